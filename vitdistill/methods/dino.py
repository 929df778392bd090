"""DINO, self-distillation with no labels: its state, its step, its k-NN evaluation.

The state carries the student's params, the EMA teacher's params and the center as siblings;
one jitted step computes the loss, updates the student (per-tensor clipping, AdamW with the
cosine lr/weight-decay schedules, the head's last layer frozen during the first epochs), then
moves the teacher towards the student (`optim.ema_update`) and the center towards the
teacher's batch mean (`losses.update_center`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from tensorflow.io import gfile

from vitdistill import losses, models, weights
from vitdistill.data import deit_transforms, device_photometric, device_resize, multicrop, pipeline
from vitdistill.data.device_ops import normalize_levels
from vitdistill.data.sources import get_source
from vitdistill.errors import ConfigError
from vitdistill.evaluate import batched, knn
from vitdistill.train import diagnostics, loop, optim, schedules, sharding
from vitdistill.train.reporting import markdown_table
from vitdistill.train.state import TrainState

KNN_AT_INIT_FILE = "knn_at_init.json"  # in the workdir, with `knn.before_training`


@flax.struct.dataclass
class DinoState(TrainState):
    """`teacher_params`: the EMA teacher, student and head alike; `center`: [1, out_dim], the running mean of
    the teacher's outputs. `batch_stats` belong to the head's BatchNorm (`use_bn_in_head`)."""

    teacher_params: Any = flax.struct.field(default_factory=dict)
    center: Any = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DinoSetup:
    """The static half of a DINO step: the two networks, the optimiser and every schedule."""

    student: Any                    # models.DINO: backbone + head, with drop path
    teacher: Any                    # the same without drop path
    tx: optax.GradientTransformation
    lr: Callable
    weight_decay: Callable
    momentum: Callable              # the teacher's EMA momentum, per step
    teacher_temp: Callable          # per epoch
    steps_per_epoch: int
    student_temp: float
    center_momentum: float
    use_bn_in_head: bool
    num_local: int
    global_size: int
    out_dim: int
    seed: int                       # the config's; the step's randomness is drawn from seed + 1
    max_sigma: float = 2.0          # the blur's largest sigma (image_ops='device': the step applies the blur)

    @property
    def views(self) -> list:
        return multicrop.view_names(self.num_local)


def make_setup(config, *, steps_per_epoch: int) -> DinoSetup:
    """The DINO step's networks, optimiser and schedules for `config`."""
    mc, hp, opt, m = config.multicrop, config.dino, config.optim, config.model
    dtype = models.compute_dtype(m.dtype)
    head_args = dict(out_dim=m.out_dim, hidden_dim=m.hidden_dim, bottleneck_dim=m.bottleneck_dim,
                     norm_last_layer=m.norm_last_layer, use_bn_in_head=m.use_bn_in_head)
    # the position embedding native to the global crops; remat, fused attention and the scan as configured
    backbone = dict(img_size=mc.global_size, remat=bool(m.get("remat", False)),
                    fused_attention=bool(m.get("fused_attention", True)),
                    scan_blocks=bool(m.get("scan_blocks", False)))
    if m.patch_size:
        backbone["patch_size"] = m.patch_size
    student = models.create_dino(m.name, drop_path_rate=m.drop_path_rate, dtype=dtype, **backbone, **head_args)
    teacher = models.create_dino(m.name, drop_path_rate=0.0, dtype=dtype, **backbone, **head_args)

    # epochs = 0 evaluates only (a converted checkpoint, say): the schedules are never read.
    epochs = config.epochs or 1.0
    lr = schedules.dino_cosine_schedule(
        schedules.scaled_lr(opt.lr, config.batch_size, opt.lr_reference_batch), opt.min_lr, epochs=epochs,
        steps_per_epoch=steps_per_epoch, warmup_epochs=min(opt.warmup_epochs, epochs))
    wd = schedules.dino_cosine_schedule(opt.weight_decay, opt.weight_decay_end, epochs=epochs,
                                        steps_per_epoch=steps_per_epoch)
    momentum = schedules.dino_cosine_schedule(hp.momentum_teacher, 1.0, epochs=epochs,
                                              steps_per_epoch=steps_per_epoch)
    teacher_temp = schedules.teacher_temp_schedule(hp.warmup_teacher_temp, hp.teacher_temp,
                                                   min(hp.warmup_teacher_temp_epochs, epochs), epochs)
    freeze_steps = schedules.epochs_to_steps(opt.freeze_last_layer, steps_per_epoch)
    frozen = None
    if freeze_steps:
        shapes = jax.eval_shape(lambda rng: student.init(rng, _example(mc.global_size))["params"],
                                jax.random.key(0))
        frozen = optim.frozen_while(optim.last_layer_mask(shapes), freeze_steps)
    adam = optim.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd, decay_mask=optim.dino_decay_mask,
                       frozen=frozen)
    tx = optax.chain(optim.clip_by_tensor_norm(opt.clip_grad), adam) if opt.clip_grad else adam
    return DinoSetup(student=student, teacher=teacher, tx=tx, lr=lr, weight_decay=wd, momentum=momentum,
                     teacher_temp=teacher_temp, steps_per_epoch=steps_per_epoch, student_temp=hp.student_temp,
                     center_momentum=hp.center_momentum, use_bn_in_head=m.use_bn_in_head, num_local=mc.num_local,
                     global_size=mc.global_size, out_dim=m.out_dim, seed=config.seed, max_sigma=mc.blur_sigma[1])


