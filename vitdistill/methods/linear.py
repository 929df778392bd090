"""Linear probe on frozen features, as DINO's `eval_linear.py` trains one.

The backbone (a DINO or DeiT workdir, its teacher/EMA by default, or a converted checkpoint, through
`config.model.init_from`) is frozen: an input of every step, never trained or saved. Its features are
the CLS token of each of the last `n_last_blocks` blocks, each through the final LayerNorm, concatenated
(`get_intermediate_layers`); with `avgpool_patchtokens` (n_last_blocks must be 1, as the official
concatenation requires) the average of the last block's normed patch tokens is interleaved with them.
One linear layer per learning rate in `linear.lrs` (weights N(0, 0.01), bias 0) trains on the same
features: SGD with momentum 0.9, weight decay 0, lr x batch / 256, cosine annealing to 0 stepped once per
epoch (`CosineAnnealingLR(epochs, eta_min=0)`), on random-resized crops (scale 0.08-1) and flips, each
epoch ending on its partial batch as the official loader (no drop_last) ends it; it is
evaluated after every `eval_every_epochs` on resize (crop_pct) + centre crop, top-1 and top-5 per head,
and the summary gives each head's last and best top-1.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vitdistill import weights
from vitdistill.data import deit_transforms, pipeline
from vitdistill.data.sources import Source, get_source
from vitdistill.errors import ConfigError
from vitdistill.evaluate import batched
from vitdistill.evaluate.classify import fractions, topk_correct
from vitdistill.train import loop, schedules, sharding
from vitdistill.train.reporting import eval_rows, markdown_table
from vitdistill.train.state import TrainState


@flax.struct.dataclass
class LinearState(TrainState):
    """`params`: {'kernel': [heads, dim, classes], 'bias': [heads, classes]}, one head per learning rate;
    `opt_state`: their SGD momentum buffers."""


@dataclasses.dataclass(frozen=True)
class LinearSetup:
    backbone: nn.Module
    n_last_blocks: int
    avgpool: bool
    lrs: tuple              # per head, already scaled by batch / 256
    momentum: float
    num_classes: int
    feature_dim: int
    steps_per_epoch: int
    epochs: float

    def lr_scale(self, step):
        """CosineAnnealingLR(T_max=epochs, eta_min=0), stepped at the end of every epoch."""
        epoch = step // self.steps_per_epoch
        return 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / self.epochs))


features = batched.block_features  # the module docstring's features


def init_state(rng, *, setup: LinearSetup) -> LinearState:
    heads = len(setup.lrs)
    params = {"kernel": 0.01 * jax.random.normal(rng, (heads, setup.feature_dim, setup.num_classes), jnp.float32),
              "bias": jnp.zeros((heads, setup.num_classes), jnp.float32)}
    return LinearState(step=jnp.zeros((), jnp.int32), params=params, opt_state=jax.tree.map(jnp.zeros_like, params))


def logits(params, feats):
    """[heads, B, classes]."""
    return jnp.einsum("bd,hdc->hbc", feats, params["kernel"]) + params["bias"][:, None, :]


def train_step(state: LinearState, batch: dict, backbone_params, *, setup: LinearSetup):
    feats = jax.lax.stop_gradient(features(setup.backbone, backbone_params, batch["image"],
                                           n_last_blocks=setup.n_last_blocks, avgpool=setup.avgpool))
    labels = batch["label"].astype(jnp.int32)
    mask = batch["mask"]  # 0 for the padding of an epoch's last partial batch (TrainData.keep_partial)

    def loss_fn(params):  # nn.CrossEntropyLoss's mean, over the real examples of an epoch's last partial batch
        losses = optax.softmax_cross_entropy_with_integer_labels(logits(params, feats), labels[None])
        per_head = jnp.sum(losses * mask, axis=1) / jnp.sum(mask)
        return jnp.sum(per_head), per_head  # heads are independent: the sum's gradient is each head's own

    (_, per_head), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    # torch.optim.SGD(momentum, dampening 0, weight_decay 0): buf = momentum * buf + g; p -= lr * buf.
    buffers = jax.tree.map(lambda b, g: setup.momentum * b + g, state.opt_state, grads)
    lr = jnp.asarray(setup.lrs, jnp.float32) * setup.lr_scale(state.step)
    params = {"kernel": state.params["kernel"] - lr[:, None, None] * buffers["kernel"],
              "bias": state.params["bias"] - lr[:, None] * buffers["bias"]}
    metrics = {"loss": jnp.mean(per_head), "lr": lr[0],
               **{f"loss_head{h}": per_head[h] for h in range(len(setup.lrs))}}
    return state.replace(step=state.step + 1, params=params, opt_state=buffers), metrics


def train_transform(config):
    """eval_linear.py's `RandomResizedCrop(224)` (bilinear, torchvision's default; configs written before
    `linear.interpolation` took bicubic, DeiT's), `RandomHorizontalFlip()`, normalisation."""
    size, scale = config.data.image_size, tuple(config.linear.scale)
    resize = deit_transforms.resize_of(config.data)
    method = config.linear.get("interpolation", "bicubic")
    image_ops = "pil" if deit_transforms.image_ops_of(config.data) == "pil" else "tf"

    def transform(image, seed, jpeg="accurate"):  # Pillow's crop, resize and flip in one call with image_ops='pil'
        crop_seed, flip_seed = deit_transforms.split_seed(seed, 2)
        view = deit_transforms.crop_and_flip(image, crop_seed, flip_seed, size=size, scale=scale, interpolation=method,
                                             resize=resize, image_ops=image_ops, jpeg=jpeg)
        return {"image": deit_transforms.normalize(view)}

    transform.decodes = True  # given an encoded image (and jpeg=), decodes only its crop's window
    return transform


