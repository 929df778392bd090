"""DeiT (and plain supervised training, a CNN teacher's included): the task the loop runs.

The train step mixes the batch (mixup/cutmix + label smoothing), runs the frozen teacher on
the same mixed images in inference mode, and applies `deit_loss` to the student's class and
distillation heads. The teacher's variables are an input of the step, not part of the state:
never trained, never checkpointed, loaded each run.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from tensorflow.io import gfile

from vitdistill import checkpoint as variables_io
from vitdistill import losses, models
from vitdistill.errors import CheckpointError, ConfigError
from vitdistill.data import deit_transforms, mixup, pipeline
from vitdistill.data.sources import get_source
from vitdistill.evaluate.classify import topk_correct
from vitdistill.train import loop, optim, schedules, sharding
from vitdistill.train.state import TrainState


def _dtype(name: str):
    """The compute dtype; 'auto' is bfloat16 where the hardware has fast bfloat16 (GPU, TPU), else float32.

    The official runs use mixed precision too (PyTorch AMP); parameters always stay float32.
    """
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    try:
        return jnp.dtype(name)
    except TypeError as e:
        raise ConfigError(f"config.model.dtype={name!r} is not a dtype; use auto, float32 or bfloat16") from e


def model_overrides(model_config, image_size: int) -> dict:
    """The config's non-default model settings (CNNs have no drop path or compute dtype to set).

    A ViT's position embedding is sized for the training resolution (`config.data.image_size`).
    """
    overrides = {}
    if _is_vit(model_config.name):
        overrides["img_size"] = image_size
        if model_config.get("patch_size"):
            overrides["patch_size"] = model_config.patch_size
    for key in ("drop_path_rate", "drop_rate"):
        if model_config.get(key):
            overrides[key] = model_config[key]
    dtype = _dtype(model_config.get("dtype", "float32"))
    if dtype != jnp.float32:
        overrides["dtype"] = dtype
    return overrides


def _is_vit(name: str) -> bool:
    return name in models.MODELS and models.MODELS[name][0] is models.VisionTransformer


def train_transform(config):
    aug = config.augment
    augment = functools.partial(
        deit_transforms.deit_train_transform, size=config.data.image_size, scale=tuple(aug.scale),
        ratio=tuple(aug.ratio), hflip=aug.hflip, rand_augment=aug.rand_augment, ra_num_ops=aug.ra_num_ops,
        ra_magnitude=aug.ra_magnitude, ra_magnitude_std=aug.ra_magnitude_std, erase_prob=aug.erase_prob)
    return lambda image, seed: {"image": augment(image, seed)}


def eval_transform(config):
    size, crop_pct = config.data.image_size, config.data.crop_pct
    return lambda image: {"image": deit_transforms.eval_transform(image, size=size, crop_pct=crop_pct)}


def is_distilled(model) -> bool:
    return bool(getattr(model, "distilled", False))


def load_teacher(config, workdir: str, num_classes: int):
    """The frozen teacher's (name, module, variables): trained first if the config says so, else loaded.

    The teacher must share the student's label space (`num_classes`) and sees the student's images.
    `teacher.checkpoint="random"` gives randomly initialised weights (benchmarks, smoke tests).
    """
    tconf = config.teacher
    path = tconf.checkpoint
    name = tconf.train.model.name if tconf.train else tconf.model
    if tconf.train and not path:  # a given checkpoint wins: the teacher.train block only runs without one
        path = os.path.join(workdir, "teacher")
        logging.info("Training the teacher first, in %s", path)
        from vitdistill.train.loop import train_and_evaluate

        train_and_evaluate(tconf.train, path)
    elif not path:
        raise ConfigError(
            f"Distillation kind {config.distill.kind!r} needs a teacher: set --config.teacher.checkpoint=DIR "
            "(a `python -m vitdistill.convert` output or a teacher run's workdir), give the config a "
            "teacher.train block, or use --config.distill.kind=none.")
    size = config.data.image_size
    if path == "random":
        variables, recorded = None, None
    else:
        variables, recorded = read_variables(path)
    name = recorded or name
    overrides = {"num_classes": num_classes}
    if _is_vit(name):
        overrides["img_size"] = size
    teacher = models.create(name, **overrides)
    example = jnp.zeros((1, size, size, 3))
    if variables is None:
        return name, teacher, jax.jit(teacher.init)(jax.random.key(config.seed + 2), example)
    expected = jax.eval_shape(teacher.init, jax.random.key(0), example)
    mismatched = [f"{'/'.join(str(k.key) for k in path_)}: checkpoint {np.shape(a)}, model {b.shape}"
                  for (path_, a), b in zip(jax.tree_util.tree_leaves_with_path(variables),
                                           jax.tree.leaves(expected))
                  if np.shape(a) != b.shape] if jax.tree.structure(variables) == jax.tree.structure(expected) \
        else ["the parameter trees differ (another architecture?)"]
    if mismatched:
        raise CheckpointError(f"The teacher checkpoint {path} does not fit {name} with {num_classes} classes "
                              "(the student's label space): " + "; ".join(mismatched[:8]))
    return name, teacher, variables


def read_variables(path: str):
    """Variables from a convert output (vitdistill.json) or a training workdir (latest checkpoint)."""
    if gfile.exists(os.path.join(path, "vitdistill.json")):
        return variables_io.load_variables(path), variables_io.read_metadata(path).get("model")
    ckpt_dir = os.path.join(path, "checkpoints")
    if gfile.isdir(ckpt_dir):
        import orbax.checkpoint as ocp

        with ocp.CheckpointManager(ckpt_dir) as manager:
            step = manager.latest_step()
            if step is None:
                raise CheckpointError(f"{ckpt_dir} holds no finished checkpoint; finish (or re-run) that training run first")
            raw = manager.restore(step, args=ocp.args.StandardRestore())
        variables = {"params": raw["params"]}
        if raw.get("batch_stats"):
            variables["batch_stats"] = raw["batch_stats"]
        model = None
        config_path = os.path.join(path, "config.json")
        if gfile.exists(config_path):
            with gfile.GFile(config_path) as f:
                model = json.load(f).get("model", {}).get("name")
        return variables, model
    raise CheckpointError(
        f"No model checkpoint at {path!r}: expected a `python -m vitdistill.convert` output (with "
        "vitdistill.json) or a training workdir (with checkpoints/).")


def build_task(config, workdir: str) -> loop.Task:
    data = config.data
    train_source = get_source(data, data.train_split, limit=data.train_limit)
    eval_source = get_source(data, data.eval_split, limit=data.eval_limit, class_names=train_source.class_names)
    num_classes = config.model.num_classes or train_source.num_classes
    model = models.create(config.model.name, num_classes=num_classes,
                          **model_overrides(config.model, data.image_size))
    distilled = is_distilled(model)
    kind = config.distill.kind
    if kind not in losses.DEIT_KINDS:
        raise ConfigError(f"config.distill.kind={kind!r}; valid kinds: {', '.join(losses.DEIT_KINDS)}")
    if kind != "none" and not distilled:
        raise ConfigError(f"config.distill.kind={kind!r} needs a distilled student (deit_*_distilled_*), but "
                         f"config.model.name={config.model.name!r} has no distillation head")
    teacher_name, teacher, teacher_variables = None, None, None
    if kind != "none":
        teacher_name, teacher, teacher_variables = load_teacher(config, workdir, num_classes)

    steps_per_epoch, total_steps = loop.steps_for(config, train_source.num_examples)
    opt = config.optim
    lr = schedules.deit_lr_schedule(
        schedules.scaled_lr(opt.lr, config.batch_size, opt.lr_reference_batch), epochs=config.epochs,
        steps_per_epoch=steps_per_epoch, warmup_epochs=opt.warmup_epochs, warmup_lr=opt.warmup_lr,
        min_lr=opt.min_lr, per_epoch=opt.schedule_per_epoch,
        official_lag=opt.schedule_official_lag) if total_steps else (lambda step: 0.0)
    adam = optim.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                       decay_mask=optim.deit_decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_grad), adam) if opt.clip_grad else adam
    size = data.image_size
    mix = config.mixup
    use_mixup = mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0)
    ema_decay = config.model_ema_decay
    base_rng = jax.random.key(config.seed + 1)

    def init(rng):
        variables = model.init({"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 3), jnp.float32),
                               train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=variables.get("batch_stats", {}),
                          ema_params=jax.tree.map(jnp.copy, params) if ema_decay else {})

    def targets_for(rng, images, labels):
        if use_mixup:
            return mixup.mixup_cutmix(rng, images, labels, num_classes=num_classes, mixup_alpha=mix.mixup_alpha,
                                      cutmix_alpha=mix.cutmix_alpha, switch_prob=mix.switch_prob, prob=mix.prob,
                                      label_smoothing=mix.label_smoothing)
        if mix.label_smoothing:
            return images, mixup.smooth_one_hot(labels, num_classes, mix.label_smoothing)
        return images, labels

    def train_step(state, batch, teacher_vars):
        rng = jax.random.fold_in(base_rng, state.step)
        mix_rng, drop_rng = jax.random.split(rng)
        images, targets = targets_for(mix_rng, batch["image"], batch["label"])
        teacher_logits = None
        if teacher is not None:
            teacher_logits = jax.lax.stop_gradient(teacher.apply(teacher_vars, images, train=False))

        def loss_fn(params):
            variables = state.model_variables(params)
            mutable = ["batch_stats"] if state.batch_stats else False
            out = model.apply(variables, images, train=True, rngs={"dropout": drop_rng}, mutable=mutable)
            out, new_stats = out if mutable else (out, {})
            cls_logits, dist_logits = out if distilled else (out, None)
            parts = losses.deit_loss_parts(cls_logits, dist_logits, targets, teacher_logits, kind=kind,
                                           alpha=config.distill.alpha, tau=config.distill.tau)
            return parts["loss"], (parts, new_stats.get("batch_stats", {}) if new_stats else {})

        (loss, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema_decay:
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  batch_stats=new_stats if state.batch_stats else state.batch_stats, ema_params=ema)
        metrics = {"loss": loss, "lr": lr(state.step), "grad_norm": optim.tree_l2_norm(grads),
                   "param_norm": optim.tree_l2_norm(params), "update_norm": optim.tree_l2_norm(updates)}
        if kind != "none":
            metrics.update(loss_base=parts["base"], loss_distillation=parts["distillation"])
        return new_state, metrics

    mesh = sharding.make_mesh()

    @jax.jit
    def eval_counts(params, batch_stats, batch):
        variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
        labels, mask = batch["label"], batch["mask"]
        if distilled:
            cls_logits, dist_logits = model.apply(variables, batch["image"], train=False, both_heads=True)
            avg = (cls_logits + dist_logits) / 2
            counts = {f"{k}": v for k, v in topk_correct(avg, labels, mask).items()}
            counts.update({f"{k}_cls": v for k, v in topk_correct(cls_logits, labels, mask).items()})
            counts.update({f"{k}_dist": v for k, v in topk_correct(dist_logits, labels, mask).items()})
        else:
            counts = topk_correct(model.apply(variables, batch["image"], train=False), labels, mask)
        counts["count"] = jnp.sum(mask)
        return counts

    def evaluate(state):
        ds, _ = pipeline.eval_dataset(eval_source, eval_transform(config), global_batch=config.batch_size,
                                      process_index=jax.process_index(), process_count=jax.process_count())
        named = dict(source=eval_source, global_batch=config.batch_size)
        totals = loop.evaluate_in_batches(eval_counts, (state.params, state.batch_stats), ds, mesh, **named)
        result = _fractions(totals)
        if ema_decay:
            ema_totals = loop.evaluate_in_batches(eval_counts, (state.ema_params, state.batch_stats), ds, mesh,
                                                  **named)
            result.update({f"ema_{k}": v for k, v in _fractions(ema_totals).items()})
        return result

    def summarize(final):
        rows = [("model", "head", "top-1 %")]
        if teacher is not None:
            accuracy = _teacher_accuracy(teacher, teacher_variables, eval_source, config, mesh)["top1"]
            rows.append((f"teacher {teacher_name}", "-", f"{100 * accuracy:.2f}"))
        name = config.model.name
        if distilled:
            rows += [(f"student {name}", "class", f"{100 * final['top1_cls']:.2f}"),
                     ("", "distillation", f"{100 * final['top1_dist']:.2f}"),
                     ("", "average", f"{100 * final['top1']:.2f}")]
        else:
            rows.append((name, "class", f"{100 * final['top1']:.2f}"))
        return _table(rows, title=f"{eval_source.name}: {int(final.get('count', 0))} images, "
                                  f"distillation={kind}")

    eval_every = int(config.eval_every_epochs * steps_per_epoch) if config.eval_every_epochs else 0
    return loop.Task(name=f"deit:{config.model.name}", train_source=train_source,
                     train_transform=train_transform(config), init=init, train_step=train_step, evaluate=evaluate,
                     steps_per_epoch=steps_per_epoch, total_steps=total_steps, eval_every_steps=eval_every,
                     frozen=teacher_variables if teacher is not None else {}, repeats=config.augment.repeats,
                     prepare_state=_pretrained_loader(config, model, size), summarize=summarize)


def _teacher_accuracy(teacher, variables, eval_source, config, mesh) -> dict:
    @jax.jit
    def counts(variables, batch):
        result = topk_correct(teacher.apply(variables, batch["image"], train=False), batch["label"], batch["mask"])
        result["count"] = jnp.sum(batch["mask"])
        return result

    ds, _ = pipeline.eval_dataset(eval_source, eval_transform(config), global_batch=config.batch_size,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    return _fractions(loop.evaluate_in_batches(counts, (sharding.replicate(variables, mesh),), ds, mesh))


def _fractions(totals: dict) -> dict:
    count = max(totals.get("count", 0.0), 1.0)
    return {k: (v / count if k != "count" else v) for k, v in totals.items()}


def _table(rows, title: str = "") -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [title] if title else []
    for n, row in enumerate(rows):
        lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")
        if n == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _pretrained_loader(config, model, size):
    """Fine-tuning: a fresh state's params from `config.model.init_from`, adapted to this model."""
    path = config.model.init_from
    if not path:
        return None

    def place_like(new, old):  # keep the fresh state's dtypes and shardings
        return jax.tree.map(lambda n, o: jax.device_put(np.asarray(n, o.dtype), o.sharding), new, old)

    def prepare(state):
        loaded, _ = read_variables(path)
        params = place_like(models.adapt_params(loaded["params"], jax.device_get(state.params)), state.params)
        batch_stats = state.batch_stats
        if batch_stats and loaded.get("batch_stats"):
            batch_stats = place_like(loaded["batch_stats"], batch_stats)
        return state.replace(params=params, batch_stats=batch_stats,
                             ema_params=params if state.ema_params else state.ema_params)

    return prepare
