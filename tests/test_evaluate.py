"""Top-k counting over padded batches and DINO's weighted k-NN, against hand-worked examples."""
import numpy as np
import jax.numpy as jnp

from vitdistill.evaluate.classify import topk_correct
from vitdistill.evaluate.knn import knn_accuracy, knn_scores


def test_topk_counts_only_unmasked_rows():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    labels = jnp.array([1, 2, 2, 0])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding: correct, but must not count
    counts = topk_correct(logits, labels, mask, ks=(1, 2))
    assert float(counts["top1"]) == 2.0  # rows 0 and 2
    assert float(counts["top2"]) == 3.0  # row 1's label 2 ties with class 1 for second place


def test_knn_votes_are_weighted_by_exp_similarity_over_temperature():
    # Two training points of class 0 at 90 degrees from the query direction, one of class 1 close to it.
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    labels = np.array([0, 0, 1])
    query = np.array([[0.6, 0.8]])
    t = 0.5
    scores = knn_scores(train, labels, query, k=3, temperature=t, num_classes=2)
    sims = train @ query[0]
    expected = [np.exp(sims[0] / t) + np.exp(sims[1] / t), np.exp(sims[2] / t)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    # With k=3, the two class-0 votes (e^1.2 + e^1.6 = 8.27) beat the one class-1 vote (e^2 = 7.39).
    assert knn_accuracy(train, labels, query, np.array([0]), k=3, temperature=t, num_classes=2)["knn_top1"] == 1.0
    # With k=1 only the nearest neighbour (class 1) votes.
    assert knn_accuracy(train, labels, query, np.array([1]), k=1, temperature=t, num_classes=2)["knn_top1"] == 1.0


def test_knn_normalises_features_so_scale_does_not_matter():
    rng = np.random.RandomState(0)
    train, query = rng.randn(50, 8), rng.randn(10, 8)
    labels = rng.randint(0, 5, 50)
    a = knn_scores(train, labels, query, k=7, temperature=0.07, num_classes=5)
    b = knn_scores(train * 13.0, labels, query * 0.01, k=7, temperature=0.07, num_classes=5)
    np.testing.assert_allclose(a, b, rtol=1e-4)
