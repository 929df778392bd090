"""DINO's multi-crop augmentation (`DataAugmentationDINO` in facebookresearch/dino main_dino.py) in TF.

Every view: random resized crop (bicubic), horizontal flip, colour jitter with probability 0.8,
grayscale with probability 0.2, Gaussian blur, solarisation (second global view only), normalise.
The photometric ops follow torchvision's PIL code paths (ImageEnhance), in float32 0..255 units.
"""
import math

import tensorflow as tf

from vitdistill.data import randaugment
from vitdistill.data.deit_transforms import coin, normalize, resized_crop, sample_crop_box, split_seed


def grayscale(image):
    """torchvision RandomGrayscale's op: PIL's convert('L') repeated over 3 channels."""
    return tf.tile(randaugment.luma(image), [1, 1, 3])


def adjust_hue(image, delta):
    """Rotate the hue by `delta` of a full turn (torchvision adjust_hue; PIL does it on 8-bit HSV)."""
    return tf.clip_by_value(tf.image.adjust_hue(image / 255.0, delta) * 255.0, 0.0, 255.0)


def solarize(image, threshold=128):
    """DINO's Solarization: PIL ImageOps.solarize, values >= threshold become 255 - value."""
    return randaugment.solarize(image, threshold)


def gaussian_blur(image, sigma, *, max_sigma=2.0):
    """A Gaussian blur of standard deviation `sigma`, edges replicated.

    DINO calls PIL's GaussianBlur(radius=sigma), which approximates this Gaussian with three box
    blurs; here the kernel is the sampled Gaussian truncated at radius ceil(3 * sigma), inside a
    static window of radius ceil(3 * max_sigma) so that the graph has fixed shapes.
    """
    window = math.ceil(3 * max_sigma)
    sigma = tf.cast(sigma, tf.float32)
    taps = tf.range(-window, window + 1, dtype=tf.float32)
    weights = tf.exp(-0.5 * tf.square(taps / sigma)) * tf.cast(tf.abs(taps) <= tf.math.ceil(3 * sigma), tf.float32)
    weights /= tf.reduce_sum(weights)
    channels = 3  # RGB, as everywhere in this package
    shape = tf.shape(image)
    rows = tf.clip_by_value(tf.range(-window, shape[0] + window), 0, shape[0] - 1)
    cols = tf.clip_by_value(tf.range(-window, shape[1] + window), 0, shape[1] - 1)
    padded = tf.gather(tf.gather(image, rows, axis=0), cols, axis=1)[None]
    vertical = tf.tile(weights[:, None, None, None], [1, 1, channels, 1])
    horizontal = tf.tile(weights[None, :, None, None], [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, vertical, strides=[1, 1, 1, 1], padding="VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, horizontal, strides=[1, 1, 1, 1], padding="VALID")
    return tf.ensure_shape(blurred[0], image.shape)


def sample_color_jitter_params(seed, *, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision ColorJitter.get_params: a random order of the 4 ops and their factors.

    brightness, contrast, saturation ~ U(max(0, 1 - s), 1 + s); hue ~ U(-hue, hue).
    """
    order_seed, b_seed, c_seed, s_seed, h_seed = split_seed(seed, 5)

    def factor(s, strength):
        return tf.random.stateless_uniform([], s, max(0.0, 1.0 - strength), 1.0 + strength)

    return {
        "order": tf.argsort(tf.random.stateless_uniform([4], order_seed)),
        "brightness": factor(b_seed, brightness),
        "contrast": factor(c_seed, contrast),
        "saturation": factor(s_seed, saturation),
        "hue": tf.random.stateless_uniform([], h_seed, -hue, hue),
    }


def color_jitter(image, seed, *, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision ColorJitter on a PIL image: the 4 adjustments in a random order (a strength of 0 skips one)."""
    params = sample_color_jitter_params(seed, brightness=brightness, contrast=contrast, saturation=saturation,
                                        hue=hue)
    for k in range(4):
        image = _jitter_step(image, params, k, active=(brightness > 0, contrast > 0, saturation > 0, hue > 0))
    return image


def _jitter_step(image, params, k, active):
    ops = [
        lambda: randaugment.brightness(image, params["brightness"]),
        lambda: randaugment.contrast(image, params["contrast"]),
        lambda: randaugment.color(image, params["saturation"]),
        lambda: adjust_hue(image, params["hue"]),
    ]
    branches = [op if on else (lambda: image) for op, on in zip(ops, active)]
    return tf.ensure_shape(tf.switch_case(params["order"][k], branches), image.shape)


def _maybe(apply, fn, image):
    return tf.cond(apply, lambda: fn(image), lambda: image)


def augment_view(image_uint8, seed, *, size, scale, hflip=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
                 solarize_prob=0.0, interpolation="bicubic"):
    """One DINO view -> (normalised float32 [size, size, 3], the choices made, for tests and debugging)."""
    crop_seed, flip_seed, jitter_seed, jitter_params_seed, gray_seed, blur_seed, sigma_seed, solarize_seed = (
        split_seed(seed, 8))
    shape = tf.shape(image_uint8)
    box = sample_crop_box(crop_seed, shape[0], shape[1], scale=scale)
    applied = {
        "flip": coin(flip_seed, hflip),
        "color_jitter": coin(jitter_seed, jitter_prob),
        "grayscale": coin(gray_seed, grayscale_prob),
        "blur": coin(blur_seed, blur_prob),
        "solarize": coin(solarize_seed, solarize_prob),
    }
    sigma = tf.random.stateless_uniform([], sigma_seed, blur_sigma[0], blur_sigma[1])

    image = resized_crop(image_uint8, box, size, method=interpolation)
    image = _maybe(applied["flip"], lambda x: x[:, ::-1], image)
    image = _maybe(applied["color_jitter"], lambda x: color_jitter(
        x, jitter_params_seed, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue), image)
    image = _maybe(applied["grayscale"], grayscale, image)
    image = _maybe(applied["blur"], lambda x: gaussian_blur(x, sigma, max_sigma=blur_sigma[1]), image)
    image = _maybe(applied["solarize"], solarize, image)
    return normalize(image), {**applied, "crop": tf.stack(box), "blur_sigma": sigma}


NUM_GLOBAL_VIEWS = 2


def view_names(num_local: int) -> list:
    """The views of one image in the order the student sees them: the global crops, then the local ones."""
    return [f"global_{g}" for g in range(NUM_GLOBAL_VIEWS)] + [f"local_{i}" for i in range(num_local)]


def multicrop_views(image_uint8, seed, *, global_size=224, local_size=96, global_scale=(0.4, 1.0),
                    local_scale=(0.05, 0.4), num_local=8, hflip=0.5, jitter_prob=0.8, brightness=0.4,
                    contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2, global_blur_probs=(1.0, 0.1),
                    local_blur_prob=0.5, blur_sigma=(0.1, 2.0), global_solarize_probs=(0.0, 0.2),
                    local_solarize_prob=0.0, interpolation="bicubic", return_params=False):
    """DINO's views of one image: {'global_0', 'global_1', 'local_0', ..., 'local_{num_local-1}'}.

    `global_*_probs` hold one probability per global view. With `return_params`, returns
    (views, params) where params[name] records each view's crop box and which ops were applied.
    """
    for name, probs in (("global_blur_probs", global_blur_probs), ("global_solarize_probs", global_solarize_probs)):
        if len(probs) != NUM_GLOBAL_VIEWS:
            raise ValueError(f"{name}={probs} must hold one probability for each of the {NUM_GLOBAL_VIEWS} global "
                             "views")
    shared = dict(hflip=hflip, jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
                  saturation=saturation, hue=hue, grayscale_prob=grayscale_prob, blur_sigma=blur_sigma,
                  interpolation=interpolation)
    names = view_names(num_local)
    view_seeds = split_seed(seed, len(names))
    views, params = {}, {}
    for index, name in enumerate(names):
        if index < NUM_GLOBAL_VIEWS:
            settings = dict(size=global_size, scale=global_scale, blur_prob=global_blur_probs[index],
                            solarize_prob=global_solarize_probs[index])
        else:
            settings = dict(size=local_size, scale=local_scale, blur_prob=local_blur_prob,
                            solarize_prob=local_solarize_prob)
        views[name], params[name] = augment_view(image_uint8, view_seeds[index], **settings, **shared)
    return (views, params) if return_params else views
