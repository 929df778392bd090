"""DeiT's image transforms in TensorFlow, one image at a time, usable eagerly and in `tf.data`.

Training is timm's `create_transform(is_training=True, auto_augment='rand-m9-mstd0.5-inc1',
re_prob=0.25, re_mode='pixel', interpolation='bicubic')`: random resized crop, horizontal flip,
RandAugment, normalisation, random erasing. Evaluation is DeiT's resize-256 / centre-crop-224.
Randomness is stateless: every random function takes a `seed` of shape [2] and splits it.
Images are float32 in 0..255 units until `normalize`.
"""
import math

import tensorflow as tf

from vitdistill.data import IMAGENET_MEAN, IMAGENET_STD, SIZE_CHECK
from vitdistill.data import pil_ops, sources
from vitdistill.data.pil_resize import pil_resize
from vitdistill.data.randaugment import FILL as RA_FILL
from vitdistill.data.randaugment import rand_augment as _rand_augment
from vitdistill.data.randaugment import sample_params as sample_ra_params
from vitdistill.errors import ConfigError


def normalize(image):
    """0..255 RGB -> (x / 255 - mean) / std with ImageNet statistics."""
    mean = tf.constant(IMAGENET_MEAN, tf.float32) * 255.0
    std = tf.constant(IMAGENET_STD, tf.float32) * 255.0
    return (tf.cast(image, tf.float32) - mean) / std


def split_seed(seed, num):
    """`num` independent stateless seeds derived from `seed`."""
    return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def coin(seed, p):
    """True with probability `p` (timm/torchvision draw `rand() < p`)."""
    return tf.random.stateless_uniform([], seed) < p


def _random_int(seed, high):
    """Uniform integer in [0, high] (Python's `random.randint(0, high)`)."""
    return tf.random.stateless_uniform([], seed, minval=0, maxval=high + 1, dtype=tf.int32)


def _first_fit(fits, values, default):
    """`values[i]` for the first `i` where `fits[i]`, else `default`."""
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    return tf.where(tf.reduce_any(fits), tf.gather(values, first), default)


