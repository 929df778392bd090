"""Augmentation ops run by Pillow itself inside the tf.data pipeline (`config.data.image_ops="pil"`).

torchvision applies DeiT's and DINO's augmentations to PIL images; running those very Pillow calls gives
its levels by construction, and Pillow's C loops release the GIL, so tf.data's parallel map spreads them
over the host's cores. The random choices are drawn in TF (the stateless, per-example seeds of the graph
ops in `multicrop` and `deit_transforms`), so both backends make the same choices and resume alike; only
applying them happens here, in `tf.numpy_function`.

Resizes run in the order Pillow <= 12 ran them (`pil_order.resize`: Pillow 13 may run the vertical pass
first, python-pillow/Pillow#9549).
"""
import numpy as np
import tensorflow as tf
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from vitdistill.data.pil_order import FILTERS, resize, shorter_side_size
from vitdistill.data.randaugment import OP_NAMES


def _text(value) -> str:
    """A string argument as tf.numpy_function passes it (bytes), or as Python code does."""
    return value.decode() if isinstance(value, bytes) else str(value)


def resized_crop(picture: Image.Image, box, size: int, method: str = "bicubic") -> Image.Image:
    """torchvision's F.resized_crop on a PIL image: crop (top, left, height, width), then resize."""
    top, left, height, width = (int(v) for v in box)
    return resize(picture.crop((left, top, left + width, top + height)), size, size, method)


def eval_view(image, shorter, size, method) -> np.ndarray:
    """torchvision's Resize(shorter) then CenterCrop(size) of a PIL image, as DeiT's and DINO's evaluations apply
    them: the shorter side to `shorter`, the longer to int(shorter * long / short), then the centre size x size at
    offsets int(round((side - size) / 2)). uint8 [size, size, 3]."""
    shorter, size = int(shorter), int(size)
    picture = Image.fromarray(np.asarray(image))
    width, height = shorter_side_size(*picture.size, shorter)
    picture = resize(picture, width, height, _text(method))
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return np.asarray(picture.crop((left, top, left + size, top + size)), np.uint8)


def tf_eval_view(image_uint8, shorter: int, size: int, *, method="bicubic"):
    """`eval_view` inside a TF graph (one `tf.numpy_function`): uint8 [size, size, 3]."""
    view = tf.numpy_function(eval_view, [image_uint8, shorter, size, method], tf.uint8, stateful=False)
    return tf.ensure_shape(view, [size, size, 3])


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def adjust(picture: Image.Image, op: str, factor: float) -> Image.Image:
    """torchvision's adjust_{brightness, contrast, saturation, hue} on a PIL image."""
    if op == "brightness":
        return ImageEnhance.Brightness(picture).enhance(factor)
    if op == "contrast":
        return ImageEnhance.Contrast(picture).enhance(factor)
    if op == "saturation":
        return ImageEnhance.Color(picture).enhance(factor)
    hue, saturation, value = picture.convert("HSV").split()
    shifted = (np.asarray(hue, np.uint8) + np.int32(factor * 255).astype(np.uint8)).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(shifted, "L"), saturation, value)).convert("RGB")


def grayscale(picture: Image.Image) -> Image.Image:
    """torchvision's rgb_to_grayscale(num_output_channels=3) on a PIL image."""
    return Image.fromarray(np.dstack([np.asarray(picture.convert("L"), np.uint8)] * 3), "RGB")


def dino_view(picture: Image.Image, box, size: int, method: str, flip, jitter, order, factors, gray, blur, sigma,
              solarize) -> np.ndarray:
    """One DINO view as DataAugmentationDINO makes it with torchvision, for the choices given: uint8 [size, size, 3].

    `order` lists the colour-jitter ops to apply as indices into `JITTER_OPS`, in ColorJitter's random order
    (an op of strength 0 left out); `factors` holds the 4 ops' factors."""
    picture = resized_crop(picture, box, int(size), method)
    if flip:
        picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    if jitter:
        for index in order:
            picture = adjust(picture, JITTER_OPS[index], float(factors[index]))
    if gray:
        picture = grayscale(picture)
    if blur:
        picture = picture.filter(ImageFilter.GaussianBlur(radius=float(sigma)))
    if solarize:
        picture = ImageOps.solarize(picture, 128)
    return np.asarray(picture, np.uint8)


def dino_views(sources, boxes, sizes, flips, jitters, orders, factors, grays, blurs, sigmas, solarizes, method):
    """`dino_view` for each view of one image (one source image for all, or one per view); a list of arrays."""
    method = _text(method)
    pictures = [Image.fromarray(np.asarray(source)) for source in sources]
    return [dino_view(pictures[min(v, len(pictures) - 1)], boxes[v], sizes[v], method, flips[v], jitters[v],
                      orders[v], factors[v], grays[v], blurs[v], sigmas[v], solarizes[v]) for v in range(len(sizes))]


