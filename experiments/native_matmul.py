"""Float32 products (every Dense layer's forward pass and both its gradients, RegNet's 1x1 convolutions,
attention's batched products) through the native kernel (vitdistill/native/cpu_conv.cc's VdMatmul, the grouped
convolution's register tile) against MKL's `cblas_sgemm`: RegNetY-16GF's, DeiT-S's and DINO's shapes alone, then
the train steps built each way, in turns in one process.

    python experiments/native_matmul.py [--baseline=mkl|forward|batched] [--turns=4] [--per_turn=3]
        [--configs=deit_s,deit_s_distilled,dino_vits16]

Shapes: medians of 5 calls after 3 warm-up calls, ours and MKL's alternating three times (jitted, batch 4's
rows; ta / tb: the operand stored transposed, as the gradients' products take them; a leading count: a batch of
products, attention's per image and head). Steps: the loop's jitted step (vitdistill.bench.StepBench, batch 4),
every product native, against a baseline built with `cpu_gemm._op_product` sending every product to MKL (`mkl`),
only the transposed ones of two matrices and the batches (`forward`: the Dense forward pass native), or only
the batches (`batched`: attention's products on MKL). Needs `pip install -e '.[cpu]'` and an AVX-512 CPU.
"""
import statistics

from absl import flags

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 4)
flags.DEFINE_enum("baseline", "mkl", ["mkl", "forward", "batched"],
                  "What the native products are timed against in the steps.")

# (m, k, n, ta, tb): RegNetY-16GF's 1x1 convolutions at each stage's width; DeiT-S's qkv, fc1 and fc2 (788 tokens)
# forward, then their gradients: the input's (grad @ wᵀ, tb) and the kernel's (xᵀ @ grad, ta).
SHAPES = [(12544, 224, 224, False, False), (3136, 448, 448, False, False), (784, 1232, 1232, False, False),
          (196, 3024, 3024, False, False), (784, 1232, 3024, False, False), (788, 384, 1152, False, False),
          (788, 384, 1536, False, False), (788, 1536, 384, False, False), (788, 1152, 384, False, True),
          (788, 1536, 384, False, True), (788, 384, 1536, False, True), (384, 788, 1152, True, False),
          (384, 788, 1536, True, False), (1536, 788, 384, True, False)]
# (batch, m, k, n, ta, tb): attention's products, forward and gradients, at batch 4 (6 heads): DeiT-S's 197 tokens,
# DINO's local crops' 37 (8 crops an image).
BATCHED = [(24, 197, 64, 197, False, True), (24, 197, 197, 64, False, False), (24, 197, 197, 64, True, False),
           (192, 37, 64, 37, False, True), (192, 37, 37, 64, False, False), (192, 37, 37, 64, True, False)]


def shapes():
    import jax
    import numpy as np

    from vitdistill import cpu_gemm

    rng = np.random.default_rng(0)
    for batch, m, k, n, ta, tb in [(1, *shape) for shape in SHAPES] + BATCHED:
        lead = (batch,) if batch > 1 else ()
        a = jax.numpy.asarray(rng.standard_normal((*lead, k, m) if ta else (*lead, m, k)).astype(np.float32))
        b = jax.numpy.asarray(rng.standard_normal((*lead, n, k) if tb else (*lead, k, n)).astype(np.float32))
        calls = {"native": jax.jit(lambda a, b: cpu_gemm._native_product(a, b, ta, tb)),
                 "mkl": jax.jit(lambda a, b: cpu_gemm._gemm(a, b, ta=ta, tb=tb))}
        times = {name: [] for name in calls}
        for _ in range(3):
            for name, call in calls.items():
                times[name].append(gemm_experiment.median_ms(lambda: call(a, b).block_until_ready(), calls=5))
        row = {name: statistics.median(t) for name, t in times.items()}
        gflop = 2 * batch * m * k * n / 1e9
        print(f"{batch} x " * (batch > 1) + f"{m} x {k} x {n}{' ta' if ta else ''}{' tb' if tb else ''}: " + ", ".join(f"{name} {ms:.2f} ms ({gflop / ms * 1e3:.0f} GFLOP/s)"
                                               for name, ms in row.items()), flush=True)


def baseline_products():
    from vitdistill import cpu_gemm

    real = cpu_gemm._op_product

    def baseline(a, b, ta, tb):
        on_native = a.ndim == 2 and (FLAGS.baseline == "batched" or FLAGS.baseline == "forward" and not (ta or tb))
        return real(a, b, ta, tb) if on_native else cpu_gemm._gemm(a, b, ta=ta, tb=tb)

    return {(cpu_gemm, "_op_product"): baseline}


def main(argv):
    del argv
    gemm_experiment.require(lambda cpu_gemm: cpu_gemm.status() == "native" and cpu_gemm.mkl_loaded(),
                            "Needs the native products (an AVX-512F CPU) and MKL (pip install -e '.[cpu]') here")
    shapes()
    before = {"mkl": "MKL", "forward": "MKL's gradient and batched products", "batched": "MKL's batched products"}
    gemm_experiment.ab_steps(baseline_products, before[FLAGS.baseline], "native", "products")


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
