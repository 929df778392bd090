"""AdamW with PyTorch's semantics, DINO's per-tensor clipping, and the decay masks.

optax.adamw keeps one step count for the whole tree. PyTorch keeps `state['step']` per
parameter and skips a parameter whose grad is None entirely, which is how DINO freezes
the head's last layer for the first epoch: its Adam bias correction starts from step 1
when it is released. Reproducing the official runs needs that, hence this module.
"""
import math
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]

# timm 0.3.2's VisionTransformer.no_weight_decay(), which DeiT's DistilledVisionTransformer inherits: the class
# token and the position embedding. The distillation token is decayed (later timm also skips 'dist_token').
DEIT_NO_DECAY_NAMES = frozenset({"pos_embed", "cls_token"})


def _path_names(path):
    """Key names along a tree path: ('blocks_0', 'attn', 'qkv', 'bias')."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
    return tuple(names)


def deit_decay_mask(params):
    """True where DeiT decays (timm 0.3.2's add_weight_decay): not biases, not 1-D params, not pos_embed or
    cls_token; dist_token is decayed."""
    def decays(path, leaf):
        names = _path_names(path)
        return not (jnp.ndim(leaf) <= 1 or names[-1] == "bias"
                    or any(name in DEIT_NO_DECAY_NAMES for name in names))

    return jax.tree_util.tree_map_with_path(decays, params)


def dino_decay_mask(params):
    """True where DINO's get_params_groups decays: not biases, not 1-D params.

    Unlike DeiT, pos_embed and cls_token are decayed, and so is a trainable weight-norm
    gain (`[1, K]` in Flax, `[K, 1]` in PyTorch: 2-D either way).
    """
    def decays(path, leaf):
        return not (_path_names(path)[-1] == "bias" or jnp.ndim(leaf) == 1)

    return jax.tree_util.tree_map_with_path(decays, params)


def last_layer_mask(params):
    """True on the DINO head's `last_layer` leaves (DINO matches 'last_layer' in the name)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: any("last_layer" in name for name in _path_names(path)), params)


def frozen_while(mask, num_steps):
    """A `frozen` callable for `adamw`: the leaves in `mask` are skipped while step < num_steps.

    DINO's freeze_last_layer: `frozen_while(last_layer_mask(params), epochs_to_steps(1, spe))`.
    """
    return lambda step: jax.tree.map(lambda m: jnp.logical_and(m, step < num_steps), mask)


def tree_l2_norm(tree):
    """The l2 norm of all leaves together, in float32 (for logging grads, params, updates)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return jnp.zeros((), jnp.float32)
    return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


def ema_update(average, new, decay):
    """decay·average + (1 − decay)·new, leaf by leaf: DINO's teacher (decay: the teacher momentum) and
    DeiT's model EMA (`model_ema_decay`) follow their networks this way after each update."""
    return jax.tree.map(lambda a, n: decay * a + (1.0 - decay) * n, average, new)


def clip_by_tensor_norm(max_norm):
    """DINO's clip_gradients: each tensor is scaled to norm <= max_norm on its own.

    coef = max_norm / (‖g‖ + 1e-6), applied only where coef < 1. Unlike global-norm
    clipping, a single exploding tensor does not shrink every other gradient.
    """
    def clip(g):
        coef = max_norm / (jnp.linalg.norm(g.ravel()) + 1e-6)
        return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class AdamWState(NamedTuple):
    """A plain pytree, so orbax checkpoints it as is.

    count: steps so far, which indexes the learning-rate and decay schedules (a step the loop skips for a
      non-finite update counts: `keep_schedule_counts`).
    leaf_steps: PyTorch's per-parameter state['step'], which drives the bias correction.
    """
    count: jax.Array
    leaf_steps: Any
    mu: Any
    nu: Any


def keep_schedule_counts(kept, new):
    """An optimizer state `kept` from before a step whose update was thrown away, with the schedule counts of
    `new`, the state after it: the learning rate, weight decay and freezing go on with the step, as the
    official loops index them by iteration (and as PyTorch's schedulers go on when GradScaler skips a step),
    while Adam's moments and per-parameter step counts (its bias correction) stay as they were."""
    def is_adamw(x):
        return isinstance(x, AdamWState)

    return jax.tree.map(lambda k, n: k._replace(count=n.count) if is_adamw(k) else k, kept, new, is_leaf=is_adamw)


def _one_minus_power(beta, step):
    """1 − beta**step without float32's cancellation (1 − 0.999 is off by 1e-5 in float32)."""
    return -jnp.expm1(step.astype(jnp.float32) * math.log(beta))


def _as_schedule(value: ScalarOrSchedule):
    return value if callable(value) else (lambda step: value)


def adamw(learning_rate: ScalarOrSchedule, *, b1=0.9, b2=0.999, eps=1e-8,
          weight_decay: ScalarOrSchedule, decay_mask, frozen: Optional[Callable] = None):
    """torch.optim.AdamW as an optax transformation; its updates already include -lr.

    `decay_mask` is a pytree of bools like the params (or a callable params -> mask),
    True where decay applies: PyTorch's param groups with and without weight decay.
    `frozen(step)` returns a pytree of bools: a True leaf is treated as PyTorch treats a
    parameter with grad None at that step — no moment update, no step count, no decay.
    The schedules and `frozen` see the number of updates applied before this one.
    """
    lr_at = _as_schedule(learning_rate)
    wd_at = _as_schedule(weight_decay)

    def init(params):
        return AdamWState(
            count=jnp.zeros((), jnp.int32),
            leaf_steps=jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params),
            mu=jax.tree.map(jnp.zeros_like, params),
            nu=jax.tree.map(jnp.zeros_like, params),
        )

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("adamw needs the params for weight decay: call update(grads, state, params).")
        lr = lr_at(state.count)
        wd = wd_at(state.count)
        decays = decay_mask(params) if callable(decay_mask) else decay_mask
        skip = frozen(state.count) if frozen is not None else jax.tree.map(lambda _: False, params)

        def leaf(g, p, step, mu, nu, decay, skipped):
            g = g.astype(mu.dtype)
            new_step = step + 1
            new_mu = mu + (1.0 - b1) * (g - mu)  # torch's lerp_
            new_nu = b2 * nu + (1.0 - b2) * g * g
            bias_correction1 = _one_minus_power(b1, new_step)
            bias_correction2 = _one_minus_power(b2, new_step)
            denom = jnp.sqrt(new_nu) / jnp.sqrt(bias_correction2) + eps
            update = -(lr / bias_correction1) * new_mu / denom - jnp.where(decay, lr * wd, 0.0) * p
            update = update.astype(p.dtype)
            return (jnp.where(skipped, jnp.zeros_like(update), update),
                    jnp.where(skipped, step, new_step),
                    jnp.where(skipped, mu, new_mu),
                    jnp.where(skipped, nu, new_nu))

        outs = jax.tree.map(leaf, grads, params, state.leaf_steps, state.mu, state.nu, decays, skip)
        treedef = jax.tree.structure(grads)
        updates, steps, mus, nus = (
            jax.tree.unflatten(treedef, list(column)) for column in zip(*treedef.flatten_up_to(outs))
        )
        return updates, AdamWState(state.count + 1, steps, mus, nus)

    return optax.GradientTransformation(init, update)
