"""RandAugment (timm rand-m9-mstd0.5-inc1): each op against timm's PIL op, eager and in tf.data; sampling statistics."""
import numpy as np
import pytest
import tensorflow as tf
from scipy import stats

from augment_testing import (assert_rate, eager, in_tf_data, map_in_tf_data, over_seeds,
                             sample_image)
from vitdistill.data import randaugment as ra

IMAGES = ("china", "flower")

# (our op, timm op name in auto_augment, argument, PIL resample needed, tolerance on the mean |difference|)
# Photometric ops: PIL truncates blends to uint8 where we keep floats (<= 1 unit per pixel).
# Geometric ops: bicubic (DeiT's) by default, PIL's edge rule reproduced; PIL truncates the result.
OP_CASES = {
    "auto_contrast": (ra.auto_contrast, "auto_contrast", None, 0.0),
    "equalize": (ra.equalize, "equalize", None, 0.0),
    "invert": (ra.invert, "invert", None, 0.0),
    "posterize_1": (ra.posterize, "posterize", 1, 0.0),
    "posterize_4": (ra.posterize, "posterize", 4, 0.0),
    "solarize_26": (ra.solarize, "solarize", 26, 0.0),
    "solarize_128": (ra.solarize, "solarize", 128, 0.0),
    "solarize_add_99": (ra.solarize_add, "solarize_add", 99, 0.0),
    "color_0.19": (ra.color, "color", 0.19, 0.0),
    "color_1.81": (ra.color, "color", 1.81, 0.0),
    "contrast_0.19": (ra.contrast, "contrast", 0.19, 0.0),
    "contrast_1.81": (ra.contrast, "contrast", 1.81, 0.0),
    "brightness_0.19": (ra.brightness, "brightness", 0.19, 0.0),
    "brightness_1.81": (ra.brightness, "brightness", 1.81, 0.0),
    "sharpness_0.19": (ra.sharpness, "sharpness", 0.19, 0.0),
    "sharpness_1.81": (ra.sharpness, "sharpness", 1.81, 0.0),
    "rotate_27": (ra.rotate, "rotate", 27.0, 0.01),
    "rotate_-13.5": (ra.rotate, "rotate", -13.5, 0.01),
    "shear_x_0.27": (ra.shear_x, "shear_x", 0.27, 0.01),
    "shear_y_-0.27": (ra.shear_y, "shear_y", -0.27, 0.01),
    "translate_x_rel_0.405": (ra.translate_x_rel, "translate_x_rel", 0.405, 0.01),
    "translate_y_rel_-0.1234": (ra.translate_y_rel, "translate_y_rel", -0.1234, 0.01),
}
GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x_rel", "translate_y_rel")


def _timm_op(name, arg, pil_image, resample):
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image

    fn = getattr(auto_augment, name)
    args = () if arg is None else (arg,)
    kwargs = dict(fillcolor=ra.FILL, resample=getattr(Image, resample)) if name in GEOMETRIC else {}
    return np.asarray(fn(pil_image, *args, **kwargs)).astype(np.float32)


def _our_op(fn, arg):
    if arg is None:
        return fn

    def op(image):
        return fn(image, arg)

    return op


