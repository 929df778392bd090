"""DINO's photometric ops in JAX, level for level as Pillow computes them, for `config.data.image_ops="device"`.

With that setting the DINO pipeline makes only each view's crop, resize and flip (with Pillow) and ships the
view's photometric choices beside it (`multicrop.device_ops`); the train step applies them here, before it
normalises: colour jitter (brightness, contrast, saturation, hue in a random order), grayscale, Gaussian blur and
solarisation, DataAugmentationDINO's order. On one core of the host those ops were 0.51-0.52 of a view's time
(`experiments/dino_view_costs.py`); on an accelerator they are elementwise work beside the networks'.

Each op takes and returns uint8 levels held in float32, as the TF ops of `multicrop` and `randaugment` do (whose
steps these follow), in forms that give Pillow's levels whatever the compiler fuses:
- blends (ImageEnhance) split the factor into two parts whose products with a level difference are exact, so
  the one rounding of `factor * difference` is the same with or without a fused multiply-add;
- the 8-bit hue and saturation (Convert.c rgb2hsv, which takes the hue through float64 steps that float32
  cannot follow) are looked up in tables that Pillow itself fills: the hue depends only on which channel is the
  largest and the other two channels' distances below it (3 x 256 x 256 entries), the saturation on the largest
  channel and the spread (256 x 256);
- the box blur's partial sums are whole numbers below 2^24, exact in float32 in any order.
The way back from HSV (hsv2rgb) is float32 products as in Pillow; it is checked on the test machine's backend.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vitdistill.data import device_ops, multicrop

_FIELD = {name: index for index, name in enumerate(multicrop.DEVICE_OP_FIELDS)}


@functools.lru_cache(maxsize=None)
def hsv_tables() -> tuple:
    """(hue [3 * 256 * 256], saturation [256 * 256]) uint8 levels from Pillow's `convert("HSV")`: hue at
    case * 65536 + a * 256 + b, where case is the first largest channel (R, G, B) and a, b the other two
    channels' distances below it, in channel order; saturation at max * 256 + (max - min)."""
    from PIL import Image

    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    top = np.full_like(a, 255)
    cases = []
    for case in range(3):
        channels = [255 - a, 255 - b]
        channels.insert(case, top)
        cases.append(np.stack(channels, axis=-1))
    hue = np.asarray(Image.fromarray(np.concatenate(cases).astype(np.uint8)).convert("HSV"))[..., 0]
    top, spread = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    grey = np.clip(top - spread, 0, 255)  # max - spread, the smallest channel; entries with spread > max are unused
    colours = np.stack([top, grey, grey], axis=-1).astype(np.uint8)
    saturation = np.asarray(Image.fromarray(colours).convert("HSV"))[..., 1]
    return hue.reshape(-1), saturation.reshape(-1)


def _levels(image):
    return jnp.clip(jnp.round(image), 0.0, 255.0).astype(jnp.int32)


def luma(image):
    """Pillow's `convert("L")` (ITU-R 601-2 in 16-bit fixed point) as float32 levels [..., H, W, 1]."""
    levels = _levels(image)
    r, g, b = levels[..., 0], levels[..., 1], levels[..., 2]
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(jnp.float32)[..., None]


def _blend(degenerate, image, factor):
    """Pillow's `Image.blend(degenerate, image, factor)` into uint8: floor(clip(d + float32(factor * (i - d)))).
    `factor` is cut into its top 16 significant bits and the rest; each part times a difference of levels (8
    bits) is exact, so their sum is `factor * (i - d)` rounded once, fused into a multiply-add or not."""
    factor = jnp.asarray(factor, jnp.float32)
    high = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(factor, jnp.int32) & ~0xFF, jnp.float32)
    low = factor - high
    difference = image - degenerate
    return jnp.floor(jnp.clip(degenerate + (high * difference + low * difference), 0.0, 255.0))


def brightness(image, factor):
    return _blend(jnp.zeros_like(image), image, factor)


def contrast(image, factor):
    """ImageEnhance.Contrast: blend with the mean grey level, int(mean + 0.5) as Pillow rounds it (in integers:
    the sum of levels is exact, (2 sum + n) // 2n its rounded mean)."""
    return _blend(_mean_level(luma(image)), image, factor)


