"""DINO multi-crop: photometric ops against torchvision/PIL, application rates, crop scales, tf.data == eager."""
import itertools

import numpy as np
import pytest
import tensorflow as tf

from augment_testing import (assert_rate, eager, in_tf_data, map_in_tf_data, over_seeds,
                             sample_image, unnormalize)
from vitdistill.data import multicrop as mc
from vitdistill.data import randaugment as ra

IMAGES = ("china", "flower")


def _torchvision_functional():
    return pytest.importorskip("torchvision.transforms.functional")


@pytest.mark.parametrize("op,factor", [("brightness", 0.6), ("brightness", 1.4), ("contrast", 0.6),
                                       ("contrast", 1.4), ("saturation", 0.8), ("saturation", 1.2),
                                       ("hue", -0.1), ("hue", 0.03), ("hue", 0.1)])
def test_jitter_ops_equal_torchvision_level_for_level(op, factor):
    functional = _torchvision_functional()
    from PIL import Image

    ours = {"brightness": ra.brightness, "contrast": ra.contrast, "saturation": ra.color, "hue": mc.adjust_hue}[op]
    for name in IMAGES:
        image = sample_image(name)
        want = np.asarray(getattr(functional, f"adjust_{op}")(Image.fromarray(image), factor)).astype(np.float32)
        assert np.abs(want - image).mean() > 1.0
        np.testing.assert_array_equal(eager(lambda x: ours(x, factor), image.astype(np.float32)), want,
                                      err_msg=f"{op} {factor} on {name}")
        np.testing.assert_array_equal(in_tf_data(lambda x: ours(x, factor), image.astype(np.float32)), want)


