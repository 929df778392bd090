"""Losses against hand-computed values, the official DeiT loss in torch, and DINO's formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitdistill import losses

# A 2×3 example: two images, three classes.
CLS = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]], np.float32)
DIST = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, -1.0]], np.float32)
TEACHER = np.array([[0.0, 3.0, 1.0], [2.0, -1.0, 0.0]], np.float32)  # argmax: 1, 0
LABELS = np.array([2, 0], np.int32)
SOFT_TARGETS = np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]], np.float32)


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def test_cross_entropy_by_hand():
    # Row 0: -log(e^3 / (e^1 + e^2 + e^3)); row 1: -log(e^0.5 / (e^0.5 + e^-1 + e^2)).
    row0 = -3.0 + np.log(np.exp(1.0) + np.exp(2.0) + np.exp(3.0))
    row1 = -0.5 + np.log(np.exp(0.5) + np.exp(-1.0) + np.exp(2.0))
    assert row0 == pytest.approx(0.4076059644, abs=1e-9)
    assert float(losses.cross_entropy(CLS, LABELS)) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    one_hot = np.eye(3, dtype=np.float32)[LABELS]
    assert float(losses.cross_entropy(CLS, one_hot)) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    soft = -np.mean(np.sum(SOFT_TARGETS * np_log_softmax(CLS), axis=-1))
    assert float(losses.cross_entropy(CLS, SOFT_TARGETS)) == pytest.approx(soft, abs=1e-6)


def expected_deit(targets, kind, alpha, tau):
    """The DeiT loss written out for the 2×3 example with numpy formulas."""
    if targets.ndim == 1:
        base = -np.mean(np_log_softmax(CLS)[np.arange(2), targets])
    else:
        base = -np.mean(np.sum(targets * np_log_softmax(CLS), axis=-1))
    if kind == "none":
        return base
    if kind == "hard":
        teacher_ids = np.array([1, 0])  # argmax of each TEACHER row
        distill = -np.mean(np_log_softmax(DIST)[np.arange(2), teacher_ids])
    else:
        p_teacher = np.exp(np_log_softmax(TEACHER / tau))
        kl_sum = np.sum(p_teacher * (np_log_softmax(TEACHER / tau) - np_log_softmax(DIST / tau)))
        distill = kl_sum * tau**2 / 6  # B·C = 2·3, the official normalisation
    return (1 - alpha) * base + alpha * distill


@pytest.mark.parametrize("kind", ["none", "hard", "soft"])
@pytest.mark.parametrize("targets", [LABELS, SOFT_TARGETS], ids=["class_ids", "soft_targets"])
@pytest.mark.parametrize("alpha,tau", [(0.5, 1.0), (0.1, 3.0)])
def test_deit_loss_by_hand(kind, targets, alpha, tau):
    got = losses.deit_loss(CLS, DIST, targets, TEACHER, kind=kind, alpha=alpha, tau=tau)
    assert got.shape == ()
    assert float(got) == pytest.approx(expected_deit(targets, kind, alpha, tau), abs=1e-6)


def test_soft_kl_is_divided_by_batch_times_classes():
    parts = losses.deit_loss_parts(CLS, DIST, LABELS, TEACHER, kind="soft", alpha=0.5, tau=2.0)
    per_row_kl = np.sum(
        np.exp(np_log_softmax(TEACHER / 2)) * (np_log_softmax(TEACHER / 2) - np_log_softmax(DIST / 2)),
        axis=-1,
    )
    # Dividing by B alone would give 3× this value.
    assert float(parts["distillation"]) == pytest.approx(4.0 * per_row_kl.sum() / 6, abs=1e-6)
    want_loss = 0.5 * float(parts["base"]) + 0.5 * float(parts["distillation"])
    assert float(parts["loss"]) == pytest.approx(want_loss)


def test_deit_loss_none_needs_no_dist_logits():
    got = losses.deit_loss(CLS, None, LABELS, None, kind="none", alpha=0.5, tau=1.0)
    assert float(got) == pytest.approx(expected_deit(LABELS, "none", 0.5, 1.0), abs=1e-6)


def test_deit_loss_errors():
    with pytest.raises(ValueError, match="'bogus'.*'none', 'soft', 'hard'"):
        losses.deit_loss(CLS, DIST, LABELS, TEACHER, kind="bogus", alpha=0.5, tau=1.0)
    with pytest.raises(ValueError, match="distillation head"):
        losses.deit_loss(CLS, None, LABELS, TEACHER, kind="hard", alpha=0.5, tau=1.0)


def test_deit_loss_teacher_gets_no_gradient_and_jits():
    for kind in ("hard", "soft"):
        fn = jax.jit(lambda c, d, t: losses.deit_loss(c, d, LABELS, t, kind=kind, alpha=0.5, tau=2.0))
        grad_teacher = jax.grad(fn, argnums=2)(CLS, DIST, TEACHER)
        np.testing.assert_array_equal(grad_teacher, 0.0)
        assert np.abs(jax.grad(fn, argnums=1)(CLS, DIST, TEACHER)).max() > 0
        assert float(fn(CLS, DIST, TEACHER)) == pytest.approx(expected_deit(LABELS, kind, 0.5, 2.0), abs=1e-6)


def torch_distillation_loss(torch, outputs, outputs_kd, labels, teacher_outputs, kind, alpha, tau):
    """facebookresearch/deit `DistillationLoss.forward`, teacher outputs given directly."""
    F = torch.nn.functional
    if labels.ndim == 1:
        base_loss = F.cross_entropy(outputs, labels)
    else:  # timm's SoftTargetCrossEntropy, the criterion under mixup
        base_loss = torch.sum(-labels * F.log_softmax(outputs, dim=-1), dim=-1).mean()
    if kind == "none":
        return base_loss
    teacher_outputs = teacher_outputs.detach()
    if kind == "soft":
        distillation_loss = F.kl_div(
            F.log_softmax(outputs_kd / tau, dim=1), F.log_softmax(teacher_outputs / tau, dim=1),
            reduction="sum", log_target=True,
        ) * (tau * tau) / outputs_kd.numel()
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


@pytest.mark.parametrize("kind", ["none", "hard", "soft"])
@pytest.mark.parametrize("soft_targets", [False, True])
def test_deit_loss_matches_official_torch(kind, soft_targets):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    batch, classes, alpha, tau = 8, 10, 0.3, 3.0
    cls_logits = rng.normal(size=(batch, classes)).astype(np.float32) * 3
    dist_logits = rng.normal(size=(batch, classes)).astype(np.float32) * 3
    teacher = rng.normal(size=(batch, classes)).astype(np.float32) * 3
    if soft_targets:
        targets = rng.dirichlet(np.ones(classes), size=batch).astype(np.float32)
    else:
        targets = rng.integers(0, classes, size=batch).astype(np.int64)

    cls_t = torch.tensor(cls_logits, requires_grad=True)
    dist_t = torch.tensor(dist_logits, requires_grad=True)
    want = torch_distillation_loss(
        torch, cls_t, dist_t, torch.tensor(targets), torch.tensor(teacher), kind, alpha, tau)
    want.backward()

    fn = lambda c, d: losses.deit_loss(c, d, targets, teacher, kind=kind, alpha=alpha, tau=tau)
    got, (grad_cls, grad_dist) = jax.value_and_grad(fn, argnums=(0, 1))(cls_logits, dist_logits)
    assert float(got) == pytest.approx(want.item(), abs=1e-5)
    np.testing.assert_allclose(grad_cls, cls_t.grad.numpy(), atol=1e-6)
    want_grad_dist = np.zeros_like(dist_logits) if dist_t.grad is None else dist_t.grad.numpy()
    np.testing.assert_allclose(grad_dist, want_grad_dist, atol=1e-6)


def np_dino_loss(student, teacher, center, student_temp, teacher_temp, num_global):
    """DINOLoss.forward as a plain double loop over (teacher crop, student crop) pairs."""
    batch = teacher.shape[0] // num_global
    num_views = student.shape[0] // batch
    total, terms = 0.0, 0
    for i in range(num_global):
        t = (teacher[i * batch:(i + 1) * batch] - center) / teacher_temp
        q = np.exp(np_log_softmax(t))
        for v in range(num_views):
            if v == i:
                continue
            log_p = np_log_softmax(student[v * batch:(v + 1) * batch] / student_temp)
            total += np.mean(np.sum(-q * log_p, axis=-1))
            terms += 1
    return total / terms, terms


def dino_inputs(num_local, batch=4, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    student = rng.normal(size=((2 + num_local) * batch, dim)).astype(np.float32)
    teacher = rng.normal(size=(2 * batch, dim)).astype(np.float32)
    center = rng.normal(size=(1, dim)).astype(np.float32) * 0.1
    return student, teacher, center


@pytest.mark.parametrize("num_local,pairs", [(0, 2), (2, 6), (8, 18)])
def test_dino_loss_matches_double_loop(num_local, pairs):
    student, teacher, center = dino_inputs(num_local)
    want, terms = np_dino_loss(student, teacher, center, 0.1, 0.04, 2)
    assert terms == pairs
    got = losses.dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.04)
    assert got.shape == ()
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_dino_loss_jits_with_traced_temperature_and_stops_teacher_gradient():
    student, teacher, center = dino_inputs(2)
    fn = jax.jit(lambda s, t, temp: losses.dino_loss(s, t, center, student_temp=0.1, teacher_temp=temp))
    want, _ = np_dino_loss(student, teacher, center, 0.1, 0.07, 2)
    assert float(fn(student, teacher, jnp.float32(0.07))) == pytest.approx(want, rel=1e-5)
    grad_student, grad_teacher = jax.grad(fn, argnums=(0, 1))(student, teacher, jnp.float32(0.07))
    np.testing.assert_array_equal(grad_teacher, 0.0)
    assert np.abs(grad_student).max() > 0


def test_dino_loss_rejects_rows_that_are_not_crop_major():
    student, teacher, center = dino_inputs(2)
    with pytest.raises(ValueError, match="crop-major"):
        losses.dino_loss(student[:-1], teacher, center, student_temp=0.1, teacher_temp=0.04)


def test_update_center():
    _, teacher, center = dino_inputs(0)
    got = losses.update_center(center, teacher, momentum=0.9)
    np.testing.assert_allclose(got, 0.9 * center + 0.1 * teacher.mean(axis=0, keepdims=True), rtol=1e-6)
    assert got.shape == center.shape


def test_update_center_over_a_sharded_batch_uses_the_global_mean():
    devices = np.array(jax.devices())
    mesh = jax.sharding.Mesh(devices, ("data",))
    _, teacher, center = dino_inputs(0, batch=len(devices) * 2)
    sharded = jax.device_put(teacher, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
    got = jax.jit(losses.update_center)(center, sharded)
    np.testing.assert_allclose(got, 0.9 * center + 0.1 * teacher.mean(axis=0, keepdims=True), rtol=1e-6)


def test_dino_monitoring():
    student, teacher, center = dino_inputs(2)
    got = losses.dino_monitoring(student, teacher, center, student_temp=0.1, teacher_temp=0.04,
                                 num_global_crops=2)
    log_q = np_log_softmax((teacher - center) / 0.04)
    entropy = np.mean(-np.sum(np.exp(log_q) * log_q, axis=-1))
    assert float(got["teacher_entropy"]) == pytest.approx(entropy, rel=1e-5)
    loss, _ = np_dino_loss(student, teacher, center, 0.1, 0.04, 2)
    # Each teacher crop is in the same number of pairs, so the mean KL is CE − H.
    assert float(got["teacher_student_kl"]) == pytest.approx(loss - entropy, rel=1e-5, abs=1e-6)
    marginal = np.exp(log_q).reshape(2, -1, teacher.shape[1]).mean(axis=1)
    marginal_entropy = np.mean(-np.sum(marginal * np.log(marginal), axis=-1))
    assert float(got["teacher_marginal_entropy"]) == pytest.approx(marginal_entropy, rel=1e-5)
    assert marginal_entropy > entropy  # mixing rows never lowers entropy; here it must raise it

    # A uniform teacher (collapse onto the centre) has entropy log K.
    uniform = losses.dino_monitoring(student, np.zeros_like(teacher), np.zeros_like(center),
                                     student_temp=0.1, teacher_temp=0.04, num_global_crops=2)
    assert float(uniform["teacher_entropy"]) == pytest.approx(np.log(teacher.shape[1]), rel=1e-6)

    # Every image sent to the same one of K outputs: sharp rows and a one-point marginal.
    one_cluster = np.zeros_like(teacher)
    one_cluster[:, 3] = 50.0
    collapsed = losses.dino_monitoring(student, one_cluster, np.zeros_like(center), student_temp=0.1,
                                       teacher_temp=0.04, num_global_crops=2)
    assert float(collapsed["teacher_marginal_entropy"]) == pytest.approx(0.0, abs=1e-6)
    # Each crop's rows spread one-hot over 4 outputs in equal shares: log 4 whatever the row entropy.
    four = np.zeros_like(teacher)
    batch = teacher.shape[0] // 2
    four[np.arange(teacher.shape[0]), np.arange(teacher.shape[0]) % batch % 4] = 50.0
    spread = losses.dino_monitoring(student, four, np.zeros_like(center), student_temp=0.1, teacher_temp=0.04,
                                    num_global_crops=2)
    assert float(spread["teacher_marginal_entropy"]) == pytest.approx(np.log(4), rel=1e-4)
