"""DINO's photometric ops in the train step (`data.image_ops='device'`): each op against Pillow's own, the views
against the pipeline's Pillow views for the same seeds, and the step's use of them."""
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from augment_testing import eager, map_in_tf_data, sample_image
from vitdistill.data import device_photometric as dp
from vitdistill.data import multicrop as mc

PHOTOMETRIC = ("color_jitter", "grayscale", "blur", "solarize")


def _every_colour():
    code = np.arange(2 ** 24, dtype=np.uint32)
    return np.stack([code >> 16, (code >> 8) & 255, code & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)


def test_hsv_equals_pils_on_every_colour_and_back_on_every_triple():
    # Pillow takes the hue through float64 steps; in float32 alone 72,036 of these colours get another hue
    # level (experiments/hue_float32.py): the tables Pillow fills must give every one of them.
    from PIL import Image

    colours = _every_colour()
    want = np.asarray(Image.fromarray(colours).convert("HSV"))
    got = jax.jit(dp.rgb_to_hsv_levels)(colours.astype(np.float32))
    for k, name in enumerate("HSV"):
        np.testing.assert_array_equal(np.asarray(got[k]), want[..., k], err_msg=name)
    triples = colours  # every (H, S, V) triple, read as HSV
    back = np.asarray(Image.fromarray(triples, "HSV").convert("RGB"))
    got = jax.jit(dp.hsv_levels_to_rgb)(*(jnp.asarray(triples[..., k].astype(np.int32)) for k in range(3)))
    np.testing.assert_array_equal(np.asarray(got), back)


@pytest.mark.parametrize("factor", [-0.5, -0.0371, 0.1])
def test_hue_equals_torchvision_on_every_colour(factor):
    functional = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image

    colours = _every_colour()
    want = np.asarray(functional.adjust_hue(Image.fromarray(colours), factor))
    shift = int(eager(mc.hue_shift, np.float32(factor)))
    assert shift == int(np.float64(np.float32(factor)) * 255)  # torchvision's np.uint8(hue_factor * 255) shift
    np.testing.assert_array_equal(np.asarray(jax.jit(dp.adjust_hue)(colours.astype(np.float32), shift)), want)


def test_blend_equals_pils_on_every_pair_of_levels():
    # Image.blend, the core of ImageEnhance, rounds factor * (b - a) to float32 and a + that again, then truncates
    # to uint8. A fused multiply-add (one rounding) changes the level in 159 of the 131,072,000 pairs and factors
    # of U(0.6, 1.4) tried (experiments/hue_float32.py's notes): the split factor must give Pillow's either way.
    from PIL import Image

    first, second = (a.astype(np.uint8) for a in np.meshgrid(np.arange(256), np.arange(256), indexing="ij"))
    factors = np.random.default_rng(0).uniform(0.6, 1.4, 120).astype(np.float32)
    factors[:3] = (0.6, 1.0, 1.4)
    got = jax.jit(jax.vmap(lambda f: dp._blend(first.astype(np.float32), second.astype(np.float32), f)))(factors)
    for k, factor in enumerate(factors):
        want = np.asarray(Image.blend(Image.fromarray(first), Image.fromarray(second), float(factor)))
        np.testing.assert_array_equal(np.asarray(got[k]), want, err_msg=f"factor {factor}")


@pytest.mark.parametrize("op,factor", [("brightness", 0.6), ("brightness", 1.4), ("contrast", 0.6),
                                       ("contrast", 1.37), ("saturation", 0.8), ("saturation", 1.2)])
def test_enhance_ops_equal_torchvision(op, factor):
    functional = pytest.importorskip("torchvision.transforms.functional")
    from PIL import Image

    ours = {"brightness": dp.brightness, "contrast": dp.contrast, "saturation": dp.saturation}[op]
    for name in ("china", "flower"):
        image = sample_image(name, size=(96, 80))
        want = np.asarray(getattr(functional, f"adjust_{op}")(Image.fromarray(image), factor))
        assert np.abs(want.astype(float) - image).mean() > 1.0
        got = jax.jit(ours)(image.astype(np.float32), np.float32(factor))
        np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"{op} {factor} on {name}")


