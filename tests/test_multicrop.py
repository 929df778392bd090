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
def test_jitter_ops_match_torchvision(op, factor):
    functional = _torchvision_functional()
    from PIL import Image

    ours = {"brightness": ra.brightness, "contrast": ra.contrast, "saturation": ra.color, "hue": mc.adjust_hue}[op]
    for name in IMAGES:
        image = sample_image(name)
        want = np.asarray(getattr(functional, f"adjust_{op}")(Image.fromarray(image), factor)).astype(np.float32)
        got = eager(lambda x: ours(x, factor), image.astype(np.float32))
        difference = np.abs(got - want)
        # PIL truncates blends to uint8; its hue works on 8-bit H, S, V (a few units off on saturated pixels)
        assert difference.mean() < 0.8, f"{op} {factor} on {name}: mean |diff| {difference.mean():.3f}"
        assert difference.max() < (10 if op == "hue" else 1.5), f"{op} {factor} on {name}: max {difference.max()}"
        assert np.abs(want - image).mean() > 1.0
        np.testing.assert_allclose(in_tf_data(lambda x: ours(x, factor), image.astype(np.float32)), got, atol=1e-3)


def test_color_jitter_matches_torchvision_in_its_random_order():
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
        np.testing.assert_allclose(graph[k], got, atol=1e-3)
        assert np.abs(got - want).mean() < 1.5, f"seed {seed}: mean |diff| {np.abs(got - want).mean():.3f}"


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


def test_grayscale_and_solarize_match_pil():
    from PIL import Image, ImageOps

    for name in IMAGES:
        image = sample_image(name)
        gray = np.asarray(Image.fromarray(image).convert("L"))
        got = eager(mc.grayscale, image.astype(np.float32))
        assert np.abs(got - gray[..., None]).max() <= 0.51
        np.testing.assert_array_equal(got[..., 0], got[..., 2])
        want = np.asarray(ImageOps.solarize(Image.fromarray(image), 128))
        np.testing.assert_array_equal(eager(mc.solarize, image.astype(np.float32)), want)
        np.testing.assert_array_equal(in_tf_data(mc.solarize, image.astype(np.float32)), want)


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_gaussian_blur_matches_pil(sigma):
    from PIL import Image, ImageFilter

    for name in IMAGES:
        image = sample_image(name)
        want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma))).astype(np.float32)
        got = eager(lambda x: mc.gaussian_blur(x, sigma), image.astype(np.float32))
        difference = np.abs(got - want)
        # PIL approximates the Gaussian with three box blurs
        assert difference.mean() < 0.7, f"sigma {sigma} on {name}: mean |diff| {difference.mean():.3f}"
        np.testing.assert_allclose(in_tf_data(lambda x: mc.gaussian_blur(x, sigma), image.astype(np.float32)), got,
                                   atol=1e-3)
    flat = np.full((20, 30, 3), 77.0, np.float32)
    np.testing.assert_allclose(mc.gaussian_blur(flat, sigma), flat, rtol=1e-6)


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
