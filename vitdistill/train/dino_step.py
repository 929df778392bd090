"""DINO: self-distillation with no labels, the task the loop runs.

The state carries the student's params, the EMA teacher's params and the center as siblings;
one jitted step computes the loss, updates the student (per-tensor clipping, AdamW with the
cosine lr/weight-decay schedules, the head's last layer frozen during the first epochs), then
moves the teacher towards the student and the center towards the teacher's batch mean.
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tensorflow.io import gfile

from vitdistill import losses, models
from vitdistill.data import deit_transforms, multicrop, pipeline
from vitdistill.data.sources import get_source
from vitdistill.evaluate import knn
from vitdistill.train import loop, optim, schedules, sharding
from vitdistill.train.deit_step import _dtype, _table, read_variables
from vitdistill.train.state import TrainState

# Below this teacher-student KL (nats) an extreme teacher entropy counts as collapse.
COLLAPSE_KL = 0.2


def view_names(num_local: int) -> list:
    return ["global_0", "global_1"] + [f"local_{i}" for i in range(num_local)]


def train_transform(config):
    mc = config.multicrop
    return functools.partial(multicrop.multicrop_views, global_size=mc.global_size, local_size=mc.local_size,
                             global_scale=tuple(mc.global_scale), local_scale=tuple(mc.local_scale),
                             num_local=mc.num_local, blur_sigma=tuple(mc.blur_sigma))


def build_task(config, workdir: str) -> loop.Task:
    data, mc, hp, opt = config.data, config.multicrop, config.dino, config.optim
    train_source = get_source(data, data.train_split, limit=data.train_limit)
    steps_per_epoch, total_steps = loop.steps_for(config, train_source.num_examples)
    dtype = _dtype(config.model.dtype)
    head_args = dict(out_dim=config.model.out_dim, hidden_dim=config.model.hidden_dim,
                     bottleneck_dim=config.model.bottleneck_dim, norm_last_layer=config.model.norm_last_layer,
                     use_bn_in_head=config.model.use_bn_in_head)
    size = dict(img_size=mc.global_size)  # position embedding native to the global crops
    if config.model.patch_size:
        size["patch_size"] = config.model.patch_size
    student = models.create_dino(config.model.name, drop_path_rate=config.model.drop_path_rate, dtype=dtype,
                                 **size, **head_args)
    teacher = models.create_dino(config.model.name, drop_path_rate=0.0, dtype=dtype, **size, **head_args)
    backbone = models.create(config.model.name, num_classes=0, dtype=dtype, **size)

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
    g = mc.global_size
    example = [jnp.zeros((1, g, g, 3), jnp.float32)]
    freeze_steps = schedules.epochs_to_steps(opt.freeze_last_layer, steps_per_epoch)
    frozen = None
    if freeze_steps:
        shapes = jax.eval_shape(lambda rng: student.init(rng, example)["params"], jax.random.key(0))
        frozen = optim.frozen_while(optim.last_layer_mask(shapes), freeze_steps)
    adam = optim.adamw(lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=wd, decay_mask=optim.dino_decay_mask,
                       frozen=frozen)
    tx = optax.chain(optim.clip_by_tensor_norm(opt.clip_grad), adam) if opt.clip_grad else adam
    names = view_names(mc.num_local)
    use_bn = config.model.use_bn_in_head
    base_rng = jax.random.key(config.seed + 1)

    def init(rng):
        variables = student.init({"params": rng, "dropout": rng}, example, train=False)
        params = variables["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          batch_stats=variables.get("batch_stats", {}),
                          teacher_params=jax.tree.map(jnp.copy, params),
                          center=jnp.zeros((1, config.model.out_dim), jnp.float32))

    def train_step(state, batch, _):
        crops = [batch[name] for name in names]
        temp = teacher_temp(state.step // steps_per_epoch)
        if use_bn:
            # The official teacher stays in train mode: its head normalises with the batch's statistics.
            teacher_out, _ = teacher.apply({"params": state.teacher_params, "batch_stats": state.batch_stats},
                                           crops[:2], train=True, mutable=["batch_stats"])
        else:
            teacher_out = teacher.apply({"params": state.teacher_params}, crops[:2], train=False)
        teacher_out = jax.lax.stop_gradient(teacher_out.astype(jnp.float32))
        rng = jax.random.fold_in(base_rng, state.step)

        def loss_fn(params):
            if use_bn:
                student_out, updates = student.apply({"params": params, "batch_stats": state.batch_stats}, crops,
                                                     train=True, rngs={"dropout": rng}, mutable=["batch_stats"])
            else:
                student_out, updates = student.apply({"params": params}, crops, train=True,
                                                     rngs={"dropout": rng}), {}
            student_out = student_out.astype(jnp.float32)
            loss = losses.dino_loss(student_out, teacher_out, state.center, student_temp=hp.student_temp,
                                    teacher_temp=temp, num_global_crops=2)
            return loss, (student_out, updates.get("batch_stats", state.batch_stats))

        (loss, (student_out, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        m = momentum(state.step)
        teacher_params = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, state.teacher_params, params)
        center = losses.update_center(state.center, teacher_out, hp.center_momentum)
        monitor = losses.dino_monitoring(student_out, teacher_out, state.center, student_temp=hp.student_temp,
                                         teacher_temp=temp, num_global_crops=2)
        metrics = {"loss": loss, "lr": lr(state.step), "weight_decay": wd(state.step), "teacher_momentum": m,
                   "teacher_temp": temp, "grad_norm": optim.tree_l2_norm(grads),
                   "param_norm": optim.tree_l2_norm(params), "update_norm": optim.tree_l2_norm(updates), **monitor}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, batch_stats=batch_stats,
                             teacher_params=teacher_params, center=center), metrics

    mesh = sharding.make_mesh()
    evaluate = _knn_evaluator(config, backbone, mesh)
    log_k = math.log(config.model.out_dim)

    def check_metrics(step, metrics):
        # The DINO paper's diagnosis (§5.3): in both kinds of collapse the student copies the teacher (KL
        # near 0) while the teacher's entropy goes to 0 (one dimension) or log K (uniform). A sharp teacher
        # the student still disagrees with is a teacher doing its job.
        entropy, kl = float(metrics["teacher_entropy"]), float(metrics["teacher_student_kl"])
        if step >= steps_per_epoch and kl < COLLAPSE_KL and (entropy < 0.02 * log_k or entropy > 0.98 * log_k):
            towards = "one dimension" if entropy < 0.02 * log_k else "the uniform distribution"
            return (f"WARNING step {step}: the teacher's output may be collapsing towards {towards} (entropy "
                    f"{entropy:.3f}, log K = {log_k:.3f}, teacher-student KL {kl:.4f})."
                    " Check the teacher temperature (config.dino.*teacher_temp*) and center momentum.")
        return None

    init_path = os.path.join(workdir, "knn_at_init.json")

    def prepare_state(state):
        if config.model.init_from:
            loaded, _ = read_variables(config.model.init_from)
            params = models.adapt_params(loaded["params"], jax.device_get(state.params))
            params = jax.tree.map(lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding), params,
                                  state.params)
            state = state.replace(params=params, teacher_params=params)
        if config.knn.before_training:
            result = evaluate(state)
            if jax.process_index() == 0:
                with gfile.GFile(init_path, "w") as f:
                    json.dump(result, f)
        return state

    def summarize(final):
        rows = [("network", "k-NN top-1 %")]
        if gfile.exists(init_path):
            with gfile.GFile(init_path) as f:
                rows.append((f"{config.model.name} at initialisation", f"{100 * json.load(f)['knn_top1']:.2f}"))
        rows.append((f"{config.model.name} after DINO, teacher ({final['step']} steps)",
                     f"{100 * final['knn_top1']:.2f}"))
        return _table(rows, title=f"k-NN (k={config.knn.k}, T={config.knn.temperature}) on {data.source} "
                                  f"{data.eval_split}")

    every = int(config.knn.every_epochs * steps_per_epoch) if config.knn.every_epochs else 0
    return loop.Task(name=f"dino:{config.model.name}", train_source=train_source, train_transform=train_transform(config),
                     init=init, train_step=train_step, evaluate=evaluate, steps_per_epoch=steps_per_epoch,
                     total_steps=total_steps, eval_every_steps=every, frozen=None, prepare_state=prepare_state,
                     check_metrics=check_metrics, summarize=summarize,
                     metadata={"student": student, "teacher": teacher, "lr": lr, "weight_decay": wd,
                               "momentum": momentum, "teacher_temp": teacher_temp})


def _knn_evaluator(config, backbone, mesh):
    """k-NN top-1 of the teacher backbone's CLS features on a labelled split (DINO's protocol)."""
    data, kcfg = config.data, config.knn
    bank = get_source(data, data.train_split, limit=kcfg.train_limit)
    queries = get_source(data, data.eval_split, limit=kcfg.eval_limit, class_names=bank.class_names)
    size, crop_pct = config.multicrop.global_size, data.crop_pct
    transform = lambda image: {"image": deit_transforms.eval_transform(image, size=size, crop_pct=crop_pct)}  # noqa

    @jax.jit
    def features(params, batch):
        return backbone.apply({"params": params}, batch["image"], train=False).astype(jnp.float32)

    def extract(params, source):
        ds, _ = pipeline.eval_dataset(source, transform, global_batch=config.batch_size,
                                      process_index=jax.process_index(), process_count=jax.process_count())
        feats, labels, masks = [], [], []
        for local in ds.as_numpy_iterator():
            batch = sharding.to_global(local, mesh)
            f, l, m = sharding.to_host((features(params, batch), batch["label"], batch["mask"]))
            feats.append(f), labels.append(l), masks.append(m)
        keep = np.concatenate(masks) > 0
        return np.concatenate(feats)[keep], np.concatenate(labels)[keep]

    def evaluate(state):
        params = state.teacher_params["backbone"]
        bank_features, bank_labels = extract(params, bank)
        query_features, query_labels = extract(params, queries)
        return knn.knn_accuracy(bank_features, bank_labels, query_features, query_labels, k=kcfg.k,
                                temperature=kcfg.temperature, num_classes=bank.num_classes)

    return evaluate
