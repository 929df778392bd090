"""Where a DeiT-S train step loses to PyTorch on a small CPU host: the step's operations one by one.

    python experiments/cpu_op_ratios.py [--out=experiments/results/cpu_op_ratios.json]

Times, at the DeiT-S step's shapes in `python -m vitdistill.bench --config.batch_size=4` (4 images of 197
tokens, width 384, 6 heads), each operation's forward and backward (the vector-Jacobian product of a fixed
random cotangent) in JAX (jitted, as the model computes it) and in PyTorch (eager, as timm computes it), in a
process on all the host's cores and in one pinned to a single core before either library starts its threads
(`os.sched_setaffinity`). `cores_used` is time on one core over time on all of them: about 1 for an
operation that runs on one thread. Medians of `--reps` calls after one warm-up; ours and PyTorch's in turns
within each process, so a machine whose speed drifts still compares like with like. Prints a Markdown table
and writes the JSON.
"""
import argparse
import json
import os
import sys

sys.modules.setdefault("triton", None)  # PyTorch's triton import crashes beside TensorFlow's; unused on CPU

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T, D, H = 4, 197, 384, 6


def _median_ms(call, reps):
    from vitdistill.bench import median_seconds

    return 1e3 * median_seconds(call, reps, warmup=1)


def cases():
    """(name, JAX function of its arrays, PyTorch function of its tensors, input shapes). The last array is
    the cotangent: a case computes the forward and the gradients of <output, cotangent>."""
    import jax
    import jax.numpy as jnp
    import torch

    from vitdistill.models import vit

    def jax_grad(f, n):
        def forward_backward(*a):
            out, pullback = jax.vjp(f, *a[:n])
            return out, pullback(a[n])
        return jax.jit(forward_backward)

    def torch_grad(f):
        def run(*a):
            for t in a[:-1]:
                t.grad = None
            f(*a[:-1]).backward(a[-1])
        return run

    def ln_jax(x):
        mean = x.mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(jnp.mean(jnp.square(x - mean), -1, keepdims=True) + 1e-6)

    heads = (B * H, T, D // H)
    return [
        ("dense 788x384 @ 384x1536 (fc1)", jax_grad(lambda x, w: x @ w, 2),
         torch_grad(lambda x, w: x @ w), [(B * T, D), (D, 4 * D), (B * T, 4 * D)]),
        ("attention logits q k^T (24 heads, 197x64)", jax_grad(lambda q, k: q @ jnp.swapaxes(k, -1, -2), 2),
         torch_grad(lambda q, k: q @ k.transpose(-1, -2)), [heads, heads, (B * H, T, T)]),
        ("attention weights @ v (24 heads)", jax_grad(lambda w, v: w @ v, 2),
         torch_grad(lambda w, v: w @ v), [(B * H, T, T), heads, heads]),
        ("softmax over 24x197x197", jax_grad(lambda x: jax.nn.softmax(x, -1), 1),
         torch_grad(lambda x: x.softmax(-1)), [(B * H, T, T), (B * H, T, T)]),
        ("layer norm 788x384", jax_grad(ln_jax, 1),
         torch_grad(lambda x: torch.nn.functional.layer_norm(x, (D,), eps=1e-6)), [(B * T, D), (B * T, D)]),
        ("exact GELU 788x1536", jax_grad(vit.gelu, 1),
         torch_grad(torch.nn.functional.gelu), [(B * T, 4 * D), (B * T, 4 * D)]),
        ("bias gradient: sum over 788 rows of 1536", jax.jit(lambda g: g.sum(0)), lambda g: g.sum(0),
         [(B * T, 4 * D)]),
        ("qkv split into heads (a transpose)",
         jax.jit(lambda y: jnp.transpose(y.reshape(B, T, 3, H, D // H), (2, 0, 3, 1, 4)) * 1.0),
         lambda y: y.reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4).contiguous(), [(B * T, 3 * D)]),
    ]


def block_case():
    """One whole transformer block, ours (vitdistill.models.vit.Block) against timm's, forward and backward."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from timm.models.vision_transformer import Block as TimmBlock

    from vitdistill.models import vit

    block = vit.Block(H)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((B, T, D), np.float32))
    params = block.init(jax.random.PRNGKey(0), x)
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal((B, T, D), np.float32))

    @jax.jit
    def forward_backward(params, x, cotangent):
        out, pullback = jax.vjp(lambda p, x: block.apply(p, x, True), params, x)
        return out, pullback(cotangent)

    timm_block = TimmBlock(D, H, 4.0, qkv_bias=True)
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    tg = torch.tensor(np.asarray(cotangent))

    def torch_step():
        tx.grad = None
        timm_block.zero_grad()
        timm_block(tx).backward(tg)

    return ("whole block (ours / timm's)", lambda: jax.block_until_ready(forward_backward(params, x, cotangent)),
            torch_step)


def measure(reps: int) -> list:
    """{operation, jax_ms, torch_ms} for each case, on the cores this process may use."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    rng = np.random.default_rng(0)
    calls = []
    for name, jax_f, torch_f, shapes in cases():
        arrays = [rng.standard_normal(s, np.float32) for s in shapes]
        j = [jnp.asarray(a) for a in arrays]
        needs_grad = torch_f.__name__ == "run"
        t = [torch.tensor(a, requires_grad=needs_grad) for a in arrays[:-1]] + [torch.tensor(arrays[-1])]
        calls.append((name, lambda f=jax_f, a=j: jax.block_until_ready(f(*a)), lambda f=torch_f, a=t: f(*a)))
    calls.append(block_case())
    return [{"operation": name, "jax_ms": _median_ms(ours, reps), "torch_ms": _median_ms(theirs, reps)}
            for name, ours, theirs in calls]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=None)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the child processes
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.reps)))
        return
    import subprocess

    cores = sorted(os.sched_getaffinity(0))
    runs = {}
    for label, pinned in (("all", cores), ("one", cores[:1])):
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", f"--reps={args.reps}"],
                               preexec_fn=lambda pinned=pinned: os.sched_setaffinity(0, pinned),
                               capture_output=True, text=True, check=True)
        runs[label] = json.loads(child.stdout.strip().splitlines()[-1])
    rows = []
    for all_cores, one_core in zip(runs["all"], runs["one"]):
        row = {"operation": all_cores["operation"], "jax_ms_all": all_cores["jax_ms"],
               "torch_ms_all": all_cores["torch_ms"], "jax_ms_one": one_core["jax_ms"],
               "torch_ms_one": one_core["torch_ms"]}
        row["ratio"] = row["torch_ms_all"] / row["jax_ms_all"]
        row["jax_cores_used"] = row["jax_ms_one"] / row["jax_ms_all"]
        row["torch_cores_used"] = row["torch_ms_one"] / row["torch_ms_all"]
        rows.append(row)
    print(f"\n{len(cores)} cores; ratio = PyTorch time / ours (above 1: ours faster)\n")
    print("| operation (fwd + bwd) | ours ms | PyTorch ms | ratio | cores used, ours | cores used, PyTorch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['operation']} | {r['jax_ms_all']:.2f} | {r['torch_ms_all']:.2f} | {r['ratio']:.2f} | "
              f"{r['jax_cores_used']:.1f} | {r['torch_cores_used']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"cores": len(cores), "reps": args.reps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    main()
