"""Mixup / CutMix with label smoothing, in JAX, inside the jitted train step.

timm `Mixup(mode='batch', correct_lam=True)` as DeiT uses it: one lambda per batch, each image
mixed with its partner in the reversed batch, and the targets -- smoothed one-hot vectors --
mixed with the same lambda. Shapes are static: the CutMix box is a mask built from iotas.
"""
import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes, smoothing=0.0):
    """One-hot targets with `smoothing` spread over all classes: off = s / C, on = 1 - s + s / C."""
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (on - off) + off


def cutmix_box(lam, cy, cx, height, width, *, rule: str = "timm_0.3.2"):
    """timm 0.3.2's rand_bbox (the version DeiT pins): sides cut_h = int(H * sqrt(1 - lam)), cut_w alike,
    rows cy - cut_h // 2 to cy + cut_h // 2 and columns alike, clipped to the image. `rule='timm_1.0'`: timm
    1.0's (1.0.31 checked), whose box ends at cy + (cut_h + 1) // 2, a pixel further for odd sides.

    Returns (y_lo, y_hi, x_lo, x_hi), int32; the box is rows y_lo:y_hi, columns x_lo:x_hi.
    """
    if rule not in ("timm_0.3.2", "timm_1.0"):
        raise ValueError(f"cutmix_box rule={rule!r}; valid: timm_0.3.2, timm_1.0")
    cut_ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
    extra = 1 if rule == "timm_1.0" else 0
    y_lo, y_hi = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + (cut_h + extra) // 2, 0, height)
    x_lo, x_hi = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + (cut_w + extra) // 2, 0, width)
    return jnp.stack([y_lo, y_hi, x_lo, x_hi]).astype(jnp.int32)


def sample_mix_params(rng, image_size, *, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0):
    """The batch's mixing choices: {'lam', 'use_cutmix', 'box' = (y_lo, y_hi, x_lo, x_hi)}.

    With probability `prob` the batch is mixed: by CutMix with probability `switch_prob` when both
    alphas are positive (only by the one that is positive otherwise), with lam ~ Beta(alpha, alpha).
    CutMix pastes `cutmix_box` around a uniform centre and corrects lam to 1 - box area / image
    area. An unmixed batch has lam = 1.
    """
    height, width = image_size
    apply_key, switch_key, mixup_key, cutmix_key, y_key, x_key = jax.random.split(rng, 6)
    apply = jax.random.uniform(apply_key) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(switch_key) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    use_cutmix &= apply
    lam_mixup = jax.random.beta(mixup_key, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cutmix = jax.random.beta(cutmix_key, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0)
    cy = jax.random.randint(y_key, (), 0, height)
    cx = jax.random.randint(x_key, (), 0, width)
    box = cutmix_box(lam, cy, cx, height, width)
    box_lam = 1.0 - ((box[1] - box[0]) * (box[3] - box[2])) / (height * width)
    return {
        "lam": jnp.where(use_cutmix, box_lam, lam).astype(jnp.float32),
        "use_cutmix": use_cutmix,
        "box": box,
    }


def mix_batch(params, images, targets):
    """Apply `sample_mix_params`'s choices: each image and target mixed with the reversed batch's."""
    _, height, width, _ = images.shape
    lam = params["lam"]
    partners = images[::-1]
    y_lo, y_hi, x_lo, x_hi = params["box"]
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, width), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (height, width), 1)
    in_box = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)
    pasted = jnp.where(in_box[None, :, :, None], partners, images)
    blended = lam.astype(images.dtype) * images + (1.0 - lam).astype(images.dtype) * partners
    mixed = jnp.where(params["use_cutmix"], pasted, blended)
    return mixed, lam * targets + (1.0 - lam) * targets[::-1]


def group_mix_params(rng, image_size, *, groups=1, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0):
    """`sample_mix_params` for each of `groups` groups of a batch: each leaf with a leading [groups] axis.

    One group draws from `rng` itself; more draw from `jax.random.split(rng, groups)`, one key each.
    """
    sample = lambda key: sample_mix_params(key, image_size, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                                           switch_prob=switch_prob, prob=prob)
    if groups == 1:
        return jax.tree.map(lambda x: jnp.asarray(x)[None], sample(rng))
    return jax.vmap(sample)(jax.random.split(rng, groups))


def mixup_cutmix(rng, images, labels, *, num_classes, mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5,
                 prob=1.0, label_smoothing=0.1, groups=1):
    """Mix a batch of NHWC `images` and class ids `labels` -> (images, soft targets [B, num_classes]).

    The batch is `groups` contiguous groups (on a mesh, one per device: each device's rows), each mixed as
    timm's Mixup mixes one GPU's batch under DeiT's DistributedDataParallel: its own lam, mode and box
    (`group_mix_params`), each image with its group's reversed order. `groups=1`: one draw over the whole
    batch. Both alphas 0: no mixing, targets are the smoothed one-hot labels. Each group must be even
    (timm's requirement: an odd batch would mix its middle image with itself).
    """
    batch, height, width = images.shape[:3]
    if batch % groups or (batch // groups) % 2:
        raise ValueError(f"mixup/cutmix needs an even batch per mixing group, got {batch} images in {groups} "
                         "group(s): use a batch_size divisible by 2 x the number of devices")
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    params = group_mix_params(rng, (height, width), groups=groups, mixup_alpha=mixup_alpha,
                              cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, prob=prob)
    per_group = lambda x: x.reshape((groups, batch // groups) + x.shape[1:])
    mixed, mixed_targets = jax.vmap(mix_batch)(params, per_group(images), per_group(targets))
    return mixed.reshape(images.shape), mixed_targets.reshape(targets.shape)