def sample_crop_box(seed, height, width, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """torchvision `RandomResizedCrop.get_params`: (top, left, crop_height, crop_width), int32.

    Up to `attempts` draws of an area fraction ~ U(scale) and an aspect ratio (w/h) log-uniform in
    `ratio`; sides are int(round(sqrt(.))); the first box that fits is placed uniformly. If none
    fits: the centred crop of the whole image, its aspect ratio clamped to `ratio`.
    """
    area_seed, ratio_seed, top_seed, left_seed = split_seed(seed, 4)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    target_area = h * w * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1], dtype=tf.float64)
    log_ratio = tf.random.stateless_uniform(
        [attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64)
    aspect = tf.exp(log_ratio)
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)

    in_ratio = w / h
    lo, hi = min(ratio), max(ratio)
    fallback_w = tf.cast(tf.where(in_ratio > hi, tf.round(h * hi), w), tf.int32)
    fallback_h = tf.cast(tf.where(in_ratio < lo, tf.round(w / lo), h), tf.int32)
    found = tf.reduce_any(fits)
    crop_h = _first_fit(fits, crop_h, fallback_h)
    crop_w = _first_fit(fits, crop_w, fallback_w)
    top = tf.where(found, _random_int(top_seed, height - crop_h), (height - crop_h) // 2)
    left = tf.where(found, _random_int(left_seed, width - crop_w), (width - crop_w) // 2)
    return top, left, crop_h, crop_w


RESIZES = ("pil", "tf")
IMAGE_OPS = ("pil", "tf", "device")


def _setting(data_config, key: str, valid: tuple, fix: str) -> str:
    """`config.data[key]`, checked against `valid` (its first entry the default, also for configs saved before
    the key existed)."""
    value = data_config.get(key, valid[0])
    if value not in valid:
        raise ConfigError(f"config.data.{key}={value!r}; {fix}")
    return value


def resize_of(data_config) -> str:
    """`config.data.resize`, checked: 'pil' (the default) or 'tf'."""
    return _setting(data_config, "resize", RESIZES, "use 'pil' (PIL's resize bit for bit, the default) or 'tf' "
                    "(tf.image.resize: faster, levels within 8 of PIL's)")


def image_ops_of(data_config) -> str:
    """`config.data.image_ops`, checked: 'pil' (the default: Pillow's own ops inside tf.data, `pil_ops`), 'tf' or
    'device' (DINO only: the photometric ops in the train step, `device_photometric`)."""
    return _setting(data_config, "image_ops", IMAGE_OPS, "use 'pil' (Pillow's ops inside tf.data, as torchvision "
                    "and timm apply them, the default), 'tf' (TensorFlow ops: DINO's views at the same levels, "
                    "DeiT's RandAugment in floats between ops) or, for DINO, 'device' (its colour jitter, "
                    "grayscale, blur and solarisation in the train step, at the same levels)")


def pil_source(image_uint8, box, size: int, *, interpolation="bicubic", resize="pil"):
    """What Pillow's ops start from for a crop `box` (top, left, height, width) to size x size: with resize='pil'
    the image and the box (Pillow crops and resizes); otherwise TF's resized crop and the whole of it."""
    if resize == "pil":
        return image_uint8, box
    crop = resized_crop(image_uint8, tuple(tf.unstack(box)), size, method=interpolation, resize=resize)
    return tf.cast(crop, tf.uint8), tf.constant([0, 0, size, size], tf.int32)


def resize_levels(image, size, *, method="bicubic", resize="pil"):
    """Resize a [H, W, C] image of 0..255 levels to `size` = (height, width) -> float32 levels.

    resize='pil': PIL's `Image.resize` bit for bit (`pil_resize`), as torchvision resizes PIL images
    in the official code; 'tf': `tf.image.resize(antialias=True)`, the same kernels in floats with no
    rounding between passes (levels within 8 of PIL's, mean 0.3), rounded to levels at the end.
    """
    if resize == "pil":
        return pil_resize(image, size, method)
    if resize != "tf":
        raise ValueError(f"resize={resize!r} is not one of {RESIZES}")
    resized = tf.image.resize(tf.cast(image, tf.float32), size, method=method, antialias=True)
    return tf.floor(tf.clip_by_value(resized, 0.0, 255.0) + 0.5)  # Resample.c rounds halves up


def resized_crop(image, box, size, *, method="bicubic", resize="pil"):
    """Crop `box` = (top, left, height, width) and resize to size x size as PIL does (see `resize`).

    The result is in uint8 levels, as PIL's resampler stores it, so that the ops after the crop see
    what they see in torchvision.
    """
    top, left, crop_h, crop_w = box
    crop = tf.slice(image, tf.stack([top, left, 0]), tf.stack([crop_h, crop_w, -1]))
    resized = resize_levels(crop, [size, size], method=method, resize=resize)
    return tf.ensure_shape(resized, [size, size, image.shape[-1]])


def crop_source(image, seed, *, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jpeg="accurate"):
    """(image, box): RandomResizedCrop's box drawn for `image` (uint8 [H, W, C]), or, for an encoded image (a
    scalar string), only that box's window decoded (`sources.decode_crop`, JPEGs with `jpeg`) and its whole box."""
    def crop_box_of(height, width):
        return tf.stack(sample_crop_box(seed, height, width, scale=scale, ratio=ratio))

    if image.dtype == tf.string:
        window = sources.decode_crop(image, crop_box_of, jpeg)
        return window, tf.concat([[0, 0], tf.shape(window, out_type=tf.int32)[:2]], 0)
    shape = tf.shape(image, out_type=tf.int32)
    return image, crop_box_of(shape[0], shape[1])


CROPS = ("resized", "padded")
PADDED_FIX = ("Set --config.data.image_size to the images' side, or --config.augment.crop=resized (the random resized "
              "crop, and Resize + CenterCrop to evaluate)")
PADDING = 4  # DeiT's build_transform: RandomCrop(input_size, padding=4) at input_size <= 32


def padded_crop_fits(height: int, width: int, size: int, padding: int = PADDING) -> bool:
    """Whether RandomCrop(size, padding) can crop an image of height x width (torchvision refuses it otherwise)."""
    return min(height, width) + 2 * padding >= size


def padded_crop_source(image, seed, size: int, *, padding: int = PADDING, jpeg="accurate"):
    """(image, box) of torchvision's RandomCrop(size, padding): the image (uint8 [H, W, C], or an encoded one,
    decoded whole) with `padding` black pixels on every side, and a size x size box at offsets drawn uniformly
    from 0..H + 2 * padding - size (and the same for the width). DeiT's build_transform trains on it, instead of
    the random resized crop, at input_size <= 32 (CIFAR). An image too small for the box is refused, as
    torchvision refuses it."""
    if image.dtype == tf.string:
        image = sources.decode_image(image, jpeg)
    problem = (f"an image smaller than {size - 2 * padding} x {size - 2 * padding}, which RandomCrop({size}, "
               f"padding={padding}) cannot crop (DeiT's transform at image_size <= 32, config.augment.crop 'auto' or "
               f"'padded'). {PADDED_FIX}")
    if None not in image.shape[:2] and not padded_crop_fits(*image.shape[:2], size, padding):  # known when built
        raise ConfigError(f"{image.shape[0]} x {image.shape[1]} images: {problem}")
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    shape = tf.shape(padded, out_type=tf.int32)
    fits = tf.debugging.assert_greater_equal(tf.reduce_min(shape[:2]), size, message=f"{SIZE_CHECK}: {problem}")
    top_seed, left_seed = split_seed(seed, 2)
    with tf.control_dependencies([fits]):
        top = _random_int(top_seed, shape[0] - size)
        left = _random_int(left_seed, shape[1] - size)
    return padded, tf.stack([top, left, tf.constant(size), tf.constant(size)])


def random_resized_crop(image, seed, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), method="bicubic",
                        resize="pil", jpeg="accurate"):
    """torchvision RandomResizedCrop(size, scale, ratio, interpolation) -> float32 [size, size, C]. `image` may be
    encoded (a scalar string): then only the crop's window is decoded (`crop_source`), with the same result."""
    image, box = crop_source(image, seed, scale=scale, ratio=ratio, jpeg=jpeg)
    return resized_crop(image, tuple(tf.unstack(box)), size, method=method, resize=resize)


def horizontal_flip(image, seed, p=0.5):
    """Mirror left-right with probability `p`."""
    return tf.cond(coin(seed, p), lambda: image[:, ::-1], lambda: image)


def sample_erase_box(seed, height, width, *, p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), attempts=10):
    """timm RandomErasing's choices: (erase, top, left, erase_height, erase_width).

    With probability `p`, up to `attempts` draws of an area fraction ~ U(scale) and an aspect ratio
    (h/w) log-uniform in `ratio`; the first box strictly smaller than the image is placed uniformly.
    """
    apply_seed, area_seed, ratio_seed, top_seed, left_seed = split_seed(seed, 5)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    area = tf.cast(height * width, tf.float64)
    target_area = area * tf.random.stateless_uniform([attempts], area_seed, scale[0], scale[1], dtype=tf.float64)
    aspect = tf.exp(tf.random.stateless_uniform(
        [attempts], ratio_seed, math.log(ratio[0]), math.log(ratio[1]), dtype=tf.float64))
    erase_h = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    erase_w = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (erase_w < width) & (erase_h < height)
    erase = coin(apply_seed, p) & tf.reduce_any(fits)
    erase_h = _first_fit(fits, erase_h, 0)
    erase_w = _first_fit(fits, erase_w, 0)
    return erase, _random_int(top_seed, height - erase_h), _random_int(left_seed, width - erase_w), erase_h, erase_w


