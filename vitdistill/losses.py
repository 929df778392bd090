"""Loss functions of DeiT and DINO: pure, keyword-only, float32, jit-able.

Each one mirrors the official PyTorch code (facebookresearch/deit `losses.py`,
facebookresearch/dino `main_dino.py` DINOLoss) value for value; SPEC §1, §3, §4.
"""
import jax
import jax.numpy as jnp

DEIT_KINDS = ("none", "soft", "hard")


def cross_entropy(logits, targets):
    """Mean over the batch of −Σ target·log_softmax(logits).

    `targets` are class ids `[B]` (integers) or distributions `[B, C]`, so one function
    serves plain labels and the soft targets that mixup and label smoothing produce.
    """
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    targets = jnp.asarray(targets)
    if targets.ndim == log_probs.ndim - 1:
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(
                f"targets of shape {targets.shape} look like class ids but have dtype "
                f"{targets.dtype}; pass integer class ids [B] or distributions [B, C]."
            )
        picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        return -jnp.mean(picked)
    if targets.shape != log_probs.shape:
        raise ValueError(
            f"targets have shape {targets.shape} but logits have shape {log_probs.shape}; "
            "pass class ids [B] or distributions [B, C]."
        )
    return -jnp.mean(jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1))


def _soft_distillation(dist_logits, teacher_logits, tau):
    """τ²·KL(teacher ‖ student) summed, divided by B·C as DeiT's code does (not by B)."""
    student_log_probs = jax.nn.log_softmax(dist_logits / tau, axis=-1)
    teacher_log_probs = jax.nn.log_softmax(teacher_logits / tau, axis=-1)
    kl_sum = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs))
    return kl_sum * (tau * tau) / dist_logits.size


def deit_loss_parts(cls_logits, dist_logits, targets, teacher_logits, *, kind, alpha, tau):
    """`deit_loss` and its two terms, for logging: {'loss', 'base', 'distillation'}."""
    if kind not in DEIT_KINDS:
        raise ValueError(f"Unknown distillation kind {kind!r}; use one of {DEIT_KINDS}.")
    base = cross_entropy(cls_logits, targets)
    if kind == "none":
        return {"loss": base, "base": base, "distillation": jnp.zeros_like(base)}
    if dist_logits is None:
        raise ValueError(
            f"Distillation kind {kind!r} needs the distillation head's logits, got None; "
            "use a distilled model (deit_*_distilled_*) or kind='none'."
        )
    if teacher_logits is None:
        raise ValueError(f"Distillation kind {kind!r} needs teacher logits, got None.")
    dist_logits = jnp.asarray(dist_logits, jnp.float32)
    teacher_logits = jax.lax.stop_gradient(jnp.asarray(teacher_logits, jnp.float32))
    if kind == "soft":
        distillation = _soft_distillation(dist_logits, teacher_logits, tau)
    else:
        distillation = cross_entropy(dist_logits, jnp.argmax(teacher_logits, axis=-1))
    loss = (1.0 - alpha) * base + alpha * distillation
    return {"loss": loss, "base": base, "distillation": distillation}


def deit_loss(cls_logits, dist_logits, targets, teacher_logits, *, kind, alpha, tau):
    """DeiT's DistillationLoss: (1−α)·CE(cls, targets) + α·distillation term.

    kind 'none': CE only (`dist_logits`, `teacher_logits` may be None); 'hard': CE of the
    distillation head against the teacher's argmax; 'soft': τ²·KL at temperature τ with
    the official B·C normalisation. The teacher gets no gradient.
    """
    return deit_loss_parts(
        cls_logits, dist_logits, targets, teacher_logits, kind=kind, alpha=alpha, tau=tau
    )["loss"]


