"""RegNet's block outputs through `cpu_gemm.stored` (a custom call that takes its input's buffer: XLA:CPU
cannot fuse past it) against plain, as they were: the teacher's forward pass alone, then the distilled step,
each built both ways and timed in turns in one process.

    python experiments/stored_block_outputs.py [--turns=8] [--per_turn=3] [--configs=deit_s_distilled]

Unstored, XLA:CPU fused each block's output relu(bn(conv3) + shortcut) into the next block's shortcut add as
well as storing it for the next block's first product, so each output fusion recomputed every earlier block of
its stage. Printed: the largest fusion's operand count each way, the largest difference of the logits, and
the medians of the turns' medians (RegNetY-16GF at batch 4).
"""
from absl import flags

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 8)
FLAGS.set_default("configs", ["deit_s_distilled"])


def unstored():
    from vitdistill import cpu_gemm

    return {(cpu_gemm, "stored"): lambda x: x}


def teacher_forward(turns: int, per_turn: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vitdistill import models

    model = models.create("regnety_160")
    images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 224, 224, 3)).astype(np.float32))
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), images[:1]))()
    # Batch statistics away from (0, 1) so that every normalisation does work.
    variables = jax.tree_util.tree_map(
        lambda v: v + 0.01 * jnp.sin(jnp.arange(v.size, dtype=jnp.float32).reshape(v.shape)), variables)

    def build():
        return jax.jit(lambda v, x: model.apply(v, x, train=False)).lower(variables, images).compile()

    forms = {"plain": gemm_experiment.with_patches(unstored(), build), "stored": build()}
    for name, compiled in forms.items():
        entry = compiled.as_text().split("ENTRY")[1]
        print(f"{name}: largest fusion's operands {max(l.count('%') for l in entry.splitlines() if ' fusion(' in l)}")
    logits = {name: np.asarray(c(variables, images)) for name, c in forms.items()}
    print(f"largest |plain - stored| of the logits: {np.abs(logits['plain'] - logits['stored']).max():.3g}")
    rounds = gemm_experiment.calls_in_turns(
        {name: (lambda c=c: c(variables, images)) for name, c in forms.items()}, turns, per_turn)
    print("teacher forward: on " + gemm_experiment.turns_line(rounds), flush=True)


def main(argv):
    del argv
    gemm_experiment.require(gemm_experiment.custom_calls_in_use, "The native custom calls are not in use here")
    teacher_forward(FLAGS.turns, FLAGS.per_turn)
    gemm_experiment.ab_steps(unstored, "plain outputs", "stored outputs", "RegNet's block outputs")


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
