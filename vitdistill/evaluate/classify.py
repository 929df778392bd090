"""Top-k accuracy over a padded evaluation set: padding rows carry mask 0 and count nowhere."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, ks=(1, 5)) -> dict:
    """Masked counts of examples whose label is among the top-k logits, for each k."""
    labels = labels.astype(jnp.int32)
    # Rank of the true class = number of classes scoring strictly higher (ties resolved in its favour).
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    rank = jnp.sum(logits > true_logit, axis=-1)
    return {f"top{k}": jnp.sum((rank < k) * mask) for k in ks if k <= logits.shape[-1]}


def accumulate(totals: dict, counts: dict) -> dict:
    return {k: totals.get(k, 0) + v for k, v in counts.items()}
