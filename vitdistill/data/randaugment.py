"""timm's RandAugment `rand-m9-mstd0.5-inc1` (DeiT's `--aa`) in TensorFlow, one image at a time.

Each op mirrors the PIL operation timm calls (`timm/data/auto_augment.py`) on float32 RGB images
in 0..255 units, so that `tf.data` can run it in graph mode, and returns the uint8 levels PIL
stores (as float32): the ImageEnhance blends (libImaging/Blend.c) and the affine warps
(Geometry.c) truncate towards zero and clip, grayscale is PIL's integer `L` ((19595 R + 38470 G
+ 7471 B + 2^15) >> 16), the SMOOTH filter of Sharpness rounds. So the next op, like PIL's, sees
integer levels (Solarize's threshold 128 included). The ops PIL defines by a 256-entry lookup
table (AutoContrast, Equalize, Posterize) round their input to integer levels. Geometric ops reproduce
PIL's affine warp (`Image.transform`, libImaging/Geometry.c), edge rule included, bicubic by
default as timm under DeiT's `interpolation='bicubic'` (PIL's cubic convolution with a = -1, the
result clipped to 0..255) or bilinear.
"""
import math

import tensorflow as tf

from vitdistill.data import IMAGENET_MEAN

# timm fills the area uncovered by geometric ops with the dataset mean: round(255 * mean).
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)

# timm's _RAND_INCREASING_TRANSFORMS, in its order; `tf.switch_case` indexes this tuple.
OP_NAMES = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)

MAX_LEVEL = 10.0  # timm's _LEVEL_DENOM: magnitudes are clipped to [0, 10] and divided by it
TRANSLATE_PCT = 0.45  # timm's default `translate_pct` for TranslateXRel/YRel



def _clip(image):
    return tf.clip_by_value(image, 0.0, 255.0)


def _levels(image):
    """The uint8 levels PIL would hold, as int32."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.int32)


def _apply_lut(levels, lut):
    """Look up `levels` [H, W, 3] in a per-channel table `lut` [3, 256]."""
    flat = tf.reshape(tf.cast(lut, tf.float32), [-1])
    return tf.gather(flat, levels + 256 * tf.range(3))


def luma(image):
    """PIL's grayscale `L` of an RGB image (`convert("L")`: the integer ITU-R 601-2 weights, rounded), as
    float32 levels of shape [H, W, 1]."""
    r, g, b = tf.unstack(tf.cast(_levels(image), tf.int32), axis=-1)
    return tf.cast(tf.bitwise.right_shift(r * 19595 + g * 38470 + b * 7471 + 0x8000, 16), tf.float32)[..., None]


def _uint8(image):
    """PIL's store of a float result into uint8 (Blend.c, Geometry.c): clipped to 0..255, truncated."""
    return tf.floor(_clip(image))


def _blend(degenerate, image, factor):
    """PIL's `Image.blend(degenerate, image, factor)`, the core of every ImageEnhance op."""
    return _uint8(degenerate + tf.cast(factor, tf.float32) * (image - degenerate))


# ----- photometric ops (PIL ImageOps / ImageEnhance) ------------------------------------------

def auto_contrast(image):
    """ImageOps.autocontrast: stretch each channel's [min, max] level range to [0, 255]."""
    levels = _levels(image)
    lo = tf.reduce_min(levels, axis=[0, 1])
    hi = tf.reduce_max(levels, axis=[0, 1])
    scale = 255.0 / tf.cast(tf.maximum(hi - lo, 1), tf.float64)
    offset = -tf.cast(lo, tf.float64) * scale
    i = tf.range(256, dtype=tf.float64)[None, :]
    # PIL: int(i * scale + offset) clamped to [0, 255]; truncation equals floor once clamped at 0.
    stretched = tf.clip_by_value(tf.floor(i * scale[:, None] + offset[:, None]), 0.0, 255.0)
    lut = tf.where((hi > lo)[:, None], stretched, tf.broadcast_to(i, [3, 256]))
    return _apply_lut(levels, lut)


