"""The logistic-regression probe (`method='logreg'`, SimCLR's and CLIP's transfer protocol): L-BFGS reaches
the optimum SciPy's L-BFGS-B finds for the same objective in float64, an unregularised bias gives the class
frequencies when the weights are forced to zero, l2 is chosen on the held-out training examples alone, and a
checkpoint's probe on an image folder runs end to end and rereads its saved features."""
import os
import sys

import numpy as np
import pytest
import scipy.optimize
import scipy.special

from vitdistill import methods, recipes
from vitdistill.errors import ConfigError
from vitdistill.evaluate import logistic

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_linear import _on_colour_folder  # noqa: E402


def _problem(n=300, d=12, c=4, seed=0, separation=1.5):
    rng = np.random.RandomState(seed)
    means = separation * rng.randn(c, d)
    labels = rng.randint(0, c, n)
    return (means[labels] + rng.randn(n, d)).astype(np.float32), labels


def _scipy_optimum(x, y, c, l2):
    """min over (W, b) of mean cross-entropy + l2/2 ||W||^2, in float64 by SciPy's L-BFGS-B."""
    x = x.astype(np.float64)
    n, d = x.shape
    onehot = np.eye(c)[y]

    def f(w):
        kernel, bias = w[:d * c].reshape(d, c), w[d * c:]
        z = x @ kernel + bias
        loss = np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(n), y]) + 0.5 * l2 * np.sum(kernel ** 2)
        g = (scipy.special.softmax(z, axis=1) - onehot) / n
        return loss, np.concatenate([(x.T @ g + l2 * kernel).ravel(), g.sum(0)])

    result = scipy.optimize.minimize(f, np.zeros(d * c + c), jac=True, method="L-BFGS-B",
                                     options={"maxiter": 10_000, "gtol": 1e-12, "ftol": 1e-15})
    return result.x[:d * c].reshape(d, c), result.x[d * c:], result.fun


@pytest.mark.parametrize("l2", [1e-3, 1e-1])
def test_fit_reaches_scipys_optimum_of_the_same_objective(l2):
    x, y = _problem()
    kernel, bias, optimum = _scipy_optimum(x, y, 4, l2)
    ours = logistic.fit(x, y, num_classes=4, l2=l2, max_iter=1000, tol=1e-6)
    assert abs(ours["objective"] - optimum) < 1e-5 * max(1.0, abs(optimum))
    # The gradient-norm stop works: at 1e-5 it ends the fit early. (At 1e-6, float32's rounding can keep the
    # norm above tol at the optimum: seen at l2 1e-3 on one machine, objective 2.5e-8 from SciPy's, 1000 iterations.)
    assert logistic.fit(x, y, num_classes=4, l2=l2, max_iter=1000, tol=1e-5)["iterations"] < 100
    # The objective is strictly convex for l2 > 0: one minimiser. Logits are unique; the bias up to a constant.
    # At l2 1e-3 the objective is so flat along the bias that float32 pins it to about 3e-3 (seen: 3.1e-3 off
    # SciPy's float64 minimiser, objective 2.5e-8 off); 2e-3 held on another machine.
    np.testing.assert_allclose(np.asarray(ours["kernel"]), kernel, atol=5e-3)
    np.testing.assert_allclose(np.asarray(ours["bias"]) - np.mean(ours["bias"]), bias - bias.mean(), atol=5e-3)


def test_the_bias_is_not_regularised_its_softmax_is_the_class_frequencies_when_weights_are_forced_to_zero():
    x, y = _problem(n=200)
    y = np.where(np.arange(200) < 120, 0, y % 3 + 1)  # class 0 in 60 % of the labels
    ours = logistic.fit(x, y, num_classes=4, l2=1e6)  # kernel ~ 0: only the bias can fit
    frequencies = np.bincount(y, minlength=4) / len(y)
    np.testing.assert_allclose(scipy.special.softmax(np.asarray(ours["bias"], np.float64)), frequencies, atol=1e-4)


def test_l2_is_the_best_on_the_held_out_training_examples_and_is_refitted_on_all_of_them():
    x, y = _problem(n=240, d=40, seed=3, separation=0.25)  # overlapping classes
    l2s = (1e-4, 1e-2, 10.0)
    chosen = logistic.select_and_fit(x, y, num_classes=4, l2s=l2s, val_fraction=0.25, seed=7)
    fit_idx, val_idx = logistic.validation_split(240, 0.25, 7)
    assert len(val_idx) == 60 and not set(fit_idx) & set(val_idx) and len(fit_idx) + len(val_idx) == 240
    expected = {}
    for l2 in l2s:  # validation top-1 of SciPy's optimum on the fit indices
        kernel, bias, _ = _scipy_optimum(x[fit_idx], y[fit_idx], 4, l2)
        expected[l2] = np.mean(np.argmax(x[val_idx] @ kernel + bias, axis=1) == y[val_idx])
    assert chosen["val_top1"] == pytest.approx(expected, abs=1e-9)
    assert chosen["l2"] == max(l2s, key=lambda l2: (expected[l2], l2))
    assert expected[10.0] < max(expected.values())  # the grid's top strength underfits: the choice matters
    _, _, refit = _scipy_optimum(x, y, 4, chosen["l2"])  # refitted on all 240
    assert abs(chosen["model"]["objective"] - refit) < 1e-5


def test_choosing_l2_needs_a_validation_share():
    x, y = _problem(n=20)
    with pytest.raises(ConfigError, match="val_fraction=0.0 holds out 0 of 20"):
        logistic.select_and_fit(x, y, num_classes=4, l2s=(1e-3, 1e-2), val_fraction=0.0)


def test_a_probe_of_a_checkpoint_on_an_image_folder_rereads_its_saved_features(tmp_path, capsys):
    config = recipes.logreg("vit_micro_patch4_32")
    _on_colour_folder(config, tmp_path, seed=1)
    config.logreg.n_last_blocks = 2
    config.logreg.l2s = (1e-4, 1e-1)
    config.logreg.features_dir = str(tmp_path / "features")
    final = methods.train_and_evaluate(config, str(tmp_path / "run"))
    assert final["top1"] > 0.9  # colour is linearly readable from random features
    assert final["l2"] in (1e-4, 1e-1) and {"val_top1_l2_0.0001", "val_top1_l2_0.1"} <= set(final)
    saved = np.load(tmp_path / "features" / "train_features.npy")
    assert saved.shape == (128, 2 * 128)  # CLS of 2 blocks of width 128, for the 128 training images
    out = capsys.readouterr().out
    assert "(chosen)" in out and "128 train (0.1 held out to choose l2) / 32 test" in out

    again = methods.train_and_evaluate(config, str(tmp_path / "run2"))
    assert "features read from" in capsys.readouterr().out
    assert again["top1"] == final["top1"] and again["l2"] == final["l2"]
