"""Three train steps of DeiT (hard distillation from a ResNet teacher) and DINO on micro models, on one device
and on meshes of 8 simulated CPU devices; run by tests/test_scale_out.py in a process of its own.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/scale_out_steps.py OUT.npz

Writes, for each method and layout, the three losses and the final params and Adam moments, plus what each
device holds of every array under FSDP, and the per-device bytes of a ViT-B/16 DINO state.
"""
import functools
import os
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.modules.setdefault("triton", None)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from vitdistill import methods, recipes, small_data  # noqa: E402
from vitdistill.data import pipeline  # noqa: E402
from vitdistill.train import loop, sharding  # noqa: E402

STEPS = 3
LAYOUTS = {"data8": {"data": 8, "fsdp": 1}, "fsdp8": {"data": 1, "fsdp": 8}, "data2_fsdp4": {"data": 2, "fsdp": 4}}


def deit_config():
    config = recipes.deit("deit_micro_distilled_patch4_32", distilled=True)
    small_data.runlocal(config)
    config.data.image_size = 16
    config.batch_size = 8
    config.teacher.train = ConfigDict()
    config.teacher.checkpoint = "random"       # a randomly initialised resnet_micro: a teacher with BatchNorm
    config.teacher.model = "resnet_micro"
    config.model.drop_path_rate = 0.0
    config.augment.rand_augment = False
    config.data.eval_limit = 8
    return config


def dino_config():
    config = recipes.dino("vit_micro_patch4_32")
    small_data.runlocal(config)
    config.batch_size = 8
    config.multicrop.global_size = 16
    config.multicrop.local_size = 8
    config.model.drop_path_rate = 0.0
    config.knn.train_limit = 8
    config.knn.eval_limit = 8
    return config


def flat(tree, prefix):
    return {f"{prefix}/{jax.tree_util.keystr(path)}": np.asarray(value)
            for path, value in jax.tree_util.tree_leaves_with_path(tree)}


def one_device(task, batches):
    """The reference: the step jitted with no shardings, on the default device."""
    state = jax.jit(task.init)(jax.random.key(0))
    step = jax.jit(task.train_step)
    losses = []
    for batch in batches:
        state, metrics = step(state, batch, task.frozen)
        losses.append(float(metrics["loss"]))
    return state, losses


def on_mesh(task, batches, layout):
    mesh = sharding.make_mesh(layout)
    _, shardings = loop.state_layout(task, mesh, seed=0)
    state = loop.init_state(task, shardings, seed=0)
    frozen = loop.place_frozen(task, mesh)
    step = loop.jit_train_step(task, mesh, shardings, frozen)
    losses = []
    for batch in batches:
        state, metrics = step(state, sharding.to_global(batch, mesh), frozen)
        losses.append(float(metrics["loss"]))
    return state, losses, frozen


def shard_shapes(tree, prefix):
    """For every array: its global shape, and the shape each of the 8 devices holds."""
    out = {}
    for path, value in jax.tree_util.tree_leaves_with_path(tree):
        key = f"{prefix}/{jax.tree_util.keystr(path)}"
        out[f"global:{key}"] = np.asarray(value.shape)
        out[f"shards:{key}"] = np.asarray([shard.data.shape for shard in value.addressable_shards])
    return out


def vit_b_dino_bytes():
    config = recipes.dino("vit_base_patch16_224")
    config.data.source = "digits"  # the step's shapes do not depend on the data; nothing is read
    task_setup = methods.dino.make_setup(config, steps_per_epoch=100)
    abstract = jax.eval_shape(functools.partial(methods.dino.init_state, setup=task_setup), jax.random.key(0))
    result = {}
    for name, layout in (("data8", LAYOUTS["data8"]), ("fsdp8", LAYOUTS["fsdp8"])):
        result[f"vit_b_dino_bytes:{name}"] = np.asarray(
            sharding.per_device_bytes(abstract, sharding.state_shardings(abstract, sharding.make_mesh(layout))))
    return result


def main(out_path):
    assert jax.device_count() == 8, jax.devices()
    results = {}
    for method, config in (("deit", deit_config()), ("dino", dino_config())):
        with tempfile.TemporaryDirectory() as workdir:
            task = methods.get(method).build_task(config, workdir)
            batches = [pipeline.random_batch(task.data, config.batch_size, seed=i) for i in range(STEPS)]
            state, losses = one_device(task, batches)
            results[f"{method}/one/losses"] = np.asarray(losses)
            results.update(flat({"params": state.params, "opt_state": state.opt_state}, f"{method}/one"))
            for name, layout in LAYOUTS.items():
                state, losses, frozen = on_mesh(task, batches, layout)
                results[f"{method}/{name}/losses"] = np.asarray(losses)
                results.update(flat(sharding.to_host({"params": state.params, "opt_state": state.opt_state}),
                                    f"{method}/{name}"))
                if name == "fsdp8":
                    results.update(shard_shapes({"params": state.params, "opt_state": state.opt_state,
                                                 "frozen": frozen}, method))
    results.update(vit_b_dino_bytes())
    np.savez(out_path, **results)


if __name__ == "__main__":
    main(sys.argv[1])
