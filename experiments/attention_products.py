"""Attention's two batched products (q kᵀ and the weights times v) through MKL (vitdistill.cpu_gemm), against
XLA's batched dots with the Dense layers on MKL in both, in turns in one process.

    python experiments/attention_products.py [--turns=4] [--per_turn=3] [--configs=deit_s,dino_vits16]

The loop's steps (vitdistill.bench.StepBench, batch 4); "XLA" builds them with `cpu_gemm.batched_matmul`
replaced by the plain `a @ b`. Medians of the turns' medians. Needs `pip install -e '.[cpu]'`.
"""
import importlib
import os
import statistics
import sys
import tempfile

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FLAGS = flags.FLAGS
flags.DEFINE_integer("turns", 4, "Turns of the two steps.")
flags.DEFINE_integer("per_turn", 3, "Timed steps per turn.")
flags.DEFINE_list("configs", ["deit_s", "dino_vits16"], "configs/NAME.py to build steps of.")


def xla_batched_matmul(a, b, *, tb=False):
    import jax.numpy as jnp

    return a @ (jnp.swapaxes(b, -1, -2) if tb else b)


def build(module, attention_on_mkl: bool):
    from vitdistill import bench, cpu_gemm, methods

    config = bench.bench_config(module.get_config(None))
    config.batch_size = 4
    real = cpu_gemm.batched_matmul
    if not attention_on_mkl:
        cpu_gemm.batched_matmul = xla_batched_matmul
    try:
        return bench.StepBench(methods.get(config.method).build_task(config, tempfile.mkdtemp()), config)
    finally:
        cpu_gemm.batched_matmul = real


def main(argv):
    del argv
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import cpu_gemm

    if cpu_gemm.status() != "mkl":
        sys.exit(f"MKL's products are not in use here: {cpu_gemm.status()}")
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    for name in FLAGS.configs:
        module = importlib.import_module(name)
        steps = {"XLA": build(module, False), "MKL": build(module, True)}
        rounds = {k: [] for k in steps}
        for _ in range(FLAGS.turns):
            for k, step in steps.items():
                rounds[k].append(1000 * step.time(FLAGS.per_turn))
        print(name + ": attention's products on " + "; on ".join(
            f"{k} {statistics.median(v):.1f} ms (turns {', '.join(f'{x:.0f}' for x in v)})"
            for k, v in rounds.items()), flush=True)


if __name__ == "__main__":
    os.environ.pop("XLA_FLAGS", None)
    app.run(main)