def equalize(image):
    """ImageOps.equalize, per channel, with PIL's integer step arithmetic."""
    levels = _levels(image)
    channel_levels = tf.reshape(levels + 256 * tf.range(3), [-1])
    hist = tf.reshape(tf.math.bincount(channel_levels, minlength=768, maxlength=768, dtype=tf.int64), [3, 256])
    top_count = tf.gather(hist, tf.reduce_max(levels, axis=[0, 1]), batch_dims=1)  # the last non-empty bin
    step = (tf.reduce_sum(hist, axis=1) - top_count) // 255
    cumulative = tf.cumsum(hist, axis=1, exclusive=True)
    equalized = tf.minimum((step[:, None] // 2 + cumulative) // tf.maximum(step, 1)[:, None], 255)
    keep = (tf.math.count_nonzero(hist, axis=1) <= 1) | (step == 0)
    identity = tf.broadcast_to(tf.range(256, dtype=tf.int64), [3, 256])
    return _apply_lut(levels, tf.where(keep[:, None], identity, equalized))


def invert(image):
    """ImageOps.invert."""
    return 255.0 - image


def posterize(image, bits):
    """ImageOps.posterize: keep the `bits` most significant bits.

    0 bits (PosterizeIncreasing at magnitude 10) gives black, as the Pillow of DeiT's time did;
    Pillow 13 raises for it, so timm's own RandAugment fails on about 1 image in 650 there.
    """
    bits = tf.cast(bits, tf.int32)
    shift = 8 - tf.clip_by_value(bits, 0, 8)
    kept = tf.bitwise.left_shift(tf.bitwise.right_shift(_levels(image), shift), shift)
    return tf.where(bits >= 8, image, tf.cast(kept, tf.float32))  # timm returns the image for bits >= 8


def solarize(image, threshold):
    """ImageOps.solarize: invert the values at or above `threshold`."""
    return tf.where(image < tf.cast(threshold, tf.float32), image, 255.0 - image)


def solarize_add(image, add, threshold=128):
    """timm's solarize_add: add `add` to the values below `threshold`, saturating at 255."""
    added = tf.minimum(image + tf.cast(add, tf.float32), 255.0)
    return tf.where(image < tf.cast(threshold, tf.float32), added, image)


def color(image, factor):
    """ImageEnhance.Color (saturation): blend with the grayscale image."""
    return _blend(luma(image), image, factor)


def contrast(image, factor):
    """ImageEnhance.Contrast: blend with the mean of the grayscale levels, rounded to a level as PIL does."""
    mean = tf.floor(tf.reduce_mean(luma(image)) + 0.5)
    return _blend(mean, image, factor)


def brightness(image, factor):
    """ImageEnhance.Brightness: blend with black."""
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter, whose output keeps the 1-pixel border."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    smooth = tf.floor(_clip(smooth) + 0.5)  # Filter.c rounds its 8-bit result
    border = [[1, 1], [1, 1], [0, 0]]
    interior = tf.pad(tf.ones_like(smooth[..., :1]), border)
    degenerate = interior * tf.pad(smooth, border) + (1.0 - interior) * image
    return _blend(degenerate, image, factor)


# ----- geometric ops (PIL Image.transform, AFFINE) ------------------------------------------

INTERPOLATIONS = ("bicubic", "bilinear")
WARP_NUDGE = 1e-3  # levels; see _affine


def _check_interpolation(interpolation):
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"RandAugment interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")


def _bicubic_warp(image, src_x, src_y):
    """PIL's bicubic sample of `image` at index coordinates (src_x, src_y) [H, W], edges replicated.

    Geometry.c's BICUBIC is cubic convolution with a = -1 on the 4 x 4 neighbours around
    floor(src); taps outside the image repeat the edge pixel (XCLIP, and the row fallbacks, which
    amount to clamping). Separable, so the 16 weights are products of per-axis weights.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    channels = image.shape[-1]
    fx, fy = tf.floor(src_x), tf.floor(src_y)
    dx, dy = src_x - fx, src_y - fy

    def weights(d):  # the coefficients of v1..v4 in BICUBIC(v, v1, v2, v3, v4, d)
        d2, d3 = d * d, d * d * d
        return (-d + 2.0 * d2 - d3, 1.0 - 2.0 * d2 + d3, d + d2 - d3, d3 - d2)

    def taps(f, size):
        base = tf.cast(f, tf.int32)
        return [tf.clip_by_value(base + k, 0, size - 1) for k in (-1, 0, 1, 2)]

    xs, ys = taps(fx, width), taps(fy, height)
    wx, wy = weights(dx), weights(dy)
    index = tf.stack([row * width + col for row in ys for col in xs])  # [16, H, W], one gather
    weight = tf.stack([w_row * w_col for w_row in wy for w_col in wx])
    neighbours = tf.gather(tf.reshape(image, [-1, channels]), index)  # [16, H, W, C]
    out = tf.reduce_sum(weight[..., None] * neighbours, axis=0)
    return tf.clip_by_value(out, 0.0, 255.0)


def _affine(image, matrix, fill, interpolation="bicubic"):
    """Warp with the output->input `matrix` (a0, a1, a2, b0, b1, b2) in pixel-index coordinates.

    PIL's rule: an output pixel whose source point lies outside the image (pixel centres at +0.5,
    so outside [-0.5, size - 0.5) in index units) takes the fill colour; every other one is
    interpolated with the edge pixels replicated (for bilinear, TF's NEAREST fill mode).
    """
    _check_interpolation(interpolation)
    a0, a1, a2, b0, b1, b2 = [tf.cast(m, tf.float32) for m in matrix]
    shape = tf.shape(image)
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    y = tf.range(height)[:, None]
    x = tf.range(width)[None, :]
    src_x = a0 * x + a1 * y + a2
    src_y = b0 * x + b1 * y + b2
    inside = (src_x >= -0.5) & (src_x < width - 0.5) & (src_y >= -0.5) & (src_y < height - 0.5)
    if interpolation == "bicubic":
        warped = _bicubic_warp(image, src_x, src_y)
    else:
        warped = tf.raw_ops.ImageProjectiveTransformV3(
            images=image[None], transforms=tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])[None],
            output_shape=shape[:2], fill_value=0.0, interpolation="BILINEAR", fill_mode="NEAREST")[0]
    # A level that is an integer in PIL's double arithmetic (a flat region: weights summing to 1) can come out
    # a hair below it in float32; the nudge keeps it from truncating to the level below.
    filled = tf.where(inside[..., None], _uint8(warped + WARP_NUDGE), tf.constant(fill, tf.float32))
    return tf.ensure_shape(filled, image.shape)


def rotate(image, degrees, fill=FILL, interpolation="bicubic"):
    """Image.rotate(degrees) about the centre, counter-clockwise, same size."""
    theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    cos, sin = tf.cos(theta), tf.sin(theta)
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    cy, cx = (size[0] - 1.0) / 2.0, (size[1] - 1.0) / 2.0  # PIL's (w/2, h/2) in pixel-centre coordinates
    matrix = [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy]
    return _affine(image, matrix, fill, interpolation)


def shear_x(image, factor, fill=FILL, interpolation="bicubic"):
    """Image.transform(AFFINE, (1, factor, 0, 0, 1, 0)); PIL samples at pixel centres, hence the 0.5."""
    factor = tf.cast(factor, tf.float32)
    return _affine(image, [1.0, factor, 0.5 * factor, 0.0, 1.0, 0.0], fill, interpolation)


def shear_y(image, factor, fill=FILL, interpolation="bicubic"):
    """Image.transform(AFFINE, (1, 0, 0, factor, 1, 0))."""
    factor = tf.cast(factor, tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, factor, 1.0, 0.5 * factor], fill, interpolation)


def translate_x_rel(image, pct, fill=FILL, interpolation="bicubic"):
    """Shift the content left by `pct` of the width (timm's translate_x_rel)."""
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, [1.0, 0.0, pixels, 0.0, 1.0, 0.0], fill, interpolation)


def translate_y_rel(image, pct, fill=FILL, interpolation="bicubic"):
    """Shift the content up by `pct` of the height (timm's translate_y_rel)."""
    pixels = tf.cast(pct, tf.float32) * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, pixels], fill, interpolation)


