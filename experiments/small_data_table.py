"""The README's three-dataset table: the small-data recipes, unchanged, on digits, Fashion-MNIST and
fashion_small (Fashion-MNIST's last five classes at 14 px), none of which needs a download:

    python experiments/small_data_table.py --root=/tmp/vitdistill/small_data_table

Per data set, with no per-dataset setting (each recipe sizes itself, `vitdistill/small_data.py`):
- DINO (`configs/dino_small_data.py`): k-NN top-1 at initialisation and after 1,200 steps, and the
  logistic-regression probe (`configs/eval_logreg.py`'s protocol) of the trained teacher on the same images;
- DeiT (`configs/deit_small_data.py`): the `resnet_micro` teacher, the micro DeiT without distillation and
  the hard-distilled micro DeiT (heads averaged), top-1 on the test split.
Each part's wall time is its training's (2 CPU cores here). Results go to ROOT/results.json and the table to
ROOT/table.md; a finished part is read back, not re-run. Needs `apt-get install dataset-fashion-mnist`;
about 85 minutes on 2 CPU cores. `--datasets` and `--max_steps` (a smoke test) narrow it; after a change to
one method's rules, `--rerun=dino --previous=experiments/results/small_data_table.json` re-runs that method's
parts and takes the others from the earlier table, and `--dino_seeds=0,1 --rerun=none --previous=...` adds
DINO runs with other seeds (the table's DINO columns are then means over the seeds, each seed's gain beside).
"""
import argparse
import json
import os
import sys
import time

sys.modules.setdefault("triton", None)  # torch's triton, pulled in by nothing here, crashes beside TF

DATASETS = ("digits", "fashion_small", "fashion_mnist")


def run(config, workdir: str) -> tuple[dict, float]:
    from vitdistill.methods import train_and_evaluate

    start = time.perf_counter()
    final = train_and_evaluate(config, workdir)
    return final, time.perf_counter() - start


def logistic_probe(dino_config, backbone: str, workdir: str) -> dict:
    """configs/eval_logreg.py's protocol on the k-NN's images: l2 chosen on 10 % of the training images."""
    from vitdistill import recipes, small_data

    config = recipes.logreg(dino_config.model.name)
    small_data.use_small_data(config, dino_config.data.source)
    config.data.image_size = dino_config.data.image_size
    config.logreg.train_limit = dino_config.knn.train_limit
    config.logreg.eval_limit = dino_config.knn.eval_limit
    config.model.init_from = backbone
    config.progress_bar = False
    final, _ = run(config, workdir)
    return {"l2": final["l2"], "top1": final["top1"]}


PARTS = {"dino": ("dino",), "deit": ("deit_teacher", "deit_none", "deit_hard")}


def dino_part(seed: int) -> str:
    """The results' key of the DINO run with this seed (seed 0's is "dino", as before seeds were added)."""
    return "dino" if seed == 0 else f"dino_seed{seed}"