def _mean_level(grey):
    """int(mean + 0.5) of grey levels [H, W, 1], in integers, as float32."""
    count = grey.size
    return ((2 * jnp.sum(grey.astype(jnp.int32)) + count) // (2 * count)).astype(jnp.float32)


def saturation(image, factor):
    """ImageEnhance.Color: blend with the grayscale image."""
    return _blend(luma(image), image, factor)


def rgb_to_hsv_levels(image):
    """Pillow's `convert("HSV")`: float32 RGB levels -> int32 (H, S, V) levels, from `hsv_tables`."""
    hue_table, saturation_table = (jnp.asarray(t) for t in hsv_tables())
    levels = _levels(image)
    r, g, b = levels[..., 0], levels[..., 1], levels[..., 2]
    top = jnp.maximum(r, jnp.maximum(g, b))
    bottom = jnp.minimum(r, jnp.minimum(g, b))
    case = jnp.where(r == top, 0, jnp.where(g == top, 1, 2))
    first = jnp.where(case == 0, g, r)
    second = jnp.where(case == 2, g, b)
    hue = hue_table[case * 65536 + (top - first) * 256 + (top - second)].astype(jnp.int32)
    sat = saturation_table[top * 256 + (top - bottom)].astype(jnp.int32)
    return hue, sat, top


def _c_round(x):
    """C's round() of non-negative values: halves go up."""
    down = jnp.floor(x)
    return jnp.where(x - down >= 0.5, down + 1.0, down)


def hsv_levels_to_rgb(h, s, v):
    """Pillow's `convert("RGB")` of HSV levels (Convert.c hsv2rgb), in its float32 steps -> RGB levels [..., 3]."""
    turn = device_ops.exact_divide(h.astype(jnp.float32) * 6.0, 255.0)
    sector = jnp.floor(turn)
    frac = turn - sector
    fs = device_ops.exact_divide(s.astype(jnp.float32), 255.0)
    value = v.astype(jnp.float32)

    def level(x):
        return jnp.clip(_c_round(value * x), 0.0, 255.0)

    p, q, t = level(1.0 - fs), level(1.0 - fs * frac), level(1.0 - fs * (1.0 - frac))
    sector = sector.astype(jnp.int32) % 6
    channels = [value, value, value]
    for k, row in enumerate([(value, t, p), (q, value, p), (p, value, t), (p, q, value), (t, p, value),
                             (value, p, q)]):
        channels = [jnp.where(sector == k, new, old) for new, old in zip(row, channels)]
    rgb = jnp.stack(channels, axis=-1)
    return jnp.where((s == 0)[..., None], value[..., None], rgb)


def adjust_hue(image, shift):
    """torchvision's adjust_hue on a PIL image, its shift in hue levels given (`multicrop.hue_shift`)."""
    h, s, v = rgb_to_hsv_levels(image)
    return hsv_levels_to_rgb((h + shift) % 256, s, v)


def grayscale(image):
    return jnp.broadcast_to(luma(image), image.shape)


def solarize(image, threshold=128):
    return jnp.where(image < threshold, image, 255.0 - image)


def gaussian_blur(image, whole, ww, fw, *, reach: int):
    """Pillow's GaussianBlur, its box weights given (`multicrop.box_weights`): three box blurs along the rows,
    then three down the columns, each rounded to a level, as `multicrop.gaussian_blur` computes them. `reach`
    (`multicrop.blur_reach`) bounds the box for every sigma of the run."""
    distance = jnp.arange(reach + 1)
    weight = jnp.where(distance <= whole, ww, jnp.where(distance == whole + 1, fw, 0))
    high, low = (weight // 4096).astype(jnp.float32), (weight % 4096).astype(jnp.float32)
    levels = image
    for axis in (1, 0):  # rows first, then columns, as Pillow
        size = levels.shape[axis]
        edges_repeated = jnp.clip(jnp.arange(-reach, size + reach), 0, size - 1)
        for _ in range(multicrop.BLUR_PASSES):
            padded = jnp.take(levels, edges_repeated, axis=axis)
            shifted = [jax.lax.slice_in_dim(padded, k, k + size, axis=axis) for k in range(2 * reach + 1)]
            pairs = [shifted[reach]] + [shifted[reach - k] + shifted[reach + k] for k in range(1, reach + 1)]
            hi = sum(high[k] * p for k, p in enumerate(pairs))  # whole numbers below 2^24: exact in any order
            lo = sum(low[k] * p for k, p in enumerate(pairs))
            levels = jnp.floor((hi + jnp.floor((lo + 2.0 ** 23) / 4096.0)) / 4096.0)  # (sum + 2^23) >> 24
    return levels


def color_jitter(image, ops):
    """torchvision's ColorJitter for one view's `multicrop.device_ops`: its ops in their order, each once. The
    three blends (brightness, contrast, saturation: Image.blend with black, the mean grey level or the grey
    image) run as one blend a position whose degenerate image and factor the op picks; the hue, the costly op,
    runs once, between the positions before it and those after it."""
    factors = jax.lax.bitcast_convert_type(ops[_FIELD["brightness"]:_FIELD["saturation"] + 1], jnp.float32)
    order = jnp.stack([ops[_FIELD[f"order_{k}"]] for k in range(4)])  # op indices, -1 for an op left out
    hue_at = jnp.min(jnp.where(order == 3, jnp.arange(4), 4))  # 4: no hue

    def blends(x, positions):
        for k in range(4):
            op = order[k]
            grey = luma(x)
            degenerate = jnp.where(op == 0, 0.0, jnp.where(op == 1, _mean_level(grey), grey))
            blended = _blend(degenerate, x, factors[jnp.clip(op, 0, 2)])
            x = jnp.where(positions(k) & (op >= 0) & (op <= 2), blended, x)
        return x

    before = blends(image, lambda k: k < hue_at)
    turned = jnp.where(hue_at < 4, adjust_hue(before, ops[_FIELD["hue_shift"]]), before)
    return blends(turned, lambda k: k > hue_at)


def apply_view(levels, ops, *, reach: int):
    """One view's photometric ops: uint8 levels [H, W, 3] and its `multicrop.device_ops` int32 vector -> uint8
    levels, the same as Pillow's ops give for those choices (every op is computed, and chosen with `where`)."""
    image = levels.astype(jnp.float32)
    image = jnp.where(ops[_FIELD["color_jitter"]] != 0, color_jitter(image, ops), image)
    image = jnp.where(ops[_FIELD["grayscale"]] != 0, grayscale(image), image)
    blurred = gaussian_blur(image, ops[_FIELD["blur_whole"]], ops[_FIELD["blur_ww"]], ops[_FIELD["blur_fw"]],
                            reach=reach)
    image = jnp.where(ops[_FIELD["blur"]] != 0, blurred, image)
    image = jnp.where(ops[_FIELD["solarize"]] != 0, solarize(image), image)
    return image.astype(jnp.uint8)


def apply_views(levels, ops, *, max_sigma: float = 2.0):
    """A batch of one view: uint8 [B, H, W, 3] and int32 [B, len(DEVICE_OP_FIELDS)] -> uint8 [B, H, W, 3]."""
    return jax.vmap(functools.partial(apply_view, reach=multicrop.blur_reach(max_sigma)))(levels, ops)
