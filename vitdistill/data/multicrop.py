"""DINO's multi-crop augmentation (`DataAugmentationDINO` in facebookresearch/dino main_dino.py) in TF.

Every view: random resized crop (bicubic), horizontal flip, colour jitter with probability 0.8,
grayscale with probability 0.2, Gaussian blur, solarisation (second global view only), normalise.
The photometric ops follow torchvision's PIL code paths level for level: ImageEnhance, 8-bit HSV for the
hue, BoxBlur.c for the blur; each takes and returns uint8 levels held in float32, as PIL hands uint8
images from one op to the next.
"""
import functools
import math

import tensorflow as tf

from vitdistill.data import pil_ops, pil_resize, randaugment
from vitdistill.data.deit_transforms import (coin, normalize, pil_source, resized_crop, sample_crop_box,
                                             split_seed)


def grayscale(image):
    """torchvision RandomGrayscale's op: PIL's convert('L') repeated over 3 channels."""
    return tf.tile(randaugment.luma(image), [1, 1, 3])


def _c_round(x):
    """C's round() of non-negative values: halves go up (tf.round sends them to the even neighbour)."""
    down = tf.floor(x)
    return tf.where(x - down >= 0.5, down + 1.0, down)


def rgb_to_hsv_levels(image):
    """PIL's `convert("HSV")` (Convert.c rgb2hsv_row) of RGB levels -> int32 (H, S, V), each 0..255.

    In float32, as PIL's variables are, except the steps where PIL's float64 constants change a level
    (`2.0 + rc - bc` and the hue's wrap, `fmod(h / 6.0 + 1.0, 1.0)`); checked equal to PIL on all 2^24
    colours.
    """
    f32 = tf.float32
    r, g, b = tf.unstack(randaugment._levels(image), axis=-1)
    maxc = tf.maximum(r, tf.maximum(g, b))
    minc = tf.minimum(r, tf.minimum(g, b))
    grey = tf.equal(maxc, minc)
    spread = tf.cast(tf.where(grey, 1, maxc - minc), f32)
    saturation = spread / tf.cast(tf.maximum(maxc, 1), f32)
    rc, gc, bc = (tf.cast(maxc - c, f32) / spread for c in (r, g, b))
    f64 = tf.float64
    hue = tf.where(tf.equal(r, maxc), tf.cast(bc - gc, f64),
                   tf.where(tf.equal(g, maxc), 2.0 + tf.cast(rc, f64) - tf.cast(bc, f64),
                            4.0 + tf.cast(gc, f64) - tf.cast(rc, f64)))
    hue = tf.cast(hue, f32)  # PIL's float h
    hue = tf.cast(tf.math.floormod(tf.cast(hue, f64) / 6.0 + 1.0, 1.0), f32)  # fmod of a positive value

    def level(x):
        return tf.where(grey, 0, tf.clip_by_value(tf.cast(tf.floor(x * 255.0), tf.int32), 0, 255))

    return level(hue), level(saturation), maxc


def hsv_levels_to_rgb(h, s, v):
    """PIL's `convert("RGB")` of an HSV image (Convert.c hsv2rgb): int32 levels -> float32 RGB levels [..., 3].

    In float32; checked equal to PIL on all 2^24 HSV triples.
    """
    f32 = tf.float32
    turn = tf.cast(h, f32) * 6.0 / 255.0
    sector = tf.floor(turn)
    frac = turn - sector
    fs = tf.cast(s, f32) / 255.0
    value = tf.cast(v, f32)

    def level(x):
        return tf.clip_by_value(_c_round(value * x), 0.0, 255.0)

    p, q, t = level(1.0 - fs), level(1.0 - fs * frac), level(1.0 - fs * (1.0 - frac))
    sector = tf.cast(sector, tf.int32) % 6
    channels = [value, value, value]
    for k, row in enumerate([(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value),
                             (value, p, q)]):
        channels = [tf.where(tf.equal(sector, k), new, old) for new, old in zip(row, channels)]
    rgb = tf.stack(channels, axis=-1)
    return tf.where(tf.equal(s, 0)[..., None], value[..., None], rgb)


def adjust_hue(image, delta):
    """torchvision's adjust_hue on a PIL image: to 8-bit HSV, H += int(delta * 255) modulo 256, back to RGB.

    `delta` is a fraction of a full turn in [-0.5, 0.5]; the shift truncates towards zero, as
    `np.int32(hue_factor * 255)` does.
    """
    h, s, v = rgb_to_hsv_levels(image)
    return hsv_levels_to_rgb(tf.math.floormod(h + hue_shift(delta), 256), s, v)


