"""Helpers shared by the augmentation tests: small real images, tf.data runners, rate checks."""
import functools
import math

import numpy as np
import tensorflow as tf


@functools.lru_cache(maxsize=None)
def _sample_images():
    from sklearn.datasets import load_sample_images

    return dict(zip(("china", "flower"), load_sample_images().images))


def sample_image(name="china", size=(96, 64)):
    """scikit-learn's china.jpg / flower.jpg, resized to `size` = (width, height) by PIL, uint8 HxWx3."""
    from PIL import Image

    return np.asarray(Image.fromarray(_sample_images()[name]).resize(size, Image.BICUBIC))


def in_tf_data(fn, *args):
    """`fn(*args)` computed inside a tf.data map (graph mode), as numpy."""
    dataset = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(fn)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset)))


def map_in_tf_data(fn, *stacked_args):
    """`fn` on each slice of `stacked_args` along axis 0, inside one tf.data map, stacked as numpy."""
    dataset = tf.data.Dataset.from_tensor_slices(tuple(tf.convert_to_tensor(a) for a in stacked_args)).map(fn)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset.batch(len(stacked_args[0])))))


def eager(fn, *args):
    return tf.nest.map_structure(lambda t: np.asarray(t), fn(*args))


def over_seeds(fn, count):
    """`fn(seed)` for the seeds (0, 0) .. (count - 1, 0), run in tf.data and stacked along a leading axis."""
    dataset = tf.data.Dataset.range(count).map(
        lambda i: fn(tf.stack([i, tf.constant(0, tf.int64)])), num_parallel_calls=2, deterministic=True)
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(dataset.batch(count))))


def assert_rate(hits, p, name=""):
    """A binomial frequency within 4.5 standard deviations of `p` (false alarm ~ 1e-5 per check)."""
    hits = np.asarray(hits, bool).ravel()
    n = hits.size
    tolerance = 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9
    assert abs(hits.mean() - p) <= tolerance, f"{name}: rate {hits.mean():.4f} over {n}, expected {p} ± {tolerance:.4f}"
    return hits.mean()


def unnormalize(image):
    from vitdistill.data import IMAGENET_MEAN, IMAGENET_STD

    return np.asarray(image) * 255.0 * np.array(IMAGENET_STD) + 255.0 * np.array(IMAGENET_MEAN)


def pil_resize_reference(image, size, resample="bicubic"):
    """Pillow's `Image.resize(size=(width, height))` as Pillow up to 12 runs it (torchvision's resize in
    DeiT's and DINO's time): the horizontal pass, stored as uint8, then the vertical pass. Built from two
    one-axis Pillow resizes, each a single Resample.c pass in every Pillow version; Pillow 13 may run
    the vertical pass first when the height shrinks much more than the width (python-pillow/Pillow#9549)."""
    from PIL import Image

    filters = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}
    picture = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    width, height = size
    return picture.resize((width, picture.height), filters[resample]).resize((width, height), filters[resample])
