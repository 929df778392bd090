"""Weighted k-NN classification on L2-normalised features: DINO's evaluation protocol.

Each test feature votes with its `k` most cosine-similar training features, each vote
weighted by exp(similarity / temperature); the class with the largest total wins.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x, eps: float = 1e-12):
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _vote(train_features, train_labels, test_features, *, k, temperature, num_classes):
    similarity = test_features @ train_features.T
    top_sim, top_idx = jax.lax.top_k(similarity, k)
    neighbour_labels = train_labels[top_idx]
    weights = jnp.exp(top_sim / temperature)
    return jnp.sum(jax.nn.one_hot(neighbour_labels, num_classes) * weights[..., None], axis=1)


def knn_scores(train_features, train_labels, test_features, *, k: int = 20, temperature: float = 0.07,
               num_classes: int, chunk: int = 1024) -> np.ndarray:
    """Per-class vote totals [num_test, num_classes]; features are normalised here."""
    train_features = l2_normalize(train_features)
    train_labels = jnp.asarray(train_labels, jnp.int32)
    k = min(k, train_features.shape[0])
    out = []
    for start in range(0, len(test_features), chunk):
        test = l2_normalize(test_features[start:start + chunk])
        out.append(np.asarray(_vote(train_features, train_labels, test, k=k, temperature=temperature,
                                    num_classes=num_classes)))
    return np.concatenate(out) if out else np.zeros((0, num_classes), np.float32)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int) -> dict:
    """Top-1 and top-5 k-NN accuracy (fractions in [0, 1])."""
    scores = knn_scores(train_features, train_labels, test_features, k=k, temperature=temperature,
                        num_classes=num_classes)
    test_labels = np.asarray(test_labels)
    true_score = np.take_along_axis(scores, test_labels[:, None], axis=1)
    rank = np.sum(scores > true_score, axis=1)
    result = {"knn_top1": float(np.mean(rank < 1))}
    if num_classes >= 5 and k >= 5:
        result["knn_top5"] = float(np.mean(rank < 5))
    return result