def _colours(count, seed=0):
    """`count` random RGB colours, every grey and the six pure hues, as an image [rows, 1024, 3] of uint8."""
    rng = np.random.default_rng(seed)
    special = [[v, v, v] for v in range(256)] + [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                                                 [0, 255, 255], [255, 0, 255]]
    colours = np.concatenate([np.array(special), rng.integers(0, 256, (count, 3))]).astype(np.uint8)
    colours = colours[: len(colours) // 1024 * 1024]
    return colours.reshape(-1, 1024, 3)


def test_hsv_and_hue_equal_pil_on_a_quarter_million_colours():
    # PIL's 8-bit HSV: rgb2hsv truncates H and S to levels, hsv2rgb rounds; torchvision shifts H by
    # int(hue_factor * 255) modulo 256. The float HSV used before (tf.image.adjust_hue) was up to 15.7 levels
    # off here, on 32-43 % of the values.
    functional = _torchvision_functional()
    from PIL import Image

    colours = _colours(2 ** 18)
    want_hsv = np.asarray(Image.fromarray(colours).convert("HSV"))
    got_hsv = np.stack([np.asarray(c) for c in mc.rgb_to_hsv_levels(colours.astype(np.float32))], axis=-1)
    np.testing.assert_array_equal(got_hsv, want_hsv)
    back = np.asarray(Image.fromarray(want_hsv, "HSV").convert("RGB"))
    np.testing.assert_array_equal(mc.hsv_levels_to_rgb(*(want_hsv[..., k].astype(np.int32) for k in range(3))),
                                  back)
    for factor in (-0.5, -0.1, -0.0371, 0.03, 0.1, 0.5):
        want = np.asarray(functional.adjust_hue(Image.fromarray(colours), factor))
        np.testing.assert_array_equal(mc.adjust_hue(colours.astype(np.float32), factor), want,
                                      err_msg=f"hue {factor}")


def test_color_jitter_equals_torchvision_in_its_random_order():
    functional = _torchvision_functional()
    from PIL import Image

    image = sample_image("flower")
    seeds = np.array([[k, 17] for k in range(6)], np.int64)
    graph = map_in_tf_data(lambda s: mc.color_jitter(image.astype(np.float32), s), seeds)
    for k, seed in enumerate(seeds):
        params = eager(mc.sample_color_jitter_params, seed)
        want = Image.fromarray(image)
        for index in params["order"]:
            op = ("brightness", "contrast", "saturation", "hue")[index]
            want = getattr(functional, f"adjust_{op}")(want, float(params[op]))
        want = np.asarray(want).astype(np.float32)
        got = eager(mc.color_jitter, image.astype(np.float32), seed)
        np.testing.assert_array_equal(got, want, err_msg=f"seed {seed}")
        np.testing.assert_array_equal(graph[k], want)


def test_color_jitter_parameter_statistics():
    count = 2000
    params = over_seeds(mc.sample_color_jitter_params, count)
    for name, (lo, hi) in {"brightness": (0.6, 1.4), "contrast": (0.6, 1.4), "saturation": (0.8, 1.2),
                           "hue": (-0.1, 0.1)}.items():
        values = params[name]
        assert values.min() >= lo and values.max() <= hi
        assert abs(values.mean() - (lo + hi) / 2) < 4.5 * (hi - lo) / np.sqrt(12 * count)
    orders = params["order"]
    assert np.all(np.sort(orders, axis=1) == np.arange(4))
    # each op lands in each position a quarter of the time; all 24 orders occur
    for op, position in itertools.product(range(4), range(4)):
        assert_rate(orders[:, position] == op, 0.25, f"op {op} at position {position}")
    assert len({tuple(o) for o in orders}) == 24


def test_grayscale_and_solarize_equal_pil():
    from PIL import Image, ImageOps

    for name in IMAGES:
        image = sample_image(name)
        gray = np.asarray(Image.fromarray(image).convert("L"))
        np.testing.assert_array_equal(eager(mc.grayscale, image.astype(np.float32)),
                                      np.repeat(gray[..., None], 3, axis=-1))
        want = np.asarray(ImageOps.solarize(Image.fromarray(image), 128))
        np.testing.assert_array_equal(eager(mc.solarize, image.astype(np.float32)), want)
        np.testing.assert_array_equal(in_tf_data(mc.solarize, image.astype(np.float32)), want)


def test_box_radius_follows_pils_formula():
    # Gwosdek et al.: sigma^2 / 3 per pass, box length L = sqrt(12 sigma^2 / 3 + 1), integer half
    # l = floor((L - 1) / 2), fraction a = (2l + 1)(l(l + 1) - 3 sigma^2 / 3) / (6 (sigma^2 / 3 - (l + 1)^2))
    for sigma in (0.1, 0.5, 1.0, 1.5, 2.0):
        variance = sigma ** 2 / 3
        whole = np.floor((np.sqrt(12 * variance + 1) - 1) / 2)
        frac = (2 * whole + 1) * (whole * (whole + 1) - 3 * variance) / (6 * (variance - (whole + 1) ** 2))
        assert abs(float(mc.pil_box_radius(sigma)) - (whole + frac)) < 1e-6
        assert 0 <= frac < 1


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_gaussian_blur_equals_pil(sigma):
    from PIL import Image, ImageFilter

    sigmas = [sigma] + np.random.default_rng(int(sigma * 10)).uniform(0.1, 2.0, 3).astype(np.float32).tolist()
    for name in IMAGES:
        image = sample_image(name)
        for s in sigmas:
            want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=s))).astype(np.float32)
            np.testing.assert_array_equal(eager(lambda x: mc.gaussian_blur(x, s), image.astype(np.float32)), want,
                                          err_msg=f"sigma {s} on {name}")
        np.testing.assert_array_equal(in_tf_data(lambda x: mc.gaussian_blur(x, sigma), image.astype(np.float32)),
                                      eager(lambda x: mc.gaussian_blur(x, sigma), image.astype(np.float32)))
    tiny = sample_image("china", size=(3, 2))  # narrower than the box: PIL's other edge branch
    want = np.asarray(Image.fromarray(tiny).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float32)
    np.testing.assert_array_equal(mc.gaussian_blur(tiny.astype(np.float32), sigma), want)


