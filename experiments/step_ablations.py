"""Where the DeiT-S step's non-matmul time goes on the CPU: the forward and backward pass with one part removed.

Timing only: each ablation changes the numbers on purpose (`no_gelu` drops the MLP's GELU, `no_ln` every
LayerNorm, `no_softmax` the attention softmax, `no_bias` every Dense bias), so its saving bounds what a faster
form of that part could win. `gelu_custom_jvp` is a candidate that keeps the numbers: the exact GELU with its
derivative written out (cdf + x pdf) as a custom JVP, instead of autodiff through erf. All variants are built
like `experiments/attention_variants.py` (DeiT-S, 224 px, batch 4, loss mean(logits^2)), compiled, then run in
turns; the median of rounds 3-N is reported with the largest gradient difference from the model where the
numbers should be equal. Nothing here is used by the package (README, "Speed").

    python experiments/step_ablations.py --out=experiments/results/step_ablations.json
"""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitdistill.models import vit

import attention_variants  # experiments/, on the path when this script runs

ORIGINAL = {"gelu": vit.gelu, "layer_norm": vit._layer_norm, "dense": vit._dense, "softmax": jax.nn.softmax}
SQRT_HALF = np.float32(np.sqrt(0.5))
INV_SQRT_2PI = np.float32(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_jvp
def gelu_custom_jvp(x):
    return 0.5 * x * (1.0 + jax.lax.erf(x * SQRT_HALF.astype(x.dtype)))


@gelu_custom_jvp.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * SQRT_HALF.astype(x.dtype)))
    return x * cdf, t * (cdf + x * jnp.exp(-0.5 * x * x) * INV_SQRT_2PI.astype(x.dtype))


def _dense_without_bias(features, dtype, param_dtype, name):
    return nn.Dense(features, use_bias=False, kernel_init=vit.trunc_normal_02, dtype=dtype, param_dtype=param_dtype,
                    name=name)


PATCHES = {
    "model": {},
    "no_gelu": {"gelu": lambda x: x},
    "no_ln": {"layer_norm": lambda dtype, param_dtype, name: (lambda x: x)},
    "no_softmax": {"softmax": lambda x, axis=-1: x},
    "no_bias": {"dense": _dense_without_bias},
    "gelu_custom_jvp": {"gelu": gelu_custom_jvp},
}
SAME_NUMBERS = ("model", "gelu_custom_jvp")


def _apply(patch: dict) -> None:
    parts = {**ORIGINAL, **patch}
    vit.gelu, vit._layer_norm, vit._dense = parts["gelu"], parts["layer_norm"], parts["dense"]
    jax.nn.softmax = parts["softmax"]


def compiled_step(name: str, batch: int):
    _apply(PATCHES[name])
    try:
        return attention_variants.grad_step(batch)[:3]
    finally:
        _apply({})


def main():
    args = attention_variants.arguments(__doc__)
    steps = {name: compiled_step(name, args.batch) for name in PATCHES}
    medians = attention_variants.in_turns(steps, args.rounds)
    rows = []
    for name, (_, _, (_, grads)) in steps.items():
        row = {"variant": name, "median_s": medians[name],
               "saving_vs_model": (medians["model"] - medians[name]) / medians["model"]}
        if name in SAME_NUMBERS:
            row["max_grad_diff"] = attention_variants.max_grad_diff(grads, steps["model"][2][1])
        rows.append(row)
        print(json.dumps(row))
    if args.out:
        attention_variants.save(args.out, __doc__, args, rows)


if __name__ == "__main__":
    main()