def hue_shift(delta):
    """torchvision's shift of PIL's 8-bit hue for `delta`: int(delta * 255), truncated towards zero (int32)."""
    return tf.cast(tf.cast(delta, tf.float64) * 255.0, tf.int32)


def solarize(image, threshold=128):
    """DINO's Solarization: PIL ImageOps.solarize, values >= threshold become 255 - value."""
    return randaugment.solarize(image, threshold)


BLUR_PASSES = 3  # PIL's GaussianBlur: three box blurs per axis


def pil_box_radius(sigma, passes=BLUR_PASSES):
    """The (fractional) box radius PIL's GaussianBlur uses for a Gaussian of standard deviation `sigma`
    (BoxBlur.c `_gaussian_blur_radius`, after Gwosdek et al. 2011), in PIL's float32 and float64 steps."""
    f32, f64 = tf.float32, tf.float64
    sigma = tf.cast(sigma, f32)
    sigma2 = sigma * sigma / float(passes)
    length = tf.cast(tf.sqrt(12.0 * tf.cast(sigma2, f64) + 1.0), f32)
    whole = tf.cast(tf.floor((tf.cast(length, f64) - 1.0) / 2.0), f32)
    frac = (2.0 * whole + 1.0) * (whole * (whole + 1.0) - 3.0 * sigma2)
    frac /= 6.0 * (sigma2 - (whole + 1.0) * (whole + 1.0))
    return whole + frac


def blur_reach(max_sigma: float) -> int:
    """How far from a pixel PIL's box blur reads, at most, for sigmas up to `max_sigma`: r = int(radius) is at most
    the box length's integer half, floor((sqrt(12 sigma^2 / passes + 1) - 1) / 2), and a pass reads r + 1 away."""
    return math.floor((math.sqrt(12 * max_sigma ** 2 / BLUR_PASSES + 1) - 1) / 2) + 2


def box_weights(sigma):
    """PIL's box blur pass for `sigma` as int32 (r, ww, fw): the box's integer radius, the weight of each of its
    2r + 1 pixels and the weight of the two just beyond it, in 2^-24 units (BoxBlur.c)."""
    radius = pil_box_radius(sigma)
    whole = tf.cast(radius, tf.int32)  # C's (int) of a positive float
    ww = tf.cast(tf.floor(tf.constant(2.0 ** 24, tf.float32) / (radius * 2.0 + 1.0)), tf.int32)
    return whole, ww, (2 ** 24 - (2 * whole + 1) * ww) // 2


