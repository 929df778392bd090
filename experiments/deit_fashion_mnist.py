"""Regenerates the README's DeiT distillation table on Fashion-MNIST (the paper's ablation, CPU-sized).

    python experiments/deit_fashion_mnist.py --workdir=/tmp/vitdistill/deit_fashion_mnist

Trains the ResNet teacher once, then three micro DeiT students for the same number of steps: without
distillation, with soft distillation (tau 3, lambda 0.1 as in the paper) and with hard distillation
(alpha 0.5), all from `configs/fashion_mnist_deit.py`. Prints a Markdown table and writes results.json.
Re-running resumes or reuses finished runs. Needs `apt-get install dataset-fashion-mnist`.
"""
import argparse
import json
import os
import time

from ml_collections import ConfigDict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(arg):
    from vitdistill import recipes

    return recipes.from_file(os.path.join(ROOT, "configs", "fashion_mnist_deit.py"), arg)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vitdistill/deit_fashion_mnist")
    parser.add_argument("--max_steps", type=int, default=None, help="cut every run short (a smoke test)")
    args = parser.parse_args()
    from vitdistill.methods import train_and_evaluate

    results, seconds = {}, {}
    teacher_dir = os.path.join(args.workdir, "teacher")
    runs = [("teacher", teacher_dir)] + [(kind, os.path.join(args.workdir, kind)) for kind in ("none", "soft", "hard")]
    for name, workdir in runs:
        config = load_config(name)
        if name in ("soft", "hard"):
            config.teacher.train = ConfigDict()
            config.teacher.checkpoint = teacher_dir
        if args.max_steps:
            config.max_steps = args.max_steps
        config.progress_bar = False
        start = time.time()
        results[name] = train_and_evaluate(config, workdir)
        seconds[name] = time.time() - start

    def pct(value):
        return f"{100 * value:.2f}"

    rows = [
        ("ResNet teacher (resnet_micro)", pct(results["teacher"]["top1"]), "-", "-"),
        ("DeiT micro, no distillation", pct(results["none"]["top1"]), "-", "-"),
    ]
    for kind in ("soft", "hard"):
        r = results[kind]
        rows.append((f"DeiT micro distilled, {kind}", pct(r["top1_cls"]), pct(r["top1_dist"]), pct(r["top1"])))
    lines = ["| model | class head | distillation head | heads averaged |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    table = "\n".join(lines)
    print(table)
    print("wall seconds per run:", {k: round(v) for k, v in seconds.items()})
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"results": results, "seconds": seconds, "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
