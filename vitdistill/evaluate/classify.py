"""Top-k accuracy over a padded evaluation set: padding rows carry mask 0 and count nowhere."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_correct(logits: jax.Array, labels: jax.Array, mask: jax.Array, ks=(1, 5)) -> dict:
    """Masked counts of examples whose label is among the top-k logits, for each k."""
    labels = labels.astype(jnp.int32)
    # The true class's place when classes are sorted highest first, NaN above every number (as torch's topk
    # in timm's `accuracy` puts them), ties in class-index order. Constant logits then score 1/C, not 100 %.
    nan = jnp.isnan(logits)
    true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
    true_nan = jnp.take_along_axis(nan, labels[:, None], axis=-1)
    before = jnp.arange(logits.shape[-1])[None, :] < labels[:, None]
    above = jnp.where(true_nan, False, (logits > true_logit) | nan)
    tied = jnp.where(true_nan, nan, logits == true_logit) & before
    rank = jnp.sum(above | tied, axis=-1)
    return {f"top{k}": jnp.sum((rank < k) * mask) for k in ks if k <= logits.shape[-1]}


def fractions(totals: dict) -> dict:
    """Summed counts (with the number of examples under 'count') as fractions of the examples."""
    count = max(totals.get("count", 0.0), 1.0)
    return {k: (v / count if k != "count" else v) for k, v in totals.items()}
