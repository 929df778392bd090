"""Mixup / CutMix / label smoothing against hand-computed values, timm's functions, and their statistics."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from augment_testing import assert_rate
from vitdistill.data import mixup

N_DRAWS = 4000


def test_smooth_one_hot_by_hand():
    targets = mixup.smooth_one_hot(jnp.array([2, 0]), 4, 0.1)
    np.testing.assert_allclose(targets, [[0.025, 0.025, 0.925, 0.025], [0.925, 0.025, 0.025, 0.025]], rtol=1e-6)
    np.testing.assert_array_equal(mixup.smooth_one_hot(jnp.array([1]), 3, 0.0), [[0, 1, 0]])


def test_mix_batch_by_hand():
    images = jnp.stack([jnp.full((4, 4, 1), 10.0), jnp.full((4, 4, 1), 20.0)])
    targets = mixup.smooth_one_hot(jnp.array([0, 2]), 4, 0.1)

    blended, mixed_targets = mixup.mix_batch(
        {"lam": jnp.float32(0.7), "use_cutmix": jnp.bool_(False), "box": jnp.array([0, 4, 0, 4])}, images, targets)
    np.testing.assert_allclose(blended[:, 0, 0, 0], [0.7 * 10 + 0.3 * 20, 0.7 * 20 + 0.3 * 10], rtol=1e-6)
    np.testing.assert_allclose(mixed_targets, [[0.655, 0.025, 0.295, 0.025], [0.295, 0.025, 0.655, 0.025]],
                               rtol=1e-5)

    # rows 1:3, columns 0:2 pasted from the partner: 4 of 16 pixels, lam = 0.75
    pasted, mixed_targets = mixup.mix_batch(
        {"lam": jnp.float32(0.75), "use_cutmix": jnp.bool_(True), "box": jnp.array([1, 3, 0, 2])}, images, targets)
    want = np.full((4, 4), 10.0)
    want[1:3, 0:2] = 20.0
    np.testing.assert_array_equal(pasted[0, :, :, 0], want)
    np.testing.assert_array_equal(pasted[1, :, :, 0], 30.0 - want)
    np.testing.assert_allclose(mixed_targets[0], [0.7, 0.025, 0.25, 0.025], rtol=1e-5)


def rand_bbox_timm_0_3_2(img_shape, lam, cy, cx):
    """timm 0.3.2 `timm/data/mixup.py::rand_bbox` (DeiT pins 0.3.2), margin 0, with the centre given instead
    of drawn by np.random.randint. Written out because the installed timm ends the box at
    cy + (cut_h + 1) // 2."""
    ratio = np.sqrt(1 - lam)
    img_h, img_w = img_shape[-2:]
    cut_h, cut_w = int(img_h * ratio), int(img_w * ratio)
    yl = np.clip(cy - cut_h // 2, 0, img_h)
    yh = np.clip(cy + cut_h // 2, 0, img_h)
    xl = np.clip(cx - cut_w // 2, 0, img_w)
    xh = np.clip(cx + cut_w // 2, 0, img_w)
    return yl, yh, xl, xh


def cutmix_bbox_and_lam_timm_0_3_2(img_shape, lam, rng):
    """timm 0.3.2 `cutmix_bbox_and_lam(correct_lam=True)`: the box, then lam = 1 - its area / the image's."""
    cy, cx = rng.randint(0, img_shape[-2]), rng.randint(0, img_shape[-1])
    yl, yu, xl, xu = rand_bbox_timm_0_3_2(img_shape, lam, cy, cx)
    return (yl, yu, xl, xu), 1. - (yu - yl) * (xu - xl) / float(img_shape[-2] * img_shape[-1])


@pytest.mark.parametrize("lam", [0.0, 0.13, 0.5, 0.77, 0.999])
def test_cutmix_box_matches_timm_0_3_2(lam):
    height, width = 24, 31  # odd sides: where 0.3.2 and later timm differ
    for cy, cx in [(0, 0), (5, 30), (23, 16), (12, 3)]:
        want = rand_bbox_timm_0_3_2((3, height, width), lam, cy, cx)
        got = mixup.cutmix_box(jnp.float32(lam), cy, cx, height, width)
        np.testing.assert_array_equal(got, np.array(want).ravel())


def test_cutmix_box_is_a_pixel_shorter_than_later_timm_on_odd_sides():
    # lam 0.5 on 24 x 31: cut 16 x 21; 0.3.2 spans rows 2:18 (16) and columns 5:25 (20, not 21).
    np.testing.assert_array_equal(mixup.cutmix_box(jnp.float32(0.5), 10, 15, 24, 31), [2, 18, 5, 25])
    # timm 1.0 (rand_bbox: cy + (cut_h + 1) // 2) gives the odd side its 21 columns.
    np.testing.assert_array_equal(mixup.cutmix_box(jnp.float32(0.5), 10, 15, 24, 31, rule="timm_1.0"), [2, 18, 5, 26])


def test_targets_match_timm_mixup_target():
    timm_mixup = pytest.importorskip("timm.data.mixup")
    torch = pytest.importorskip("torch")
    labels = np.array([3, 1, 4, 1, 5, 9])
    for lam in (1.0, 0.62, 0.1):
        want = timm_mixup.mixup_target(torch.tensor(labels), 10, lam, smoothing=0.1).numpy()
        targets = mixup.smooth_one_hot(jnp.asarray(labels), 10, 0.1)
        _, got = mixup.mix_batch({"lam": jnp.float32(lam), "use_cutmix": jnp.bool_(False),
                                  "box": jnp.zeros(4, jnp.int32)}, jnp.zeros((6, 2, 2, 3)), targets)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _keys():
    return jax.random.split(jax.random.key(0), N_DRAWS)


@functools.lru_cache(maxsize=None)
def _draws(**kwargs):
    """sample_mix_params for N_DRAWS keys, 32x32 images (cached: each configuration compiles once)."""
    sample = functools.partial(mixup.sample_mix_params, image_size=(32, 32), **kwargs)
    return jax.tree.map(np.asarray, jax.jit(jax.vmap(sample))(_keys()))


def test_mix_statistics_match_timm():
    params = _draws(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)
    use_cutmix, lam = params["use_cutmix"], params["lam"]
    switch_rate = assert_rate(use_cutmix, 0.5, "cutmix switch")

    mixup_lam = lam[~use_cutmix]
    assert stats.kstest(mixup_lam, stats.beta(0.8, 0.8).cdf).pvalue > 1e-3
    assert abs(mixup_lam.mean() - 0.5) < 4.5 * np.sqrt(stats.beta(0.8, 0.8).var() / mixup_lam.size)

    # CutMix's lam is Beta(1, 1) corrected by the clipped box: compare with timm 0.3.2's sampling.
    rng = np.random.RandomState(0)
    timm_lam = np.array([cutmix_bbox_and_lam_timm_0_3_2((3, 32, 32), rng.beta(1.0, 1.0), rng)[1]
                         for _ in range(N_DRAWS)])
    cutmix_lam = lam[use_cutmix]
    assert stats.ks_2samp(cutmix_lam, timm_lam).pvalue > 1e-3
    assert abs(cutmix_lam.mean() - timm_lam.mean()) < 0.03
    box = params["box"][use_cutmix]
    np.testing.assert_allclose(cutmix_lam, 1 - (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2]) / 1024, atol=1e-6)
    print(f"switch rate {switch_rate:.3f}; mixup lam mean {mixup_lam.mean():.3f} (Beta(0.8,0.8): 0.5); "
          f"cutmix corrected lam mean {cutmix_lam.mean():.3f} (timm 0.3.2 {timm_lam.mean():.3f}; Beta(1,1): 0.5)")


def test_switches_and_prob():
    only_mixup = _draws(mixup_alpha=0.8, cutmix_alpha=0.0)
    assert not only_mixup["use_cutmix"].any()
    only_cutmix_sometimes = _draws(mixup_alpha=0.0, cutmix_alpha=1.0, prob=0.3)
    assert_rate(only_cutmix_sometimes["use_cutmix"], 0.3, "mix prob")
    assert np.all(only_cutmix_sometimes["lam"][~only_cutmix_sometimes["use_cutmix"]] == 1.0)


def test_mixup_cutmix_end_to_end_jitted():
    """The jitted batch op does what its sampled parameters say: pasted boxes or blends, targets to match."""
    rng = np.random.default_rng(1)
    images = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    labels = rng.integers(0, 10, size=8)
    one_hot = np.asarray(mixup.smooth_one_hot(labels, 10, 0.1))
    mix = jax.jit(functools.partial(mixup.mixup_cutmix, num_classes=10))
    draws = _draws(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)  # same keys, default config
    keys = _keys()
    seen = set()
    for k in range(12):
        mixed, targets = jax.tree.map(np.asarray, mix(keys[k], images, labels))
        lam, use_cutmix, (y_lo, y_hi, x_lo, x_hi) = (draws[name][k] for name in ("lam", "use_cutmix", "box"))
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-5)
        assert targets.min() >= 0.1 / 10 - 1e-7 and targets.max() <= 1 - 0.1 + 0.1 / 10 + 1e-6
        np.testing.assert_allclose(targets, lam * one_hot + (1 - lam) * one_hot[::-1], rtol=1e-5)
        if use_cutmix:
            from_partner = np.all(mixed == images[::-1], axis=-1)
            from_self = np.all(mixed == images, axis=-1)
            assert np.all(from_partner | from_self)
            box = np.zeros((32, 32), bool)
            box[y_lo:y_hi, x_lo:x_hi] = True
            np.testing.assert_array_equal(from_partner[0], box)
            assert lam == pytest.approx(1 - from_partner[0].mean(), abs=1e-6)
        else:
            np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], rtol=1e-5, atol=1e-6)
        seen.add(bool(use_cutmix))
    assert seen == {True, False}