# ----- magnitude -> op argument (timm's *_level_to_arg; `sign` is timm's _randomly_negate) -----

def rotate_level(magnitude, sign):
    return sign * (magnitude / MAX_LEVEL) * 30.0


def enhance_increasing_level(magnitude, sign):
    return tf.maximum(0.1, 1.0 + sign * (magnitude / MAX_LEVEL) * 0.9)


def posterize_increasing_level(magnitude):
    return 4 - tf.cast((magnitude / MAX_LEVEL) * 4, tf.int32)


def solarize_increasing_level(magnitude):
    return 256 - tf.minimum(256, tf.cast((magnitude / MAX_LEVEL) * 256, tf.int32))


def solarize_add_level(magnitude):
    return tf.minimum(128, tf.cast((magnitude / MAX_LEVEL) * 110, tf.int32))


def shear_level(magnitude, sign):
    return sign * (magnitude / MAX_LEVEL) * 0.3


def translate_rel_level(magnitude, sign):
    return sign * (magnitude / MAX_LEVEL) * TRANSLATE_PCT


def apply_op(image, op_index, magnitude, sign, *, fill=FILL, interpolation="bicubic"):
    """Apply op `OP_NAMES[op_index]` at `magnitude` (0..10) with `sign` (+1 or -1) where timm negates.

    `interpolation` ("bicubic" or "bilinear") resamples the geometric ops, as timm's hparams do.
    """
    _check_interpolation(interpolation)
    m = tf.cast(magnitude, tf.float32)
    s = tf.cast(sign, tf.float32)
    branches = [
        lambda: auto_contrast(image),
        lambda: equalize(image),
        lambda: invert(image),
        lambda: rotate(image, rotate_level(m, s), fill, interpolation),
        lambda: posterize(image, posterize_increasing_level(m)),
        lambda: solarize(image, solarize_increasing_level(m)),
        lambda: solarize_add(image, solarize_add_level(m)),
        lambda: color(image, enhance_increasing_level(m, s)),
        lambda: contrast(image, enhance_increasing_level(m, s)),
        lambda: brightness(image, enhance_increasing_level(m, s)),
        lambda: sharpness(image, enhance_increasing_level(m, s)),
        lambda: shear_x(image, shear_level(m, s), fill, interpolation),
        lambda: shear_y(image, shear_level(m, s), fill, interpolation),
        lambda: translate_x_rel(image, translate_rel_level(m, s), fill, interpolation),
        lambda: translate_y_rel(image, translate_rel_level(m, s), fill, interpolation),
    ]
    return tf.ensure_shape(tf.switch_case(tf.cast(op_index, tf.int32), branches), image.shape)


