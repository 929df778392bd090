"""`pil_resize` against Pillow's own resampler, level for level, and `config.data.resize` end to end."""
import numpy as np
import pytest
import tensorflow as tf

from augment_testing import eager, in_tf_data, pil_resize_reference, sample_image
from vitdistill.data import deit_transforms
from vitdistill.data.pil_resize import pil_resize


def _sizes(rng, count):
    """Random (image height, width, output height, width): up- and downscaling, alone or mixed, 1 px included."""
    for _ in range(count):
        h, w, oh, ow = (int(v) for v in rng.integers(1, 160, 4))
        yield h, w, oh, ow
    yield from [(1, 1, 7, 3), (5, 200, 1, 1), (375, 500, 224, 224), (224, 224, 224, 224), (28, 28, 224, 224)]


@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_equals_pillow_on_random_sizes(method):
    rng = np.random.default_rng(0)
    for h, w, oh, ow in _sizes(rng, 40):
        # noise (where negative lobes overshoot and clip) and a smooth photo
        noise = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        photo = sample_image("china", size=(w, h))
        for image in (noise, photo):
            want = np.asarray(pil_resize_reference(image, (ow, oh), method))
            got = eager(lambda x: pil_resize(x, (oh, ow), method), image)
            np.testing.assert_array_equal(got, want, err_msg=f"{h}x{w} -> {oh}x{ow} {method}")


def test_equals_a_single_pillow_call_where_every_version_runs_horizontal_first():
    """The plain `Image.resize` call, no reference built: with the width shrinking at least as much as
    the height every Pillow runs the horizontal pass first."""
    from PIL import Image

    photo = sample_image("flower", size=(500, 375))
    for oh, ow in [(224, 224), (300, 100), (375, 250), (600, 400)]:
        want = np.asarray(Image.fromarray(photo).resize((ow, oh), Image.BICUBIC))
        np.testing.assert_array_equal(eager(lambda x: pil_resize(x, (oh, ow)), photo), want)


def test_one_pass_rounds_to_levels_before_the_next():
    """The horizontal pass is stored as uint8 before the vertical one: the same kernels in floats
    (`tf.image.resize`) land on other levels, so a float two-pass implementation fails this test."""
    photo = sample_image("china", size=(157, 131))
    want = np.asarray(pil_resize_reference(photo, (61, 47)))
    floats = tf.image.resize(photo.astype(np.float32), (47, 61), "bicubic", antialias=True).numpy()
    assert np.any(np.floor(np.clip(floats, 0, 255) + 0.5) != want)
    np.testing.assert_array_equal(eager(lambda x: pil_resize(x, (47, 61)), photo), want)


def test_same_in_tf_data_with_dynamic_shapes():
    photo = sample_image("china", size=(90, 70))
    got = in_tf_data(lambda x: pil_resize(x, (33, 45)), photo)
    np.testing.assert_array_equal(got, np.asarray(pil_resize_reference(photo, (45, 33))))


def test_bad_method_and_bad_config_value_are_named():
    from vitdistill.errors import ConfigError

    with pytest.raises(ValueError, match="method='lanczos'"):
        pil_resize(np.zeros((4, 4, 3), np.uint8), (2, 2), "lanczos")
    with pytest.raises(ConfigError, match="config.data.resize='PIL'.*'pil'.*'tf'"):
        deit_transforms.resize_of({"resize": "PIL"})
    assert deit_transforms.resize_of({}) == "pil"  # configs saved before the key existed
