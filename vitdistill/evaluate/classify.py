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


def fractions(totals: dict) -> dict:
    """Summed counts (with the number of examples under 'count') as fractions of the examples."""
    count = max(totals.get("count", 0.0), 1.0)
    return {k: (v / count if k != "count" else v) for k, v in totals.items()}
