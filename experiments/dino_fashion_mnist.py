"""Regenerates the README's DINO tables on Fashion-MNIST: k-NN and a linear probe on a micro ViT at
initialisation and on the same ViT after DINO (teacher backbone), and k-NN on raw pixels.

    python experiments/dino_fashion_mnist.py --workdir=/tmp/vitdistill/dino_fashion_mnist

Runs `configs/dino_fashion_mnist.py` (re-running resumes) and prints a Markdown table. k-NN: k 20, T 0.07,
the first 10,000 training images as the memory bank and the first 2,000 test images as queries. The
linear probe (`configs/eval_linear.py`: CLS of the last 4 blocks through the final norm, SGD momentum 0.9,
cosine, random-resized crops and flips) trains on the same 10,000 images and is scored on the same 2,000,
for --probe_epochs (30), one head per learning rate of --probe_lrs (0.1, 0.3, 1) in one pass; every head
is reported (none is picked on the test images). Its crops default to the DINO config's global-crop scale
(0.4-1): eval_linear.py's 0.08-1, an ImageNet setting, leaves a few pixels of a 28-px image (that probe is
--probe_scale=0.08,1.0). The logistic-regression probe (`configs/eval_logreg.py`, SimCLR's and CLIP's
protocol) fits the same features of the whole images by L-BFGS, l2 chosen on 1,000 of the 10,000 training
images, and is scored once on the 2,000. The network at initialisation is the DINO run's own (same seed), saved as
`init_teacher/`. Needs `apt-get install dataset-fashion-mnist`.
"""
import argparse
import functools
import json
import os
import time

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config():
    from vitdistill import recipes

    return recipes.from_file(os.path.join(ROOT, "configs", "dino_fashion_mnist.py"))


def raw_pixel_knn(config) -> float:
    """k-NN top-1 on the raw 28x28 pixels (the images the ViT sees before resizing and normalising)."""
    from vitdistill.data.sources import get_source
    from vitdistill.evaluate.knn import knn_accuracy

    def arrays(split, limit):
        source = get_source(config.data, split, limit=limit)
        ds = tf.data.Dataset.range(source.num_examples).map(source.load).batch(1000)
        images, labels = zip(*[(b["image"].numpy(), b["label"].numpy()) for b in ds])
        images = np.concatenate(images)[..., 0].reshape(source.num_examples, -1).astype(np.float32) / 255.0
        return images, np.concatenate(labels)

    bank, bank_labels = arrays(config.data.train_split, config.knn.train_limit)
    queries, query_labels = arrays(config.data.eval_split, config.knn.eval_limit)
    return knn_accuracy(bank, bank_labels, queries, query_labels, k=config.knn.k,
                        temperature=config.knn.temperature, num_classes=10)["knn_top1"]


def training_seconds(workdir: str, seconds: float, step: int) -> float:
    """The DINO run's wall time over all the invocations that trained it (train_time.json): a re-run that
    finds it finished only evaluates and adds nothing."""
    path = os.path.join(workdir, "train_time.json")
    record = {"seconds": 0.0, "step": 0}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    if step > record["step"]:
        record = {"seconds": record["seconds"] + seconds, "step": step}
        with open(path, "w") as f:
            json.dump(record, f)
    return record["seconds"]


def save_init_teacher(config, directory: str) -> str:
    """The teacher of the DINO run's fresh state (same config and seed), as a weights directory."""
    from vitdistill import weights
    from vitdistill.methods import dino
    from vitdistill.train import loop, sharding

    if not os.path.exists(os.path.join(directory, weights.METADATA_FILE)):
        task = dino.build_task(config, directory)  # only its init is used: nothing is written
        _, shardings = loop.state_layout(task, sharding.make_mesh(), config.seed)
        state = loop.init_state(task, shardings, config.seed)
        weights.save_variables(directory, {"params": sharding.to_host(state.teacher_params)},
                               model=config.model.name, source="DINO Fashion-MNIST config at initialisation")
    return directory


def linear_probe(backbone: str, workdir: str, *, dino_config, epochs: float, lrs, scale) -> dict:
    """configs/eval_linear.py on the k-NN's images, random-resized crops of `scale`; {lr: top-1 at the end}."""
    from vitdistill import recipes, small_data
    from vitdistill.methods import train_and_evaluate

    config = recipes.linear(dino_config.model.name)
    small_data.use_small_data(config, "fashion_mnist")
    config.data.image_size = dino_config.multicrop.global_size
    config.data.train_limit = dino_config.knn.train_limit
    config.data.eval_limit = dino_config.knn.eval_limit
    config.model.init_from = backbone
    config.linear.n_last_blocks = 4
    config.linear.lrs = tuple(lrs)
    config.linear.scale = tuple(scale)
    config.epochs = epochs
    config.batch_size = 256
    config.eval_every_epochs = 0.0
    config.log_every_steps = 50
    config.progress_bar = False
    final = train_and_evaluate(config, workdir)
    return {lr: final[f"top1_head{h}"] for h, lr in enumerate(lrs)}


