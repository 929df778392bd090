"""Scale-out: the (data, fsdp) mesh, two processes with jax.distributed on localhost, checkpoints that move
between topologies, and SIGTERM on several processes.

Every comparison is against the same run on one process (and, for FSDP, one device): the same global batch
must give the same losses and parameters.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import scale_out_steps
from vitdistill import methods
from vitdistill.data import pipeline
from vitdistill.errors import ConfigError
from vitdistill.train import loop, sharding
from vitdistill.train.state_checkpoints import latest_raw_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-5  # same global batch, another layout: float32 sums in another order


# ---------------------------------------------------------------------------
# The mesh and FSDP, in this process (two CPU devices).
# ---------------------------------------------------------------------------


def test_mesh_sizes_resolve_and_bad_ones_are_named():
    assert sharding.mesh_shape({"data": -1, "fsdp": 1}, 8) == {"data": 8, "fsdp": 1}
    assert sharding.mesh_shape({"data": 2, "fsdp": -1}, 8) == {"data": 2, "fsdp": 4}
    assert sharding.mesh_shape(None, 2) == {"data": 2, "fsdp": 1}
    with pytest.raises(ConfigError, match="no axis 'model'.*data, fsdp"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(ConfigError, match="not a multiple of 3"):
        sharding.mesh_shape({"data": -1, "fsdp": 3}, 8)
    with pytest.raises(ConfigError, match="covers 4 devices, but there are 8"):
        sharding.mesh_shape({"data": 2, "fsdp": 2}, 8)
    with pytest.raises(ConfigError, match="-1 for one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)


def test_fsdp_splits_the_largest_divisible_dimension_of_large_arrays_only():
    assert sharding.fsdp_spec((128, 384), 8) == jax.sharding.PartitionSpec(None, "fsdp")
    assert sharding.fsdp_spec((4, 4, 3, 128), 8) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert sharding.fsdp_spec((384, 384), 8) == jax.sharding.PartitionSpec("fsdp", None)  # a tie: the first
    assert sharding.fsdp_spec((1, 197, 384), 8) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert sharding.fsdp_spec((128,), 8) == jax.sharding.PartitionSpec()          # small: replicated
    assert sharding.fsdp_spec((127, 129), 8) == jax.sharding.PartitionSpec()      # no divisible dimension
    assert sharding.fsdp_spec((128, 384), 1) == jax.sharding.PartitionSpec()      # no fsdp axis


def test_fsdp_over_two_devices_trains_like_one_device_and_each_holds_half(tmp_path):
    config = scale_out_steps.dino_config()
    task = methods.dino.build_task(config, str(tmp_path))
    batches = [pipeline.random_batch(task.data, config.batch_size, seed=i) for i in range(3)]
    state, step = jax.jit(task.init)(jax.random.key(0)), jax.jit(task.train_step)
    reference = []
    for batch in batches:
        state, metrics = step(state, batch, None)
        reference.append(float(metrics["loss"]))

    mesh = sharding.make_mesh({"data": 1, "fsdp": 2})
    _, shardings = loop.state_layout(task, mesh, seed=0)
    sharded = loop.init_state(task, shardings, seed=0)
    sharded_step = loop.jit_train_step(task, mesh, shardings, None)
    losses = []
    for batch in batches:
        sharded, metrics = sharded_step(sharded, sharding.to_global(batch, mesh), None)
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(losses, reference, rtol=TOLERANCE)
    for ours, theirs in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), atol=TOLERANCE)

    qkv = sharded.params["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]  # [128, 384]
    assert [s.data.shape for s in qkv.addressable_shards] == [(128, 192)] * 2
    mu = sharded.opt_state[1].mu["backbone"]["blocks_0"]["attn"]["qkv"]["kernel"]
    assert [s.data.shape for s in mu.addressable_shards] == [(128, 192)] * 2
    teacher = sharded.teacher_params["backbone"]["blocks_0"]["mlp"]["fc1"]["kernel"]  # [128, 512]
    assert [s.data.shape for s in teacher.addressable_shards] == [(128, 256)] * 2
    bias = sharded.params["backbone"]["blocks_0"]["attn"]["qkv"]["bias"]
    assert [s.data.shape for s in bias.addressable_shards] == [(384,)] * 2  # small: whole on each device


@pytest.mark.slow
def test_eight_devices_in_every_layout_train_like_one_device(tmp_path):
    """3 DeiT steps (hard distillation from a ResNet teacher) and 3 DINO steps on 8 simulated devices, data
    parallel, fsdp=8 and data=2 x fsdp=4, against one device; under fsdp=8 each device holds 1/8 of every
    sharded array; a ViT-B/16 DINO state's per-device bytes fall accordingly. About 4 minutes on 2 cores."""
    out = tmp_path / "steps.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "scale_out_steps.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    r = np.load(out)
    for method in ("deit", "dino"):
        keys = [k for k in r.files if k.startswith(f"{method}/one/") and not k.endswith("losses")]
        for layout in ("data8", "fsdp8", "data2_fsdp4"):
            np.testing.assert_allclose(r[f"{method}/{layout}/losses"], r[f"{method}/one/losses"], rtol=TOLERANCE)
            for key in keys:
                np.testing.assert_allclose(r[key.replace("/one/", f"/{layout}/")], r[key], atol=TOLERANCE,
                                           err_msg=f"{layout}: {key}")
        sharded = 0
        for key in (k for k in r.files if k.startswith(f"shards:{method}/")):
            shape, shards = r[key.replace("shards:", "global:")], r[key]
            spec = sharding.fsdp_spec(tuple(shape), 8)
            expected = tuple(s // 8 if axis == "fsdp" else s for s, axis in zip(shape, tuple(spec) + (None,) * 9))
            assert len(shards) == 8 and all(tuple(s) == expected for s in shards), (key, shape, shards)
            sharded += spec != jax.sharding.PartitionSpec()
        assert sharded >= 20  # the matrices of params, Adam moments and the teacher
    whole, split = int(r["vit_b_dino_bytes:data8"]), int(r["vit_b_dino_bytes:fsdp8"])
    print(f"ViT-B/16 DINO state per device: {whole / 2**20:.0f} MiB data parallel, {split / 2**20:.0f} MiB fsdp=8")
    assert split < 0.14 * whole


# ---------------------------------------------------------------------------
# Two processes on localhost.
# ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


CACHE = os.path.join(os.environ.get("TMPDIR", "/tmp"), "vitdistill-test-jax-cache")  # conftest's


def _start(args, processes: int, devices_per_process: int = 1, env_of=lambda process: {}):
    """`vitdistill.main` (with the nano models) on `processes` processes of `devices_per_process` CPU devices;
    `env_of(i)`: environment variables added for process i."""
    command = [sys.executable, os.path.join(ROOT, "tests", "nano_main.py"), *args, f"--jax_cache_dir={CACHE}"]
    if processes == 1:
        return [subprocess.Popen(command, cwd=ROOT, env={**_env(devices_per_process), **env_of(0)},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    port = _free_port()
    return [subprocess.Popen(command + ["--distributed", f"--coordinator_address=localhost:{port}",
                                        f"--num_processes={processes}", f"--process_id={i}"],
                             cwd=ROOT, env={**_env(devices_per_process), **env_of(i)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for i in range(processes)]


def _finish(procs, timeout=600):
    results = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        results.append((p.returncode, out, err))
    return results


def _run(args, processes: int, devices_per_process: int = 1):
    results = _finish(_start(args, processes, devices_per_process))
    for rc, out, err in results:
        assert rc == 0, err[-3000:]
    return results


def _assert_same_state(a_dir, b_dir, fields=("params", "opt_state", "teacher_params", "center", "batch_stats"),
                       exact=False):
    (step_a, a), (step_b, b) = latest_raw_state(a_dir), latest_raw_state(b_dir)
    assert step_a == step_b
    compared = 0
    for field in fields:
        for x, y in zip(jax.tree.leaves(a.get(field, {})), jax.tree.leaves(b.get(field, {})), strict=True):
            if exact:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=field)
            else:
                np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=TOLERANCE, err_msg=field)
            compared += 1
    assert compared >= 10
    return step_a


def _dino(workdir, max_steps):
    return ["--config=tests/nano_config.py:dino", f"--workdir={workdir}", f"--config.max_steps={max_steps}"]


def test_two_processes_train_stop_and_resume_like_one(tmp_path):
    """Nano DINO on two processes (one CPU device each, each reading its own half of every batch) against one
    process with two devices, uninterrupted. The two processes log the one-process losses; SIGTERM to one of
    them mid-run: both save at the same step and exit 0 with one line; that checkpoint resumes in one process
    for 2 steps, whose checkpoint resumes in two processes (the same command as the first), and the run ends
    bit-identical to the uninterrupted one."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    end = 60
    _run(_dino(one, end), processes=1, devices_per_process=2)

    procs = _start(_dino(two, end), processes=2)
    metrics, deadline = os.path.join(two, "metrics.jsonl"), time.time() + 300
    while time.time() < deadline and not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    sent = time.time()
    results = _finish(procs)
    assert time.time() - sent < 60
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM at step" in results[0][2] and "stopped by" not in results[1][2]  # process 0 says it
    stopped_at, _ = latest_raw_state(two)
    assert 3 <= stopped_at < end - 2
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl")) if '"loss"' in line][:3]
              for d in (two, one)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=TOLERANCE)  # the first 3 steps on 2 processes and on 1

    _run(_dino(two, stopped_at + 2), processes=1, devices_per_process=2)
    assert latest_raw_state(two)[0] == stopped_at + 2
    _run(_dino(two, end), processes=2)
    assert _assert_same_state(two, one, exact=True) == end


def test_sigterm_during_an_evaluation_stops_two_processes_at_the_same_batch(tmp_path):
    """A k-NN over a large split can outlast a scheduler's grace period, on several processes too: SIGTERM to
    process 1 during the k-NN of the network at initialisation (before its 2nd of 26 batches) stops both
    processes between two batches of it, agreed through JAX's preemption sync: both exit 0, process 0 says so
    in one line, nothing is saved; the same command then runs to the end."""
    workdir = str(tmp_path / "two")
    args = _dino(workdir, 2) + ["--config.knn.before_training=True", "--config.knn.train_limit=200"]
    procs = _start(args, processes=2, env_of=lambda i: {"NANO_SIGTERM_AT_EVAL_CHECK": "2"} if i == 1 else {})
    results = _finish(procs)
    for rc, out, err in results:
        assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert "stopped by SIGTERM during an evaluation" in results[0][2], results[0][2][-3000:]
    assert "at step 0/2" in results[0][2] and "stopped by" not in results[1][2]
    assert not os.path.exists(os.path.join(workdir, "knn_at_init.json"))
    assert not os.path.exists(os.path.join(workdir, "checkpoints")) or not os.listdir(
        os.path.join(workdir, "checkpoints"))
    _run(args, processes=2)
    assert latest_raw_state(workdir)[0] == 2 and os.path.exists(os.path.join(workdir, "knn_at_init.json"))


def test_a_teacher_trained_on_two_processes_teaches_a_student_on_one_device(tmp_path):
    """Nano DeiT on two processes, its nano ResNet teacher trained first, 3 student steps; then the same student
    on one process with one device, given that teacher: it loads (another topology wrote it) and the student ends
    as on two processes."""
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # One mixup draw over the batch on both: by default each device mixes its own rows (DeiT's DDP), so 2 and
    # 1 devices would mix differently by design.
    one_draw = "--config.mixup.groups=1"
    _run(["--config=tests/nano_config.py:deit", f"--workdir={two}", one_draw], processes=2)
    (_, out, _), = _run(["--config=tests/nano_config.py:deit", f"--workdir={one}", one_draw,
                         f"--config.teacher.checkpoint={two}/teacher"], processes=1, devices_per_process=1)
    assert "| teacher resnet_nano" in out
    assert not os.path.exists(os.path.join(one, "teacher"))  # the given teacher was used, not retrained
    assert _assert_same_state(two, one, fields=("params", "opt_state", "ema_params")) == 3
