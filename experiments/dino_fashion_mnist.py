"""Regenerates the README's DINO table on Fashion-MNIST: k-NN on raw pixels, on a micro ViT at
initialisation, and on the same ViT after DINO (teacher backbone), with the same k-NN protocol.

    python experiments/dino_fashion_mnist.py --workdir=/tmp/vitdistill/dino_fashion_mnist

Runs `configs/dino_fashion_mnist.py` (re-running resumes) and prints a Markdown table; k-NN uses
k 20, T 0.07, the first 10,000 training images as the memory bank and the first 2,000 test images as
queries. Needs `apt-get install dataset-fashion-mnist`.
"""
import argparse
import importlib.util
import json
import os
import time

import numpy as np
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config():
    path = os.path.join(ROOT, "configs", "dino_fashion_mnist.py")
    spec = importlib.util.spec_from_file_location("dino_fashion_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/vitdistill/dino_fashion_mnist")
    parser.add_argument("--max_steps", type=int, default=None, help="cut the run short (a smoke test)")
    args = parser.parse_args()
    from vitdistill.methods import train_and_evaluate

    config = load_config()
    if args.max_steps:
        config.max_steps = args.max_steps
    config.progress_bar = False
    pixels = raw_pixel_knn(config)
    start = time.time()
    final = train_and_evaluate(config, args.workdir)
    seconds = time.time() - start
    with open(os.path.join(args.workdir, "knn_at_init.json")) as f:
        at_init = json.load(f)["knn_top1"]
    rows = [("raw pixels (784-d)", pixels), ("micro ViT at initialisation (teacher CLS)", at_init),
            (f"micro ViT after DINO ({final['step']} steps, {seconds / 60:.1f} min)", final["knn_top1"])]
    table = "\n".join(["| features | k-NN top-1 % |", "|---|---|"] + [f"| {n} | {100 * v:.2f} |" for n, v in rows])
    print(table)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"raw_pixels": pixels, "init": at_init, "dino": final, "seconds": seconds, "table": table}, f,
                  indent=2)


if __name__ == "__main__":
    main()
