"""Attention's two batched products (q kᵀ and the weights times v) through MKL (vitdistill.cpu_gemm), against
XLA's batched dots with the Dense layers on MKL in both, in turns in one process.

    python experiments/attention_products.py [--turns=4] [--per_turn=3] [--configs=deit_s,dino_vits16]

The loop's steps (vitdistill.bench.StepBench, batch 4); "XLA" builds them with `cpu_gemm.batched_matmul`
replaced by the plain `a @ b`. Medians of the turns' medians. Needs `pip install -e '.[cpu]'`.
"""
from absl import flags

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 4)
FLAGS.set_default("configs", ["deit_s", "dino_vits16"])


def xla_batched_matmul(a, b, *, tb=False):
    import jax.numpy as jnp

    return a @ (jnp.swapaxes(b, -1, -2) if tb else b)


def xla_attention():
    from vitdistill import cpu_gemm

    return {(cpu_gemm, "batched_matmul"): xla_batched_matmul}


def main(argv):
    del argv
    gemm_experiment.require(gemm_experiment.custom_calls_in_use, "The custom calls are not in use here")
    gemm_experiment.ab_steps(xla_attention, "XLA", "MKL", "attention's products")


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
