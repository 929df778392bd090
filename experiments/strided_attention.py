"""Attention on a CPU whose products run on MKL, three forms. `heads_first`: q, k, v rearranged out of the qkv
projection to [b, h, t, d] and the output back to [b, t, h d] by XLA's copies, batched products between. `shipped`
(`cpu_gemm.qkv_attention`): q, k, v still copied heads-first, but the output written with its heads side by side
and dq, dk, dv into their thirds of the gradient of qkv by strided products, without the copies back. `in_place`
(tried at 610f2a4, kept here): q, k, v read in place out of qkv by strided products as well.

    python experiments/strided_attention.py [--configs=deit_s] [--turns=5] [--per_turn=3] [--calls=20]
        [--out=FILE.json]

Three parts, each in turns (the forms one after another in each turn), medians of the turns:
- attention alone, forward and backward (jitted `jax.vjp`, from qkv to its gradient) at DeiT-S's block (4 x 197
  tokens, 6 heads), DeiT-B's (12 heads), DINO ViT-S/16's global crops (8 x 197) and local crops (32 x 37):
  `--calls` calls a turn, with the largest difference of each form's gradient from heads_first's;
- DeiT-S's forward and backward pass (train mode, no optimiser), `--per_turn` calls a turn, wall and process
  CPU time;
- each of --configs' steps at batch 4, `--per_turn` steps a turn, wall and process CPU time.
Runs in a one-device process (unset XLA_FLAGS' host device count) and only where `cpu_gemm.status()` is 'mkl'.
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


def in_place(qkv, num_heads):
    """The form of 610f2a4: as `cpu_gemm.qkv_attention`, but q, k and v read in place out of qkv by strided products."""
    import jax

    from vitdistill import cpu_gemm

    strided = cpu_gemm._strided

    def layouts(shape):
        b, t, three_dim = shape
        dim = three_dim // 3
        d = dim // num_heads
        items = (b, num_heads)
        thirds = [(items, part * dim, three_dim, t * three_dim, d) for part in range(3)]
        return (*thirds, (items, 0, dim, t * dim, d), (items, 0, t, num_heads * t * t, t * t), (b, t, dim, d))

    def forward(qkv):
        at_q, at_k, at_v, at_out, at_square, (b, t, dim, d) = layouts(qkv.shape)
        logits = strided(qkv, qkv, (b, num_heads, t, t), m=t, n=t, k=d, tb=True, alpha=d**-0.5, at_a=at_q,
                         at_b=at_k, at_c=at_square)
        weights = cpu_gemm.softmax_last(logits)
        out = strided(weights, qkv, (b, t, dim), m=t, n=d, k=t, at_a=at_square, at_b=at_v, at_c=at_out)
        return out, (qkv, weights)

    def backward(residuals, grad):
        qkv, weights = residuals
        at_q, at_k, at_v, at_out, at_square, (b, t, dim, d) = layouts(qkv.shape)
        grad_weights = strided(grad, qkv, weights.shape, m=t, n=t, k=d, tb=True, at_a=at_out, at_b=at_v,
                               at_c=at_square)
        grad_logits = cpu_gemm._rows_call("softmax_grad", weights.shape)(weights, grad_weights)
        out = strided(weights, grad, qkv.shape, m=t, n=d, k=t, ta=True, at_a=at_square, at_b=at_out, at_c=at_v)
        out = strided(grad_logits, qkv, qkv.shape, out, m=t, n=d, k=t, alpha=d**-0.5, at_a=at_square, at_b=at_k,
                      at_c=at_q)
        out = strided(grad_logits, qkv, qkv.shape, out, m=t, n=d, k=t, ta=True, alpha=d**-0.5, at_a=at_square,
                      at_b=at_q, at_c=at_k)
        return (out,)

    attention = jax.custom_vjp(lambda qkv: forward(qkv)[0])
    attention.defvjp(forward, backward)
    return attention(qkv)


def forms(cpu_gemm) -> dict:
    """form -> the patches (`gemm_experiment.with_patches`) that make vit.Attention trace it."""
    return {"heads_first": {(cpu_gemm, "strided_attention_enabled"): lambda qkv: False},
            "in_place": {(cpu_gemm, "qkv_attention"): in_place}, "shipped": {}}


def alone():
    import jax
    import numpy as np

    from vitdistill import cpu_gemm

    results = {}
    for name, (b, t, h, d) in SHAPES.items():
        qkv, grad = (jax.random.normal(jax.random.key(i), shape) for i, shape in enumerate(((b, t, 3 * h * d),
                                                                                           (b, t, h * d))))
        fns = {"heads_first": heads_first, "in_place": in_place, "shipped": cpu_gemm.qkv_attention}
        jitted = {form: jax.jit(lambda x, g, fn=fn: jax.vjp(lambda x: fn(x, h), x)[1](g)[0])
                  for form, fn in fns.items()}
        grads = {form: np.asarray(fn(qkv, grad)) for form, fn in jitted.items()}
        differences = {form: float(np.abs(value - grads["heads_first"]).max()) for form, value in grads.items()}
        rounds = gemm_experiment.calls_in_turns({k: (lambda f=f: f(qkv, grad)) for k, f in jitted.items()},
                                                FLAGS.turns, FLAGS.calls)
        print(f"{name} {b}x{t}, {h} heads: on " + gemm_experiment.turns_line(rounds, 2) +
              f"; largest gradient differences from heads_first {differences}", flush=True)
        results[name] = {"turns_ms": rounds, "median_ms": {k: statistics.median(v) for k, v in rounds.items()},
                         "grad_difference": differences}
    return results


def medians_line(times: dict) -> str:
    return "; ".join(f"{form} wall {statistics.median(t['wall_ms']):.1f} ms, CPU {statistics.median(t['cpu_ms']):.1f}"
                     for form, t in times.items())


def model(cpu_gemm):
    """DeiT-S's forward and backward pass at batch 4 in each form, timed in turns: form -> wall_ms, cpu_ms."""
    import time

    import jax
    import jax.numpy as jnp

    from vitdistill import models

    images = jax.random.normal(jax.random.key(0), (4, 224, 224, 3))
    passes = {}
    for form, patches in forms(cpu_gemm).items():
        vit = models.create("deit_small_patch16_224")
        params = vit.init(jax.random.key(1), images)["params"]

        def loss(params, vit=vit):
            logits = vit.apply({"params": params}, images, train=True, rngs={"dropout": jax.random.key(2)})
            return jnp.sum(logits ** 2)

        step = gemm_experiment.with_patches(patches, lambda: jax.jit(jax.value_and_grad(loss)).lower(params).compile())
        jax.block_until_ready(step(params))
        passes[form] = (step, params)
    times = {form: {"wall_ms": [], "cpu_ms": []} for form in passes}
    for _ in range(FLAGS.turns):
        for form, (step, params) in passes.items():
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(FLAGS.per_turn):
                out = step(params)
            jax.block_until_ready(out)
            times[form]["wall_ms"].append(1000 * (time.perf_counter() - wall) / FLAGS.per_turn)
            times[form]["cpu_ms"].append(1000 * (time.process_time() - cpu) / FLAGS.per_turn)
    print("DeiT-S forward + backward (batch 4): " + medians_line(times), flush=True)
    return times


def main(argv):
    del argv
    gemm_experiment.require(lambda cpu_gemm: cpu_gemm.status() == "mkl", "The products do not run on MKL here")
    from vitdistill import cpu_gemm

    results = {"gemm": cpu_gemm.status(), "turns": FLAGS.turns, "per_turn": FLAGS.per_turn, "cpus": os.cpu_count(),
               "alone": alone(), "model": model(cpu_gemm), "steps": {}}
    for name in FLAGS.configs:
        module = gemm_experiment.config_module(name)
        benches = {form: gemm_experiment.step_bench_with(module, patches) for form, patches in forms(cpu_gemm).items()}
        times = gemm_experiment.wall_and_cpu_turns(benches, FLAGS.turns, FLAGS.per_turn)
        print(f"{name} step (batch 4, {FLAGS.turns * FLAGS.per_turn} steps each): " + medians_line(times), flush=True)
        results["steps"][name] = times
    gemm_experiment.write_out(results)


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
