"""Top-k counting over padded batches and DINO's weighted k-NN, against hand-worked examples, a brute-force
NumPy ranking and DINO's `knn_classifier` written out in torch."""
import numpy as np
import jax.numpy as jnp
import pytest

from vitdistill.evaluate.classify import topk_correct
from vitdistill.evaluate.knn import knn_accuracies, knn_accuracy, knn_scores


def test_topk_counts_only_unmasked_rows():
    logits = jnp.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.9, 0.05, 0.05]])
    labels = jnp.array([1, 2, 2, 0])
    mask = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding: correct, but must not count
    counts = topk_correct(logits, labels, mask, ks=(1, 2))
    assert float(counts["top1"]) == 2.0  # rows 0 and 2
    assert float(counts["top2"]) == 2.0  # row 1's label 2 ties with class 1, which sorts first (lower index)


def test_constant_and_nan_logits_score_what_a_sort_gives_not_full_marks():
    labels = jnp.arange(40) % 10
    mask = jnp.ones(40)
    counts = topk_correct(jnp.zeros((40, 10)), labels, mask)
    assert float(counts["top1"]) == 4.0 and float(counts["top5"]) == 20.0  # 1/C and 5/C: classes 0..4 first
    nan = jnp.full((40, 10), jnp.nan)
    assert float(topk_correct(nan, labels, mask)["top1"]) == 4.0
    # One NaN ranks above every number, as torch's topk puts it.
    logits = jnp.array([[0.0, jnp.nan, 5.0], [0.0, jnp.nan, 5.0], [jnp.nan, jnp.nan, 1.0]])
    counts = topk_correct(logits, jnp.array([1, 2, 1]), jnp.ones(3), ks=(1, 2))
    assert float(counts["top1"]) == 1.0 and float(counts["top2"]) == 3.0  # NaN first; NaN ties by index


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


def _brute_force(train, train_labels, test, test_labels, k, t, num_classes):
    """The official ranking in NumPy, one query at a time: cosine similarities, the k largest, votes
    exp(sim / t) per class, classes sorted by votes highest first with ties in index order."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for query, label in zip(test, test_labels):
        sims = train @ query
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for i in nearest:
            votes[train_labels[i]] += np.exp(sims[i] / t)
        order = list(np.argsort(-votes, kind="stable"))
        top1 += order[0] == label
        top5 += label in order[:min(5, k)]
    return top1 / len(test), top5 / len(test)


def _official_torch(train, train_labels, test, test_labels, k, t, num_classes):
    """DINO's eval_knn.knn_classifier (facebookresearch/dino), written out: mm, topk, one-hot scatter,
    exp(d / T) weights, `probs.sort(1, True)`, top-5 over the first min(5, k) columns."""
    torch = pytest.importorskip("torch")
    train_f = torch.nn.functional.normalize(torch.tensor(train, dtype=torch.float32), dim=1)
    test_f = torch.nn.functional.normalize(torch.tensor(test, dtype=torch.float32), dim=1)
    distances, indices = (test_f @ train_f.T).topk(k, largest=True, sorted=True)
    neighbours = torch.gather(torch.tensor(train_labels).view(1, -1).expand(len(test), -1), 1, indices)
    one_hot = torch.zeros(len(test) * k, num_classes).scatter_(1, neighbours.reshape(-1, 1), 1)
    probs = (one_hot.view(len(test), k, num_classes) * distances.div(t).exp().view(len(test), k, 1)).sum(1)
    _, predictions = probs.sort(1, True)
    correct = predictions.eq(torch.tensor(test_labels).view(-1, 1))
    return (correct[:, :1].sum().item() / len(test), correct[:, :min(5, k)].sum().item() / len(test))


@pytest.mark.parametrize("case", ["random", "ties", "k_beyond_a_class", "few_voting_classes"])
def test_knn_ranks_as_the_official_knn_classifier(case):
    rng = np.random.RandomState(["random", "ties", "k_beyond_a_class", "few_voting_classes"].index(case))
    num_classes, dim = 10, 6
    if case == "few_voting_classes":  # tight clusters: the 5 nearest come from one or two classes
        centres = rng.randn(num_classes, dim) * 5
        train_labels = rng.randint(0, num_classes, 200)
        train = centres[train_labels] + 0.1 * rng.randn(200, dim)
        test_labels = rng.randint(0, num_classes, 80)
        test = centres[test_labels] + 0.1 * rng.randn(80, dim)
        test_labels = rng.randint(0, num_classes, 80)  # often a class that got no votes at all
    else:
        train_labels = rng.randint(0, num_classes, 60 if case != "k_beyond_a_class" else 30)
        train = rng.randn(len(train_labels), dim)
        test_labels = rng.randint(0, num_classes, 80)
        test = rng.randn(80, dim)
    if case == "ties":  # exact vote ties: queries that are a training point's duplicate in a copied pair
        train = np.concatenate([train, train[:20]])
        train_labels = np.concatenate([train_labels, (train_labels[:20] + 1) % num_classes])
        test[:20] = train[:20]
    ks = (5, 20) if case != "k_beyond_a_class" else (3, 8)  # 8 > every class's 30/10 training points
    ours = knn_accuracies(train, train_labels, test, test_labels, ks=ks, temperature=0.07,
                          num_classes=num_classes)
    for k in ks:
        expected = _brute_force(train, train_labels, test, test_labels, k, 0.07, num_classes)
        assert (ours[k]["knn_top1"], ours[k]["knn_top5"]) == pytest.approx(expected, abs=1e-9), k
        assert expected == pytest.approx(_official_torch(train, train_labels, test, test_labels, k, 0.07,
                                                         num_classes), abs=1e-9)
    if case == "few_voting_classes":  # the case a tie-in-favour rule gets wrong
        lenient = np.mean([label in np.argsort(-s)[:5] or s[label] >= np.sort(s)[-5]
                           for s, label in zip(knn_scores(train, train_labels, test, k=5, num_classes=num_classes),
                                               test_labels)])
        assert ours[5]["knn_top5"] < lenient - 0.1
