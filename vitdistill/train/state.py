"""What every method's train state has: one pytree, updated as a whole by the jitted step and checkpointed
as a whole. A method subclasses it with its own fields (DeiT's model EMA, DINO's teacher and center)."""
from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
    """The step, the trained parameters and their optimiser state, and BatchNorm statistics (CNNs, DINO's
    BatchNorm head; an empty dict otherwise).

    The loop reads only `step`; a model's weights are read back from a workdir as `params` (and
    `batch_stats`) by `vitdistill.weights.read_variables`.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    batch_stats: Any = flax.struct.field(default_factory=dict)

    def model_variables(self, params=None) -> dict:
        """Variables for `module.apply`: params plus BatchNorm statistics when the model has them."""
        variables = {"params": self.params if params is None else params}
        if self.batch_stats:
            variables["batch_stats"] = self.batch_stats
        return variables
