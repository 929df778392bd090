"""Other formulations of the ViT's attention, timed against the model's own in one process on the CPU.

Each variant replaces `vitdistill.models.vit.Attention` while a DeiT-S is built and its forward and backward
pass (batch 4, 224 px, loss mean(logits^2)) is compiled; the compiled steps then run in turns, 12 rounds, and
the median of rounds 3-12 is reported with the largest gradient difference from the model's own. Nothing here
is used by the package: it records what was tried for the CPU step (README, "Speed").

    python experiments/attention_variants.py --out=experiments/results/attention_variants.json

Variants:
- `model`: the package's attention as it is now. Until 1c67091 (the runs in the results JSON): qkv rearranged to
  [3, b, t, h, d], einsums over b t h d, float32 softmax; since then heads first, as `heads_first` below.
- `slices`: qkv reshaped to [b, t, 3, h, d] and sliced, no transpose of the whole projection.
- `heads_first`: q, k, v transposed to [b, h, t, d] and multiplied with `@` (timm's layout).
- `own_softmax`: the model's layout with softmax written out (exp of the row-max-shifted logits over their sum).
"""
import argparse
import json
import platform
import time

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import models
from vitdistill.models import vit

MODEL_ATTENTION = vit.Attention


def _qkv(module, x):
    return vit._dense(3 * x.shape[-1], module.dtype, module.param_dtype, 'qkv')(x)


def _proj(module, out):
    return vit._dense(out.shape[-1], module.dtype, module.param_dtype, 'proj')(out)


def slices(self, x, *, train):
    heads, dim = self.num_heads, x.shape[-1]
    qkv = _qkv(self, x).reshape(*x.shape[:2], 3, heads, dim // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q * (dim // heads) ** -0.5, k), axis=-1)
    return _proj(self, jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(x.shape)), weights


def heads_first(self, x, *, train):
    heads, dim = self.num_heads, x.shape[-1]
    q, k, v = _qkv(self, x).reshape(*x.shape[:2], 3, heads, dim // heads).transpose(2, 0, 3, 1, 4)
    weights = jax.nn.softmax((q * (dim // heads) ** -0.5) @ jnp.swapaxes(k, -1, -2), axis=-1)
    return _proj(self, (weights @ v).transpose(0, 2, 1, 3).reshape(x.shape)), weights


def own_softmax(self, x, *, train):
    heads, dim = self.num_heads, x.shape[-1]
    q, k, v = einops.rearrange(_qkv(self, x), 'b t (qkv h d) -> qkv b t h d', qkv=3, h=heads)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q * (dim // heads) ** -0.5, k)
    shifted = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
    weights = shifted / shifted.sum(-1, keepdims=True)
    out = einops.rearrange(jnp.einsum('bhqk,bkhd->bqhd', weights, v), 'b t h d -> b t (h d)')
    return _proj(self, out), weights


VARIANTS = {"model": None, "slices": slices, "heads_first": heads_first, "own_softmax": own_softmax}


def compiled_step(name: str, batch: int):
    if VARIANTS[name] is not None:
        vit.Attention = type(f"Attention_{name}", (MODEL_ATTENTION,), {"__call__": nn.compact(VARIANTS[name])})
    try:
        return grad_step(batch)
    finally:
        vit.Attention = MODEL_ATTENTION


def grad_step(batch: int):
    """A DeiT-S built from the model code as it stands (patched or not), its forward and backward pass jitted
    (loss mean(logits^2), `batch` random 224-px images): (step, params, first result, compile seconds)."""
    model = models.create("deit_small_patch16_224")
    images = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 224, 224, 3)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), images[:1], train=False)["params"]

    def loss(p):
        out = model.apply({"params": p}, images, train=False)
        return jnp.mean((out[0] if isinstance(out, (tuple, list)) else out) ** 2)

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    result = jax.block_until_ready(step(params))
    return step, params, result, time.perf_counter() - start


def max_grad_diff(grads, reference) -> float:
    """The largest absolute difference between two gradient trees, leaf by leaf matched on their paths."""
    theirs = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(reference)}
    return max(float(jnp.max(jnp.abs(v - theirs[jax.tree_util.keystr(k)])))
               for k, v in jax.tree_util.tree_leaves_with_path(grads))


def arguments(doc: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--out", default="")
    return parser.parse_args()


def in_turns(steps: dict, rounds: int) -> dict:
    """Each compiled (step, params, ...) run once a round, in turns: name -> median seconds of rounds 3 on."""
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, (step, params, *_) in steps.items():
            start = time.perf_counter()
            jax.block_until_ready(step(params))
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(seconds[2:])) for name, seconds in times.items()}


def save(path: str, doc: str, args: argparse.Namespace, rows: list) -> None:
    """Appends this run's rows to the results JSON at `path` (its "runs")."""
    record = {"what": doc.splitlines()[0], "batch": args.batch, "rounds": args.rounds,
              "machine": f"{platform.processor() or platform.machine()}, {jax.device_count()} CPU device(s)",
              "jax": jax.__version__, "rows": rows}
    runs = []
    try:
        with open(path) as f:
            runs = json.load(f)["runs"]
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        json.dump({"runs": runs + [record]}, f, indent=1)
        f.write("\n")


def main():
    args = arguments(__doc__)
    steps = {name: compiled_step(name, args.batch) for name in VARIANTS}
    medians = in_turns(steps, args.rounds)
    rows = []
    for name, (_, _, (loss, grads), compile_s) in steps.items():
        diff = max_grad_diff(grads, steps["model"][2][1])
        rows.append({"variant": name, "median_s": medians[name], "compile_s": compile_s,
                     "max_grad_diff": diff, "loss": float(loss)})
        print(f"{name:12s} {rows[-1]['median_s']:.4f} s  compile {compile_s:.1f} s  max grad diff {diff:.2e}")
    if args.out:
        save(args.out, __doc__, args, rows)


if __name__ == "__main__":
    main()
