"""Softmax and LayerNorm through the native row kernels (vitdistill.cpu_gemm.softmax / layer_norm,
vitdistill/native/cpu_rows.cc) against JAX's softmax and Flax's LayerNorm, with the products on MKL in both:
the operations alone, with PyTorch's for reference, then the train steps built each way, in turns in one process.

    python experiments/row_kernels.py [--turns=4] [--per_turn=3] [--configs=deit_s,deit_s_distilled,dino_vits16]

Operations: forward and backward (the vector-Jacobian product of a fixed random cotangent) at a DeiT-S block's
shapes at batch 4 (softmax over 4 x 6 x 197 x 197 attention logits, LayerNorm over 4 x 197 x 384 tokens),
jitted; PyTorch's eager. Medians of 50 calls, ours and PyTorch's alternating twice. Steps: the loop's jitted step
(vitdistill.bench.StepBench, batch 4); "XLA" builds it with `cpu_gemm.softmax_last` as `jax.nn.softmax` and
`vit._layer_norm` as Flax's. Medians of the turns' medians. Needs `pip install -e '.[cpu]'`.
"""
import statistics

from absl import flags

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 4)


def operations():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from vitdistill import cpu_gemm

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 6, 197, 197)).astype(np.float32) * 3
    tokens = rng.standard_normal((4, 197, 384)).astype(np.float32)
    scale, bias = (rng.standard_normal(384).astype(np.float32) for _ in range(2))

    def jax_vjp(f, args, cotangent):
        step = jax.jit(lambda *a: (lambda out: (out[0], out[1](cotangent)))(jax.vjp(f, *a)))
        args = [jnp.asarray(a) for a in args]
        return lambda: jax.block_until_ready(step(*args))

    def torch_vjp(f, args, cotangent):
        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        grad = torch.from_numpy(cotangent)

        def run():
            for t in tensors:
                t.grad = None
            f(*tensors).backward(grad)
        return run

    flax_ln = nn.LayerNorm(epsilon=1e-6)
    cases = {
        "softmax 4x6x197x197": (
            jax_vjp(cpu_gemm.softmax, [logits], jnp.asarray(logits)),
            jax_vjp(lambda x: jax.nn.softmax(x, axis=-1), [logits], jnp.asarray(logits)),
            torch_vjp(lambda x: x.softmax(-1), [logits], logits)),
        "layer norm 4x197x384": (
            jax_vjp(lambda x, s, b: cpu_gemm.layer_norm(x, s, b, 1e-6), [tokens, scale, bias], jnp.asarray(tokens)),
            jax_vjp(lambda x, s, b: flax_ln.apply({"params": {"scale": s, "bias": b}}, x), [tokens, scale, bias],
                    jnp.asarray(tokens)),
            torch_vjp(lambda x, s, b: torch.nn.functional.layer_norm(x, (384,), s, b, 1e-6), [tokens, scale, bias],
                      tokens)),
    }
    rows = {}
    for name, (native, xla, reference) in cases.items():
        times = {"native": [], "xla": [], "torch": []}
        for _ in range(2):
            for key, call in (("native", native), ("xla", xla), ("torch", reference)):
                times[key].append(gemm_experiment.median_ms(call, 50))
        rows[name] = {k + "_ms": statistics.median(v) for k, v in times.items()}
        print(name + ": " + ", ".join(f"{k} {v:.3f}" for k, v in rows[name].items()), flush=True)
    return rows


def xla_rows():
    import jax
    import flax.linen as nn

    from vitdistill import cpu_gemm
    from vitdistill.models import vit

    def flax_layer_norm(dtype, param_dtype, name):
        return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name)

    return {(cpu_gemm, "softmax_last"): lambda x: jax.nn.softmax(x, axis=-1), (vit, "_layer_norm"): flax_layer_norm}


def main(argv):
    del argv
    gemm_experiment.require(gemm_experiment.custom_calls_in_use, "The native kernels are not in use here")
    operations()
    gemm_experiment.ab_steps(xla_rows, "XLA", "native", "softmax and LayerNorm")


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
