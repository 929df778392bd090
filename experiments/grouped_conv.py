"""RegNetY-16GF's grouped 3x3 convolutions through the native kernel (vitdistill.cpu_gemm.grouped_conv,
vitdistill/native/cpu_conv.cc) against the per-group lax convolutions it replaces, and PyTorch's (oneDNN): each
of the teacher's shapes alone, the teacher's forward pass, then the distilled train step built each way, in
turns in one process.

    python experiments/grouped_conv.py [--turns=4] [--per_turn=3] [--configs=deit_s_distilled]

Shapes at batch 4 (the bench's), NHWC in JAX and NCHW in PyTorch, each with its count in the teacher; medians
of 15 calls after a warm-up, the three alternating. PyTorch runs with OMP_WAIT_POLICY=PASSIVE (set here before
it loads): its OpenMP threads otherwise spin after each call and take the 2-core host from the next JAX call
(ours then measured 0.43-0.97x PyTorch's, against 0.92-1.24x with passive threads). The teacher: timm's
regnety_160 in eval mode under no_grad against ours jitted, medians of 7 calls. Steps: the loop's jitted step
(vitdistill.bench.StepBench, batch 4); "lax" builds it with `cpu_gemm.grouped_conv_supported` returning
False. Needs `pip install -e '.[cpu]'` and an AVX-512 or AVX2 CPU (VITDISTILL_NATIVE_ISA=avx2 picks the AVX2 kernel
on an AVX-512 CPU).
"""
import os
import statistics
import sys

from absl import flags

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 4)
FLAGS.set_default("configs", ["deit_s_distilled"])

# (height = width, channels, stride, count in RegNetY-16GF): each stage's first block strides.
SHAPES = [(112, 224, 2, 1), (56, 224, 1, 1), (56, 448, 2, 1), (28, 448, 1, 3), (28, 1232, 2, 1), (14, 1232, 1, 10),
          (14, 3024, 2, 1)]


def _median_ms(call, reps):
    from vitdistill.bench import median_seconds

    return 1e3 * median_seconds(call, reps, warmup=1)


def operations():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from vitdistill import cpu_gemm

    rng = np.random.default_rng(0)
    totals = {"native": 0.0, "lax": 0.0, "torch": 0.0}
    for size, channels, stride, count in SHAPES:
        x = rng.standard_normal((4, size, size, channels)).astype(np.float32)
        w = (rng.standard_normal((3, 3, 112, channels)) * 0.03).astype(np.float32)
        native = jax.jit(lambda a, b: cpu_gemm.grouped_conv(a, b, stride, 1))
        lax = jax.jit(lambda a, b: cpu_gemm.per_group_conv(a, b, stride, 1))
        xs, ws = jnp.asarray(x), jnp.asarray(w)
        tx, tw = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
        calls = {"native": lambda: native(xs, ws).block_until_ready(), "lax": lambda: lax(xs, ws).block_until_ready(),
                 "torch": lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1,
                                                             groups=channels // 112)}
        error = float(np.abs(np.asarray(native(xs, ws)) - np.asarray(lax(xs, ws))).max())
        times = {k: [] for k in calls}
        with torch.no_grad():
            for _ in range(3):
                for key, call in calls.items():
                    times[key].append(_median_ms(call, 5))
        row = {k: statistics.median(v) for k, v in times.items()}
        out = (size + 2 - 3) // stride + 1
        gflop = 4 * out * out * channels * 112 * 9 * 2 / 1e9
        for key in totals:
            totals[key] += count * row[key]
        print(f"{size}x{size}x{channels} stride {stride} (x{count}): " + ", ".join(
            f"{k} {v:.2f} ms ({gflop / v * 1e3:.0f} GFLOP/s)" for k, v in row.items()) + f"; max |native - lax| "
            f"{error:.1e}", flush=True)
    print("the teacher's grouped convolutions, a step: " + ", ".join(f"{k} {v:.1f} ms" for k, v in totals.items()),
          flush=True)


def teacher():
    import jax
    import numpy as np
    import timm
    import torch

    from vitdistill import cpu_gemm
    from vitdistill.models import regnet

    model = regnet.RegNet()
    images = np.random.default_rng(1).standard_normal((4, 224, 224, 3)).astype(np.float32)
    variables = jax.jit(model.init)(jax.random.key(0), images[:1])
    real = cpu_gemm.grouped_conv_supported
    forwards = {}
    for name in ("native", "lax"):
        if name == "lax":
            cpu_gemm.grouped_conv_supported = lambda *a: False
        try:
            forwards[name] = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).compile()
        finally:
            cpu_gemm.grouped_conv_supported = real
    reference = timm.create_model("regnety_160", num_classes=1000).eval()
    timages = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    calls = {"native": lambda: forwards["native"](variables, images).block_until_ready(),
             "lax": lambda: forwards["lax"](variables, images).block_until_ready(),
             "torch": lambda: reference(timages)}
    times = {k: [] for k in calls}
    with torch.no_grad():
        for _ in range(3):
            for key, call in calls.items():
                times[key].append(_median_ms(call, 3))
    print("RegNetY-16GF forward, batch 4: " + ", ".join(f"{k} {statistics.median(v):.1f} ms (turns "
          + ", ".join(f"{t:.0f}" for t in v) + ")" for k, v in times.items()), flush=True)


def per_group():
    from vitdistill import cpu_gemm

    return {(cpu_gemm, "grouped_conv_supported"): lambda *a: False}


def main(argv):
    del argv
    gemm_experiment.require(lambda cpu_gemm: cpu_gemm.conv_available() and cpu_gemm.mkl_loaded(),
                            "Needs the native kernels and MKL (pip install -e '.[cpu]') here")
    operations()
    teacher()
    gemm_experiment.ab_steps(per_group, "lax", "native", "grouped convolutions")


if __name__ == "__main__":
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    sys.modules.setdefault("triton", None)
    gemm_experiment.run_on_one_device(main)