def sample_params(seed, *, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
    """The random choices of one RandAugment call, each of shape [num_ops].

    `op`: index into OP_NAMES, uniform with replacement; `apply`: True with probability `prob`;
    `magnitude`: N(magnitude, magnitude_std) (uniform on [0, magnitude] for an infinite std)
    clipped to [0, 10]; `sign`: -1 or +1 with probability 1/2 each.
    """
    op_seed, apply_seed, magnitude_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    shape = [num_ops]
    if math.isinf(magnitude_std):
        magnitudes = tf.random.stateless_uniform(shape, magnitude_seed, 0.0, magnitude)
    else:
        magnitudes = magnitude + magnitude_std * tf.random.stateless_normal(shape, magnitude_seed)
    return {
        "op": tf.random.stateless_uniform(shape, op_seed, 0, len(OP_NAMES), dtype=tf.int32),
        "apply": tf.random.stateless_uniform(shape, apply_seed) < prob,
        "magnitude": tf.clip_by_value(magnitudes, 0.0, MAX_LEVEL),
        "sign": tf.where(tf.random.stateless_uniform(shape, sign_seed) > 0.5, -1.0, 1.0),
    }


def rand_augment(image, seed, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5, fill=FILL,
                 interpolation="bicubic"):
    """timm RandAugment(rand_augment_ops(increasing=True), num_ops) on one float image in 0..255.

    `interpolation` is timm's `hparams['interpolation']`: the train transform's own (DeiT: bicubic).
    """
    _check_interpolation(interpolation)
    image = tf.cast(image, tf.float32)
    params = sample_params(seed, num_ops=num_ops, magnitude=magnitude, magnitude_std=magnitude_std, prob=prob)
    for k in range(num_ops):
        image = _maybe_apply_op(image, params["apply"][k], params["op"][k], params["magnitude"][k],
                                params["sign"][k], fill, interpolation)
    return image


def _maybe_apply_op(image, apply, op_index, magnitude, sign, fill, interpolation):
    return tf.cond(apply, lambda: apply_op(image, op_index, magnitude, sign, fill=fill, interpolation=interpolation),
                   lambda: image)
