"""l2-regularised multinomial logistic regression on frozen features, fitted to convergence by L-BFGS.

The transfer protocol of SimCLR (Chen et al. 2020, appendix B.8) and CLIP (Radford et al. 2021, appendix
A.3): features of the eval transform computed once, no augmentation, a full-batch convex fit, and the
regularisation picked on a validation split held out of the training set, then refitted on all of it. It
is scored on the test split only once, with the chosen strength.

Objective, for features X [N, D], labels y, weights W [D, C] and bias b [C]:

    mean_i cross_entropy(X_i W + b, y_i) + l2 / 2 * ||W||^2          (the bias is not regularised)

which is scikit-learn's `LogisticRegression(C=1 / (l2 * N))` divided by N.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vitdistill.errors import ConfigError
from vitdistill.evaluate.classify import topk_correct


def objective(params, features, labels, l2):
    logits = features @ params["kernel"] + params["bias"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"]))


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _fit(features, labels, l2, tol, *, num_classes: int, max_iter: int):
    params = {"kernel": jnp.zeros((features.shape[1], num_classes), jnp.float32),
              "bias": jnp.zeros((num_classes,), jnp.float32)}
    fun = functools.partial(objective, features=features, labels=labels, l2=l2)
    solver = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = solver.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        return optax.apply_updates(params, updates), state

    def unfinished(carry):
        _, state = carry
        count = optax.tree_utils.tree_get(state, "count")
        grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(state, "grad"))
        return (count == 0) | ((count < max_iter) & (grad_norm >= tol))

    params, state = jax.lax.while_loop(unfinished, step, (params, solver.init(params)))
    return params, fun(params), optax.tree_utils.tree_get(state, "count")


def fit(features, labels, *, num_classes: int, l2: float, max_iter: int = 1000, tol: float = 1e-6) -> dict:
    """{'kernel', 'bias', 'objective', 'iterations'}: the minimiser of the module docstring's objective, from
    zero weights, stopping when the gradient's norm is below `tol` or after `max_iter` L-BFGS iterations."""
    features = jnp.asarray(features, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    params, value, count = _fit(features, labels, jnp.float32(l2), jnp.float32(tol), num_classes=num_classes,
                                max_iter=int(max_iter))
    return {"kernel": params["kernel"], "bias": params["bias"], "objective": float(value), "iterations": int(count)}


def scores(model: dict, features, labels) -> dict:
    """top-1 / top-5 fractions of `model` (a `fit` result) on `features`, ties ranked as `topk_correct`."""
    logits = jnp.asarray(features, jnp.float32) @ model["kernel"] + model["bias"]
    labels = jnp.asarray(labels, jnp.int32)
    counts = topk_correct(logits, labels, jnp.ones(labels.shape, jnp.float32))
    return {name: float(count) / max(len(labels), 1) for name, count in counts.items()}


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit indices, validation indices): a seeded permutation of range(n), its first round(n * val_fraction)
    held out."""
    held_out = int(round(n * val_fraction))
    if not 1 <= held_out < n:
        raise ConfigError(f"config.logreg.val_fraction={val_fraction} holds out {held_out} of {n} training "
                          "examples; choosing l2 needs at least one on each side (e.g. 0.1)")
    order = np.random.default_rng(seed).permutation(n)
    return order[held_out:], order[:held_out]


def select_and_fit(train_features, train_labels, *, num_classes: int, l2s, val_fraction: float, seed: int = 0,
                   max_iter: int = 1000, tol: float = 1e-6) -> dict:
    """Fits every strength of `l2s` on the training examples outside the validation split, keeps the one with
    the best validation top-1 (the larger strength on a tie: the simpler model), and refits it on all the
    training examples. Returns {'l2', 'model', 'val_top1': {l2: top-1}}; with one strength, no split."""
    l2s = tuple(float(x) for x in l2s)
    if not l2s or min(l2s) < 0:
        raise ConfigError(f"config.logreg.l2s={l2s}; give one or more strengths >= 0, e.g. (1e-5, 1e-4, 1e-3)")
    train_features, train_labels = np.asarray(train_features, np.float32), np.asarray(train_labels)
    val_top1 = {}
    if len(l2s) > 1:
        fit_idx, val_idx = validation_split(len(train_labels), val_fraction, seed)
        for l2 in l2s:
            model = fit(train_features[fit_idx], train_labels[fit_idx], num_classes=num_classes, l2=l2,
                        max_iter=max_iter, tol=tol)
            val_top1[l2] = scores(model, train_features[val_idx], train_labels[val_idx])["top1"]
    best = max(l2s, key=lambda l2: (val_top1.get(l2, 0.0), l2))
    model = fit(train_features, train_labels, num_classes=num_classes, l2=best, max_iter=max_iter, tol=tol)
    return {"l2": best, "model": model, "val_top1": val_top1}
