"""Attention on a CPU whose products run on MKL: the heads-first batched products (q, k, v rearranged out of the
qkv projection to [b, h, t, d], the output back to [b, t, h d]) against `cpu_gemm.qkv_attention`, whose
strided products read q, k, v in place and write the heads side by side (and the gradient of qkv likewise).

    python experiments/strided_attention.py [--configs=deit_s] [--turns=5] [--per_turn=3] [--calls=20]
        [--out=FILE.json]

First attention alone, forward and backward (jitted `jax.vjp`, from qkv to its gradient) at DeiT-S's block
(4 x 197 tokens, 6 heads), DeiT-B's (12 heads), DINO ViT-S/16's global crops (8 x 197) and local crops (32 x 37):
turns of `--calls` calls each, the turns' medians, and the largest difference of the gradients. Then each of
--configs' steps at batch 4 traced both ways (`strided_attention_enabled` patched off for "heads_first"), in
turns: each step's wall time and the process's CPU time, medians. Runs in a one-device process (unset
XLA_FLAGS' host device count) and only where `cpu_gemm.status()` is 'mkl'.
"""
import os
import statistics

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = gemm_experiment.FLAGS
FLAGS.set_default("configs", ["deit_s"])
gemm_experiment.flags.DEFINE_integer("calls", 20, "Timed calls a turn of attention alone.")

SHAPES = {"deit_s": (4, 197, 6, 64), "deit_b": (4, 197, 12, 64), "dino_global": (8, 197, 6, 64),
          "dino_local": (32, 37, 6, 64)}  # batch, tokens, heads, head size


def heads_first(qkv, num_heads):
    """vit.Attention's explicit form without dropout."""
    import einops

    from vitdistill import cpu_gemm

    q, k, v = einops.rearrange(qkv, 'b t (qkv h d) -> qkv b h t d', qkv=3, h=num_heads)
    logits = cpu_gemm.batched_matmul(q * q.shape[-1]**-0.5, k, tb=True)
    return einops.rearrange(cpu_gemm.batched_matmul(cpu_gemm.softmax_last(logits), v), 'b h t d -> b t (h d)')


def alone():
    import jax
    import numpy as np

    from vitdistill import cpu_gemm

    results = {}
    for name, (b, t, h, d) in SHAPES.items():
        qkv, grad = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(((b, t, 3 * h * d),
                                                                                           (b, t, h * d))))
        forms = {form: jax.jit(lambda x, g, fn=fn: jax.vjp(lambda x: fn(x, h), x)[1](g)[0])
                 for form, fn in (("heads_first", heads_first), ("strided", cpu_gemm.qkv_attention))}
        strided, explicit = (np.asarray(forms[form](qkv, grad)) for form in ("strided", "heads_first"))
        difference = float(np.abs(strided - explicit).max())
        rounds = gemm_experiment.calls_in_turns({k: (lambda f=f: f(qkv, grad)) for k, f in forms.items()}, FLAGS.turns,
                                                FLAGS.calls)
        print(f"{name} {b}x{t}, {h} heads: on " + gemm_experiment.turns_line(rounds, 2) +
              f"; largest gradient difference {difference:.2g}", flush=True)
        results[name] = {"turns_ms": rounds, "median_ms": {k: statistics.median(v) for k, v in rounds.items()},
                         "grad_difference": difference}
    return results


def main(argv):
    del argv
    gemm_experiment.require(lambda cpu_gemm: cpu_gemm.status() == "mkl", "The products do not run on MKL here")
    from vitdistill import cpu_gemm

    results = {"gemm": cpu_gemm.status(), "turns": FLAGS.turns, "cpus": os.cpu_count(), "alone": alone(), "steps": {}}
    for name in FLAGS.configs:
        module = gemm_experiment.config_module(name)
        benches = {"heads_first": gemm_experiment.step_bench_with(
            module, {(cpu_gemm, "strided_attention_enabled"): lambda qkv: False}),
            "strided": gemm_experiment.step_bench(module)}
        times = gemm_experiment.wall_and_cpu_turns(benches, FLAGS.turns, FLAGS.per_turn)
        medians = {form: {kind: statistics.median(values) for kind, values in kinds.items()}
                   for form, kinds in times.items()}
        print(f"{name} step (batch 4, {FLAGS.turns * FLAGS.per_turn} steps each): " + "; ".join(
            f"{form} wall {m['wall_ms']:.1f} ms, CPU {m['cpu_ms']:.1f} ms" for form, m in medians.items()), flush=True)
        results["steps"][name] = {"steps_ms": times, "median_ms": medians}
    gemm_experiment.write_out(results)


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