def erase_box(seed, height, width, p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), max_attempts=10):
    """The box `random_erasing` with this seed erases, as int32 [6] (`device_ops.ERASE_FIELDS`: erase, top,
    left, height, width, and a seed for its noise from the one `random_erasing` draws it with), for
    `device_ops.erase_boxes` to fill in the step."""
    box_seed, noise_seed = split_seed(seed, 2)
    erase, top, left, erase_h, erase_w = sample_erase_box(box_seed, height, width, p=p, scale=scale, ratio=ratio,
                                                          attempts=max_attempts)
    noise = tf.random.stateless_uniform([], noise_seed, minval=None, maxval=None, dtype=tf.int32)
    return tf.stack([tf.cast(erase, tf.int32), top, left, erase_h, erase_w, noise])


def random_erasing(image_normalised, seed, p=0.25, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3), max_attempts=10):
    """timm RandomErasing(p, mode='pixel', max_count=1) on a normalised image: one box of N(0, 1) noise."""
    box_seed, noise_seed = split_seed(seed, 2)
    shape = tf.shape(image_normalised)
    erase, top, left, erase_h, erase_w = sample_erase_box(
        box_seed, shape[0], shape[1], p=p, scale=scale, ratio=ratio, attempts=max_attempts)

    def erased():  # noise for the box alone (a 224-px image's worth took 3-4 ms), padded into place
        rows = tf.range(shape[0])[:, None, None]
        cols = tf.range(shape[1])[None, :, None]
        inside = (rows >= top) & (rows < top + erase_h) & (cols >= left) & (cols < left + erase_w)
        noise = tf.random.stateless_normal(tf.stack([erase_h, erase_w, shape[2]]), noise_seed,
                                           dtype=image_normalised.dtype)
        noise = tf.pad(noise, [[top, shape[0] - top - erase_h], [left, shape[1] - left - erase_w], [0, 0]])
        return tf.where(inside, noise, image_normalised)

    return tf.cond(erase, erased, lambda: image_normalised)


