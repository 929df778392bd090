"""The ViT's per-token Dense layers on rows [b t, c] (the model, `vit._on_rows`) against on tokens [b, t, c].

Both compute the same numbers; what differs is what XLA:CPU builds for the backward pass. On tokens, the
weight gradient contracts two dimensions (b and t), and XLA:CPU materialises a transposed copy of the
activation gradient for it ([1536, b t] for fc1, [384, b t] after each LayerNorm, [1152, b t] for qkv), for
fc1 computing GELU's backward fusion twice. On rows it is one plain contraction. The script builds DeiT-S
forward and backward (`experiments/attention_variants.py`'s `grad_step`: 224 px, loss mean(logits^2)) both
ways, runs them in turns and reports the medians of rounds 3-N, the largest gradient difference, and the
transposed copies in each compiled program. Then the same for the loop's own jitted train step
(`vitdistill.bench`'s StepBench: shardings, donation, the method's loss and optimiser) of each `--configs`
entry (a config file and its overrides) at `--batch`.

    python experiments/token_rows.py --out=experiments/results/token_rows.json
"""
import argparse
import importlib.util
import os
import re
import statistics
import tempfile
import time

from vitdistill.models import vit

import attention_variants  # experiments/, on the path when this script runs

ON_ROWS = vit._on_rows
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _on_tokens(layer, x):
    return layer(x)


def both_ways(build) -> dict:
    """{"rows": build(), "tokens": build()}, the second with the Dense layers applied to [b, t, c] tokens."""
    built = {}
    for name, apply in (("rows", ON_ROWS), ("tokens", _on_tokens)):
        vit._on_rows = apply
        try:
            built[name] = build()
        finally:
            vit._on_rows = ON_ROWS
    return built


def transposed_copies(step, params, tokens: int) -> int:
    """Copy fusions in the compiled program whose output puts the b t token rows last: [features, b t]."""
    text = step.lower(params).compile().as_text()
    return sum(1 for line in text.splitlines()
               if re.match(rf"\s*%copy\w*(\.\d+)? = f32\[\d+,{tokens}\]", line))


CONFIGS = ("configs/deit_s_distilled.py distill.kind=none", "configs/dino_vits16.py")


def train_steps(entry: str, batch: int, rounds: int) -> list:
    """The loop's train step for one config entry built both ways in this process, timed in turns."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import bench, methods, small_data

    path, *overrides = entry.split()
    spec = importlib.util.spec_from_file_location("config", os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.update_from_flattened_dict(dict(o.split("=", 1) for o in overrides))
    config.batch_size = batch
    small_data.size_to_data(config)
    config = bench.bench_config(config)
    with tempfile.TemporaryDirectory() as workdir:
        benches = both_ways(lambda: bench.StepBench(methods.get(config.method).build_task(config, workdir), config))
        times = {name: [] for name in benches}
        for _ in range(rounds):
            for name, b in benches.items():
                start = time.perf_counter()
                b._run()
                times[name].append(time.perf_counter() - start)
    rows = []
    for name, b in benches.items():
        text = b.compiled.as_text()
        copies = sum(1 for line in text.splitlines() if re.match(r"\s*%copy\w*(\.\d+)? = f32\[\d+,\d+\]\{1,0\} fusion",
                                                                 line))
        rows.append({"variant": f"{entry}: train step, {name}", "median_s": statistics.median(times[name][2:]),
                     "seconds": times[name], "compile_s": round(b.compile_s, 2), "two_d_copy_fusions": copies})
        print(rows[-1]["variant"], round(rows[-1]["median_s"], 4), "s,", copies, "2-D copy fusions", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated; empty: the model only")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    steps, rows = both_ways(lambda: attention_variants.grad_step(args.batch)), []
    medians = attention_variants.in_turns({name: s[:2] for name, s in steps.items()}, args.rounds)
    reference = steps["tokens"][2][1]
    for name, (step, params, (loss, grads), compile_s) in steps.items():
        rows.append({"variant": name, "median_s": medians[name], "compile_s": round(compile_s, 2),
                     "loss": float(loss), "max_grad_diff": attention_variants.max_grad_diff(grads, reference),
                     "transposed_copies": transposed_copies(step, params, args.batch * 197)})
        print(rows[-1], flush=True)
    for entry in filter(None, args.configs.split(",")):
        rows += train_steps(entry, args.batch, args.rounds)
    if args.out:
        attention_variants.save(args.out, __doc__, args, rows)


if __name__ == "__main__":
    main()