def test_a_view_after_its_crop_equals_torchvisions_chain_of_pil_ops():
    # Everything after the crop, in DataAugmentationDINO's order, on PIL images: the ops hand uint8 levels on,
    # so a view equals torchvision's op for op (the crop's bicubic resampling is TF's, within a few levels).
    functional = _torchvision_functional()
    from PIL import Image, ImageFilter, ImageOps

    from vitdistill.data import deit_transforms as dt
    image = sample_image("flower", size=(80, 64))
    checked = set()
    for k in range(40):
        seed = np.array([k, 5], np.int64)
        view, params = eager(lambda s: mc.augment_view(image, s, size=32, scale=(0.3, 1.0), blur_prob=0.5,
                                                       solarize_prob=0.5), seed)
        jitter = eager(mc.sample_color_jitter_params, eager(lambda s: dt.split_seed(s, 8), seed)[3])
        crop = eager(lambda b: dt.resized_crop(image, tuple(tf.unstack(b)), 32), params["crop"])
        np.testing.assert_array_equal(crop, np.round(crop))
        want = Image.fromarray(crop.astype(np.uint8))
        if params["flip"]:
            want = functional.hflip(want)
        if params["color_jitter"]:
            for index in jitter["order"]:
                op = ("brightness", "contrast", "saturation", "hue")[index]
                want = getattr(functional, f"adjust_{op}")(want, float(jitter[op]))
        if params["grayscale"]:
            want = want.convert("L").convert("RGB")
        if params["blur"]:
            want = want.filter(ImageFilter.GaussianBlur(radius=float(params["blur_sigma"])))
        if params["solarize"]:
            want = ImageOps.solarize(want, 128)
        checked |= {op for op in ("color_jitter", "grayscale", "blur", "solarize") if params[op]}
        np.testing.assert_allclose(unnormalize(view), np.asarray(want), atol=2e-3, err_msg=f"seed {seed}")
    assert checked == {"color_jitter", "grayscale", "blur", "solarize"}


def test_views_names_shapes_and_determinism():
    image = sample_image("china", size=(80, 64))
    seed = np.array([3, 1], np.int64)

    def views(s):
        return mc.multicrop_views(image, s, global_size=32, local_size=16, num_local=3)

    got = eager(views, seed)
    assert sorted(got) == ["global_0", "global_1", "local_0", "local_1", "local_2"]
    assert mc.view_names(3) == ["global_0", "global_1", "local_0", "local_1", "local_2"]  # the student's order
    assert got["global_0"].shape == (32, 32, 3) and got["local_2"].shape == (16, 16, 3)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in got.values())
    graph = in_tf_data(views, seed)
    for name in got:
        np.testing.assert_allclose(graph[name], got[name], atol=1e-3)
    other = eager(views, np.array([4, 1], np.int64))
    assert all(not np.allclose(other[name], got[name]) for name in got)
    assert not np.allclose(got["local_0"], got["local_1"])


@pytest.mark.parametrize("image_ops", ["pil", "tf"])
def test_training_views_are_levels_the_step_normalises_to_the_bit(image_ops):
    """The DINO training pipeline ships uint8 levels; `normalize_levels` inside the jitted step must give the very
    floats the pipeline's own normalisation (float32 (x - 255 mean) / (255 std), torchvision's) would have."""
    import jax

    from vitdistill.data.device_ops import normalize_levels

    image = sample_image("china", size=(80, 64))
    seed = np.array([5, 2], np.int64)

    def views(s, levels):
        return mc.multicrop_views(image, s, global_size=32, local_size=16, num_local=2, image_ops=image_ops,
                                  levels=levels)

    levels = in_tf_data(lambda s: views(s, True), seed)
    floats = in_tf_data(lambda s: views(s, False), seed)
    on_device = jax.jit(lambda batch: {k: normalize_levels(v) for k, v in batch.items()})(levels)
    for name in floats:
        assert levels[name].dtype == np.uint8 and levels[name].std() > 5  # real images, not a constant
        np.testing.assert_array_equal(np.asarray(on_device[name]), floats[name], err_msg=name)
    # the formula written out: (level / 255 - mean) / std
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(on_device["global_0"]), (levels["global_0"] / 255.0 - mean) / std,
                               atol=1e-5)
    already = np.ones((2, 3), np.float32)
    assert normalize_levels(already) is already  # float input counts as normalised