def _example(global_size: int) -> list:
    return [jnp.zeros((1, global_size, global_size, 3), jnp.float32)]


def init_state(rng, *, setup: DinoSetup) -> DinoState:
    """The student at initialisation, the teacher a copy of it, the center at zero."""
    variables = setup.student.init({"params": rng, "dropout": rng}, _example(setup.global_size), train=False)
    params = variables["params"]
    return DinoState(step=jnp.zeros((), jnp.int32), params=params, opt_state=setup.tx.init(params),
                     batch_stats=variables.get("batch_stats", {}), teacher_params=jax.tree.map(jnp.copy, params),
                     center=jnp.zeros((1, setup.out_dim), jnp.float32))


def teacher_outputs(state: DinoState, global_crops: list, *, setup: DinoSetup) -> jax.Array:
    """The teacher's head outputs for the global crops, float32 and without gradient.

    With BatchNorm in the head the official teacher stays in train mode: its head normalises with
    the batch's statistics (and its running statistics are not kept).
    """
    if setup.use_bn_in_head:
        out, _ = setup.teacher.apply({"params": state.teacher_params, "batch_stats": state.batch_stats},
                                     global_crops, train=True, mutable=["batch_stats"])
    else:
        out = setup.teacher.apply({"params": state.teacher_params}, global_crops, train=False)
    return jax.lax.stop_gradient(out.astype(jnp.float32))


def step_rng(setup: DinoSetup, step):
    """The drop path key of the update at `step`: a function of the seed and the step alone (exact resume)."""
    return jax.random.fold_in(jax.random.key(setup.seed + 1), step)


def view_levels(batch: dict, name: str, setup: DinoSetup):
    """View `name` of the batch: cropped and resized from the canvas if the pipeline shipped the image once
    (`data.device_canvas`), its photometric ops applied if the pipeline left them to the step."""
    windows = batch.get(name + multicrop.WINDOWS_SUFFIX)
    levels = batch[name] if windows is None else device_resize.resized_crops(batch[multicrop.CANVAS], windows)
    ops = batch.get(name + multicrop.OPS_SUFFIX)
    if ops is None:
        return levels
    return device_photometric.apply_views(levels, ops, max_sigma=setup.max_sigma)


def train_step(state: DinoState, batch: dict, frozen=None, *, setup: DinoSetup):
    """One DINO update: (state, {view name: crops}) -> (state, metrics). `frozen` is unused (no teacher input).
    Crops come as the pipeline makes them, uint8 levels normalised here (or float32, normalised already); with
    `data.image_ops='device'` their photometric ops are applied here first (`device_photometric`)."""
    del frozen
    crops = [normalize_levels(view_levels(batch, name, setup)) for name in setup.views]
    global_crops = crops[:multicrop.NUM_GLOBAL_VIEWS]
    temp = setup.teacher_temp(state.step // setup.steps_per_epoch)
    teacher_out = teacher_outputs(state, global_crops, setup=setup)
    rng = step_rng(setup, state.step)

    def loss_fn(params):
        if setup.use_bn_in_head:
            student_out, updates = setup.student.apply({"params": params, "batch_stats": state.batch_stats}, crops,
                                                       train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
        else:
            student_out, updates = setup.student.apply({"params": params}, crops, train=True,
                                                       rngs={"dropout": rng}), {}
        student_out = student_out.astype(jnp.float32)
        loss = losses.dino_loss(student_out, teacher_out, state.center, student_temp=setup.student_temp,
                                teacher_temp=temp, num_global_crops=len(global_crops))
        return loss, (student_out, updates.get("batch_stats", state.batch_stats))

    (loss, (student_out, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    momentum = setup.momentum(state.step)
    teacher_params = optim.ema_update(state.teacher_params, params, momentum)
    center = losses.update_center(state.center, teacher_out, setup.center_momentum)
    monitor = losses.dino_monitoring(student_out, teacher_out, state.center, student_temp=setup.student_temp,
                                     teacher_temp=temp, num_global_crops=len(global_crops))
    metrics = {"loss": loss, "lr": setup.lr(state.step), "weight_decay": setup.weight_decay(state.step),
               "teacher_momentum": momentum, "teacher_temp": temp, "grad_norm": optim.tree_l2_norm(grads),
               "param_norm": optim.tree_l2_norm(params), "update_norm": optim.tree_l2_norm(updates), **monitor}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
                         teacher_params=teacher_params, center=center), metrics


def health_check(config, length) -> diagnostics.DinoHealth:
    """The loop's `check_metrics`: a teacher drifting towards uniform or collapsing onto a few outputs
    (`train/diagnostics.py` has the rules), judged once the warm-ups are over."""
    hp, spe = config.dino, length.steps_per_epoch
    teacher_warmup = hp.warmup_teacher_temp_epochs if hp.warmup_teacher_temp != hp.teacher_temp else 0.0
    return diagnostics.DinoHealth.for_run(out_dim=config.model.out_dim, global_batch=config.batch_size,
                                          total_steps=length.total_steps,
                                          warmup_steps=int(config.optim.warmup_epochs * spe),
                                          teacher_warmup_steps=int(teacher_warmup * spe))


# ---------------------------------------------------------------------------
# Data and evaluation.
# ---------------------------------------------------------------------------


def train_transform(config):
    mc = config.multicrop
    return functools.partial(multicrop.multicrop_views, global_size=mc.global_size, local_size=mc.local_size,
                             global_scale=tuple(mc.global_scale), local_scale=tuple(mc.local_scale),
                             num_local=mc.num_local, blur_sigma=tuple(mc.blur_sigma),
                             resize=deit_transforms.resize_of(config.data),
                             image_ops=deit_transforms.image_ops_of(config.data),
                             canvas=int(config.data.get("device_canvas", 0)), levels=True)


def knn_evaluator(config, mesh) -> Callable[..., dict]:
    """k-NN top-1/top-5 of the teacher backbone's CLS features on a labelled split (DINO's protocol)."""
    data, kcfg, mc = config.data, config.knn, config.multicrop
    size = dict(img_size=mc.global_size)
    if config.model.patch_size:
        size["patch_size"] = config.model.patch_size
    # float32 features whatever the training dtype, as eval_knn.py extracts them
    backbone = models.create(config.model.name, num_classes=0, dtype=jnp.float32, **size)
    bank = get_source(data, data.train_split, limit=kcfg.train_limit)
    queries = get_source(data, data.eval_split, limit=kcfg.eval_limit, class_names=bank.class_names)
    extract = batched.cls_features(backbone, transform=deit_transforms.eval_transform_of(data, size=mc.global_size),
                                   global_batch=config.batch_size, mesh=mesh)

    def evaluate(state: DinoState, frozen=None) -> dict:
        del frozen  # DINO has none
        bank_features, bank_labels = extract(state.teacher_params["backbone"], bank)
        query_features, query_labels = extract(state.teacher_params["backbone"], queries)
        return knn.knn_accuracy(bank_features, bank_labels, query_features, query_labels, k=kcfg.k,
                                temperature=kcfg.temperature, num_classes=bank.num_classes)

    return evaluate


def prepare_state(state: DinoState, *, config, workdir: str, evaluate) -> DinoState:
    """A fresh state: student and teacher from `model.init_from` if given, then (with `knn.before_training`)
    the k-NN of the network at initialisation, written to the workdir for the summary."""
    if config.model.init_from:
        variables, report = weights.load_pretrained(config.model.init_from, {"params": state.params},
                                                    network=config.model.init_from_network)
        if jax.process_index() == 0:
            print(report, flush=True)
        state = state.replace(params=variables["params"], teacher_params=variables["params"])
    if config.knn.before_training:
        result = evaluate(state)
        if jax.process_index() == 0:
            with gfile.GFile(os.path.join(workdir, KNN_AT_INIT_FILE), "w") as f:
                json.dump(result, f)
    return state


def summary_table(final: dict, *, config, workdir: str) -> str:
    """The k-NN of the teacher at the end, and at initialisation when it was measured."""
    name, data = config.model.name, config.data
    rows = [("network", "k-NN top-1 %")]
    at_init = os.path.join(workdir, KNN_AT_INIT_FILE)
    if gfile.exists(at_init):
        with gfile.GFile(at_init) as f:
            rows.append((f"{name} at initialisation", f"{100 * json.load(f)['knn_top1']:.2f}"))
    rows.append((f"{name} after DINO, teacher ({final['step']} steps)", f"{100 * final['knn_top1']:.2f}"))
    return markdown_table(rows, title=f"k-NN (k={config.knn.k}, T={config.knn.temperature}) on {data.source} "
                                      f"{data.eval_split}")


# ---------------------------------------------------------------------------
# What the loop runs.
# ---------------------------------------------------------------------------


def check(config) -> None:
    """What a DINO run needs, checked before any compute: crops the model can cut into patches, local crops
    no larger than the global ones, and a training split that holds a batch."""
    crops = config.multicrop
    patch = config.model.patch_size or models.MODELS.get(config.model.name, (None, {}))[1].get("patch_size")
    for key in ("global_size", "local_size"):
        size = crops[key]
        if size < 1 or (patch and size % patch):
            raise ConfigError(f"config.multicrop.{key}={size} is not a whole number of {config.model.name}'s "
                              f"{patch}-pixel patches; use a multiple of {patch}, e.g. "
                              f"--config.multicrop.{key}={max(patch, size // patch * patch)}")
    if crops.local_size > crops.global_size:
        raise ConfigError(f"config.multicrop.local_size={crops.local_size} is larger than global_size="
                          f"{crops.global_size}: DINO's local crops are the small views (96 against 224); swap "
                          "them or lower local_size")
    sizes = [crops.global_size] * multicrop.NUM_GLOBAL_VIEWS + [crops.local_size] * crops.num_local
    problem = multicrop.canvas_problem(config.data.get("device_canvas", 0), sizes,
                                       image_ops=deit_transforms.image_ops_of(config.data),
                                       resize=deit_transforms.resize_of(config.data), interpolation="bicubic")
    if problem:
        raise ConfigError(f"config.data.{problem}")
    pipeline.check_training_split(config, jax.device_count())


def build_task(config, workdir: str) -> loop.Task:
    data = config.data
    train_source = get_source(data, data.train_split, limit=data.train_limit)
    length = schedules.run_length(config, train_source.num_examples)
    setup = make_setup(config, steps_per_epoch=length.steps_per_epoch)
    evaluate = knn_evaluator(config, sharding.make_mesh(config.get("mesh")))
    every = int(config.knn.every_epochs * length.steps_per_epoch) if config.knn.every_epochs else 0
    return loop.Task(
        name=f"dino:{config.model.name}",
        data=pipeline.TrainData(train_source, train_transform(config)),
        init=functools.partial(init_state, setup=setup),
        train_step=functools.partial(train_step, setup=setup),
        evaluate=evaluate,
        length=length,
        eval_every_steps=every,
        prepare_state=functools.partial(prepare_state, config=config, workdir=workdir, evaluate=evaluate),
        check_metrics=health_check(config, length),
        summarize=functools.partial(summary_table, config=config, workdir=workdir))
