"""DINO's crops, resizes and flips in the train step (`data.device_canvas`): the windows against Pillow's resize for
every crop length, the views against the pipeline's Pillow views for the same seeds (an image inside the canvas and
one larger than it), the step's use of them, and the settings it refuses."""
import os
import types

import jax
import numpy as np
import pytest

from augment_testing import map_in_tf_data, sample_image
from vitdistill.data import device_resize as dr
from vitdistill.data import multicrop as mc
from vitdistill.data import pil_resize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size", [224, 96])
def test_windows_resize_as_pillow_for_every_length_up_to_the_canvas(size, method):
    # Every crop length 1..512 (shrinking up to 5.3x, the same size, growing): a view's windows are this table's
    # rows shifted by the crop's offset, so the table decides the levels of every box.
    from PIL import Image

    canvas = 512
    index, weight = pil_resize.coefficient_table(canvas, size, method)
    assert index.shape == weight.shape == (canvas, size, pil_resize.taps(canvas, size, method))
    rng = np.random.default_rng(size)
    rows = rng.integers(0, 256, (canvas, 2, canvas, 3), dtype=np.uint8)
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[method]
    want = np.stack([np.asarray(Image.fromarray(rows[n - 1, :, :n]).resize((size, 2), resample))
                     for n in range(1, canvas + 1)])
    offset = 7  # what lies beyond a crop must not leak in: shift the rows right and fill the rest
    shifted = np.concatenate([rng.integers(0, 256, (canvas, 2, offset, 3), dtype=np.uint8), rows], axis=2)
    np.testing.assert_array_equal(index, np.minimum(index[:, :, :1] + np.arange(index.shape[2]),
                                                    np.arange(canvas)[:, None, None]))  # a window: consecutive taps
    got = jax.jit(lambda *a: dr._resample(*a, axis=2))(shifted, index[:, :, 0] + offset, weight)
    np.testing.assert_array_equal(np.asarray(got), want)


def _views(image, seeds, *, canvas, image_ops="device", **sizes):
    sizes = sizes or dict(global_size=40, local_size=24, num_local=2)

    def views(seed):
        return mc.multicrop_views(image, seed, levels=True, image_ops=image_ops, canvas=canvas, return_params=True,
                                  **sizes)

    return map_in_tf_data(views, seeds)


@pytest.mark.parametrize("canvas", [128, 96], ids=["image_inside", "image_larger_packed"])
def test_views_cropped_on_the_device_equal_pillows_views(canvas):
    image = sample_image("flower", size=(100, 80))
    seeds = np.array([[k, 5] for k in range(24)], np.int64)
    (want, params), (made, _) = (_views(image, seeds, canvas=c) for c in (0, canvas))
    assert set(made) == {mc.CANVAS} | {n + s for n in mc.view_names(2) for s in (mc.WINDOWS_SUFFIX, mc.OPS_SUFFIX)}
    assert made[mc.CANVAS].shape == (24, canvas, canvas, 3) and made[mc.CANVAS].dtype == np.uint8
    if canvas == 128:  # the image itself, once, at the top left
        np.testing.assert_array_equal(made[mc.CANVAS][:, :80, :100], np.broadcast_to(image, (24, 80, 100, 3)))
        assert not made[mc.CANVAS][:, 80:].any() and not made[mc.CANVAS][:, :, 100:].any()
    else:  # Pillow's views, packed where canvas_layout puts them
        (top, left), size = mc.canvas_layout([40, 40, 24, 24], canvas)[3], 24
        np.testing.assert_array_equal(made[mc.CANVAS][:, top:top + size, left:left + size], want["local_1"])
    crop = jax.jit(dr.resized_crops)
    for name in mc.view_names(2):
        np.testing.assert_array_equal(np.asarray(crop(made[mc.CANVAS], made[name + mc.WINDOWS_SUFFIX])), want[name],
                                      err_msg=name)
        np.testing.assert_array_equal(made[name + mc.OPS_SUFFIX], want[name + mc.OPS_SUFFIX], err_msg=name)
    assert params["global_0"]["flip"].any() and not params["global_0"]["flip"].all()


def test_dino_sized_views_of_a_photo_equal_pillows():
    # scikit-learn's china.jpg, 427 x 640, at DINO's 224 and 96 px: inside a 640 canvas, and larger than a 512 one
    image = sample_image("china", size=(640, 427))
    seeds = np.array([[k, 9] for k in range(3)], np.int64)
    sizes = dict(global_size=224, local_size=96, num_local=3)
    want, _ = _views(image, seeds, canvas=0, **sizes)
    crop = jax.jit(dr.resized_crops)
    for canvas in (640, 512):
        made, _ = _views(image, seeds, canvas=canvas, **sizes)
        for name in ("global_1", "local_2"):
            np.testing.assert_array_equal(np.asarray(crop(made[mc.CANVAS], made[name + mc.WINDOWS_SUFFIX])),
                                          want[name], err_msg=f"{name}, canvas {canvas}")


def test_the_dino_step_crops_then_applies_the_ops():
    from vitdistill.methods import dino

    image = sample_image("china", size=(100, 80))
    seeds = np.array([[k, 4] for k in range(6)], np.int64)
    (want, _), (made, _) = (_views(image, seeds, canvas=c, image_ops=o) for c, o in ((0, "pil"), (128, "device")))
    setup = types.SimpleNamespace(max_sigma=2.0)
    for name in ("global_0", "local_1"):
        got = jax.jit(lambda b: dino.view_levels(b, name, setup))(made)
        np.testing.assert_array_equal(np.asarray(got), want[name], err_msg=name)


def test_canvas_layout_packs_dinos_views_in_512_but_not_448():
    sizes = [224, 224] + [96] * 10
    assert mc.canvas_layout(sizes, 512) == [(0, 0), (0, 224)] + [(224, 96 * k) for k in range(5)] + [
        (320, 96 * k) for k in range(5)]
    assert mc.canvas_layout(sizes, 448) is None
    assert mc.canvas_layout([224], 200) is None


def _dino_config(**data):
    from vitdistill import recipes

    config = recipes.from_file(os.path.join(ROOT, "configs", "dino_vits16.py"))
    config.data.update(data)
    return config


@pytest.mark.parametrize("data, message", [
    (dict(image_ops="pil", device_canvas=512), r"device_canvas=512 moves the crops.*image_ops='device'"),
    (dict(image_ops="device", device_canvas=448), r"device_canvas=448 cannot hold the views \(2 x 224 \+ 10 x 96 "
                                                  r"px\).*use 480 or more"),
    (dict(image_ops="device", device_canvas=512, resize="tf"), r"device_canvas=512 resizes as Pillow.*'tf'"),
])
def test_dino_refuses_a_canvas_it_cannot_use(data, message):
    from vitdistill.errors import ConfigError
    from vitdistill.methods import dino

    config = _dino_config(**data)
    config.multicrop.num_local = 10
    with pytest.raises(ConfigError, match=r"config\.data\." + message):
        dino.check(config)


def test_deit_refuses_a_canvas():
    from vitdistill import recipes
    from vitdistill.errors import ConfigError
    from vitdistill.methods import deit

    config = recipes.from_file(os.path.join(ROOT, "configs", "deit_s_distilled.py:runlocal"))
    config.data.device_canvas = 512
    with pytest.raises(ConfigError, match=r"device_canvas=512 is DINO's.*use 0"):
        deit.check(config)