def _test_images():
    """The two sample images, and a dim, low-contrast one that AutoContrast and Equalize visibly change."""
    china = sample_image("china")
    return {"china": china, "flower": sample_image("flower"), "dim china": (china // 3 + 60).astype(np.uint8)}


@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_op_matches_timm_eagerly_and_in_tf_data(case):
    from PIL import Image

    fn, timm_name, arg, tolerance = OP_CASES[case]
    change = 0.0
    for name, image in _test_images().items():
        want = _timm_op(timm_name, arg, Image.fromarray(image), "BICUBIC")
        x = image.astype(np.float32)
        got = eager(_our_op(fn, arg), x)
        difference = np.abs(got - want)
        assert difference.mean() <= tolerance + 1e-6, f"{case} on {name}: mean |diff| {difference.mean():.3f}"
        # Photometric ops: PIL's uint8 levels exactly. Warps: PIL interpolates in double, we in float32, so a
        # level within float32 rounding of an integer can truncate to its neighbour (at most 0.3 % of values here).
        assert difference.max() <= (0 if tolerance == 0 else 1.0), f"{case} on {name}: max |diff| {difference.max()}"
        graph = np.abs(in_tf_data(_our_op(fn, arg), x) - got)  # graph vs eager: float32 rounding, then truncation
        assert graph.max() <= (1e-2 if tolerance == 0 else 1.0) and graph.mean() <= max(tolerance, 1e-4), case
        change = max(change, np.abs(want - x).mean())
    assert change > 1.0, f"{case} barely changes the test images: a weak test"


@pytest.mark.parametrize("case", [c for c in sorted(OP_CASES) if c.rsplit("_", 1)[0] in GEOMETRIC])
def test_geometric_ops_bilinear_match_timm_bilinear(case):
    """interpolation="bilinear" is PIL's bilinear warp; bicubic and bilinear differ by more than the tolerance."""
    from PIL import Image

    fn, timm_name, arg, tolerance = OP_CASES[case]
    for name, image in _test_images().items():
        pil = Image.fromarray(image)
        want = _timm_op(timm_name, arg, pil, "BILINEAR")
        got = eager(lambda x: fn(x, arg, interpolation="bilinear"), image.astype(np.float32))
        difference = np.abs(got - want)
        assert difference.mean() <= tolerance, f"{case} on {name}: mean |diff| {difference.mean():.3f}"
        assert difference.max() <= 1.0, f"{case} on {name}: max |diff| {difference.max()}"
        graph = np.abs(in_tf_data(lambda x: fn(x, arg, interpolation="bilinear"), image.astype(np.float32)) - got)
        assert graph.max() <= 1.0 and graph.mean() <= tolerance, case
        if name != "dim china" and not case.startswith("translate"):  # whole-pixel shifts are the same either way
            other = np.abs(got - _timm_op(timm_name, arg, pil, "BICUBIC")).mean()
            assert other > tolerance, f"{case} on {name}: PIL's bilinear and bicubic differ by only {other:.3f}"


def test_bad_interpolation_is_refused():
    image = tf.zeros([8, 8, 3])
    with pytest.raises(ValueError, match="bicubic.*bilinear.*nearest"):
        ra.rotate(image, 10.0, interpolation="nearest")
    with pytest.raises(ValueError, match="interpolation"):
        ra.rand_augment(image, tf.constant([1, 2]), interpolation="area")


@pytest.mark.parametrize("name", ["Rotate", "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                                  "ColorIncreasing", "ShearX", "TranslateXRel"])
def test_level_functions_match_timm(name, monkeypatch):
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    ours = {
        "Rotate": ra.rotate_level, "PosterizeIncreasing": lambda m, s: ra.posterize_increasing_level(m),
        "SolarizeIncreasing": lambda m, s: ra.solarize_increasing_level(m),
        "SolarizeAdd": lambda m, s: ra.solarize_add_level(m), "ColorIncreasing": ra.enhance_increasing_level,
        "ShearX": ra.shear_level, "TranslateXRel": ra.translate_rel_level,
    }[name]
    magnitudes = np.linspace(0.0, 10.0, 81, dtype=np.float32)
    for sign in (1.0, -1.0):
        monkeypatch.setattr(auto_augment, "_randomly_negate", lambda v, s=sign: s * v)
        want = [auto_augment.LEVEL_TO_ARG[name](float(m), {})[0] for m in magnitudes]
        got = eager(lambda m, s=sign: ours(m, tf.constant(s)), magnitudes)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("magnitude,sign", [(9.0, 1.0), (4.3, -1.0)])
def test_apply_op_matches_timm_augment_op(magnitude, sign, monkeypatch):
    """Dispatch + level + op end to end, against timm's AugmentOp (prob 1, no magnitude noise)."""
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image

    monkeypatch.setattr(auto_augment, "_randomly_negate", lambda v: sign * v)
    hparams = dict(img_mean=ra.FILL, interpolation=Image.BICUBIC, translate_const=100)  # DeiT's
    assert tuple(auto_augment._RAND_INCREASING_TRANSFORMS) == ra.OP_NAMES
    image = sample_image("flower")
    for index, name in enumerate(ra.OP_NAMES):
        want = np.asarray(auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(
            Image.fromarray(image))).astype(np.float32)
        got = eager(lambda x, i=index: ra.apply_op(x, i, magnitude, sign), image.astype(np.float32))
        difference = np.abs(got - want)
        if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
            assert difference.mean() <= 0.01 and difference.max() <= 1.0, f"{name}: mean |diff| {difference.mean():.3f}"
        else:
            assert difference.max() == 0, f"{name}: max |diff| {difference.max()}"


def test_posterize_to_zero_bits_is_black():
    """Magnitude 10 gives PosterizeIncreasing 0 bits: black, as with the Pillow of DeiT's time
    (Pillow >= 10 rejects bits=0, so timm raises there)."""
    image = sample_image("china").astype(np.float32)
    assert ra.posterize_increasing_level(tf.constant(10.0)).numpy() == 0
    np.testing.assert_array_equal(ra.posterize(image, 0), 0.0)
    np.testing.assert_array_equal(ra.posterize(image, 8), image)


def test_sampling_statistics():
    count = 3000
    params = over_seeds(lambda seed: ra.sample_params(seed, num_ops=2, magnitude=9.0, magnitude_std=0.5), count)
    ops = params["op"].ravel()
    assert ops.min() >= 0 and ops.max() < len(ra.OP_NAMES)
    frequencies = np.bincount(ops, minlength=len(ra.OP_NAMES))
    chi2 = stats.chisquare(frequencies)
    assert chi2.pvalue > 1e-3, f"op frequencies {frequencies} not uniform (p={chi2.pvalue:.2g})"
    apply_rate = assert_rate(params["apply"], 0.5, "op applied")
    negative_rate = assert_rate(params["sign"] < 0, 0.5, "negated")
    assert set(np.unique(params["sign"])) == {-1.0, 1.0}

    magnitudes = params["magnitude"].ravel()
    assert magnitudes.min() >= 0.0 and magnitudes.max() <= 10.0
    # N(9, 0.5) clipped to [0, 10]: a point mass of P(z >= 2) at 10, the normal law below it
    at_ten = assert_rate(magnitudes == 10.0, stats.norm.sf(2.0), "magnitude clipped at 10")
    expected_mean = 9.0 - 0.5 * (stats.norm.pdf(2.0) - 2.0 * stats.norm.sf(2.0))
    assert abs(magnitudes.mean() - expected_mean) < 4.5 * 0.5 / np.sqrt(magnitudes.size)
    below = magnitudes[magnitudes < 10.0]
    assert stats.kstest(below, lambda v: stats.norm.cdf(v, 9.0, 0.5) / stats.norm.cdf(2.0)).pvalue > 1e-3
    print(f"op counts {frequencies.tolist()} (chi2 p {chi2.pvalue:.2f}); applied {apply_rate:.3f}; "
          f"negated {negative_rate:.3f}; magnitude mean {magnitudes.mean():.3f} std {magnitudes.std():.3f}, "
          f"at 10: {at_ten:.3f}")


def test_rand_augment_eager_matches_tf_data_and_seeds_matter():
    image = sample_image("china", size=(32, 32))
    seeds = np.array([[k, 42] for k in range(16)], np.int64)
    graph = map_in_tf_data(lambda seed: ra.rand_augment(image, seed), seeds)
    assert graph.shape == (16, 32, 32, 3) and graph.dtype == np.float32
    assert graph.min() >= 0.0 and graph.max() <= 255.0
    assert len({g.tobytes() for g in graph}) > 8
    for k in range(4):
        # Graph and eager float32 may differ in the last bit; truncation to uint8 levels can turn that into one
        # level on a warp's few near-integer values.
        difference = np.abs(eager(ra.rand_augment, image, seeds[k]) - graph[k])
        assert difference.max() <= 1.0 and np.mean(difference > 1e-3) <= 0.005, k
    np.testing.assert_array_equal(ra.rand_augment(image, seeds[0], prob=0.0), image)
    np.testing.assert_array_equal(ra.rand_augment(image, seeds[0], num_ops=0), image)


def test_rand_augment_applies_its_sampled_ops():
    image = sample_image("flower", size=(32, 32)).astype(np.float32)
    for k in range(8):
        seed = tf.constant([k, 9], tf.int64)
        params = ra.sample_params(seed)
        want = image
        for op, apply, magnitude, sign in zip(*(params[key].numpy() for key in ("op", "apply", "magnitude", "sign"))):
            if apply:
                want = ra.apply_op(want, op, magnitude, sign)
        np.testing.assert_allclose(ra.rand_augment(image, seed), want, atol=1e-4)


@pytest.mark.parametrize("first,second", [(("brightness", 1.81), ("posterize", 1)), (("color", 0.19), ("solarize", 128)),
                                          (("sharpness", 0.19), ("equalize", None)),
                                          (("contrast", 1.81), ("auto_contrast", None))])
def test_chained_ops_see_pils_uint8_levels(first, second):
    """RandAugment applies two ops; PIL stores uint8 between them. An op that kept fractions would send
    levels like 127.6 (PIL: 127) to Posterize(1 bit) as 128 and flip them from 0 to 128."""
    from PIL import Image

    auto_augment = pytest.importorskip("timm.data.auto_augment")
    for name in IMAGES:
        image = sample_image(name)
        pil = Image.fromarray(image)
        ours = tf.constant(image, tf.float32)
        for op, arg in (first, second):
            pil = getattr(auto_augment, op)(pil, *(() if arg is None else (arg,)))
            ours = getattr(ra, op)(ours, *(() if arg is None else (arg,)))
        np.testing.assert_array_equal(ours.numpy(), np.asarray(pil).astype(np.float32), err_msg=f"{first}, {second}")


@pytest.mark.parametrize("magnitude,sign", [(9.0, 1.0), (4.3, -1.0), (10.0, -1.0)])
def test_pillow_backends_ops_are_timms_augment_ops(magnitude, sign, monkeypatch):
    """image_ops='pil' runs each op as timm's AugmentOp calls Pillow: the same image, level for level (at
    magnitude 10, PosterizeIncreasing's 0 bits is black, as in DeiT's Pillow; today's raises)."""
    auto_augment = pytest.importorskip("timm.data.auto_augment")
    from PIL import Image

    from vitdistill.data import pil_ops

    monkeypatch.setattr(auto_augment, "_randomly_negate", lambda v: sign * v)
    hparams = dict(img_mean=ra.FILL, interpolation=Image.BICUBIC, translate_const=100)  # DeiT's
    image = sample_image("flower")
    for name in ra.OP_NAMES:
        got = np.asarray(pil_ops.rand_augment_op(Image.fromarray(image), name, magnitude, sign, ra.FILL,
                                                 Image.BICUBIC))
        if name == "PosterizeIncreasing" and magnitude == 10.0:
            np.testing.assert_array_equal(got, np.zeros_like(image))
            continue
        want = np.asarray(auto_augment.AugmentOp(name, prob=1.0, magnitude=magnitude, hparams=hparams)(
            Image.fromarray(image)))
        np.testing.assert_array_equal(got, want, err_msg=name)
