"""The train state: one pytree, updated as a whole by the jitted step and checkpointed as a whole."""
from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """Student parameters and optimiser state, with the method's extras as siblings.

    `batch_stats`: BatchNorm statistics (CNNs). `ema_params`: DeiT's optional model EMA.
    `teacher_params` and `center`: DINO's EMA teacher and output center. Unused fields
    stay empty dicts so every state has the same structure for orbax.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any = flax.struct.field(default_factory=dict)
    ema_params: Any = flax.struct.field(default_factory=dict)
    teacher_params: Any = flax.struct.field(default_factory=dict)
    center: Any = flax.struct.field(default_factory=dict)

    def model_variables(self, params=None) -> dict:
        """Variables for `module.apply`: params plus BatchNorm statistics when the model has them."""
        variables = {"params": self.params if params is None else params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables
