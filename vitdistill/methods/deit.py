"""DeiT, and plain supervised training (a CNN teacher's included): its state, its step, its evaluation.

The step mixes the batch (mixup/cutmix + label smoothing), runs the frozen teacher on the same
mixed images in inference mode, and applies `deit_loss` to the student's class and distillation
heads. The teacher's variables are an input of the step, not part of the state: never trained,
never checkpointed, loaded each run (`vitdistill.methods.teacher`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from vitdistill import losses, models, weights
from vitdistill.data import deit_transforms, device_ops, mixup, pipeline
from vitdistill.data.sources import Source, get_source
from vitdistill.errors import ConfigError
from vitdistill.evaluate import batched
from vitdistill.evaluate.classify import fractions, topk_correct
from vitdistill.methods import teacher as teachers
from vitdistill.train import diagnostics, loop, optim, schedules, sharding, state_checkpoints
from vitdistill.train.reporting import eval_rows, markdown_table
from vitdistill.train.state import TrainState


@flax.struct.dataclass
class DeitState(TrainState):
    """`ema_params`: official DeiT's model EMA of the student (an empty dict with `model_ema_decay = 0`)."""

    ema_params: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Mixing:
    """timm's Mixup arguments as DeiT passes them, and label smoothing (folded into the targets)."""

    mixup_alpha: float
    cutmix_alpha: float
    switch_prob: float
    prob: float
    label_smoothing: float
    groups: int = 1                 # of the batch, each with its own draw (one per device: DeiT's DDP)

    @property
    def mixes(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclasses.dataclass(frozen=True)
class DeitSetup:
    """The static half of a DeiT step: modules, optimiser, schedule and loss settings."""

    model: nn.Module
    tx: optax.GradientTransformation
    lr: Callable
    image_size: int
    num_classes: int
    kind: str                       # none | soft | hard
    alpha: float
    tau: float
    mixing: Mixing
    ema_decay: float                # 0: no model EMA
    seed: int                       # the config's; the step's randomness is drawn from seed + 1
    teacher: Optional[nn.Module] = None
    train_mode: bool = True         # False: the student runs as at inference while it trains (DeiT's fine-tuning)

    @property
    def distilled(self) -> bool:
        return is_distilled(self.model)


def is_distilled(model) -> bool:
    return bool(getattr(model, "distilled", False))


def model_overrides(model_config, image_size: int) -> dict:
    """The config's non-default model settings (CNNs have no drop path or compute dtype to set).

    A ViT's position embedding is sized for the training resolution (`config.data.image_size`).
    """
    overrides = {}
    if models.is_vit(model_config.name):
        overrides["img_size"] = image_size
        if model_config.get("patch_size"):
            overrides["patch_size"] = model_config.patch_size
        if model_config.get("remat"):
            overrides["remat"] = True
        if model_config.get("scan_blocks"):
            overrides["scan_blocks"] = True
        if not model_config.get("fused_attention", True):
            overrides["fused_attention"] = False
    for key in ("drop_path_rate", "drop_rate"):
        if model_config.get(key):
            overrides[key] = model_config[key]
    dtype = models.compute_dtype(model_config.get("dtype", "float32"))
    if dtype != jnp.float32:
        overrides["dtype"] = dtype
    return overrides


def train_mode_of(config) -> bool:
    """`config.model.train_mode`: whether the student trains in training mode (drop path on; a distilled model's
    two heads apart, each with its loss term), as DeiT pre-trains, or in inference mode (no drop path; a distilled
    model's one output, the mean of its heads, takes the cross-entropy), as DeiT fine-tunes (main.py:
    `set_training_mode=args.finetune == ''`, later `--no-train-mode`). Configs written before the key: True."""
    return bool(config.model.get("train_mode", True))


def check_distillation(config) -> None:
    """A valid `distill.kind`, and a student with a distillation head for soft or hard distillation."""
    kind = config.distill.kind
    if kind not in losses.DEIT_KINDS:
        raise ConfigError(f"config.distill.kind={kind!r}; valid kinds: {', '.join(losses.DEIT_KINDS)}")
    if kind != "none" and not is_distilled(models.create(config.model.name)):
        raise ConfigError(f"config.distill.kind={kind!r} needs a distilled student (deit_*_distilled_*), but "
                          f"config.model.name={config.model.name!r} has no distillation head")
    if kind != "none" and not train_mode_of(config):
        raise ConfigError(f"config.distill.kind={kind!r} with config.model.train_mode=False: in inference mode the "
                          "student gives one output, the mean of its heads, and the distillation loss needs the two "
                          "apart (main.py refuses it too); set --config.model.train_mode=True, or "
                          "--config.distill.kind=none")


def mixing_groups(config) -> int:
    """How many groups of the batch mixup/cutmix draws for: `config.mixup.groups`, or with 0 one per device
    (each device's rows, as each GPU of DeiT's DistributedDataParallel mixes its own batch). Each group must
    be even when the batch is mixed."""
    mix = config.mixup
    groups = int(mix.get("groups", 1)) or jax.device_count()
    if groups < 0:
        raise ConfigError(f"config.mixup.groups={groups}; use 0 (one per device, as DeiT) or a count >= 1")
    mixes = mix.prob > 0 and (mix.mixup_alpha > 0 or mix.cutmix_alpha > 0)
    if mixes and (config.batch_size % groups or (config.batch_size // groups) % 2):
        per_device = " (one per device)" if not mix.get("groups", 1) else ""
        raise ConfigError(f"config.batch_size={config.batch_size} splits into {groups} mixup groups{per_device}, "
                          "each of which must hold an even number of images (timm mixes each image with its "
                          f"group's reversed order): use a batch_size divisible by {2 * groups}, or "
                          "--config.mixup.groups=1 for one draw over the whole batch")
    return groups


def check(config) -> None:
    """What a DeiT run needs, checked before any compute: its distillation and mixup settings, a training
    split that holds a batch, and a head that covers every label."""
    check_distillation(config)
    mixing_groups(config)
    if deit_transforms.image_ops_of(config.data) == "device":
        raise ConfigError("config.data.image_ops='device' is DINO's (its photometric ops in the train step); DeiT's "
                          "RandAugment runs in the pipeline: use 'pil' (the default) or 'tf'")
    if config.data.get("device_canvas", 0):
        raise ConfigError(f"config.data.device_canvas={config.data.device_canvas} is DINO's (its crops in the train "
                          "step); DeiT crops in the pipeline: use 0 (the default)")
    source = pipeline.check_training_split(config, jax.device_count())
    head = config.model.num_classes
    if head and head < source.num_classes:
        raise ConfigError(f"config.model.num_classes={head} is smaller than the {source.num_classes} classes of "
                          f"{source.name}: labels outside the head could never be predicted (and top-1 would be "
                          f"wrong); use --config.model.num_classes={source.num_classes}, or 0 to take the data's")


def make_setup(config, *, num_classes: int, length: schedules.RunLength,
               teacher: Optional[nn.Module] = None) -> DeitSetup:
    """The DeiT step's modules and settings for `config`; `teacher` is the frozen teacher's module."""
    model = models.create(config.model.name, num_classes=num_classes,
                          **model_overrides(config.model, config.data.image_size))
    opt = config.optim
    lr = schedules.deit_lr_schedule(
        schedules.scaled_lr(opt.lr, config.batch_size, opt.lr_reference_batch), epochs=config.epochs,
        steps_per_epoch=length.steps_per_epoch, warmup_epochs=opt.warmup_epochs, warmup_lr=opt.warmup_lr,
        min_lr=opt.min_lr, per_epoch=opt.schedule_per_epoch,
        official_lag=opt.schedule_official_lag) if length.total_steps else (lambda step: 0.0)
    adam = optim.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                       decay_mask=optim.deit_decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(opt.clip_grad), adam) if opt.clip_grad else adam
    mix = config.mixup
    groups = mixing_groups(config)
    return DeitSetup(model=model, tx=tx, lr=lr, image_size=config.data.image_size, num_classes=num_classes,
                     kind=config.distill.kind, alpha=config.distill.alpha, tau=config.distill.tau,
                     mixing=Mixing(mix.mixup_alpha, mix.cutmix_alpha, mix.switch_prob, mix.prob, mix.label_smoothing,
                                   groups),
                     ema_decay=config.model_ema_decay, seed=config.seed, teacher=teacher,
                     train_mode=train_mode_of(config))


def init_state(rng, *, setup: DeitSetup) -> DeitState:
    size = setup.image_size
    variables = setup.model.init({"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 3), jnp.float32),
                                 train=False)
    params = variables["params"]
    return DeitState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(params),
                     batch_stats=variables.get("batch_stats", {}),
                     ema_params=jax.tree.map(jnp.copy, params) if setup.ema_decay else {})


def mixed_targets(rng, images, labels, *, num_classes: int, mixing: Mixing):
    """(images, targets): mixup/cutmix with smoothed one-hot targets, smoothing alone, or the labels as given."""
    if mixing.mixes:
        return mixup.mixup_cutmix(rng, images, labels, num_classes=num_classes, mixup_alpha=mixing.mixup_alpha,
                                  cutmix_alpha=mixing.cutmix_alpha, switch_prob=mixing.switch_prob,
                                  prob=mixing.prob, label_smoothing=mixing.label_smoothing, groups=mixing.groups)
    if mixing.label_smoothing:
        return images, mixup.smooth_one_hot(labels, num_classes, mixing.label_smoothing)
    return images, labels


def step_rngs(setup: DeitSetup, step):
    """(mixup/cutmix key, drop path key) of the update at `step`: a function of the seed and the step alone,
    so a resumed run draws what the uninterrupted one drew."""
    mix_rng, drop_rng = jax.random.split(jax.random.fold_in(jax.random.key(setup.seed + 1), step))
    return mix_rng, drop_rng


def erase_rng(setup: DeitSetup):
    """The random-erasing noise key, which `device_ops.erase_boxes` folds with each example's own noise seed
    (drawn in the pipeline from its stream position, so a resumed run, or one on another topology, erases
    alike). A stream of its own: `step_rngs`' keys are as they were before the erasing moved into the step."""
    return jax.random.key(setup.seed + 2)


def train_images(batch: dict, rng):
    """The batch's images as the model takes them: the pipeline's uint8 levels normalised, and its erase boxes
    (if any) filled with noise (`device_ops`); float32 images pass as they are (normalised, erased already)."""
    images = device_ops.normalize_levels(batch["image"])
    if "erase" in batch:
        images = device_ops.erase_boxes(rng, images, batch["erase"])
    return images


def train_step(state: DeitState, batch: dict, teacher_variables, *, setup: DeitSetup):
    """One DeiT update: (state, {'image', 'label'[, 'erase']}, the teacher's variables or {}) -> (state, metrics)."""
    mix_rng, drop_rng = step_rngs(setup, state.step)
    images, targets = mixed_targets(mix_rng, train_images(batch, erase_rng(setup)), batch["label"],
                                    num_classes=setup.num_classes, mixing=setup.mixing)
    teacher_logits = None
    if setup.teacher is not None:
        teacher_logits = jax.lax.stop_gradient(setup.teacher.apply(teacher_variables, images, train=False))
    distilled = setup.distilled

    def loss_fn(params):
        variables = state.model_variables(params)
        mutable = ["batch_stats"] if state.batch_stats else False
        out = setup.model.apply(variables, images, train=setup.train_mode, rngs={"dropout": drop_rng},
                                mutable=mutable)
        out, new_stats = out if mutable else (out, {})
        cls_logits, dist_logits = out if distilled and setup.train_mode else (out, None)
        parts = losses.deit_loss_parts(cls_logits, dist_logits, targets, teacher_logits, kind=setup.kind,
                                       alpha=setup.alpha, tau=setup.tau)
        return parts["loss"], (parts, new_stats.get("batch_stats", {}) if new_stats else {})

    (loss, (parts, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, setup.ema_decay) if setup.ema_decay else state.ema_params
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=new_stats if state.batch_stats else state.batch_stats, ema_params=ema)
    metrics = {"loss": loss, "lr": setup.lr(state.step), "grad_norm": optim.tree_l2_norm(grads),
               "param_norm": optim.tree_l2_norm(params), "update_norm": optim.tree_l2_norm(updates)}
    if setup.kind != "none":
        metrics.update(loss_base=parts["base"], loss_distillation=parts["distillation"])
    return new_state, metrics


# ---------------------------------------------------------------------------
# Data and evaluation.
# ---------------------------------------------------------------------------


def crop_of(config) -> str:
    """`config.augment.crop` resolved: 'auto' is DeiT's build_transform rule, which at input_size <= 32 trains on
    RandomCrop(input_size, padding=4) instead of the random resized crop and evaluates the images as they are
    ('padded'), and above 32 resizes ('resized')."""
    crop = config.augment.get("crop", "auto")
    if crop == "auto":
        return "padded" if config.data.image_size <= 32 else "resized"
    if crop not in deit_transforms.CROPS:
        raise ConfigError(f"config.augment.crop={crop!r}; use 'auto' (DeiT's rule: 'padded' at image_size <= 32, "
                          "else 'resized'), 'resized' (the random resized crop; Resize + CenterCrop to evaluate) or "
                          "'padded' (RandomCrop(image_size, padding=4); the images as they are to evaluate)")
    return crop


def check_image_sizes(config, train_source: Source, eval_source: Source) -> None:
    """With the padded crop, the sizes DeiT's transform needs, refused before anything runs where the sources hold
    their images in memory (other sources are checked image by image, `data.SIZE_CHECK`)."""
    if crop_of(config) != "padded":
        return
    size = config.data.image_size
    for source, fits in ((train_source, lambda h, w: deit_transforms.padded_crop_fits(h, w, size)),
                         (eval_source, lambda h, w: (h, w) == (size, size))):
        if source.arrays is not None and not fits(*source.arrays[0].shape[1:3]):
            height, width = source.arrays[0].shape[1:3]
            raise ConfigError(padded_size_message(config, f"{source.name} holds {height} x {width} images"))


def padded_size_message(config, found: str) -> str:
    crop = config.augment.get("crop", "auto")
    why = ("config.augment.crop='auto' at image_size <= 32 is" if crop == "auto" else "config.augment.crop='padded' is")
    return (f"{found}; {why} DeiT's transform for images of image_size x image_size (CIFAR at 32): it trains on "
            f"RandomCrop({config.data.image_size}, padding=4) and evaluates the images as they are. "
            f"{deit_transforms.PADDED_FIX}")


def train_transform(config):
    aug = config.augment
    augment = functools.partial(
        deit_transforms.deit_train_transform, size=config.data.image_size, scale=tuple(aug.scale),
        ratio=tuple(aug.ratio), hflip=aug.hflip, rand_augment=aug.rand_augment, ra_num_ops=aug.ra_num_ops,
        ra_magnitude=aug.ra_magnitude, ra_magnitude_std=aug.ra_magnitude_std, erase_prob=aug.erase_prob,
        resize=deit_transforms.resize_of(config.data), image_ops=deit_transforms.image_ops_of(config.data),
        levels=True, crop=crop_of(config))
    augment.decodes = True  # given an encoded image (and jpeg=), decodes only its crop's window
    return augment  # {'image': uint8 levels, 'erase': the erase box}: the step normalises and erases


def eval_transform(config):
    if crop_of(config) == "padded":
        size = config.data.image_size
        return lambda image: {"image": deit_transforms.unresized_eval_transform(image, size=size)}
    return deit_transforms.eval_transform_of(config.data)


def classifier_counts(params, batch_stats, batch, *, model):
    """Top-1/top-5 counts of a classifier on a padded batch; a distilled one: of the averaged heads, and of
    each head (`_cls`, `_dist`). `loss` sums the cross-entropy of the (averaged) logits, as engine.evaluate's
    criterion computes it (a mean once divided by `count`)."""
    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    labels, mask = batch["label"], batch["mask"]
    if is_distilled(model):
        cls_logits, dist_logits = model.apply(variables, batch["image"], train=False, both_heads=True)
        logits = (cls_logits + dist_logits) / 2
        counts = {f"{k}": v for k, v in topk_correct(logits, labels, mask).items()}
        counts.update({f"{k}_cls": v for k, v in topk_correct(cls_logits, labels, mask).items()})
        counts.update({f"{k}_dist": v for k, v in topk_correct(dist_logits, labels, mask).items()})
    else:
        logits = model.apply(variables, batch["image"], train=False)
        counts = topk_correct(logits, labels, mask)
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels.astype(jnp.int32))
    counts["loss"] = jnp.sum(jnp.where(mask > 0, per_example, 0.0))
    counts["count"] = jnp.sum(mask)
    return counts


def classification_evaluator(setup: DeitSetup, eval_source: Source, config, mesh) -> Callable[[DeitState], dict]:
    """Top-k accuracy of the student (and of its EMA, as `ema_*`) on `eval_source`, as fractions."""
    counts = jax.jit(functools.partial(classifier_counts, model=setup.model))

    def evaluate(state: DeitState, frozen=None) -> dict:
        del frozen  # the teacher: scored once, before training
        ds, _ = pipeline.eval_dataset(eval_source, eval_transform(config), global_batch=config.batch_size,
                                      process_index=jax.process_index(), process_count=jax.process_count())
        named = dict(source=eval_source, global_batch=config.batch_size)
        result = fractions(batched.sum_counts(counts, (state.params, state.batch_stats), ds, mesh, **named))
        if setup.ema_decay:
            ema = fractions(batched.sum_counts(counts, (state.ema_params, state.batch_stats), ds, mesh, **named))
            result.update({f"ema_{k}": v for k, v in ema.items()})
        return result

    return evaluate


def teacher_accuracy(teacher: teachers.Teacher, eval_source: Source, config, mesh) -> dict:
    counts = jax.jit(functools.partial(classifier_counts, model=teacher.module))
    ds, _ = pipeline.eval_dataset(eval_source, eval_transform(config), global_batch=config.batch_size,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    variables = sharding.place_sharded(teacher.variables, mesh)
    return fractions(batched.sum_counts(counts, (variables["params"], variables.get("batch_stats")), ds, mesh))


def summary_table(final: dict, *, config, eval_source: Source, distilled: bool, teacher: Optional[teachers.Teacher],
                  mesh, workdir: str) -> str:
    """The run's result: the teacher's top-1, the student's per head; after more than one evaluation, the best
    top-1 of them (main.py's "Max accuracy", of the averaged heads for a distilled student) and its step."""
    rows = [("model", "head", "top-1 %")]
    if teacher is not None:
        accuracy = teacher_accuracy(teacher, eval_source, config, mesh)["top1"]
        rows.append((f"teacher {teacher.name}", "-", f"{100 * accuracy:.2f}"))
    name = config.model.name
    if distilled:
        rows += [(f"student {name}", "class", f"{100 * final['top1_cls']:.2f}"),
                 ("", "distillation", f"{100 * final['top1_dist']:.2f}"),
                 ("", "average", f"{100 * final['top1']:.2f}")]
    else:
        rows.append((name, "class", f"{100 * final['top1']:.2f}"))
    table = markdown_table(rows, title=f"{eval_source.name}: {int(final.get('count', 0))} images, "
                                       f"distillation={config.distill.kind}")
    evals = [row for row in eval_rows(workdir) if "top1" in row]  # (a step evaluated again on resuming: once)
    steps = {row["step"] for row in evals}
    if len(steps) > 1:
        best = max(evals, key=lambda row: row["top1"])  # the first of equals, as main.py keeps its first maximum
        table += (f"\nbest top-1 of the run's {len(steps)} evaluations (DeiT's \"Max accuracy\"): "
                  f"{100 * best['top1']:.2f} % at step {best['step']}")
    return table


def load_init_from(state: DeitState, *, path: str, network: str = "auto") -> DeitState:
    """Fine-tuning: a fresh state's params (and BatchNorm statistics) from `path`, adapted to this model."""
    variables, report = weights.load_pretrained(path, state.model_variables(), network=network)
    if jax.process_index() == 0:
        print(report, flush=True)
    params = variables["params"]
    return state.replace(params=params, batch_stats=variables.get("batch_stats", state.batch_stats),
                         ema_params=params if state.ema_params else state.ema_params)


# ---------------------------------------------------------------------------
# What the loop runs.
# ---------------------------------------------------------------------------


def prerequisites(config, workdir: str) -> list:
    """Runs to finish before this one: the teacher's, when the config trains it first."""
    check_distillation(config)
    run = teachers.teacher_run(config, workdir) if config.distill.kind != "none" else None
    return [run] if run is not None else []


def build_task(config, workdir: str) -> loop.Task:
    data = config.data
    train_source = get_source(data, data.train_split, limit=data.train_limit)
    eval_source = get_source(data, data.eval_split, limit=data.eval_limit, class_names=train_source.class_names)
    num_classes = config.model.num_classes or train_source.num_classes
    check_distillation(config)
    check_image_sizes(config, train_source, eval_source)
    teacher = teachers.load_teacher(config, workdir, num_classes) if config.distill.kind != "none" else None
    length = schedules.run_length(config, train_source.num_examples, config.augment.repeats)
    setup = make_setup(config, num_classes=num_classes, length=length,
                       teacher=teacher.module if teacher is not None else None)
    mesh = sharding.make_mesh(config.get("mesh"))
    init_from = config.model.init_from
    if not length.total_steps and not init_from and not state_checkpoints.has_checkpoint(workdir):
        raise ConfigError(f"Nothing to evaluate: config.epochs={config.epochs} trains nothing, and neither "
                          f"config.model.init_from nor --workdir={workdir} gives weights (its initialisation would "
                          "score at chance); pass --config.model.init_from=DIR (a `python -m vitdistill.convert` "
                          "output or a training workdir)")
    steps_per_epoch = length.steps_per_epoch
    return loop.Task(
        name=f"deit:{config.model.name}",
        data=pipeline.TrainData(train_source, train_transform(config), repeats=config.augment.repeats),
        init=functools.partial(init_state, setup=setup),
        train_step=functools.partial(train_step, setup=setup),
        evaluate=classification_evaluator(setup, eval_source, config, mesh),
        length=length,
        eval_every_steps=int(config.eval_every_epochs * steps_per_epoch) if config.eval_every_epochs else 0,
        frozen=teacher.variables if teacher is not None else {},
        prepare_state=(functools.partial(load_init_from, path=init_from, network=config.model.init_from_network)
                       if init_from else None),
        check_metrics=diagnostics.SupervisedHealth(
            num_classes=num_classes, total_steps=length.total_steps, distilled=config.distill.kind != "none",
            what=config.model.name),
        summarize=functools.partial(summary_table, config=config, eval_source=eval_source,
                                    distilled=setup.distilled, teacher=teacher, mesh=mesh, workdir=workdir))