def logistic_probe(backbone: str, workdir: str, *, dino_config) -> dict:
    """configs/eval_logreg.py on the k-NN's images (features of the whole image, l2 chosen on 10 % of the
    10,000 training images): the chosen l2 and its test top-1."""
    from vitdistill import recipes, small_data
    from vitdistill.methods import train_and_evaluate

    config = recipes.logreg(dino_config.model.name)
    small_data.use_small_data(config, "fashion_mnist")
    config.data.image_size = dino_config.multicrop.global_size
    config.data.crop_pct = dino_config.data.crop_pct
    config.logreg.train_limit = dino_config.knn.train_limit
    config.logreg.eval_limit = dino_config.knn.eval_limit
    config.logreg.features_dir = os.path.join(workdir, "features")
    config.model.init_from = backbone
    config.progress_bar = False
    final = train_and_evaluate(config, workdir)
    return {"l2": final["l2"], "top1": final["top1"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vitdistill/dino_fashion_mnist")
    parser.add_argument("--max_steps", type=int, default=None, help="cut the run short (a smoke test)")
    parser.add_argument("--epochs", type=float, default=None, help="the DINO run's length (schedules follow it); "
                        "default: the config's 4.5")
    parser.add_argument("--probe_epochs", type=float, default=30.0)
    parser.add_argument("--probe_lrs", default="0.1,0.3,1.0", help="base learning rates (x batch/256), one head each")
    parser.add_argument("--probe_scale", default=None, help="the probe's crop scale, e.g. 0.08,1.0 (eval_linear's); "
                        "default: the DINO config's global-crop scale, the crops its network was trained on")
    args = parser.parse_args()
    from vitdistill.methods import train_and_evaluate

    config = load_config()
    if args.max_steps:
        config.max_steps = args.max_steps
    if args.epochs:
        config.epochs = args.epochs
    config.progress_bar = False
    pixels = raw_pixel_knn(config)
    start = time.time()
    final = train_and_evaluate(config, args.workdir)
    seconds = training_seconds(args.workdir, time.time() - start, final["step"])
    with open(os.path.join(args.workdir, "knn_at_init.json")) as f:
        at_init = json.load(f)["knn_top1"]
    lrs = [float(lr) for lr in args.probe_lrs.split(",")]
    scale = ([float(x) for x in args.probe_scale.split(",")] if args.probe_scale
             else list(config.multicrop.global_scale))
    probe = functools.partial(linear_probe, dino_config=config, epochs=args.probe_epochs, lrs=lrs, scale=scale)
    init_dir = save_init_teacher(config, os.path.join(args.workdir, "init_teacher"))
    tag = f"e{args.probe_epochs:g}_lr{'_'.join(f'{lr:g}' for lr in lrs)}_scale{'_'.join(f'{x:g}' for x in scale)}"
    probes = {"init": probe(init_dir, os.path.join(args.workdir, f"linear_init_{tag}")),
              "dino": probe(args.workdir, os.path.join(args.workdir, f"linear_dino_{tag}"))}
    logistic = {"init": logistic_probe(init_dir, os.path.join(args.workdir, "logreg_init"), dino_config=config),
                "dino": logistic_probe(args.workdir, os.path.join(args.workdir, "logreg_dino"), dino_config=config)}
    lr_columns = " | ".join(f"linear top-1 % (lr {lr:g})" for lr in lrs)
    rows = [("raw pixels (784-d)", pixels, None, None),
            ("micro ViT at initialisation (teacher CLS)", at_init, probes["init"], logistic["init"]),
            (f"micro ViT after DINO ({final['step']} steps, {seconds / 60:.1f} min)", final["knn_top1"],
             probes["dino"], logistic["dino"])]
    lines = [f"| features | k-NN top-1 % | logistic regression top-1 % (l2 chosen) | {lr_columns} |",
             "|---" * (3 + len(lrs)) + "|"]
    for name, knn_top1, linear, logreg in rows:
        cells = [f"{100 * linear[lr]:.2f}" if linear else "-" for lr in lrs]
        logreg_cell = f"{100 * logreg['top1']:.2f} ({logreg['l2']:g})" if logreg else "-"
        lines.append(f"| {name} | {100 * knn_top1:.2f} | {logreg_cell} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"raw_pixels": pixels, "init": at_init, "dino": final, "seconds": seconds,
                   "linear_probe": {"epochs": args.probe_epochs, "batch_size": 256, "n_last_blocks": 4, "scale": scale,
                                    **{k: {f"{lr:g}": v for lr, v in p.items()} for k, p in probes.items()}},
                   "logistic_regression": logistic,
                   "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