def _deit_levels(image, crop_seed, flip_seed, ra_seed, *, size, scale, ratio, interpolation, hflip,
                 rand_augment, ra_num_ops, ra_magnitude, ra_magnitude_std, ra_prob, resize, image_ops, dtype, jpeg,
                 crop="resized"):
    """The crop, flip and RandAugment of `deit_train_transform`: the view's levels as `dtype` (float32 or uint8)."""
    if crop == "padded":  # a size x size box: Pillow's resize and `resized_crop` leave it as it is
        image_uint8, box = padded_crop_source(image, crop_seed, size, jpeg=jpeg)
    elif crop == "resized":
        image_uint8, box = crop_source(image, crop_seed, scale=scale, ratio=ratio, jpeg=jpeg)  # encoded: its window
    else:
        raise ValueError(f"crop={crop!r} is not one of {CROPS}")
    if image_ops == "pil":
        image_uint8, box = pil_source(image_uint8, box, size, interpolation=interpolation, resize=resize)
        flip = coin(flip_seed, hflip) if hflip > 0 else tf.constant(False)
        if rand_augment:
            params = sample_ra_params(ra_seed, num_ops=ra_num_ops, magnitude=ra_magnitude,
                                      magnitude_std=ra_magnitude_std, prob=ra_prob)
        else:
            params = {"op": tf.zeros([0], tf.int32), "apply": tf.zeros([0], tf.bool),
                      "magnitude": tf.zeros([0]), "sign": tf.zeros([0])}
        return pil_ops.tf_deit_view(image_uint8, box, size, flip, params, fill=RA_FILL, method=interpolation,
                                    dtype=dtype)
    image = resized_crop(image_uint8, tuple(tf.unstack(box)), size, method=interpolation, resize=resize)
    if hflip > 0:
        image = horizontal_flip(image, flip_seed, p=hflip)
    if rand_augment:
        image = _rand_augment(image, ra_seed, num_ops=ra_num_ops, magnitude=ra_magnitude,
                              magnitude_std=ra_magnitude_std, prob=ra_prob, interpolation=interpolation)
    return image if dtype == tf.float32 else tf.saturate_cast(tf.round(image), dtype)  # whole levels: exact