def eval_transform(config):
    return deit_transforms.eval_transform_of(config.data)


def head_counts(params, backbone_params, batch, *, setup: LinearSetup):
    feats = features(setup.backbone, backbone_params, batch["image"], n_last_blocks=setup.n_last_blocks,
                     avgpool=setup.avgpool)
    counts = {"count": jnp.sum(batch["mask"])}
    for h, head_logits in enumerate(logits(params, feats)):
        counts.update({f"{k}_head{h}": v for k, v in topk_correct(head_logits, batch["label"], batch["mask"]).items()})
    return counts


def evaluator(setup: LinearSetup, eval_source: Source, config, mesh) -> Callable[[LinearState, dict], dict]:
    """(state, the backbone as the loop placed it) -> every head's top-1/top-5; `top1` is the best head's."""
    counts = jax.jit(functools.partial(head_counts, setup=setup))

    def evaluate(state: LinearState, backbone_params) -> dict:
        ds, _ = pipeline.eval_dataset(eval_source, eval_transform(config), global_batch=config.batch_size,
                                      process_index=jax.process_index(), process_count=jax.process_count())
        result = fractions(batched.sum_counts(counts, (state.params, backbone_params), ds, mesh, source=eval_source,
                                              global_batch=config.batch_size))
        best = max(range(len(setup.lrs)), key=lambda h: result.get(f"top1_head{h}", 0.0))
        result["top1"] = result.get(f"top1_head{best}", 0.0)  # the best head's, for the table and the logs
        return result

    return evaluate


def summary_table(final: dict, *, config, workdir: str, setup: LinearSetup) -> str:
    """Per learning rate: top-1 at the end and the best over the run's evaluations (eval_linear's 'best')."""
    evals = eval_rows(workdir)
    rows = [("learning rate (x batch/256)", "top-1 % (end)", "top-1 % (best)", "top-5 % (end)")]
    for h, lr in enumerate(config.linear.lrs):
        best = max([row.get(f"top1_head{h}", 0.0) for row in evals] + [final.get(f"top1_head{h}", 0.0)])
        rows.append((f"{lr:g}", f"{100 * final.get(f'top1_head{h}', 0.0):.2f}", f"{100 * best:.2f}",
                     f"{100 * final[f'top5_head{h}']:.2f}" if f"top5_head{h}" in final else "-"))
    features = f"CLS of the last {setup.n_last_blocks} block(s)" + (" + mean patch token" if setup.avgpool else "")
    return markdown_table(rows, title=f"linear probe of {config.model.init_from} ({config.model.name}; {features}, "
                                      f"{final['step']} steps) on {config.data.source} {config.data.eval_split}")


def build_task(config, workdir: str) -> loop.Task:
    data, lin = config.data, config.linear
    if lin.n_last_blocks < 1:
        raise ConfigError(f"config.linear.n_last_blocks={lin.n_last_blocks}; use 1 or more")
    if lin.avgpool_patchtokens and lin.n_last_blocks != 1:
        raise ConfigError("config.linear.avgpool_patchtokens needs n_last_blocks=1 (eval_linear.py interleaves the "
                          "CLS and mean patch features, which only lines up for one block)")
    if not lin.lrs:
        raise ConfigError("config.linear.lrs is empty; give one or more base learning rates, e.g. (0.001,)")
    if lin.get("interpolation", "bicubic") not in ("bilinear", "bicubic"):
        raise ConfigError(f"config.linear.interpolation={lin.interpolation!r}; use 'bilinear' (eval_linear.py's "
                          "RandomResizedCrop, the default) or 'bicubic'")
    backbone, backbone_params, _ = weights.frozen_vit(config.model, what="the linear probe")
    if lin.n_last_blocks > backbone.depth:
        raise ConfigError(f"config.linear.n_last_blocks={lin.n_last_blocks} but {config.model.name} has "
                          f"{backbone.depth} blocks")
    train_source = get_source(data, data.train_split, limit=data.train_limit)
    eval_source = get_source(data, data.eval_split, limit=data.eval_limit, class_names=train_source.class_names)
    length = schedules.run_length(config, train_source.num_examples, keep_partial=True)  # eval_linear's loader
    setup = LinearSetup(
        backbone=backbone, n_last_blocks=int(lin.n_last_blocks), avgpool=bool(lin.avgpool_patchtokens),
        lrs=tuple(schedules.scaled_lr(float(lr), config.batch_size, 256) for lr in lin.lrs),
        momentum=float(lin.momentum), num_classes=train_source.num_classes,
        feature_dim=backbone.embed_dim * (int(lin.n_last_blocks) + int(bool(lin.avgpool_patchtokens))),
        steps_per_epoch=length.steps_per_epoch, epochs=float(config.epochs))
    mesh = sharding.make_mesh(config.get("mesh"))
    every = int(config.eval_every_epochs * length.steps_per_epoch) if config.eval_every_epochs else 0
    return loop.Task(
        name=f"linear:{config.model.name}",
        data=pipeline.TrainData(train_source, train_transform(config), keep_partial=True),
        init=functools.partial(init_state, setup=setup),
        train_step=functools.partial(train_step, setup=setup),
        evaluate=evaluator(setup, eval_source, config, mesh),
        length=length,
        eval_every_steps=every,
        frozen=backbone_params,
        summarize=functools.partial(summary_table, config=config, workdir=workdir, setup=setup))
