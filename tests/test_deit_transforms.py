"""DeiT transforms: crop/erase sampling statistics against torchvision/timm, PIL resampling, tf.data == eager."""
import math
import os

import numpy as np
import pytest
from scipy import stats

from augment_testing import (assert_rate, eager, in_tf_data, map_in_tf_data, over_seeds, pil_resize_reference,
                             sample_image, unnormalize)
from vitdistill.data import deit_transforms as dt

N_DRAWS = 2000


def _torchvision_crop_params(height, width, count, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    return np.array([transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(count)])


def _crop_params(height, width, count, **kwargs):
    return np.stack(over_seeds(lambda seed: dt.sample_crop_box(seed, height, width, **kwargs), count), axis=1)


@pytest.mark.parametrize("height,width", [(375, 500), (400, 60)])
def test_crop_box_sampling_matches_torchvision(height, width):
    ours = _crop_params(height, width, N_DRAWS)  # (top, left, h, w), computed in tf.data
    want = _torchvision_crop_params(height, width, N_DRAWS)
    top, left, crop_h, crop_w = ours.T
    assert np.all((top >= 0) & (left >= 0) & (top + crop_h <= height) & (left + crop_w <= width))
    assert np.all((crop_h > 0) & (crop_w > 0))

    # (400, 60): few draws fit, and in_ratio 0.15 < 3/4 makes the fallback the full width, height
    # round(60 / (3/4)) = 80, centred.
    if height == 400:
        fallback_box = [(400 - 80) // 2, 0, 80, 60]
        is_fallback = np.all(ours == fallback_box, axis=1)
        torch_fallback = np.all(want == fallback_box, axis=1)
        assert abs(is_fallback.mean() - torch_fallback.mean()) < 0.05, (is_fallback.mean(), torch_fallback.mean())
        assert 0.2 < is_fallback.mean() < 0.9
    else:
        is_fallback = torch_fallback = np.zeros(N_DRAWS, bool)
    sampled = ours[~is_fallback]
    area = sampled[:, 2] * sampled[:, 3] / (height * width)
    # sides are rounded: allow half a pixel on each side
    slack = (sampled[:, 2] + sampled[:, 3]) / (2 * height * width) + 0.25 / (height * width)
    assert np.all(area >= 0.08 - slack) and np.all(area <= 1.0 + slack)
    log_aspect = np.log(sampled[:, 3] / sampled[:, 2])
    aspect_slack = 0.5 / sampled[:, 2] + 0.5 / sampled[:, 3]
    assert np.all(np.abs(log_aspect) <= math.log(4 / 3) + aspect_slack)

    torch_sampled = want[~torch_fallback]
    torch_area = torch_sampled[:, 2] * torch_sampled[:, 3] / (height * width)
    assert stats.ks_2samp(area, torch_area).pvalue > 1e-3
    assert stats.ks_2samp(log_aspect, np.log(torch_sampled[:, 3] / torch_sampled[:, 2])).pvalue > 1e-3
    # placement: uniform over the free range
    free = height - sampled[:, 2]
    relative_top = sampled[:, 0][free > 0] / free[free > 0]
    assert abs(relative_top.mean() - 0.5) < 0.05
    print(f"{height}x{width}: mean area {area.mean():.3f} (torchvision {torch_area.mean():.3f}), "
          f"fallback {is_fallback.mean():.3f} (torchvision {torch_fallback.mean():.3f})")


def test_crop_box_eager_matches_tf_data():
    for k in range(3):
        seed = np.array([k, 5], np.int64)
        got = eager(lambda s: dt.sample_crop_box(s, 375, 500), seed)
        np.testing.assert_array_equal(in_tf_data(lambda s: dt.sample_crop_box(s, 375, 500), seed), got)


def test_random_resized_crop_equals_pil_and_is_deterministic():
    """torchvision's resized_crop of a PIL image: `img.crop(box)`, then `Image.resize` (bicubic); our crop
    equals it level for level."""
    functional = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image

    image = sample_image("flower", size=(160, 120))
    seeds = np.array([[k, 3] for k in range(8)], np.int64)
    graph = map_in_tf_data(lambda s: dt.random_resized_crop(image, s, 48), seeds)
    assert graph.shape == (8, 48, 48, 3) and graph.dtype == np.float32
    assert len({g.tobytes() for g in graph}) == 8
    for k in range(3):
        got = eager(lambda s: dt.random_resized_crop(image, s, 48), seeds[k])
        np.testing.assert_allclose(graph[k], got, atol=1e-3)
        top, left, h, w = (int(v) for v in dt.sample_crop_box(seeds[k], 120, 160))
        want = np.asarray(pil_resize_reference(functional.crop(Image.fromarray(image), top, left, h, w), (48, 48)))
        np.testing.assert_array_equal(got, want)
        # tf.image.resize (config.data.resize='tf') is the same kernel without PIL's integer rounding
        fast = eager(lambda s: dt.random_resized_crop(image, s, 48, resize="tf"), seeds[k])
        difference = np.abs(fast - want)
        assert 0 < difference.mean() < 0.5 and difference.max() < 8, (difference.mean(), difference.max())


def test_flip_rate_and_effect():
    image = np.arange(4 * 6 * 3, dtype=np.float32).reshape(4, 6, 3)
    flipped = over_seeds(lambda seed: dt.horizontal_flip(image, seed), N_DRAWS)
    is_flipped = np.all(flipped == image[:, ::-1], axis=(1, 2, 3))
    assert np.all(is_flipped | np.all(flipped == image, axis=(1, 2, 3)))
    rate = assert_rate(is_flipped, 0.5, "flip")
    seed = np.array([7, 0], np.int64)
    np.testing.assert_array_equal(eager(dt.horizontal_flip, image, seed), in_tf_data(dt.horizontal_flip, image, seed))
    print(f"flip rate {rate:.3f}")


def test_random_erasing_statistics():
    zeros = np.zeros((32, 32, 3), np.float32)
    erased = over_seeds(lambda seed: dt.random_erasing(zeros, seed), N_DRAWS)
    touched = np.any(erased != 0, axis=-1)
    was_erased = touched.any(axis=(1, 2))
    rate = assert_rate(was_erased, 0.25, "erase")
    fractions = []
    for mask in touched[was_erased]:
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all(), "erased area is not one rectangle"
        fractions.append(mask.mean())
    noise = erased[was_erased][touched[was_erased]].ravel()
    assert abs(noise.mean()) < 0.02 and abs(noise.std() - 1) < 0.02
    assert stats.kstest(noise[:20000], "norm").pvalue > 1e-3
    # rounding the sides of a 32x32 box moves the area by up to about half a pixel per side
    fractions = np.array(fractions)
    assert fractions.min() >= 0.02 - 0.01 and fractions.max() <= 1 / 3 + 0.04

    seed = np.array([11, 0], np.int64)
    np.testing.assert_array_equal(eager(dt.random_erasing, zeros, seed), in_tf_data(dt.random_erasing, zeros, seed))
    print(f"erase rate {rate:.3f}; erased fraction {fractions.min():.3f}..{fractions.max():.3f}, "
          f"mean {fractions.mean():.3f}; noise mean {noise.mean():.3f} std {noise.std():.3f}")


def test_erase_box_sampling_matches_timm():
    torch = pytest.importorskip("torch")
    random_erasing = pytest.importorskip("timm.data.random_erasing")
    import random

    height = width = 64
    boxes = np.stack(over_seeds(lambda seed: dt.sample_erase_box(seed, height, width, p=1.0), N_DRAWS), axis=1)
    erase, top, left, erase_h, erase_w = boxes.T
    assert erase.all()  # one of the 10 attempts always fits
    assert np.all((top + erase_h <= height) & (left + erase_w <= width))
    area = erase_h * erase_w / (height * width)
    slack = (erase_h + erase_w) / (2 * height * width) + 0.25 / (height * width)  # sides are rounded
    assert np.all(area >= 0.02 - slack) and np.all(area <= 1 / 3 + slack)
    log_aspect = np.log(erase_h / erase_w)
    assert np.all(np.abs(log_aspect) <= np.log(1 / 0.3) + 0.5 / erase_h + 0.5 / erase_w)

    random.seed(0)
    torch.manual_seed(0)
    eraser = random_erasing.RandomErasing(probability=1.0, mode="pixel", device="cpu")
    timm_area = []
    for _ in range(1000):
        image = torch.zeros(1, height, width)
        eraser(image)
        timm_area.append(float((image != 0).float().mean()))
    assert stats.ks_2samp(area, timm_area).pvalue > 1e-3
    print(f"erased area mean {area.mean():.3f} (timm {np.mean(timm_area):.3f})")


def _disc_image(height, width, radius=30):
    rows, cols = np.mgrid[:height, :width]
    inside = (rows - (height - 1) / 2) ** 2 + (cols - (width - 1) / 2) ** 2 <= radius ** 2
    image = np.full((height, width, 3), 40, np.uint8)
    image[inside] = 220
    return image


def _levels(normalised):
    """Our normalised image back to its 0..255 levels (exact: normalisation is affine in float32)."""
    return np.round(unnormalize(normalised)).astype(np.uint8)


def _torchvision_eval(photo, resize, crop):
    """torchvision `Resize(resize, BICUBIC)` + `CenterCrop(crop)` of a PIL image, Resize's PIL call written
    out (shorter side `resize`, longer `int(resize * long / short)`) so that it runs as Pillow up to 12."""
    transforms = pytest.importorskip("torchvision.transforms")
    height, width = photo.shape[:2]
    short, long = min(height, width), max(height, width)
    size = (resize, int(resize * long / short)) if height <= width else (int(resize * long / short), resize)
    resized = pil_resize_reference(photo, (size[1], size[0]))
    return np.asarray(transforms.CenterCrop(crop)(resized))


@pytest.mark.parametrize("image_ops", ["tf", "pil"])
@pytest.mark.parametrize("height,width", [(300, 400), (450, 320)])
def test_eval_transform_keeps_centre_and_equals_pil(height, width, image_ops):
    def transform(image):
        return dt.eval_transform(image, image_ops=image_ops)

    image = _disc_image(height, width)
    got = eager(transform, image)
    assert got.shape == (224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(in_tf_data(transform, image), got, atol=1e-4)
    bright = unnormalize(got)[..., 0] > 130
    rows, cols = np.nonzero(bright)
    assert abs(rows.mean() - 111.5) <= 0.75 and abs(cols.mean() - 111.5) <= 0.75  # odd margins: half a pixel

    photo = sample_image("china", size=(width, height))
    np.testing.assert_array_equal(_levels(eager(transform, photo)), _torchvision_eval(photo, 256, 224))


def test_the_eval_transform_on_pillow_gives_the_tf_ops_levels_at_every_shape():
    """`eval_transform_of` runs Pillow's resize and crop unless data.image_ops='tf': the same levels as the TF
    ops (each checked against torchvision above) for tall, wide, square, already-sized and upscaled images."""
    from ml_collections import ConfigDict

    shapes = [(300, 400), (451, 320), (256, 256), (256, 300), (300, 256), (8, 8), (9, 14), (20, 17)]
    for size, crop_pct in ((224, 0.875), (16, 0.875), (16, 1.0)):
        transforms = {ops: dt.eval_transform_of(ConfigDict({"image_size": size, "crop_pct": crop_pct,
                                                            "resize": "pil", "image_ops": ops}))
                      for ops in ("tf", "pil", "device")}
        for height, width in shapes:
            if size == 224 and min(height, width) < 32:
                continue
            photo = sample_image("flower", size=(width, height))
            views = {ops: in_tf_data(t, photo)["image"] for ops, t in transforms.items()}
            np.testing.assert_array_equal(views["pil"], views["tf"], err_msg=f"{size} {crop_pct} {height}x{width}")
            np.testing.assert_array_equal(views["device"], views["pil"])


def test_eval_transform_refuses_crop_pct_above_one():
    with pytest.raises(ValueError, match="crop_pct=1.2"):
        dt.eval_transform(np.zeros((8, 8, 3), np.uint8), size=8, crop_pct=1.2)


def test_deit_train_transform_composition():
    image = sample_image("flower", size=(80, 60))
    seeds = np.array([[k, 1] for k in range(8)], np.int64)
    graph = map_in_tf_data(lambda s: dt.deit_train_transform(image, s, size=32), seeds)
    assert graph.shape == (8, 32, 32, 3) and graph.dtype == np.float32 and np.isfinite(graph).all()
    assert len({g.tobytes() for g in graph}) == 8
    np.testing.assert_allclose(eager(lambda s: dt.deit_train_transform(image, s, size=32), seeds[0]), graph[0],
                               atol=1e-3)

    # everything random switched off: the normalised bicubic resize of the whole (square) image, stored as
    # uint8 levels as PIL stores it (halves rounded up)
    square = sample_image("china", size=(64, 64))
    plain = eager(lambda s: dt.deit_train_transform(square, s, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                                    rand_augment=False, erase_prob=0.0), seeds[0])
    np.testing.assert_array_equal(_levels(plain), np.asarray(pil_resize_reference(square, (32, 32))))
    # the steps, one at a time: flip always, then erasing always
    flipped = eager(lambda s: dt.deit_train_transform(square, s, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0,
                                                      rand_augment=None, erase_prob=0.0), seeds[0])
    np.testing.assert_allclose(flipped, plain[:, ::-1], atol=1e-5)
    erased = eager(lambda s: dt.deit_train_transform(square, s, size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0,
                                                     rand_augment=False, erase_prob=1.0), seeds[0])
    changed = np.any(erased != plain, axis=-1)
    assert 0.01 < changed.mean() < 0.4


@pytest.mark.parametrize("image_ops", ["pil", "tf"])
def test_training_levels_and_erase_box_are_what_the_normalised_form_uses(image_ops):
    """DeiT's training pipeline ships uint8 levels and the erase box; normalised on the device they must equal
    the normalised form's image to the bit wherever the box leaves it, and the box must be where it erased."""
    import jax

    from vitdistill.data.device_ops import normalize_levels

    image = sample_image("flower", size=(80, 60))
    seeds = np.array([[k, 3] for k in range(12)], np.int64)
    kwargs = dict(size=32, erase_prob=0.5, image_ops=image_ops)
    floats = map_in_tf_data(lambda s: dt.deit_train_transform(image, s, **kwargs), seeds)
    shipped = map_in_tf_data(lambda s: dt.deit_train_transform(image, s, levels=True, **kwargs), seeds)
    assert shipped["image"].dtype == np.uint8 and shipped["erase"].shape == (12, 6)
    normalised = np.asarray(jax.jit(normalize_levels)(shipped["image"]))
    erased_any = 0
    assert len(set(shipped["erase"][:, 5])) == 12  # each example its own noise seed
    for f, n, (erase, top, left, height, width, _) in zip(floats, normalised, shipped["erase"]):
        box = np.zeros((32, 32), bool)
        if erase:
            box[top:top + height, left:left + width] = True  # timm: img[:, top:top + h, left:left + w] = noise
            erased_any += 1
        np.testing.assert_array_equal(f[~box], n[~box])
        assert np.all(f[box] != n[box]), "the normalised form erased elsewhere than the box says"
    assert 0 < erased_any < 12


def test_erase_boxes_fill_exactly_the_box_with_standard_normal_noise():
    import jax

    from vitdistill.data.device_ops import erase_boxes

    images = np.full((3, 64, 48, 3), 7.0, np.float32)
    boxes = np.array([[1, 5, 9, 40, 30, 11], [0, 0, 0, 64, 48, 12], [1, 63, 47, 1, 1, -13]], np.int32)
    out = np.asarray(jax.jit(erase_boxes)(jax.random.key(0), images, boxes))
    for image, (erase, top, left, height, width, _) in zip(out, boxes):
        box = np.zeros((64, 48), bool)
        if erase:
            box[top:top + height, left:left + width] = True
        assert np.all(image[~box] == 7.0) and np.all(image[box] != 7.0)
    noise = out[0, 5:45, 9:39].reshape(-1, 3)  # 1,200 pixels x 3 channels
    # N(0, 1): the mean within 4 standard errors, the standard deviation within 4 of its (sqrt(1 / 2n))
    assert abs(noise.mean()) < 4 / np.sqrt(noise.size) and abs(noise.std() - 1) < 4 / np.sqrt(2 * noise.size)
    assert stats.kstest(noise.ravel(), "norm").pvalue > 1e-3
    assert abs(np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]) < 4 / np.sqrt(len(noise))  # channels drawn apart
    # the noise follows the example's seed, not its row: rows reversed, each image erased as before
    reversed_out = np.asarray(erase_boxes(jax.random.key(0), images, boxes[::-1]))
    np.testing.assert_array_equal(reversed_out[::-1], out)
    other_seed = boxes.copy()
    other_seed[0, 5] = 99
    assert not np.array_equal(np.asarray(erase_boxes(jax.random.key(0), images, other_seed))[0], out[0])
    assert not np.array_equal(np.asarray(erase_boxes(jax.random.key(1), images, boxes))[0], out[0])


def test_erase_noise_is_jax_normal_at_the_image_shape_keyed_by_the_noise_seed():
    # The documented draw, written with jax.random's own API: image i's box holds
    # normal(fold_in(rng, noise_seed_i), image shape) at the box's positions. erase_boxes draws it flat
    # (faster on XLA:CPU); a flat draw that differed from the shaped one would fail here.
    import jax

    from vitdistill.data.device_ops import erase_boxes

    images = np.zeros((2, 20, 12, 3), np.float32)
    boxes = np.array([[1, 0, 0, 20, 12, 5], [1, 3, 2, 10, 7, 4000000000 - 2**32]], np.int32)
    out = np.asarray(jax.jit(erase_boxes)(jax.random.key(3), images, boxes))
    for i, seed in enumerate((5, 4000000000)):
        want = np.asarray(jax.random.normal(jax.random.fold_in(jax.random.key(3), np.uint32(seed)), (20, 12, 3)))
        top, left, height, width = boxes[i, 1:5]
        np.testing.assert_array_equal(out[i, top:top + height, left:left + width],
                                      want[top:top + height, left:left + width])


def test_the_384_fine_tuning_recipe_evaluates_as_deits_build_transform():
    """DeiT's build_transform(is_train=False) with input_size 384, eval_crop_ratio 0.875:
    Resize(int(384 / 0.875) = 438, bicubic), CenterCrop(384)."""
    from ml_collections import config_flags

    from vitdistill.methods import deit

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "deit_b_384.py")
    config = config_flags.config_flags._LoadConfigModule("config", path).get_config()
    photo = sample_image("china", size=(520, 470))
    ours = _levels(eager(lambda im: deit.eval_transform(config)(im)["image"], photo))
    assert ours.shape == (384, 384, 3)
    np.testing.assert_array_equal(ours, _torchvision_eval(photo, int(384 / 0.875), 384))


def test_pillow_backend_is_timms_transform_for_the_drawn_choices(monkeypatch):
    """image_ops='pil' (the default) is, for the crop box, flip and RandAugment choices drawn in TF, timm's chain
    of PIL calls: Pillow's resize of the crop, the mirror, then timm's own AugmentOp for each applied op at the
    drawn magnitude and sign, with DeiT's hparams (bicubic, mean fill). Level for level; the TF backend
    (held to PIL op by op in tests/test_randaugment.py) stays within a level of it but for a few pixels."""
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image, ImageOps

    from vitdistill.data import randaugment as ra

    posterize = ImageOps.posterize  # Pillow <= 12's 0 bits, black (Pillow 13 raises; DeiT ran on 8)
    monkeypatch.setattr(ImageOps, "posterize", lambda im, bits: im.point([0] * 768) if bits == 0 else posterize(im, bits))
    hparams = dict(img_mean=ra.FILL, interpolation=Image.BICUBIC, translate_const=100)
    image = sample_image("flower", size=(80, 60))
    seeds = np.array([[k, 3] for k in range(80)], np.int64)

    def transform(image_ops):
        return _levels(map_in_tf_data(lambda s: dt.deit_train_transform(image, s, size=32, erase_prob=0.0,
                                                                         image_ops=image_ops), seeds))

    pil, tf_levels = transform("pil"), transform("tf")
    applied = []
    for k, seed in enumerate(seeds):
        crop_seed, flip_seed, ra_seed, _ = eager(lambda s: dt.split_seed(s, 4), seed)
        top, left, height, width = (int(v) for v in eager(lambda s: dt.sample_crop_box(s, 60, 80), crop_seed))
        want = pil_resize_reference(Image.fromarray(image).crop((left, top, left + width, top + height)), (32, 32))
        if eager(lambda s: dt.coin(s, 0.5), flip_seed):
            want = want.transpose(Image.FLIP_LEFT_RIGHT)
        params = eager(ra.sample_params, ra_seed)
        for op, apply, magnitude, sign in zip(params["op"], params["apply"], params["magnitude"], params["sign"]):
            if apply:
                monkeypatch.setattr(auto_augment, "_randomly_negate", lambda v, s=float(sign): s * v)
                want = auto_augment.AugmentOp(ra.OP_NAMES[op], prob=1.0, magnitude=float(magnitude),
                                              hparams=hparams)(want)
                applied.append(ra.OP_NAMES[op])
        np.testing.assert_array_equal(pil[k], np.asarray(want), err_msg=f"seed {seed}")
    assert len(set(applied)) == len(ra.OP_NAMES) and len(applied) >= 60, sorted(applied)
    difference = np.abs(pil.astype(np.int32) - tf_levels.astype(np.int32))
    assert difference.mean() <= 0.01 and (difference > 1).mean() <= 1e-3, (difference.mean(), difference.max())


def _encoded_variants():
    """JPEGs of every chroma layout Pillow writes (4:2:0 and 4:2:2 at widths that are not multiples of 16,
    where cropping exactly at the window's columns changes pixels), grayscale, progressive and CMYK, one with bytes after its end, and a PNG."""
    import io

    from PIL import Image

    photo = Image.fromarray(sample_image("china", size=(333, 221)))

    def encoded(picture, **kwargs):
        out = io.BytesIO()
        picture.save(out, **kwargs)
        return out.getvalue()

    return {"420_odd": encoded(photo, format="JPEG", quality=80, subsampling=2),
            "422_odd": encoded(photo.crop((1, 0, 310, 200)), format="JPEG", quality=90, subsampling=1),
            "444": encoded(photo, format="JPEG", quality=90, subsampling=0),
            "gray": encoded(photo.convert("L"), format="JPEG"),
            "progressive": encoded(photo.crop((0, 3, 301, 221)), format="JPEG", progressive=True, subsampling=2),
            "cmyk": encoded(photo.convert("CMYK"), format="JPEG"),
            "trailing_bytes": encoded(photo, format="JPEG") + b"data after the end-of-image marker",
            "png": encoded(photo, format="PNG")}


@pytest.mark.parametrize("jpeg", ["accurate", "fast"])
def test_decoding_only_the_crops_window_gives_the_whole_decodings_pixels(jpeg):
    """`sources.decode_crop` (the DeiT pipeline's decoding) against the whole image decoded, then sliced:
    with accurate decoding that is Pillow's decoding (torchvision's), checked here for the RGB and gray files."""
    import io

    import tensorflow as tf
    from PIL import Image

    from vitdistill.data import sources

    rng = np.random.default_rng(0 if jpeg == "accurate" else 1)
    for name, data in _encoded_variants().items():
        whole = sources.decode_image(tf.constant(data), jpeg).numpy()
        if jpeg == "accurate" and name != "cmyk":
            np.testing.assert_array_equal(whole, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        height, width = whole.shape[:2]
        boxes = [[rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w]
                 for h, w in zip(rng.integers(1, height + 1, 40), rng.integers(1, width + 1, 40))]
        boxes += [[0, 0, height, width], [height - 1, width - 1, 1, 1], [5, 17, 9, 31]]

        def crop(box):
            return sources.decode_crop(tf.constant(data), lambda h, w: tf.constant(box, tf.int32), jpeg)

        for box in boxes:
            top, left, h, w = box
            np.testing.assert_array_equal(crop(box).numpy(), whole[top:top + h, left:left + w],
                                          err_msg=f"{name} {box}")


@pytest.mark.parametrize("image_ops", ["pil", "tf"])
def test_deits_view_of_an_encoded_image_is_its_view_of_the_decoded_image(image_ops):
    """The pipeline hands DeiT's transform a file's bytes (`Source.load_encoded`); the views must be those of the
    decoded image, crop window, flip, RandAugment and erase box alike."""
    import tensorflow as tf

    from vitdistill.data import sources

    seeds = np.array([[k, 5] for k in range(10)], np.int64)
    kwargs = dict(size=32, erase_prob=0.5, image_ops=image_ops, levels=True)
    variants = _encoded_variants()
    for name in ("420_odd", "png"):
        data = variants[name]
        decoded = sources.decode_image(tf.constant(data)).numpy()
        want = map_in_tf_data(lambda s: dt.deit_train_transform(decoded, s, **kwargs), seeds)
        got = map_in_tf_data(lambda s: dt.deit_train_transform(tf.constant(data), s, **kwargs), seeds)
        np.testing.assert_array_equal(got["image"], want["image"], err_msg=name)
        np.testing.assert_array_equal(got["erase"], want["erase"], err_msg=name)


def test_a_jpeg_cut_short_is_refused_whatever_window_is_cropped():
    """libjpeg decodes a window's rows alone, so a file cut short below the window would decode, and train, where
    the whole decoding (and Pillow, torchvision's) refuses it: `decode_crop` must refuse it too."""
    import tensorflow as tf

    from vitdistill.data import sources

    data = _encoded_variants()["420_odd"]
    for fraction in (0.5, 0.9, 0.99):
        cut = tf.constant(data[:int(len(data) * fraction)])
        with pytest.raises(tf.errors.InvalidArgumentError):
            sources.decode_image(cut)
        for box in ([0, 0, 8, 8], [0, 0, 221, 333]):
            with pytest.raises(tf.errors.InvalidArgumentError):
                sources.decode_crop(cut, lambda h, w: tf.constant(box, tf.int32))


def test_padded_crop_is_torchvisions_random_crop_with_padding_4():
    """DeiT's build_transform at input_size <= 32 trains on torchvision's RandomCrop(32, padding=4): the image
    with 4 black pixels on each side, a 32 x 32 window at offsets uniform over 0..8 (RandomCrop.get_params:
    randint(0, h - th + 1)). Each view must be torchvision's F.crop(F.pad(...)) at the drawn offsets, all 81
    offsets must come, evenly (chi-square over 8,100 draws), and an encoded image gives its decoding's views."""
    import io

    import tensorflow as tf
    from PIL import Image

    tf_functional = pytest.importorskip("torchvision.transforms.functional")
    torch = pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    image = sample_image("flower", size=(32, 32))
    draws = 8100
    padded, boxes = over_seeds(lambda s: dt.padded_crop_source(tf.constant(image), s, 32), draws)
    assert boxes.shape == (draws, 4) and (boxes[:, 2:] == 32).all()
    counts = np.zeros((9, 9), int)
    np.add.at(counts, (boxes[:, 0], boxes[:, 1]), 1)
    assert (counts > 0).all() and counts.sum() == draws
    assert stats.chisquare(counts.ravel()).pvalue > 1e-3, counts
    torch.manual_seed(0)  # torchvision's own range of offsets for the padded 40 x 40 image
    theirs = np.array([transforms.RandomCrop.get_params(torch.zeros(3, 40, 40), (32, 32))[:2] for _ in range(2000)])
    assert theirs.min() == boxes[:, :2].min() == 0 and theirs.max() == boxes[:, :2].max() == 8
    reference = tf_functional.pad(Image.fromarray(image), 4, fill=0)
    for (top, left, _, _), source in zip(boxes[:40], padded[:40]):
        want = np.asarray(tf_functional.crop(reference, int(top), int(left), 32, 32))
        np.testing.assert_array_equal(source[top:top + 32, left:left + 32], want)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    seed = tf.constant([5, 0], tf.int64)
    views = [eager(lambda im: dt.deit_train_transform(im, seed, size=32, crop="padded", erase_prob=0.0), im)
             for im in (tf.constant(image), tf.constant(png.getvalue()))]
    np.testing.assert_array_equal(views[0], views[1])


@pytest.mark.parametrize("image_ops", ["pil", "tf"])
def test_padded_deit_view_is_the_padded_crop_then_timms_chain(image_ops):
    """The whole view with crop='padded' is the torchvision RandomCrop(32, padding=4) window, untouched by any
    resize, then the same flip and RandAugment as the resized crop's (the choices drawn from the same seeds):
    with RandAugment off, exactly the window, mirrored where the flip coin says."""
    import tensorflow as tf

    image = sample_image("china", size=(32, 32))
    seeds = np.array([[k, 7] for k in range(24)], np.int64)
    views = _levels(map_in_tf_data(lambda s: dt.deit_train_transform(
        image, s, size=32, crop="padded", rand_augment=False, erase_prob=0.0, image_ops=image_ops), seeds))
    padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
    flips = 0
    for view, seed in zip(views, seeds):
        crop_seed, flip_seed, _, _ = eager(lambda s: dt.split_seed(s, 4), seed)
        top, left, _, _ = eager(lambda s: dt.padded_crop_source(tf.constant(image), s, 32)[1], crop_seed)
        want = padded[top:top + 32, left:left + 32]
        if eager(lambda s: dt.coin(s, 0.5), flip_seed):
            want, flips = want[:, ::-1], flips + 1
        np.testing.assert_array_equal(view, want, err_msg=f"seed {seed}")
    assert 0 < flips < len(seeds)


def test_deits_rule_crops_padded_at_32_px_and_below_and_evaluates_the_images_as_they_are():
    """build_transform: `resize_im = input_size > 32`; at 32 and below RandomCrop(32, padding=4) replaces the
    random resized crop and the evaluation is ToTensor + Normalize alone (torchvision's, written here as a
    reference); above 32, Resize + CenterCrop. The small-data recipes keep the resized crop (their images are
    upsampled). Images that DeiT's transform cannot take are refused with the two ways out."""
    import tensorflow as tf
    from PIL import Image

    from vitdistill import recipes, small_data
    from vitdistill.data import sources
    from vitdistill.errors import ConfigError
    from vitdistill.methods import deit

    transforms = pytest.importorskip("torchvision.transforms")
    config = recipes.deit("deit_tiny_patch16_224")
    for size, crop in ((32, "padded"), (24, "padded"), (33, "resized"), (224, "resized")):
        config.data.image_size = size
        assert deit.crop_of(config) == crop, size
        assert deit.train_transform(config).keywords["crop"] == crop
    config.data.image_size = 32
    photo = sample_image("flower", size=(32, 32))
    ours = eager(lambda im: deit.eval_transform(config)(im)["image"], tf.constant(photo))
    official = transforms.Compose([transforms.ToTensor(),  # timm's IMAGENET_DEFAULT_MEAN and _STD
                                   transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    np.testing.assert_allclose(ours, official(Image.fromarray(photo)).numpy().transpose(1, 2, 0), atol=1e-6)
    config.augment.crop = "resized"
    assert deit.crop_of(config) == "resized"
    config.augment.crop = "centre"
    with pytest.raises(ConfigError, match="config.augment.crop='centre'; use 'auto'"):
        deit.crop_of(config)

    assert deit.crop_of(small_data.small_deit_recipe("digits")) == "resized"
    assert deit.crop_of(small_data.runlocal(recipes.deit("deit_tiny_patch16_224"))) == "resized"
    digits = sources.digits("train")  # 8 x 8: smaller than the 24 px RandomCrop(32, padding=4) needs
    config.augment.crop = "auto"
    with pytest.raises(ConfigError, match=r"digits.* holds 8 x 8 images; config.augment.crop='auto' at image_size "
                                          r"<= 32 is DeiT's transform.*--config.augment.crop=resized"):
        deit.check_image_sizes(config, digits, digits)
    config.data.image_size = 16  # trains (8 + 2 x 4 = 16), but the evaluation takes 16 x 16 images only
    with pytest.raises(ConfigError, match="holds 8 x 8 images"):
        deit.check_image_sizes(config, digits, digits)
    config.data.image_size = 8
    deit.check_image_sizes(config, digits, digits)


def test_an_image_deits_padded_transform_cannot_take_is_named_as_such_not_as_a_corrupt_file(tmp_path):
    """A folder's images are only seen as they are read: one that RandomCrop(32, padding=4) cannot crop (20 x 20)
    stops training, and one that is not 32 x 32 stops the evaluation, each with DeiT's rule and the two ways
    out in one message, not as an image that did not decode (BadImageError's 'remove the corrupt file')."""
    from PIL import Image

    from vitdistill import recipes
    from vitdistill.data import pipeline, sources
    from vitdistill.errors import BadImageError, DataError
    from vitdistill.evaluate import batched
    from vitdistill.methods import deit
    from vitdistill.train import loop, sharding

    for c in range(2):
        (tmp_path / "train" / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 20, 3), 60 * c + i, np.uint8)).save(tmp_path / "train" / f"class{c}" / f"{i}.png")
    source = sources.image_folder(str(tmp_path), "train")
    config = recipes.deit("deit_tiny_patch16_224")
    config.data.image_size = 32
    stream = pipeline.train_dataset(source, deit.train_transform(config), seed=0, global_batch=2)
    with pytest.raises(DataError) as stopped:
        loop._next_batch(stream.as_numpy_iterator(), pipeline.TrainData(source, deit.train_transform(config)), 0, config)
    message = str(stopped.value)
    assert not isinstance(stopped.value, BadImageError) and "corrupt" not in message
    assert message.startswith(f"{source.name}, for step 0: an image smaller than 24 x 24, which RandomCrop(32, "
                              "padding=4) cannot crop"), message
    assert "--config.data.image_size" in message and "--config.augment.crop=resized" in message

    config.data.image_size = 24  # trains (20 + 8 >= 24); evaluates 24 x 24 images only
    pipeline.train_dataset(source, deit.train_transform(config), seed=0, global_batch=2).as_numpy_iterator().next()
    dataset, _ = pipeline.eval_dataset(source, deit.eval_transform(config), global_batch=2)
    with pytest.raises(DataError) as stopped:
        next(batched._global_batches(dataset, sharding.make_mesh(None), source, 2))
    message = str(stopped.value)
    assert not isinstance(stopped.value, BadImageError) and "corrupt" not in message
    assert message.startswith(f"{source.name}: an image that is not 24 x 24, which DeiT's evaluation"), message
