"""Where one image's DINO multi-crop time goes on one host core, stage by stage, with Pillow's own ops.

    python experiments/dino_view_costs.py [--images=40] [--num_local=8,10]
        [--out=experiments/results/dino_view_costs.json]

The training pipeline (`config.data.image_ops='pil'`) applies DINO's augmentations with the Pillow calls
torchvision makes (`vitdistill.data.pil_ops.dino_view`), so its images per second per core are bounded by these
calls. This splits them: decoding the JPEG (once per image), the geometric part (crop, bicubic resize, flip) and
the photometric part (colour jitter, grayscale, Gaussian blur, solarisation), which a device could take over. The
choices are the pipeline's own (`multicrop.view_choices`, drawn in TF from per-image seeds), on scikit-learn's two
sample JPEGs (the bench's and the PyTorch reference's images). Each stage is timed on its own, one view at a time,
in one thread; the figure per image sums 2 global views and `num_local` local ones; medians over `--images` draws.
"""
import argparse
import glob
import io
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def sample_jpegs():
    import sklearn.datasets

    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
    return [open(path, "rb").read() for path in sorted(glob.glob(os.path.join(folder, "*.jpg")))]


def choices_for(image_uint8, seed, num_local):
    """The choices of one image's views as the DINO pipeline draws them (multicrop_views' settings), as numpy."""
    import tensorflow as tf

    from vitdistill.data import multicrop
    from vitdistill.data.deit_transforms import split_seed

    image = tf.constant(image_uint8)
    seeds = split_seed(tf.constant([seed, 0], tf.int64), 2 + num_local)
    views = []
    for index in range(2 + num_local):
        if index < 2:
            settings = dict(scale=(0.4, 1.0), blur_prob=(1.0, 0.1)[index], solarize_prob=(0.0, 0.2)[index])
        else:
            settings = dict(scale=(0.05, 0.4), blur_prob=0.5, solarize_prob=0.0)
        c = multicrop.view_choices(image, seeds[index], **settings)
        jitter = c.pop("jitter")
        view = {k: v.numpy() for k, v in c.items()}
        view["order"] = jitter["order"].numpy()
        view["factors"] = [float(jitter[op].numpy()) for op in ("brightness", "contrast", "saturation", "hue")]
        view["size"] = 224 if index < 2 else 96
        views.append(view)
    return views


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def one_image(jpeg: bytes, views) -> dict:
    """Seconds of each stage for one image's views, each stage alone on the previous stage's output."""
    from PIL import Image, ImageFilter, ImageOps

    from vitdistill.data import pil_ops

    def decode(data):
        picture = Image.open(io.BytesIO(data))
        picture.load()
        return picture.convert("RGB")

    picture, t_decode = timed(decode, jpeg)
    seconds = {"decode": t_decode, "crop_resize_flip": 0.0, "color_jitter": 0.0, "grayscale": 0.0, "blur": 0.0,
               "solarize": 0.0}
    for v in views:
        def geometric(p):
            p = pil_ops.resized_crop(p, v["crop"], v["size"], "bicubic")
            return p.transpose(Image.FLIP_LEFT_RIGHT) if v["flip"] else p

        view, t = timed(geometric, picture)
        seconds["crop_resize_flip"] += t
        if v["color_jitter"]:
            def jitter(p):
                for index in v["order"]:
                    p = pil_ops.adjust(p, pil_ops.JITTER_OPS[index], v["factors"][index])
                return p

            view, t = timed(jitter, view)
            seconds["color_jitter"] += t
        if v["grayscale"]:
            view, t = timed(pil_ops.grayscale, view)
            seconds["grayscale"] += t
        if v["blur"]:
            view, t = timed(lambda p: p.filter(ImageFilter.GaussianBlur(radius=float(v["blur_sigma"]))), view)
            seconds["blur"] += t
        if v["solarize"]:
            view, t = timed(lambda p: ImageOps.solarize(p, 128), view)
            seconds["solarize"] += t
        np.asarray(view, np.uint8)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--num_local", default="8,10")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import tensorflow as tf
    from PIL import Image

    tf.config.set_visible_devices([], "GPU")
    tf.config.threading.set_intra_op_parallelism_threads(1)
    jpegs = sample_jpegs()
    arrays = [np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs]
    results = {}
    for num_local in (int(n) for n in args.num_local.split(",")):
        draws = [(i % len(jpegs), choices_for(arrays[i % len(jpegs)], i, num_local)) for i in range(args.images)]
        for j, views in draws[:2]:
            one_image(jpegs[j], views)  # warm-up
        per_image = [one_image(jpegs[j], views) for j, views in draws]
        stages = {k: 1000 * statistics.median(s[k] for s in per_image) for k in per_image[0]}
        totals = [sum(s.values()) for s in per_image]
        photometric = [s["color_jitter"] + s["grayscale"] + s["blur"] + s["solarize"] for s in per_image]
        row = {"num_local": num_local, "images": args.images, "median_ms": stages,
               "total_ms": 1000 * statistics.median(totals),
               "photometric_ms": 1000 * statistics.median(photometric),
               "photometric_share": statistics.median(p / t for p, t in zip(photometric, totals)),
               "images_per_sec_per_core": 1 / statistics.median(totals),
               "without_photometric_images_per_sec_per_core":
                   1 / statistics.median(t - p for t, p in zip(totals, photometric))}
        results[f"2x224+{num_local}x96"] = row
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
