"""Plain float32 products (a [m, k] @ b [k, n]: the forward pass of every Dense layer and of RegNet's 1x1
convolutions) through the native kernel (vitdistill/native/cpu_conv.cc's VdMatmul, the grouped convolution's
register tile) against MKL's `cblas_sgemm`: RegNetY-16GF's and DeiT-S's shapes alone, then the train steps
built each way, in turns in one process. The gradients' products stay on MKL in both.

    python experiments/native_matmul.py [--turns=4] [--per_turn=3] [--configs=deit_s,deit_s_distilled,dino_vits16]

Shapes: medians of 5 calls after 3 warm-up calls, ours and MKL's alternating three times (jitted, batch 4's rows).
Steps: the loop's jitted step (vitdistill.bench.StepBench, batch 4); "MKL" builds it with `cpu_gemm._forward`
sending every product to MKL. Needs `pip install -e '.[cpu]'` and an AVX-512 CPU.
"""
import os
import statistics
import sys

from absl import app, flags

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 4)

# (m, k, n): RegNetY-16GF's 1x1 convolutions at each stage's width, then DeiT-S's qkv, fc1 and fc2 (788 tokens).
SHAPES = [(12544, 224, 224), (3136, 448, 448), (784, 1232, 1232), (196, 3024, 3024), (784, 1232, 3024),
          (788, 384, 1152), (788, 384, 1536), (788, 1536, 384)]


def shapes():
    import jax
    import numpy as np

    from vitdistill import cpu_gemm

    rng = np.random.default_rng(0)
    for m, k, n in SHAPES:
        a = jax.numpy.asarray(rng.standard_normal((m, k)).astype(np.float32))
        b = jax.numpy.asarray(rng.standard_normal((k, n)).astype(np.float32))
        calls = {"native": jax.jit(lambda a, b: cpu_gemm._forward(a, b, False, False)),
                 "mkl": jax.jit(lambda a, b: cpu_gemm._gemm(a, b))}
        times = {name: [] for name in calls}
        for _ in range(3):
            for name, call in calls.items():
                times[name].append(gemm_experiment.median_ms(lambda: call(a, b).block_until_ready(), calls=5))
        row = {name: statistics.median(t) for name, t in times.items()}
        gflop = 2 * m * k * n / 1e9
        print(f"{m} x {k} x {n}: " + ", ".join(f"{name} {ms:.2f} ms ({gflop / ms * 1e3:.0f} GFLOP/s)"
                                               for name, ms in row.items()), flush=True)


def build(module, native: bool):
    from vitdistill import cpu_gemm

    real = cpu_gemm._forward
    if not native:
        cpu_gemm._forward = lambda a, b, ta, tb: cpu_gemm._gemm(a, b, ta=ta, tb=tb)
    try:
        return gemm_experiment.step_bench(module)
    finally:
        cpu_gemm._forward = real


def main(argv):
    del argv
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import cpu_gemm

    if not cpu_gemm.conv_available() or cpu_gemm.status() != "mkl":
        sys.exit(f"The native product is not in use here: {cpu_gemm.status()}")
    shapes()
    gemm_experiment.ab_steps(build, "MKL", "native", "plain products")


if __name__ == "__main__":
    os.environ.pop("XLA_FLAGS", None)
    app.run(main)