def gaussian_blur(image, sigma, *, max_sigma=2.0):
    """PIL's `ImageFilter.GaussianBlur(radius=sigma)`, as DINO calls it, level for level.

    PIL (BoxBlur.c) approximates the Gaussian with three box blurs of fractional radius along the rows,
    then three down the columns, each rounded to uint8: a pass weighs the 2r+1 pixels of its window
    ww = floor(2^24 / (2 radius + 1)) each and the two just beyond it fw = (2^24 - (2r+1) ww) / 2, edge
    pixels repeated, and stores (sum + 2^23) >> 24. Each weight is split as high * 2^12 + low so that both
    partial sums are exact in float32. `max_sigma` bounds `sigma`, so that the graph has fixed shapes.
    """
    reach = blur_reach(max_sigma)
    whole, ww, fw = box_weights(sigma)
    distance = tf.range(reach + 1)
    weight = tf.where(distance <= whole, ww, tf.where(distance == whole + 1, fw, 0))  # by distance from x
    high = tf.unstack(tf.cast(weight // 4096, tf.float32))
    low = tf.unstack(tf.cast(weight % 4096, tf.float32))
    levels = tf.cast(randaugment._levels(image), tf.float32)
    shape = tf.shape(levels)
    for axis in (1, 0):  # PIL blurs the rows first, then the transposed image
        size = shape[axis]
        edges_repeated = tf.clip_by_value(tf.range(-reach, size + reach), 0, size - 1)
        for _ in range(BLUR_PASSES):
            padded = tf.gather(levels, edges_repeated, axis=axis)
            shifted = [padded[:, k:k + size] if axis == 1 else padded[k:k + size] for k in range(2 * reach + 1)]
            pairs = [shifted[reach]] + [shifted[reach - k] + shifted[reach + k] for k in range(1, reach + 1)]
            hi = tf.add_n([w * p for w, p in zip(high, pairs)])  # < 2^12 * 510 * (reach + 1) < 2^24: exact
            lo = tf.add_n([w * p for w, p in zip(low, pairs)])
            levels = tf.floor((hi + tf.floor((lo + 2.0 ** 23) / 4096.0)) / 4096.0)  # (sum + 2^23) >> 24
    return tf.ensure_shape(levels, image.shape)


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


def jitter_active(brightness, contrast, saturation, hue) -> tuple:
    """Which of ColorJitter's 4 adjustments run: torchvision skips one whose strength is 0."""
    return (brightness > 0, contrast > 0, saturation > 0, hue > 0)


def color_jitter(image, seed, *, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
    """torchvision ColorJitter on a PIL image: the 4 adjustments in a random order (a strength of 0 skips one)."""
    params = sample_color_jitter_params(seed, brightness=brightness, contrast=contrast, saturation=saturation,
                                        hue=hue)
    return apply_color_jitter(image, params, active=jitter_active(brightness, contrast, saturation, hue))


def apply_color_jitter(image, params, *, active):
    for k in range(4):
        image = _jitter_step(image, params, k, active=active)
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


def view_choices(image_uint8, seed, *, scale, hflip=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
                 solarize_prob=0.0):
    """The random choices of one DINO view, drawn in TF from `seed`: the crop box (top, left, height, width),
    which ops apply, the blur's sigma and the colour jitter's order and factors (`jitter`)."""
    crop_seed, flip_seed, jitter_seed, jitter_params_seed, gray_seed, blur_seed, sigma_seed, solarize_seed = (
        split_seed(seed, 8))
    shape = tf.shape(image_uint8)
    return {
        "crop": tf.stack(sample_crop_box(crop_seed, shape[0], shape[1], scale=scale)),
        "flip": coin(flip_seed, hflip),
        "color_jitter": coin(jitter_seed, jitter_prob),
        "grayscale": coin(gray_seed, grayscale_prob),
        "blur": coin(blur_seed, blur_prob),
        "solarize": coin(solarize_seed, solarize_prob),
        "blur_sigma": tf.random.stateless_uniform([], sigma_seed, blur_sigma[0], blur_sigma[1]),
        "jitter": sample_color_jitter_params(jitter_params_seed, brightness=brightness, contrast=contrast,
                                             saturation=saturation, hue=hue),
    }


def tf_view(image_uint8, choices, *, size, active, max_sigma=2.0, interpolation="bicubic", resize="pil"):
    """A view's uint8 levels (float32) for `choices`, by this module's TF ops."""
    image = resized_crop(image_uint8, tuple(tf.unstack(choices["crop"])), size, method=interpolation, resize=resize)
    image = _maybe(choices["flip"], lambda x: x[:, ::-1], image)
    image = _maybe(choices["color_jitter"], lambda x: apply_color_jitter(x, choices["jitter"], active=active), image)
    image = _maybe(choices["grayscale"], grayscale, image)
    image = _maybe(choices["blur"], lambda x: gaussian_blur(x, choices["blur_sigma"], max_sigma=max_sigma), image)
    return _maybe(choices["solarize"], solarize, image)


def pil_views(image_uint8, choices: list, sizes: list, *, active, interpolation="bicubic", resize="pil",
              dtype=tf.float32):
    """The views' uint8 levels (as `dtype`) for their `choices`, by Pillow's own ops (`pil_ops.dino_views`), all
    views of the image in one call; with `resize='tf'`, TF resizes each crop first."""
    sources, boxes = zip(*(pil_source(image_uint8, c["crop"], size, interpolation=interpolation, resize=resize)
                           for c, size in zip(choices, sizes)))
    if resize == "pil":
        sources = sources[:1]  # one image for all the views
    return pil_ops.tf_dino_views(sources, boxes, sizes, choices, active=active, method=interpolation, dtype=dtype)


# A view's photometric choices as the step applies them (`image_ops="device"`, `device_photometric`): one int32
# vector a view, the colour jitter's factors as the bits of their float32 values.
DEVICE_OP_FIELDS = ("color_jitter", "order_0", "order_1", "order_2", "order_3", "brightness", "contrast",
                    "saturation", "hue_shift", "grayscale", "blur", "blur_whole", "blur_ww", "blur_fw", "solarize")


def device_ops(choices: dict, *, active) -> tf.Tensor:
    """`view_choices`' photometric part as int32 [len(DEVICE_OP_FIELDS)]: the flags, the jitter's order (an op
    that `active` leaves out as -1), its factors, torchvision's hue shift in levels and the blur's box weights for
    its sigma (`box_weights`, in PIL's float64 steps, which are done here rather than on the device)."""
    jitter = choices["jitter"]
    order = tf.cast(jitter["order"], tf.int32)
    order = tf.where(tf.gather(tf.constant(active), order), order, -1)
    factors = [tf.bitcast(tf.cast(jitter[op], tf.float32), tf.int32) for op in pil_ops.JITTER_OPS[:3]]
    flags = {k: tf.cast(choices[k], tf.int32) for k in ("color_jitter", "grayscale", "blur", "solarize")}
    return tf.stack([flags["color_jitter"], *tf.unstack(order), *factors, hue_shift(jitter["hue"]),
                     flags["grayscale"], flags["blur"], *box_weights(choices["blur_sigma"]), flags["solarize"]])


def geometric_views(image_uint8, choices: list, sizes: list, *, active, interpolation="bicubic", resize="pil"):
    """The views' crop, resize and flip alone, by Pillow (`pil_views` with the photometric ops off): uint8."""
    off = dict(color_jitter=False, grayscale=False, blur=False, solarize=False)
    return pil_views(image_uint8, [dict(c, **off) for c in choices], sizes, active=active,
                     interpolation=interpolation, resize=resize, dtype=tf.uint8)


# With `device_canvas` (and image_ops="device") the pipeline ships each image once, in a canvas, and each view's
# crop, resize and flip as Resample.c's windows into it (`view_windows`) for the step to apply
# (`device_resize.resized_crops`).
CANVAS = "canvas"
WINDOWS_SUFFIX = "_windows"  # view `name`'s windows travel as `name + WINDOWS_SUFFIX`


def canvas_layout(sizes, canvas: int):
    """Where the views (square, of these `sizes`) of an image larger than the canvas go in it, made by Pillow:
    [(top, left)], left to right on shelves, or None if they do not fit."""
    top = left = shelf = 0
    places = []
    for size in sizes:
        if left + size > canvas:
            top, left, shelf = top + shelf, 0, 0
        if left + size > canvas or top + size > canvas:
            return None
        places.append((top, left))
        left, shelf = left + size, max(shelf, size)
    return places


def canvas_problem(canvas: int, sizes, *, image_ops: str, resize: str, interpolation: str):
    """Why `device_canvas=canvas` cannot make views of these `sizes` with these settings (a sentence), or None."""
    if canvas == 0:
        return None
    if image_ops != "device":
        return (f"device_canvas={canvas} moves the crops and resizes into the train step, beside the photometric "
                f"ops: it needs image_ops='device' (not {image_ops!r}); or set device_canvas=0")
    if resize != "pil" or interpolation not in pil_resize.FILTERS:
        return (f"device_canvas={canvas} resizes as Pillow does (resize='pil', bicubic or bilinear), not with "
                f"resize={resize!r} and {interpolation!r}")
    if canvas_layout(sizes, canvas) is None:
        least = next(side for side in range(max(sizes), 8 * sum(sizes), 32) if canvas_layout(sizes, side))
        counts = " + ".join(f"{sizes.count(side)} x {side}" for side in sorted(set(sizes), reverse=True))
        return (f"device_canvas={canvas} cannot hold the views ({counts} px) of "
                f"an image larger than it (whose views the host makes and packs into it); use {least} or more, or "
                "0 to make the crops on the host")
    return None


@functools.lru_cache(maxsize=None)
def window_table(canvas: int, size: int, method: str) -> tuple:
    """(index, weight): `pil_resize.coefficient_table` for views of `size`, as eager tensors made once per process,
    which tf.data functions capture as inputs. As graph constants in the map function, the DINO pipeline's peak
    memory (canvas 640, 2x224 + 10x96) was 2.9 GB with a copy a view and 2.1 GB with one a size, against 1.1 GB so."""
    with tf.init_scope():  # eagerly, also while a tf.data function is traced
        return tuple(tf.constant(t) for t in pil_resize.coefficient_table(canvas, size, method))


def view_windows(choices: dict, table: tuple) -> tf.Tensor:
    """A view's crop, resize and flip as int32 [2, size, 1 + K] (`device_resize`) from its size's `window_table`:
    for its rows, then its columns, where each output pixel's first tap lies in the canvas, then the weights of
    its K taps (Resample.c's, for the crop's length; K the most taps of a crop up to the canvas; taps past a
    window's end weigh 0). A flip reverses the columns' order."""
    index, weight = table

    def axis(start, length):
        return tf.concat([tf.gather(index, length - 1)[:, :1] + start, tf.gather(weight, length - 1)], axis=1)

    top, left, height, width = tf.unstack(choices["crop"])
    columns = axis(left, width)
    return tf.stack([axis(top, height), tf.where(choices["flip"], columns[::-1], columns)])


def _copy_windows(top: int, left: int, size: int, taps: int) -> tf.Tensor:
    """The windows that copy a `size` x `size` view from (top, left) of the canvas: one tap each, weight 1."""
    weight = tf.one_hot(tf.zeros([size], tf.int32), taps, on_value=1 << pil_resize.PRECISION_BITS, dtype=tf.int32)
    return tf.stack([tf.concat([tf.range(start, start + size)[:, None], weight], axis=1) for start in (top, left)])


def canvas_views(image_uint8, choices: list, sizes: list, *, canvas: int, active, interpolation="bicubic"):
    """(canvas uint8 [canvas, canvas, 3], [each view's windows, `view_windows`]): the image at the canvas' top
    left, or, if it is larger than the canvas, its views made by Pillow (crop, resize, flip) packed into it
    (`canvas_layout`) with windows that copy them."""
    shape = tf.shape(image_uint8)
    places = canvas_layout(sizes, canvas)

    def placed():
        margin = tf.maximum(canvas - shape[:2], 0)  # >= 0 also where this branch is not taken
        board = tf.pad(image_uint8, [[0, margin[0]], [0, margin[1]], [0, 0]])
        return board, tuple(view_windows(c, window_table(canvas, size, interpolation))
                            for c, size in zip(choices, sizes))

    def packed():
        made = geometric_views(image_uint8, choices, sizes, active=active, interpolation=interpolation)
        board = tf.zeros([canvas, canvas, 3], tf.uint8)
        for view, (top, left) in zip(made, places):
            board += tf.image.pad_to_bounding_box(view, top, left, canvas, canvas)
        return board, tuple(_copy_windows(top, left, size, pil_resize.taps(canvas, size, interpolation))
                            for (top, left), size in zip(places, sizes))

    board, windows = tf.cond(tf.logical_and(shape[0] <= canvas, shape[1] <= canvas), placed, packed)
    return tf.ensure_shape(board, [canvas, canvas, 3]), list(windows)


def _public(choices: dict) -> dict:
    return {k: v for k, v in choices.items() if k != "jitter"}


def augment_view(image_uint8, seed, *, size, scale, hflip=0.5, jitter_prob=0.8, brightness=0.4, contrast=0.4,
                 saturation=0.2, hue=0.1, grayscale_prob=0.2, blur_prob=0.5, blur_sigma=(0.1, 2.0),
                 solarize_prob=0.0, interpolation="bicubic", resize="pil", image_ops="pil"):
    """One DINO view -> (normalised float32 [size, size, 3], the choices made, for tests and debugging).

    `image_ops` says who applies the choices: 'pil' Pillow's own ops (`pil_ops`), 'tf' the TF ops of this
    module. Both give the same levels (tests/test_multicrop.py)."""
    choices = view_choices(image_uint8, seed, scale=scale, hflip=hflip, jitter_prob=jitter_prob,
                           brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
                           grayscale_prob=grayscale_prob, blur_prob=blur_prob, blur_sigma=blur_sigma,
                           solarize_prob=solarize_prob)
    active = jitter_active(brightness, contrast, saturation, hue)
    if image_ops == "pil":
        (image,) = pil_views(image_uint8, [choices], [size], active=active, interpolation=interpolation,
                             resize=resize)
    else:
        image = tf_view(image_uint8, choices, size=size, active=active, max_sigma=blur_sigma[1],
                        interpolation=interpolation, resize=resize)
    return normalize(image), _public(choices)


NUM_GLOBAL_VIEWS = 2
OPS_SUFFIX = "_ops"  # with image_ops="device", view `name`'s photometric choices travel as `name + OPS_SUFFIX`


def view_names(num_local: int) -> list:
    """The views of one image in the order the student sees them: the global crops, then the local ones."""
    return [f"global_{g}" for g in range(NUM_GLOBAL_VIEWS)] + [f"local_{i}" for i in range(num_local)]


def multicrop_views(image_uint8, seed, *, global_size=224, local_size=96, global_scale=(0.4, 1.0),
                    local_scale=(0.05, 0.4), num_local=8, hflip=0.5, jitter_prob=0.8, brightness=0.4,
                    contrast=0.4, saturation=0.2, hue=0.1, grayscale_prob=0.2, global_blur_probs=(1.0, 0.1),
                    local_blur_prob=0.5, blur_sigma=(0.1, 2.0), global_solarize_probs=(0.0, 0.2),
                    local_solarize_prob=0.0, interpolation="bicubic", resize="pil", image_ops="pil",
                    canvas=0, levels=False, return_params=False):
    """DINO's views of one image: {'global_0', 'global_1', 'local_0', ..., 'local_{num_local-1}'}.

    Each view normalised (float32), or with `levels` its uint8 levels, for the train step to normalise on the
    device (`device_ops.normalize_levels`): the DINO training pipeline's form, which leaves 10 views' cast and
    normalisation (1.6 of the 2.5 ms of TF work an image at 2x224 + 8x96, one core) off the host and ships a
    quarter of the bytes. `global_*_probs` hold one probability per global view. With `return_params`,
    returns (views, params) where params[name] records each view's crop box and which ops were applied.

    `image_ops`: 'pil' (Pillow's own ops) or 'tf' (this module's) make whole views; 'device' (with `levels`)
    makes only the crop, resize and flip here, with Pillow, and adds each view's photometric choices as
    `name + OPS_SUFFIX` (`device_ops`) for the train step to apply (`device_photometric.apply_views`): the same
    choices from the same seed, so the same levels as 'pil' (tests/test_device_photometric.py). With 'device' and
    a `canvas` side, not even the crop, resize and flip: the image goes once, as `CANVAS` (`canvas_views`), each
    view as its windows into it, `name + WINDOWS_SUFFIX` (tests/test_device_resize.py).
    """
    for name, probs in (("global_blur_probs", global_blur_probs), ("global_solarize_probs", global_solarize_probs)):
        if len(probs) != NUM_GLOBAL_VIEWS:
            raise ValueError(f"{name}={probs} must hold one probability for each of the {NUM_GLOBAL_VIEWS} global "
                             "views")
    shared = dict(hflip=hflip, jitter_prob=jitter_prob, brightness=brightness, contrast=contrast,
                  saturation=saturation, hue=hue, grayscale_prob=grayscale_prob, blur_sigma=blur_sigma)
    names = view_names(num_local)
    view_seeds = split_seed(seed, len(names))
    choices, sizes = [], []
    for index in range(len(names)):
        if index < NUM_GLOBAL_VIEWS:
            settings = dict(scale=global_scale, blur_prob=global_blur_probs[index],
                            solarize_prob=global_solarize_probs[index])
        else:
            settings = dict(scale=local_scale, blur_prob=local_blur_prob, solarize_prob=local_solarize_prob)
        choices.append(view_choices(image_uint8, view_seeds[index], **settings, **shared))
        sizes.append(global_size if index < NUM_GLOBAL_VIEWS else local_size)
    active = jitter_active(brightness, contrast, saturation, hue)
    problem = canvas_problem(canvas, sizes, image_ops=image_ops, resize=resize, interpolation=interpolation)
    if problem:
        raise ValueError(problem)
    if image_ops == "device":
        if not levels:
            raise ValueError("image_ops='device' leaves the photometric ops to the train step: it needs levels=True")
        if canvas:
            board, windows = canvas_views(image_uint8, choices, sizes, canvas=canvas, active=active,
                                          interpolation=interpolation)
            made = {CANVAS: board, **{name + WINDOWS_SUFFIX: w for name, w in zip(names, windows)}}
        else:
            made = geometric_views(image_uint8, choices, sizes, active=active, interpolation=interpolation,
                                   resize=resize)
    elif image_ops == "pil":
        made = pil_views(image_uint8, choices, sizes, active=active, interpolation=interpolation, resize=resize,
                         dtype=tf.uint8 if levels else tf.float32)
    else:
        made = [tf_view(image_uint8, c, size=size, active=active, max_sigma=blur_sigma[1],
                        interpolation=interpolation, resize=resize) for c, size in zip(choices, sizes)]
        if levels:  # whole levels held in float32: exact
            made = [tf.saturate_cast(tf.round(image), tf.uint8) for image in made]
    views = made if isinstance(made, dict) else {name: image if levels else normalize(image)
                                                  for name, image in zip(names, made)}
    if image_ops == "device":
        views.update({name + OPS_SUFFIX: device_ops(c, active=active) for name, c in zip(names, choices)})
    params = {name: _public(c) for name, c in zip(names, choices)}
    return (views, params) if return_params else views
