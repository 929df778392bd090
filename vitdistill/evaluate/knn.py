"""Weighted k-NN classification on L2-normalised features: DINO's evaluation protocol.

Each test feature votes with its `k` most cosine-similar training features, each vote
weighted by exp(similarity / temperature); classes are ranked by their totals as DINO's
`knn_classifier` ranks them with `probs.sort(1, True)`: ties in class-index order, so a class with
no votes ranks after every class with votes (torch's CPU sort is stable for rows of up to 16
classes, which is what the tests check against; longer rows it orders ties arbitrarily). Top-5
looks at the first min(5, k) classes, as it does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps: float = 1e-12):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _vote(train_features, train_labels, test_features, *, ks, temperature, num_classes):
    """Vote totals [len(ks), num_test, num_classes] for each k, from one top-max(ks) search."""
    similarity = test_features @ train_features.T
    top_sim, top_idx = jax.lax.top_k(similarity, max(ks))
    votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * jnp.exp(top_sim / temperature)[..., None]
    return jnp.stack([jnp.sum(votes[:, :k], axis=1) for k in ks])


def _votes(train_features, train_labels, test_features, *, ks, temperature, num_classes, chunk) -> np.ndarray:
    train_features = l2_normalize(train_features)
    train_labels = jnp.asarray(train_labels, jnp.int32)
    out = []
    for start in range(0, len(test_features), chunk):
        test = l2_normalize(test_features[start:start + chunk])
        out.append(np.asarray(_vote(train_features, train_labels, test, ks=ks, temperature=temperature,
                                    num_classes=num_classes)))
    return np.concatenate(out, axis=1) if out else np.zeros((len(ks), 0, num_classes), np.float32)


def knn_scores(train_features, train_labels, test_features, *, k: int = 20, temperature: float = 0.07,
               num_classes: int, chunk: int = 1024) -> np.ndarray:
    """Per-class vote totals [num_test, num_classes]; features are normalised here."""
    k = min(k, len(train_features))
    return _votes(train_features, train_labels, test_features, ks=(k,), temperature=temperature,
                  num_classes=num_classes, chunk=chunk)[0]


def rank_of_label(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The 0-based place of each row's label when its classes are sorted by score, highest first, ties in
    class-index order (a stable descending sort)."""
    labels = np.asarray(labels)
    true = np.take_along_axis(scores, labels[:, None], axis=1)
    before = np.arange(scores.shape[1])[None, :] < labels[:, None]
    return np.sum(scores > true, axis=1) + np.sum((scores == true) & before, axis=1)


def knn_accuracies(train_features, train_labels, test_features, test_labels, *, ks=(10, 20, 100, 200),
                   temperature: float = 0.07, num_classes: int, chunk: int = 1024) -> dict:
    """{k: {'knn_top1', 'knn_top5'}} for every k in `ks` from one neighbour search (fractions in [0, 1]).
    k is capped at the number of training features; top-5 is left out with fewer than 5 classes."""
    capped = tuple(sorted({min(int(k), len(train_features)) for k in ks}))
    votes = _votes(train_features, train_labels, test_features, ks=capped, temperature=temperature,
                   num_classes=num_classes, chunk=chunk)
    results = {}
    for k in ks:
        kk = min(int(k), len(train_features))
        rank = rank_of_label(votes[capped.index(kk)], test_labels)
        results[k] = {"knn_top1": float(np.mean(rank < 1))}
        if num_classes >= 5:
            results[k]["knn_top5"] = float(np.mean(rank < min(5, kk)))
    return results


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int) -> dict:
    """Top-1 and top-5 k-NN accuracy (fractions in [0, 1]) for one k."""
    return knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(k,),
                          temperature=temperature, num_classes=num_classes)[k]