def test_no_mixing_is_label_smoothing_only():
    images = jnp.ones((4, 8, 8, 3))
    labels = jnp.array([0, 1, 2, 3])
    out, targets = mixup.mixup_cutmix(jax.random.key(0), images, labels, num_classes=5, mixup_alpha=0.0,
                                      cutmix_alpha=0.0, label_smoothing=0.1)
    assert out is images
    np.testing.assert_allclose(targets, mixup.smooth_one_hot(labels, 5, 0.1))


def test_odd_batch_is_refused():
    with pytest.raises(ValueError, match="even batch per mixing group, got 3 images in 1 group"):
        mixup.mixup_cutmix(jax.random.key(0), jnp.ones((3, 4, 4, 3)), jnp.zeros(3, jnp.int32), num_classes=2)


def test_each_device_group_mixes_its_own_rows_with_its_own_draw_as_deits_ddp():
    """DeiT mixes on every GPU after DistributedDataParallel's split: timm's Mixup on the local batch, which
    pairs local image i with x.flip(0)[i] and draws lam for that batch alone. With 2 groups of 4: each mixed
    image is lam_g x_i + (1 - lam_g) x_{partner in its own group}, and the groups' lams are independent."""
    images = jnp.asarray(np.random.RandomState(0).rand(8, 6, 6, 3), jnp.float32)
    labels = jnp.arange(8) % 5
    lams = []
    for seed in range(40):
        out, targets = mixup.mixup_cutmix(jax.random.key(seed), images, labels, num_classes=5, mixup_alpha=0.8,
                                          cutmix_alpha=0.0, label_smoothing=0.0, groups=2)
        out, targets = np.asarray(out), np.asarray(targets)
        for group in range(2):
            rows = np.arange(4 * group, 4 * group + 4)
            lam = targets[rows[0], int(labels[rows[0]])]
            if int(labels[rows[0]]) == int(labels[rows[-1]]):
                continue  # lam not readable from the target
            for i, partner in zip(rows, rows[::-1]):  # x.flip(0) of the group's own rows
                want = lam * np.asarray(images[i]) + (1 - lam) * np.asarray(images[partner])
                np.testing.assert_allclose(out[i], want, atol=1e-5)
            lams.append((seed, group, lam))
    by_seed = {}
    for seed, group, lam in lams:
        by_seed.setdefault(seed, {})[group] = lam
    pairs = [g for g in by_seed.values() if len(g) == 2]
    assert len(pairs) >= 30 and sum(abs(g[0] - g[1]) > 1e-6 for g in pairs) == len(pairs)  # independent draws


def test_an_odd_group_is_refused():
    with pytest.raises(ValueError, match="even batch per mixing group, got 6 images in 2 group"):
        mixup.mixup_cutmix(jax.random.key(0), jnp.ones((6, 4, 4, 3)), jnp.zeros(6, jnp.int32), num_classes=2,
                           groups=2)


def test_deit_draws_once_per_device_by_default_and_names_a_batch_that_does_not_split_evenly():
    from vitdistill import recipes
    from vitdistill.errors import ConfigError
    from vitdistill.methods import deit

    config = recipes.deit("deit_tiny_patch16_224")
    assert config.mixup.groups == 0
    config.batch_size = 8
    assert deit.mixing_groups(config) == jax.device_count() == 2  # the suite's 2 host devices
    config.batch_size = 6
    with pytest.raises(ConfigError, match="batch_size=6 splits into 2 mixup groups .one per device., each"):
        deit.mixing_groups(config)
    config.mixup.groups = 1
    assert deit.mixing_groups(config) == 1