def _dino_views(student_out, teacher_out, center, student_temp, teacher_temp, num_global_crops):
    """Student log-probs [V, B, K] and stop-gradient teacher probs and log-probs [G, B, K]."""
    student_out = jnp.asarray(student_out, jnp.float32)
    teacher_out = jnp.asarray(teacher_out, jnp.float32)
    rows, dim = teacher_out.shape
    if rows % num_global_crops:
        raise ValueError(
            f"teacher_out has {rows} rows, not a multiple of num_global_crops={num_global_crops}; "
            "rows must be crop-major: crop i in rows i*B:(i+1)*B."
        )
    batch = rows // num_global_crops
    if student_out.shape[0] % batch or student_out.shape[0] < rows or student_out.shape[1] != dim:
        raise ValueError(
            f"student_out has shape {student_out.shape}; with teacher_out {teacher_out.shape} and "
            f"{num_global_crops} global crops it must be [(global+local)*{batch}, {dim}], crop-major."
        )
    student_log_probs = jax.nn.log_softmax(student_out / student_temp, axis=-1)
    teacher_logits = jax.lax.stop_gradient((teacher_out - center) / teacher_temp)
    teacher_log_probs = jax.nn.log_softmax(teacher_logits, axis=-1)
    return (
        student_log_probs.reshape(-1, batch, dim),
        jnp.exp(teacher_log_probs).reshape(num_global_crops, batch, dim),
        teacher_log_probs.reshape(num_global_crops, batch, dim),
    )


def _pair_mean(per_pair, num_global_crops):
    """Mean of a [G, V] table over the pairs (teacher crop i, student crop v != i)."""
    num_views = per_pair.shape[1]
    not_same = jnp.arange(num_global_crops)[:, None] != jnp.arange(num_views)[None, :]
    return jnp.sum(jnp.where(not_same, per_pair, 0.0)) / (num_global_crops * (num_views - 1))


def dino_loss(student_out, teacher_out, center, *, student_temp, teacher_temp, num_global_crops=2):
    """DINO's cross-entropy between the centred, sharpened teacher and the student.

    `student_out` is [(G+L)·B, K], `teacher_out` [G·B, K], both crop-major. Every pair
    (teacher crop i, student crop v ≠ i) contributes the batch-mean CE; pairs are averaged.
    `teacher_temp` may be a traced scalar (the per-epoch schedule).
    """
    student_log_probs, teacher_probs, _ = _dino_views(
        student_out, teacher_out, center, student_temp, teacher_temp, num_global_crops
    )
    batch = teacher_probs.shape[1]
    cross = -jnp.einsum("ibk,vbk->iv", teacher_probs, student_log_probs) / batch
    return _pair_mean(cross, num_global_crops)


def update_center(center, teacher_out, momentum=0.9):
    """center·m + (1−m)·mean of the teacher outputs over rows.

    Pass the global batch: under jit over a mesh the mean then spans all devices, which is
    what DINO's all_reduce does.
    """
    teacher_out = jax.lax.stop_gradient(jnp.asarray(teacher_out, jnp.float32))
    return center * momentum + (1.0 - momentum) * jnp.mean(teacher_out, axis=0)


def dino_monitoring(student_out, teacher_out, center, *, student_temp, teacher_temp, num_global_crops):
    """Collapse indicators from the DINO paper (§5.3, Fig. 7), without gradients.

    'teacher_entropy': mean over teacher rows of H(teacher probs) — near 0 means the
    teacher has collapsed to one dimension, near log K to the uniform distribution.
    'teacher_student_kl': KL(teacher ‖ student) averaged over the loss's pairs — near 0
    with either collapse, since the student then copies the teacher.
    'teacher_marginal_entropy': H of the batch-mean teacher probs, averaged over the global
    crops; exp of it is the number of output dimensions the batch spreads over (at most
    min(K, B) for one-hot rows). Low while 'teacher_entropy' is low too is partial collapse: the
    teacher sorts the images into a few clusters only.
    """
    student_log_probs, teacher_probs, teacher_log_probs = _dino_views(
        jax.lax.stop_gradient(student_out), teacher_out, center, student_temp, teacher_temp,
        num_global_crops,
    )
    batch = teacher_probs.shape[1]
    entropy_per_crop = -jnp.sum(teacher_probs * teacher_log_probs, axis=(1, 2)) / batch
    cross = -jnp.einsum("ibk,vbk->iv", teacher_probs, student_log_probs) / batch
    kl = _pair_mean(cross - entropy_per_crop[:, None], num_global_crops)
    marginal = jnp.mean(teacher_probs, axis=1)
    marginal_entropy = -jnp.sum(marginal * jnp.log(jnp.maximum(marginal, 1e-30)), axis=-1)
    return {"teacher_entropy": jnp.mean(entropy_per_crop), "teacher_student_kl": kl,
            "teacher_marginal_entropy": jnp.mean(marginal_entropy)}