@pytest.mark.parametrize("sigma", [0.1, 0.73, 1.0, 2.0])
def test_gaussian_blur_equals_pils(sigma):
    from PIL import Image, ImageFilter

    reach = mc.blur_reach(2.0)
    weights = [int(w) for w in eager(mc.box_weights, np.float32(sigma))]
    blur = jax.jit(lambda x: dp.gaussian_blur(x, *weights, reach=reach))
    for image in (sample_image("china", size=(72, 56)), sample_image("flower", size=(3, 2))):  # and a tiny one
        want = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=float(np.float32(sigma)))))
        np.testing.assert_array_equal(np.asarray(blur(image.astype(np.float32))), want, err_msg=f"{image.shape}")


def _views(image_ops, seeds, image, **settings):
    def views(seed):
        return mc.multicrop_views(image, seed, global_size=40, local_size=24, num_local=2, levels=True,
                                  image_ops=image_ops, return_params=True, **settings)

    return map_in_tf_data(views, seeds)


@pytest.mark.parametrize("settings", [{}, {"hue": 0.0, "contrast": 0.0}], ids=["dino", "two_ops_off"])
def test_views_finished_on_the_device_equal_pillows_views(settings):
    image = sample_image("flower", size=(100, 80))
    seeds = np.array([[k, 11] for k in range(24)], np.int64)
    (want, params), (made, _) = (_views(ops, seeds, image, **settings) for ops in ("pil", "device"))
    finish = jax.jit(dp.apply_views)
    applied = set()
    for name in mc.view_names(2):
        assert made[name].dtype == np.uint8 and made[name + mc.OPS_SUFFIX].shape == (24, len(mc.DEVICE_OP_FIELDS))
        np.testing.assert_array_equal(np.asarray(finish(made[name], made[name + mc.OPS_SUFFIX])), want[name],
                                      err_msg=name)
        applied |= {op for op in PHOTOMETRIC if params[name][op].any()}
        changed = (made[name] != want[name]).reshape(len(seeds), -1).any(axis=1)
        photometric = np.any([params[name][op] for op in PHOTOMETRIC], axis=0)
        np.testing.assert_array_equal(changed, photometric, err_msg=f"{name}: the pipeline left them undone")
    assert applied == set(PHOTOMETRIC)
    if settings:  # torchvision leaves out an op of strength 0: so must the step (hue at 0 is not the identity)
        orders = made["global_0" + mc.OPS_SUFFIX][:, 1:5]
        assert not np.isin(orders, [1, 3]).any()  # contrast, hue
        assert (orders == -1).sum(axis=1).tolist() == [2] * len(seeds)


def test_every_device_op_constant_is_multicrops_encoding():
    from vitdistill.data import pipeline

    choices = {"color_jitter": tf.constant(True), "grayscale": tf.constant(True), "blur": tf.constant(True),
               "solarize": tf.constant(True), "blur_sigma": tf.constant(1.0),
               "jitter": {"order": tf.range(4), "brightness": tf.constant(1.0), "contrast": tf.constant(1.0),
                          "saturation": tf.constant(1.0), "hue": tf.constant(10.5 / 255)}}
    encoded = eager(lambda: mc.device_ops(choices, active=(True,) * 4))
    assert tuple(encoded.tolist()) == pipeline.EVERY_DEVICE_OP


def test_the_dino_step_applies_the_ops_it_is_given():
    from vitdistill.methods import dino

    image = sample_image("china", size=(100, 80))
    seeds = np.array([[k, 4] for k in range(6)], np.int64)
    (want, _), (made, _) = (_views(ops, seeds, image) for ops in ("pil", "device"))
    setup = types.SimpleNamespace(max_sigma=2.0)
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda b: dino.view_levels(b, "local_1", setup))(made)),
                                  want["local_1"])
    assert dino.view_levels(want, "local_1", setup) is want["local_1"]  # finished views pass as they are


def test_deit_refuses_device_image_ops():
    from vitdistill import recipes
    from vitdistill.errors import ConfigError
    from vitdistill.methods import deit

    config = recipes.from_file(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                                            "deit_s_distilled.py:runlocal"))
    config.data.image_ops = "device"
    with pytest.raises(ConfigError, match=r"image_ops='device' is DINO's.*'pil'"):
        deit.check(config)