def crop_and_flip(image, crop_seed, flip_seed, *, size, scale=(0.08, 1.0), interpolation="bicubic", hflip=0.5,
                  resize="pil", image_ops="pil", jpeg="accurate"):
    """RandomResizedCrop and RandomHorizontalFlip with the seeds given -> float32 levels [size, size, 3]: DeiT's view
    without RandAugment (`_deit_levels`; Pillow's ops with image_ops='pil', TF's otherwise). `image` may be
    encoded, as in `deit_train_transform`."""
    return _deit_levels(image, crop_seed, flip_seed, None, size=size, scale=scale, ratio=(3 / 4, 4 / 3),
                        interpolation=interpolation, hflip=hflip, rand_augment=False, ra_num_ops=0, ra_magnitude=0.0,
                        ra_magnitude_std=0.0, ra_prob=0.0, resize=resize, image_ops=image_ops, dtype=tf.float32,
                        jpeg=jpeg)


def deit_train_transform(image_uint8, seed, *, size=224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                         interpolation="bicubic", hflip=0.5, rand_augment=True, ra_num_ops=2,
                         ra_magnitude=9.0, ra_magnitude_std=0.5, ra_prob=0.5, erase_prob=0.25, resize="pil",
                         image_ops="pil", levels=False, jpeg="accurate", crop="resized"):
    """DeiT's training augmentation of one image -> float32 [size, size, 3], normalised.

    `image_uint8` is uint8 [H, W, 3], or an encoded image (a scalar string: a source's `load_encoded`), of which
    only the crop's window is decoded (`sources.decode_crop`, JPEGs with `jpeg`): the same pixels and views.

    Keywords are named like `config.augment`; `hflip=0`, `rand_augment=False` (or None) and
    `erase_prob=0` switch those steps off. `image_ops` says who applies the crop, flip and RandAugment
    drawn here: 'pil' Pillow's own calls, as timm 0.3.2 makes them (`pil_ops.deit_view`; the crop's resize
    too unless resize='tf'), 'tf' the TF ops (`resize_levels`, `randaugment`). Erasing, on the normalised
    tensor as in timm, is TF's in both.

    `crop`: 'resized', timm's RandomResizedCrop (`scale`, `ratio`, `interpolation`); 'padded', torchvision's
    RandomCrop(size, padding=4) (`padded_crop_source`), which DeiT's build_transform puts in its place at
    input_size <= 32.

    With `levels` (DeiT's training pipeline): {'image': the uint8 levels before normalisation, 'erase': the
    erase box drawn for them (`erase_box`, only with `erase_prob` > 0)}, for the step to normalise and erase
    (`device_ops`). The image and the box are those the normalised form uses; only the noise is drawn elsewhere.
    """
    crop_seed, flip_seed, ra_seed, erase_seed = split_seed(seed, 4)
    image = _deit_levels(image_uint8, crop_seed, flip_seed, ra_seed, size=size, scale=scale, ratio=ratio,
                         interpolation=interpolation, hflip=hflip, rand_augment=rand_augment, ra_num_ops=ra_num_ops,
                         ra_magnitude=ra_magnitude, ra_magnitude_std=ra_magnitude_std, ra_prob=ra_prob,
                         resize=resize, image_ops=image_ops, dtype=tf.uint8 if levels else tf.float32, jpeg=jpeg,
                         crop=crop)
    if levels:
        out = {"image": image}
        if erase_prob > 0:
            out["erase"] = erase_box(erase_seed, size, size, p=erase_prob)
        return out
    image = normalize(image)
    if erase_prob > 0:
        image = random_erasing(image, erase_seed, p=erase_prob)
    return image