def dataset_parts(source: str, root: str, max_steps, previous: dict, dino_seeds=(0,)) -> dict:
    """Every measurement of one data set (each part read back from `root` when done before, or taken from
    `previous`: {part: result} of an earlier table)."""
    from vitdistill import small_data

    path = os.path.join(root, source, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    results = {**previous, **results}

    def part(name, compute):
        if name not in results:
            results[name] = compute()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                json.dump(results, f, indent=1)
        return results[name]

    def shorten(config):
        if max_steps:
            config.max_steps = max_steps
            if config.get("teacher") and config.teacher.get("train"):
                config.teacher.train.max_steps = max_steps
        config.progress_bar = False
        return config

    def dino(seed):
        def compute():
            config = shorten(small_data.small_dino_recipe(source))
            config.seed = seed
            workdir = os.path.join(root, source, dino_part(seed))
            final, seconds = run(config, workdir)
            with open(os.path.join(workdir, "knn_at_init.json")) as f:
                at_init = json.load(f)["knn_top1"]
            probe = logistic_probe(config, workdir, os.path.join(root, source, dino_part(seed) + "_logreg"))
            return {"knn_init": at_init, "knn": final["knn_top1"], "logreg": probe["top1"], "l2": probe["l2"],
                    "seconds": seconds, "steps": int(final["step"]), "seed": seed,
                    "sized": small_data.sized_settings(config)}
        return compute

    def deit(kind):
        def compute():
            config = shorten(small_data.small_deit_recipe(source, distill="none" if kind == "none" else "hard"))
            workdir = os.path.join(root, source, f"deit_{kind}")
            if kind == "teacher":
                config = config.teacher.train
                workdir = os.path.join(root, source, "deit_hard", "teacher")
            final, seconds = run(config, workdir)
            row = {"top1": final["top1"], "seconds": seconds, "steps": int(final["step"]),
                   "sized": small_data.sized_settings(config)}
            if kind == "hard":
                row.update(top1_cls=final["top1_cls"], top1_dist=final["top1_dist"])
            return row
        return compute

    for seed in dino_seeds:
        part(dino_part(seed), dino(seed))
    for kind in ("teacher", "none", "hard"):
        part(f"deit_{kind}", deit(kind))
    return results


def table(all_results: dict) -> str:
    lines = ["| data set (train images, side, classes) | DINO k-NN init -> end (gain) | DINO logistic probe | DINO min "
             "| CNN teacher | DeiT no distillation (% of teacher) | DeiT hard distillation | DeiT min (3 runs) |",
             "|---|---|---|---|---|---|---|---|"]
    for source, r in all_results.items():
        # in seed order (seed 0's run, "dino", has no "seed" of its own in tables from before seeds were added)
        runs = sorted((r[key] for key in r if key.startswith("dino")), key=lambda d: d.get("seed", 0))
        t, n, h = r["deit_teacher"], r["deit_none"], r["deit_hard"]
        minutes = (t["seconds"] + n["seconds"] + h["seconds"]) / 60

        def mean(key):
            return 100 * sum(d[key] for d in runs) / len(runs)

        gain = mean("knn") - mean("knn_init")
        seeds = "" if len(runs) == 1 else " [" + ", ".join(
            f"{100 * (d['knn'] - d['knn_init']):+.2f}" for d in runs) + f"; mean of {len(runs)} seeds]"
        probes = "" if len(runs) == 1 else " [" + ", ".join(f"{100 * d['logreg']:.2f}" for d in runs) + "]"
        lines.append(
            f"| {source} ({r['facts']}) | {mean('knn_init'):.2f} -> {mean('knn'):.2f} ({gain:+.2f}){seeds} "
            f"| {mean('logreg'):.2f}{probes} | {max(d['seconds'] for d in runs) / 60:.1f} "
            f"| {100 * t['top1']:.2f} | {100 * n['top1']:.2f} ({100 * n['top1'] / t['top1']:.0f} %) "
            f"| {100 * h['top1']:.2f} | {minutes:.1f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/vitdistill/small_data_table")
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated, of " + ", ".join(DATASETS))
    parser.add_argument("--max_steps", type=int, default=None, help="cut every run short (a smoke test)")
    parser.add_argument("--rerun", default=",".join(PARTS), help="methods to run (comma-separated, of dino, deit, or "
                        "none); the others' parts are taken from --previous")
    parser.add_argument("--dino_seeds", default="0", help="comma-separated seeds of the DINO runs (seed 0's part is "
                        "the one --rerun and --previous speak of)")
    parser.add_argument("--previous", default=None, help="an earlier results.json (the table's other parts)")
    args = parser.parse_args()
    rerun = [] if args.rerun == "none" else args.rerun.split(",")
    try:
        dino_seeds = tuple(int(seed) for seed in args.dino_seeds.split(","))
    except ValueError:
        sys.exit(f"--dino_seeds: {args.dino_seeds!r} is not a comma-separated list of integers")
    if any(method not in PARTS for method in rerun):
        sys.exit(f"--rerun: {args.rerun!r} is not a comma-separated list of {', '.join(PARTS)}")
    kept = [part for method in PARTS if method not in rerun for part in PARTS[method]]
    if kept and not args.previous:
        sys.exit(f"--rerun={args.rerun} leaves {', '.join(kept)} to an earlier table: pass --previous=PATH")
    earlier = json.load(open(args.previous)) if kept else {}
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import small_data

    all_results = {}
    for source in args.datasets.split(","):
        if source not in DATASETS:
            sys.exit(f"--datasets: {source!r} is not one of {', '.join(DATASETS)}")
        if kept and any(part not in earlier.get(source, {}) for part in kept):
            sys.exit(f"--previous={args.previous} has no {', '.join(kept)} for {source}")
        previous = {part: earlier[source][part] for part in kept}
        if "dino" not in rerun:  # runs with other seeds, too, come from the earlier table where it has them
            previous.update({dino_part(seed): earlier[source][dino_part(seed)] for seed in dino_seeds
                             if seed != 0 and dino_part(seed) in earlier.get(source, {})})
        results = dataset_parts(source, args.root, args.max_steps, previous, dino_seeds)
        config = small_data.small_dino_recipe(source)
        facts = small_data.facts_of(config.data)
        results["facts"] = f"{facts.train_size:,}, {facts.image_side} px, {facts.num_classes}"
        all_results[source] = results
    with open(os.path.join(args.root, "results.json"), "w") as f:
        json.dump(all_results, f, indent=1)
    text = table(all_results)
    with open(os.path.join(args.root, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