def test_application_rates_and_crop_scales():
    height, width = 48, 64
    image = sample_image("flower", size=(width, height))
    count = 1500
    params = over_seeds(lambda s: mc.multicrop_views(image, s, global_size=16, local_size=8, num_local=2,
                                                     return_params=True), count)
    views, applied = params
    expected = {
        "global_0": dict(blur=1.0, solarize=0.0),
        "global_1": dict(blur=0.1, solarize=0.2),
        "local_0": dict(blur=0.5, solarize=0.0),
        "local_1": dict(blur=0.5, solarize=0.0),
    }
    rates = {}
    for name, probs in expected.items():
        choices = applied[name]
        for op, p in dict(probs, flip=0.5, color_jitter=0.8, grayscale=0.2).items():
            rates[name, op] = assert_rate(choices[op], p, f"{name} {op}")
        sigma = choices["blur_sigma"]
        assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.05
        top, left, crop_h, crop_w = choices["crop"].T
        assert np.all((top >= 0) & (left >= 0) & (top + crop_h <= height) & (left + crop_w <= width))
        scale = (0.4, 1.0) if name.startswith("global") else (0.05, 0.4)
        area = crop_h * crop_w / (height * width)
        slack = (crop_h + crop_w) / (2 * height * width) + 0.25 / (height * width)
        assert np.all(area >= scale[0] - slack) and np.all(area <= scale[1] + slack), (name, area.min(), area.max())
        # grayscale shows in the pixels: three equal channels exactly when it was applied
        pixels = unnormalize(views[name])
        equal_channels = np.all(np.abs(pixels[..., 0] - pixels[..., 2]) < 1e-3, axis=(1, 2))
        np.testing.assert_array_equal(equal_channels, choices["grayscale"])
    print("rates: " + ", ".join(f"{name} {op} {rate:.3f}" for (name, op), rate in rates.items()))


def test_global_probabilities_need_two_entries():
    with pytest.raises(ValueError, match="global_blur_probs"):
        mc.multicrop_views(np.zeros((8, 8, 3), np.uint8), tf.constant([0, 0]), global_blur_probs=(1.0,))


@pytest.mark.parametrize("resize", ["pil", "tf"])
def test_pillow_backend_makes_the_tf_backends_views_level_for_level(resize):
    # The two image_ops backends apply the same drawn choices: Pillow's own calls (the default, what torchvision
    # runs) and this module's TF ops, which other tests hold to PIL op by op. Every op is hit many times over.
    image = sample_image("flower", size=(80, 64))

    def views(seed, image_ops):
        return mc.multicrop_views(image, seed, global_size=32, local_size=16, num_local=3, resize=resize,
                                  global_solarize_probs=(0.5, 0.5), image_ops=image_ops, return_params=True)

    seeds = np.stack([np.arange(60), np.full(60, 7)], axis=1).astype(np.int64)
    pil, pil_params = map_in_tf_data(lambda s: views(s, "pil"), seeds)
    tf_views, tf_params = map_in_tf_data(lambda s: views(s, "tf"), seeds)
    for name in pil:
        for key in pil_params[name]:
            np.testing.assert_array_equal(pil_params[name][key], tf_params[name][key])
        np.testing.assert_allclose(unnormalize(pil[name]), unnormalize(tf_views[name]), atol=2e-3, err_msg=name)
    applied = {op: sum(int(pil_params[name][op].sum()) for name in pil)
               for op in ("flip", "color_jitter", "grayscale", "blur", "solarize")}
    assert min(applied.values()) >= 20, applied


def test_image_ops_must_be_pil_tf_or_device():
    import ml_collections

    from vitdistill.data import deit_transforms as dt
    from vitdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"image_ops='torch'.*'pil'.*'tf'.*'device'"):
        dt.image_ops_of(ml_collections.ConfigDict({"image_ops": "torch"}))
    assert dt.image_ops_of(ml_collections.ConfigDict({})) == "pil"
    assert dt.image_ops_of(ml_collections.ConfigDict({"image_ops": "device"})) == "device"