def resize_shorter_side(image, shorter, *, method="bicubic", resize="pil"):
    """torchvision Resize(shorter): the shorter side becomes `shorter`, the longer int(shorter * long / short);
    levels as PIL's (see `resize_levels`)."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    short = tf.minimum(h, w)
    new_h = tf.where(h <= w, tf.constant(shorter, tf.float64), tf.floor(shorter * h / short))
    new_w = tf.where(w <= h, tf.constant(shorter, tf.float64), tf.floor(shorter * w / short))
    new_size = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    return resize_levels(image, new_size, method=method, resize=resize)


def center_crop(image, size):
    """torchvision CenterCrop(size) of an image at least size x size: offsets int(round((H - size) / 2))."""
    shape = tf.shape(image)
    top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
    left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
    crop = tf.slice(image, tf.stack([top, left, 0]), [size, size, -1])
    return tf.ensure_shape(crop, [size, size, image.shape[-1]])


def eval_transform(image_uint8, *, size=224, crop_pct=0.875, interpolation="bicubic", resize="pil",
                   image_ops="tf"):
    """DeiT/timm evaluation: resize the shorter side to int(size / crop_pct), centre crop, normalise.

    `image_ops='pil'` (with resize='pil') has Pillow resize and crop (`pil_ops.eval_view`, one numpy_function:
    the same levels, about twice the images/s of the TF ops that emulate its resize); otherwise TF ops."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]: the resized image has to cover the crop")
    if image_ops == "pil" and resize == "pil":
        return normalize(tf.cast(pil_ops.tf_eval_view(image_uint8, int(size / crop_pct), size,
                                                      method=interpolation), tf.float32))
    image = resize_shorter_side(image_uint8, int(size / crop_pct), method=interpolation, resize=resize)
    return normalize(center_crop(image, size))


def unresized_eval_transform(image_uint8, *, size: int):
    """DeiT's build_transform(is_train=False) at input_size <= 32: ToTensor and Normalize of the image as it is,
    which must then be size x size (CIFAR's 32 x 32 at 32); another size is refused."""
    problem = (f"an image that is not {size} x {size}, which DeiT's evaluation at image_size <= 32 (config.augment."
               f"crop 'auto' or 'padded') takes as it is, without resizing. {PADDED_FIX}")
    if None not in image_uint8.shape[:2] and tuple(image_uint8.shape[:2]) != (size, size):  # known as the graph is built
        raise ConfigError(f"{image_uint8.shape[0]} x {image_uint8.shape[1]} images: {problem}")
    shape = tf.shape(image_uint8, out_type=tf.int32)
    same = tf.debugging.assert_equal(shape[:2], tf.constant([size, size]), message=f"{SIZE_CHECK}: {problem}")
    with tf.control_dependencies([same]):
        image = tf.identity(image_uint8)
    return normalize(tf.ensure_shape(tf.cast(image, tf.float32), [size, size, image_uint8.shape[-1]]))


def eval_transform_of(data_config, size=None):
    """The eval transform of `config.data` as a tf.data map function, `image -> {'image': ...}`: resize by
    `data.crop_pct` (with `data.resize`), centre crop `size` (default `data.image_size`), normalise; on Pillow's
    ops unless `data.image_ops='tf'` (DINO's 'device' moves training ops only)."""
    size = data_config.image_size if size is None else size
    crop_pct, resize = data_config.crop_pct, resize_of(data_config)
    image_ops = "tf" if image_ops_of(data_config) == "tf" else "pil"
    return lambda image: {"image": eval_transform(image, size=size, crop_pct=crop_pct, resize=resize,
                                                  image_ops=image_ops)}
