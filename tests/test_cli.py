"""The command line as a user meets it: configs, overrides, runlocal smoke runs, and error messages."""
import glob
import json
import os
import subprocess
import sys

import pytest

from vitdistill import models, recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def _main(*args, timeout=600):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "vitdistill.main", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _stderr(run) -> str:
    """The end of a run's stderr for an assertion message, without the list of extension modules that Python's
    fault handler prints after a crash's stacks (it would fill the message and hide the stacks)."""
    text = "\n".join(line for line in run.stderr.splitlines() if not line.startswith("Extension modules:"))
    return f"exit {run.returncode}; stderr ends:\n{text[-4000:]}"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_loads_and_names_a_known_model(path):
    config = recipes.from_file(path)
    assert config.method in ("deit", "dino", "linear", "knn", "logreg")
    assert config.model.name in models.MODELS
    if config.method == "deit" and config.distill.kind != "none":
        teacher = config.teacher.train.model.name if config.teacher.train else config.teacher.model
        assert teacher in models.MODELS
    evaluation_only = config.method in ("knn", "logreg") or os.path.basename(path) == "eval_deit.py"
    sized_to_data = config.get("small_data") is not None  # its length in epochs is set from the data's size
    assert config.batch_size > 0 and (sized_to_data or config.epochs > 0 or evaluation_only)
    assert (config.epochs is None) == sized_to_data
    first = open(path).read().split('"""')[1]
    assert "python -m vitdistill.main --config=configs/" + os.path.basename(path) in first


