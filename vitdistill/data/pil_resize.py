"""PIL's `Image.resize` for 8-bit images, bit for bit, as TensorFlow ops usable in `tf.data`.

torchvision resizes PIL images with `Image.resize(size, BICUBIC | BILINEAR)`, which runs Pillow's
libImaging/Resample.c. Per axis, every output pixel `o` reads the input window around its centre
`(o + 0.5) * scale`, with the filter widened by `max(scale, 1)` when shrinking (an antialiasing
kernel); the weights of one window are normalised to sum to 1 and then stored as integers with 22
fraction bits (`PRECISION_BITS = 32 - 8 - 2`), rounded half away from zero. A pass sums
`pixel * weight` in integers from a start of `1 << 21` and keeps `clip(sum >> 22, 0, 255)`. The
horizontal pass runs first, into a uint8 image, then the vertical pass on it.

That order is Pillow's up to 12 (the Pillow of DeiT's and DINO's time and of their published runs).
Pillow 13 runs the vertical pass first when the height shrinks much more than the width
(python-pillow/Pillow#9549), which moves a level at near-ties; the tests build the reference from
two one-axis Pillow resizes, each a single pass whatever the version.

`tf.image.resize(antialias=True)` uses the same kernels in float arithmetic with no rounding between
the passes: its levels differ from PIL's by up to 8 on natural images (mean 0.3). This module keeps
PIL's integer arithmetic, so the levels are PIL's exactly; `tests/test_pil_resize.py` checks that
against Pillow on random sizes, crops and both filters.
"""
import math

import tensorflow as tf

PRECISION_BITS = 32 - 8 - 2


def _bicubic(x):
    """Resample.c `bicubic_filter`: Keys' cubic convolution with a = -0.5, support 2."""
    a = -0.5
    x = tf.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return tf.where(x < 1.0, near, tf.where(x < 2.0, far, tf.zeros_like(x)))


def _bilinear(x):
    """Resample.c `bilinear_filter`: the triangle, support 1."""
    x = tf.abs(x)
    return tf.where(x < 1.0, 1.0 - x, tf.zeros_like(x))


FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def _coefficients(in_size, out_size, method, ksize=None):
    """Resample.c `precompute_coeffs` + `normalize_coeffs_8bpc` for one axis.

    Returns (index [out, K] int32, weight [out, K] int32): output pixel `o` is
    `sum_k input[index[o, k]] * weight[o, k]`, weights past a window's end being 0. `in_size` may also be
    [L, 1] input sizes at once, giving [L, out, K]; then `ksize`, the taps kept (enough for the largest), is
    required.
    """
    kernel, filter_support = FILTERS[method]
    in_f = tf.cast(in_size, tf.float64)
    scale = in_f / tf.cast(out_size, tf.float64)
    filterscale = tf.maximum(scale, 1.0)
    support = filter_support * filterscale
    if ksize is None:
        ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
    center = (tf.cast(tf.range(out_size), tf.float64) + 0.5) * scale
    # C's (int) truncates towards zero; a negative start is clamped to 0 either way.
    xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin
    taps = tf.range(ksize)
    positions = taps + xmin[..., None]  # [..., out, K] input pixels
    ss = tf.expand_dims(1.0 / filterscale, -1)  # Resample.c's `ss`
    weights = kernel((tf.cast(positions, tf.float64) - center[..., None] + 0.5) * ss)
    weights = tf.where(taps < xmax[..., None], weights, tf.zeros_like(weights))
    total = tf.reduce_sum(weights, axis=-1, keepdims=True)
    weights = tf.where(total != 0.0, weights / tf.where(total != 0.0, total, 1.0), weights)
    fixed = weights * float(1 << PRECISION_BITS)
    fixed = tf.cast(tf.where(fixed < 0.0, fixed - 0.5, fixed + 0.5), tf.int32)  # truncation after +-0.5
    last = tf.expand_dims(tf.cast(in_size, tf.int32) - 1, -1)
    return tf.minimum(positions, last), fixed  # past a window's end: any pixel, weight 0


def taps(max_in: int, out_size: int, method: str = "bicubic") -> int:
    """The most taps Resample.c's window has for inputs of up to `max_in` pixels resized to `out_size`."""
    return math.ceil(FILTERS[method][1] * max(max_in / out_size, 1.0)) * 2 + 1


def coefficient_table(max_in: int, out_size: int, method: str = "bicubic") -> tuple:
    """`_coefficients` for every input size 1..max_in at once, padded to `taps(max_in, out_size, method)`:
    (index, weight), int32 numpy [max_in, out_size, taps], row n - 1 for an input of n pixels."""
    if method not in FILTERS:
        raise ValueError(f"coefficient_table: method={method!r} is not one of {sorted(FILTERS)}")
    with tf.init_scope():  # eagerly, also while a tf.data function is traced
        sizes = tf.range(1, max_in + 1)[:, None]
        index, weight = _coefficients(sizes, out_size, method, ksize=taps(max_in, out_size, method))
        return index.numpy(), weight.numpy()


def _rows_pass(image, out_size, method):
    """One Resample.c pass along axis 0 of an int32 [H, W, C] image -> [out_size, W, C].

    The pass is run along axis 0 so that its gather copies whole rows; the horizontal pass transposes.
    """
    index, weight = _coefficients(tf.shape(image)[0], out_size, method)
    total = tf.reduce_sum(tf.gather(image, index) * weight[:, :, None, None], axis=1)  # [out, K, W, C] -> [out, W, C]
    total = total + (1 << (PRECISION_BITS - 1))
    return tf.clip_by_value(tf.bitwise.right_shift(total, PRECISION_BITS), 0, 255)


def pil_resize(image, size, method="bicubic"):
    """`Image.fromarray(image).resize((width, height), method)` for `size` = (height, width), ints or a tensor.

    `image`: [H, W, C] of 0..255 levels (any real or integer dtype; values are rounded to levels).
    Returns float32 levels, as PIL's uint8 result. `method`: 'bicubic' or 'bilinear'.
    """
    if method not in FILTERS:
        raise ValueError(f"pil_resize: method={method!r} is not one of {sorted(FILTERS)}")
    height, width = size[0], size[1]  # ints, or a [2] tensor
    image = tf.convert_to_tensor(image)
    levels = tf.cast(image if image.dtype.is_integer else tf.round(image), tf.int32)
    # PIL skips a pass whose size is unchanged; with these kernels that pass is the identity anyway.
    columns = _rows_pass(tf.transpose(levels, [1, 0, 2]), width, method)  # horizontal pass, into uint8 levels
    levels = _rows_pass(tf.transpose(columns, [1, 0, 2]), height, method)  # then the vertical one
    return tf.cast(levels, tf.float32)