def tf_dino_views(sources, boxes, sizes, choices, *, active, method="bicubic", dtype=tf.float32):
    """`dino_views` inside a TF graph, one `tf.numpy_function` for all the views of an image: each view's uint8
    levels as `dtype` [size, size, 3] (tf.uint8: as Pillow made them, no cast). `choices` are
    `multicrop.view_choices`' for each view."""
    def stack(key):
        return tf.stack([c[key] for c in choices])

    active_t = tf.constant(active)
    orders = tf.stack([tf.boolean_mask(c["jitter"]["order"], tf.gather(active_t, c["jitter"]["order"]))
                       for c in choices])
    factors = tf.stack([tf.stack([c["jitter"][op] for op in JITTER_OPS]) for c in choices])
    count = len(sources)
    views = tf.numpy_function(
        lambda *args: dino_views(args[:count], *args[count:]),
        list(sources) + [tf.stack(boxes), tf.constant(sizes), stack("flip"), stack("color_jitter"), orders, factors,
                         stack("grayscale"), stack("blur"), stack("blur_sigma"), stack("solarize"), method],
        [tf.uint8] * len(sizes), stateful=False)
    if len(sizes) == 1 and not isinstance(views, (list, tuple)):
        views = [views]  # eagerly, a single output comes back bare
    return [tf.cast(tf.ensure_shape(view, [size, size, 3]), dtype) for view, size in zip(views, sizes)]


# ----- DeiT: RandomResizedCrop, flip and timm's RandAugment (rand-m9-mstd0.5-inc1) as timm 0.3.2 calls Pillow -----

MAX_LEVEL = 10.0  # timm's _MAX_LEVEL
TRANSLATE_PCT = 0.45  # timm's default hparams['translate_pct']


def _lut(picture: Image.Image, table) -> Image.Image:
    return picture.point(list(table) * len(picture.getbands()))


def posterize(picture: Image.Image, bits: int) -> Image.Image:
    """timm's posterize (ImageOps.posterize; the image itself for bits >= 8) as Pillow <= 12 computes it: 0 bits
    is black (Pillow 13 raises for it)."""
    if bits >= 8:
        return picture
    mask = ~(2 ** (8 - bits) - 1)
    return _lut(picture, [i & mask for i in range(256)])


def solarize_add(picture: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """timm's solarize_add: `add` added to the levels below `threshold`, saturating at 255."""
    return _lut(picture, [min(255, i + add) if i < threshold else i for i in range(256)])


def rand_augment_op(picture: Image.Image, name: str, magnitude: float, sign: float, fill, resample) -> Image.Image:
    """timm 0.3.2's AugmentOp `name` (auto_augment.py, _RAND_INCREASING_TRANSFORMS) at `magnitude` in 0..10;
    `sign` is its _randomly_negate (-1 negates). The level-to-argument rules are timm's, in float64 as there."""
    level = magnitude / MAX_LEVEL
    geometric = {"resample": resample, "fillcolor": tuple(int(v) for v in fill)}
    if name == "AutoContrast":
        return ImageOps.autocontrast(picture)
    if name == "Equalize":
        return ImageOps.equalize(picture)
    if name == "Invert":
        return ImageOps.invert(picture)
    if name == "Rotate":
        return picture.rotate(sign * level * 30.0, **geometric)
    if name == "PosterizeIncreasing":
        return posterize(picture, 4 - int(level * 4))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(picture, 256 - int(level * 256))
    if name == "SolarizeAdd":
        return solarize_add(picture, int(level * 110))
    enhancers = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                 "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}
    if name in enhancers:
        return enhancers[name](picture).enhance(1.0 + sign * level * 0.9)
    if name in ("ShearX", "ShearY"):
        factor = sign * level * 0.3
        matrix = (1, factor, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, factor, 1, 0)
        return picture.transform(picture.size, Image.AFFINE, matrix, **geometric)
    if name in ("TranslateXRel", "TranslateYRel"):
        pct = sign * level * TRANSLATE_PCT
        matrix = ((1, 0, pct * picture.size[0], 0, 1, 0) if name == "TranslateXRel"
                  else (1, 0, 0, 0, 1, pct * picture.size[1]))
        return picture.transform(picture.size, Image.AFFINE, matrix, **geometric)
    raise ValueError(f"no RandAugment op {name!r}")


def deit_view(image, box, size, method, flip, ops, applies, magnitudes, signs, fill) -> np.ndarray:
    """DeiT's training image up to RandAugment as timm 0.3.2's transform makes it with Pillow, for the choices
    given: the crop `box` (top, left, height, width) resized to size x size, flipped if `flip`, then each
    RandAugment op `ops[k]` (an index into randaugment.OP_NAMES) where `applies[k]`. uint8 [size, size, 3]."""
    method = _text(method)
    picture = resized_crop(Image.fromarray(np.asarray(image)), box, int(size), method)
    if flip:
        picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
    for op, apply, magnitude, sign in zip(ops, applies, magnitudes, signs):
        if apply:
            picture = rand_augment_op(picture, OP_NAMES[int(op)], float(magnitude), float(sign), fill,
                                      FILTERS[method])
    return np.asarray(picture, np.uint8)


def tf_deit_view(image_uint8, box, size: int, flip, params, *, fill, method="bicubic", dtype=tf.float32):
    """`deit_view` inside a TF graph (one `tf.numpy_function`): its levels as `dtype` [size, size, 3]. `params` are
    `randaugment.sample_params`' (empty [0]-shaped ones for no RandAugment)."""
    view = tf.numpy_function(
        deit_view, [image_uint8, box, size, method, flip, params["op"], params["apply"], params["magnitude"],
                    params["sign"], tf.constant(fill, tf.int32)], tf.uint8, stateful=False)
    return tf.cast(tf.ensure_shape(view, [size, size, 3]), dtype)