def test_runlocal_deit_smoke_run_and_resume(tmp_path):
    workdir = str(tmp_path / "run")
    run = _main("--config=configs/deit_s_distilled.py:runlocal", f"--workdir={workdir}",
                "--config.data.image_size=16", "--config.teacher.train.data.image_size=16")
    assert run.returncode == 0, _stderr(run)
    assert "| student deit_micro_distilled_patch4_32 | class" in run.stdout
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.path.isdir(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["name"] == "deit_micro_distilled_patch4_32"
    again = _main("--config=configs/deit_s_distilled.py:runlocal", f"--workdir={workdir}",
                  "--config.data.image_size=16", "--config.teacher.train.data.image_size=16")
    assert again.returncode == 0, _stderr(again)
    assert "resuming at step 4/4" in again.stdout + again.stderr


def test_unknown_override_names_the_key_and_the_valid_ones(tmp_path):
    run = _main("--config=configs/deit_s.py", f"--workdir={tmp_path}", "--config.optim.lrr=1e-3", timeout=120)
    assert run.returncode != 0
    assert "lrr" in run.stderr and "weight_decay" in run.stderr


def test_missing_imagenet_ends_with_a_short_message_not_a_traceback(tmp_path):
    run = _main("--config=configs/deit_s.py", f"--workdir={tmp_path / 'w'}",
                f"--config.data.data_dir={tmp_path / 'tfds'}", timeout=120)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert "imagenet2012" in run.stderr and str(tmp_path / "tfds") in run.stderr
    assert "tfds build" in run.stderr and "manual" in run.stderr


FAKE_REFERENCE = """
import json, os, sys
with open(os.environ['FAKE_REFERENCE_LOG'], 'a') as f:
    parent = open(f'/proc/{os.getppid()}/stat').read().rsplit(')', 1)[1].split()
    f.write(json.dumps({'args': sys.argv[1:], 'parent_cpu_ticks': int(parent[11]) + int(parent[12])}) + '\\n')
print('torch noise'); print(json.dumps({'ref': 'torch', 'images_per_sec': 50.0}))
"""


def test_bench_prints_one_json_object_per_measurement_and_compares_in_turns(tmp_path):
    """Every line has the figures the harness promises; --compare runs the reference for the same config,
    once per round, in turns with ours (the bench process works between two reference runs), and the ratio
    is ours over the reference's images/s."""
    reference, log = tmp_path / "torch_reference.py", tmp_path / "calls.jsonl"
    reference.write_text(FAKE_REFERENCE)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               FAKE_REFERENCE_LOG=str(log))
    run = subprocess.run([sys.executable, "-m", "vitdistill.bench", "--config=configs/deit_s_distilled.py:runlocal",
                          "--config.data.image_size=16", "--config.batch_size=8", "--steps=2",
                          "--config.teacher.model=resnet_micro",  # a random RegNetY-16GF took minutes on XLA:CPU
                          "--compare", "--rounds=3", f"--reference={reference}", "--workers=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "reference trains at 224 px" in run.stderr and "--config.data.image_size=224" in run.stderr
    assert not log.exists()  # refused before anything was built or run

    run = subprocess.run([sys.executable, "-m", "vitdistill.bench", "--config=configs/deit_s_distilled.py:runlocal",
                          "--config.data.image_size=16", "--config.batch_size=8", "--steps=2",
                          "--config.teacher.model=resnet_micro", "--what=step,pipeline"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, _stderr(run)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [line["what"] for line in lines] == ["deit_train_step", "pipeline_deit"]
    for line in lines:
        assert {"what", "images_per_sec", "step_ms", "flops_per_step", "peak_rss_mb"} <= set(line)
        assert line["images_per_sec"] > 0 and line["step_ms"] > 0 and line["peak_rss_mb"] > 100
    step = lines[0]
    assert step["flops_per_step"] > 1e6  # XLA's count for student + teacher forward/backward
    assert step["compile_s"] > 0 and step["matmul_peak_tflops"] > 0 and step["device_peak_mb"] is None  # CPU
    assert step["utilisation"] == pytest.approx(step["tflops_per_sec"] / step["matmul_peak_tflops"], rel=1e-2)

    run = subprocess.run([sys.executable, "-m", "vitdistill.bench", "--config=configs/dino_vits16.py:runlocal",
                          "--config.batch_size=8", "--steps=2", "--what=pipeline", "--compare", "--rounds=3",
                          f"--reference={reference}", "--workers=3"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, _stderr(run)
    (line,) = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    calls = [json.loads(call) for call in log.read_text().splitlines()]
    assert len(calls) == 3
    config = _config(os.path.join(ROOT, "configs", "dino_vits16.py"), "runlocal")
    assert calls[0]["args"] == ["--what", "pipeline_dino", "--workers", "3", "--n_local",
                                str(config.multicrop.num_local), "--batch", "8", "--steps", "2"]
    ticks = [call["parent_cpu_ticks"] for call in calls]
    assert ticks[0] < ticks[1] < ticks[2]  # the bench timed its own pipeline between two reference runs
    assert line["torch_images_per_sec"] == 50.0 and line["rounds"] == 3
    assert line["ratio"] == pytest.approx(line["images_per_sec"] / 50.0, rel=1e-3)
    assert line["ratio_min"] <= line["ratio"] <= line["ratio_max"]


def test_bench_sizes_a_small_data_recipe_to_its_data_as_a_run_does():
    """A small-data recipe leaves its epochs and sizes open until the run reads its data; the bench sizes it
    the same way (before: a TypeError traceback on `config.epochs`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "vitdistill.bench", "--config=configs/dino_small_data.py",
                          "--data=config", "--what=step,pipeline", "--steps=1", "--config.batch_size=8"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "Traceback" not in run.stderr, _stderr(run)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [line["what"] for line in lines] == ["dino_train_step", "pipeline_dino"]


@pytest.mark.parametrize("args, says", [
    (["--config=configs/no_such.py"], ["vitdistill.bench: No config file 'configs/no_such.py'", "deit_s.py"]),
    (["--config=configs/deit_s.py", "--config.optim.lrr=1e-3"], ["Unknown config key 'optim.lrr'", "weight_decay"]),
    (["--config=configs/deit_s.py", "--config.batch_size=abc"], ["--config.batch_size=abc", "value of its type"]),
    (["--config=configs/deit_s.py", "--steps=0"], ["--steps=0: 0 is not a positive integer"]),
    (["--config=configs/deit_s.py", "--compare", "--rounds=0"], ["--rounds=0: 0 is not a positive integer"]),
    (["--config=configs/deit_s.py", "--config.batch_size=0"], ["config.batch_size=0", "positive number of images"]),
    (["--config=configs/deit_s.py", "--config.batch_size=3"], ["config.batch_size=3 is not divisible by the 2 "
                                                                "devices", "--config.batch_size=2"]),
], ids=["missing_config", "unknown_key", "mistyped_value", "no_steps", "no_rounds", "batch_0", "batch_3"])
def test_a_bad_bench_flag_is_one_line_as_in_a_run(args, says):
    """The bench's flags and config get the run's checks and messages (before: tracebacks, e.g. a
    ZeroDivisionError for --config.batch_size=0 and a StatisticsError for --steps=0)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "vitdistill.bench", *args, "--what=step"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, _stderr(run)
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("vitdistill.bench: ")]
    for said in says:
        assert said in line


def _config(path, arg=None):
    return recipes.from_file(path, arg)


def test_dino_vits16_is_the_readme_command_it_cites_and_boost_is_the_readmes_boosted_one():
    from vitdistill.train import schedules

    vanilla = _config(os.path.join(ROOT, "configs", "dino_vits16.py"))
    # `main_dino.py --arch vit_small` with --nproc_per_node=8 and its default 64 images per GPU
    assert vanilla.batch_size == 8 * 64 and vanilla.epochs == 100
    assert schedules.scaled_lr(vanilla.optim.lr, vanilla.batch_size, vanilla.optim.lr_reference_batch) == 1e-3
    assert (vanilla.dino.teacher_temp, vanilla.dino.warmup_teacher_temp_epochs) == (0.04, 0.0)
    assert vanilla.model.norm_last_layer and vanilla.multicrop.num_local == 8
    # run_with_submitit.py (2 nodes x 8 GPUs) --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
    # --norm_last_layer false
    boost = _config(os.path.join(ROOT, "configs", "dino_vits16.py"), "boost")
    assert boost.batch_size == 2 * 8 * 64 and boost.epochs == 300
    assert (boost.dino.warmup_teacher_temp, boost.dino.teacher_temp, boost.dino.warmup_teacher_temp_epochs) == (
        0.04, 0.07, 30.0)
    assert not boost.model.norm_last_layer and boost.multicrop.num_local == 8


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_every_config_refuses_a_variant_it_does_not_know(path):
    """A misspelt `:ARG` (`:runlcoal`) must not silently load the full recipe, which on a machine with ImageNet
    starts a 300-epoch run."""
    from vitdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"configs/\S+\.py:runlcoal is not a variant of this config"):
        recipes.from_file(path, "runlcoal")


def test_an_unknown_config_variant_is_one_line_naming_the_valid_ones(tmp_path):
    run = _main("--config=configs/dino_vits16.py:paper", f"--workdir={tmp_path / 'run'}")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert ("vitdistill: configs/dino_vits16.py:paper is not a variant of this config; valid: boost, runlocal"
            in run.stderr)


@pytest.mark.parametrize("source, flag, message", [
    ("def get_config(:\n    pass\n", "", r"The config file \S+bad\.py does not parse: invalid syntax at line 1; fix"),
    ("x = 1\n", "", r"The config file \S+bad\.py defines no get_config\(\)"),
    ("def get_config(arg=None):\n    raise ValueError('no such data')\n", "",
     r"The config file \S+bad\.py failed to load: ValueError: no such data; fix the file, or run with --debug"),
    ("import no_such_module_here\n", "",
     r"The config file \S+bad\.py failed to load: ModuleNotFoundError: No module named 'no_such_module_here'"),
    (None, "--wrkdir=x", r"Unknown command line flag 'wrkdir'. Did you mean: workdir \?"),
    (None, "stray", r"unexpected arguments 'stray': every setting is a flag, --name=value"),
], ids=["syntax", "no_get_config", "raises", "import", "unknown_flag", "positional"])
def test_a_config_file_that_does_not_load_or_an_unknown_flag_is_one_line(tmp_path, source, flag, message):
    import re

    path = os.path.join(ROOT, "configs", "quickstart.py")
    if source is not None:
        path = tmp_path / "bad.py"
        path.write_text(source)
    run = _main(f"--config={path}", f"--workdir={tmp_path / 'run'}", *([flag] if flag else []))
    assert run.returncode == 2, _stderr(run)
    assert "Traceback" not in run.stderr, _stderr(run)
    assert re.search("^vitdistill: " + message, run.stderr, re.M), _stderr(run)


def test_messages_name_the_fix_for_a_wrong_split_a_vit_default_on_a_cnn_and_empty_class_folders(tmp_path):
    from vitdistill.data import sources
    from vitdistill.errors import ConfigError, DataError

    with pytest.raises(DataError, match=r"digits has splits 'train' and 'test', not 'validation': use "
                                        r"--config.data.train_split=train and --config.data.eval_split=test"):
        sources.digits("validation")
    with pytest.raises(ConfigError, match=r"resnet_micro \(ResNet\) has no field 'drop_path_rate' \(set "
                                          r"--config.model.drop_path_rate=0: the config's default is for ViTs\)"):
        models.create("resnet_micro", drop_path_rate=0.1)
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no image")
    with pytest.raises(DataError, match=r"No images .* in the class folders of \S+/train \(the layout is "
                                        r"\S+/train/<class>/<image>\): put the images there"):
        sources.image_folder(str(tmp_path), "train")


def test_a_run_that_stops_at_once_prints_its_one_line_and_nothing_of_tensorflows_start(tmp_path):
    """TensorFlow 2.21 logs before absl is initialised, past TF_CPP_MIN_LOG_LEVEL (four lines before every run's
    output); the workdir here is a file one folder above the teacher phase's, which used to pass the file check
    and fail later as 'Cannot write checkpoints ... not a directory' with the advice to free disk space."""
    (tmp_path / "afile").write_text("not a directory")
    run = _main("--config=configs/quickstart.py", f"--workdir={tmp_path / 'afile'}", timeout=120)
    assert run.returncode == 2, _stderr(run)
    assert run.stderr.splitlines() == [
        f"vitdistill: {tmp_path / 'afile'} is a file, not a directory, and this run's folder "
        f"{tmp_path / 'afile' / 'teacher'} would be inside it: give --workdir a directory (a new path, or an "
        "earlier run's workdir to resume it)"], _stderr(run)


def test_tensorflows_early_log_lines_are_filtered_by_its_level_and_everything_else_kept(tmp_path, capfd,
                                                                                       monkeypatch):
    from vitdistill import tf_import

    # what `import tensorflow` 2.21 writes to fd 2 on this kind of host, then lines that must stay
    written = (tf_import.ABSL_PREAMBLE + "\n"
               "I0000 00:00:1796675216.652117   14187 port.cc:153] oneDNN custom operations are on.\n"
               "I0000 00:00:1796675216.689688   14187 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
               "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow\n"
               "W0000 00:00:1796675216.70   14187 port.cc:9] a warning\n"
               "its second line\n"
               "E1207 20:26:17.000001   14187 x.cc:1] an error\n"
               "/x.py:1: UserWarning: a Python warning\n")
    assert tf_import.kept_lines(written, 1) == "".join(written.splitlines(keepends=True)[4:])
    assert tf_import.kept_lines(written, 2) == "".join(written.splitlines(keepends=True)[6:])
    assert tf_import.kept_lines(written, 3) == ""  # a line without a prefix goes with the message before it
    assert tf_import.kept_lines("a first line\n" + written, 3) == "a first line\n"
    module = tmp_path / "noisy_import_probe.py"
    module.write_text(f"import os\nos.write(2, {written.encode()!r})\nVALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    capfd.readouterr()
    assert tf_import.quiet_import("noisy_import_probe").VALUE == 7
    out, err = capfd.readouterr()
    assert err == "".join(written.splitlines(keepends=True)[6:]) and out == ""
    os.write(2, b"fd 2 is back\n")
    assert capfd.readouterr().err == "fd 2 is back\n"
