"""experiments/accelerator_bench.py, the GPU measurements prepared for a session lent an accelerator, works
here: its TensorFlow-free batch has the real pipeline's shapes, and it runs a step with the stand-in."""
import os
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import accelerator_bench  # noqa: E402


@pytest.mark.parametrize("name", ["deit_s_regnety", "dino_vits16", "dino_vits16_device_ops",
                                  "dino_vits16_device_crops"])
def test_the_batch_shaped_from_the_config_is_the_pipeline_s(name):
    from vitdistill import bench, methods
    from vitdistill.data import pipeline

    file, arg, overrides = accelerator_bench.MEASUREMENTS[name]
    config = bench.bench_config(accelerator_bench.load_config(file, arg, overrides, batch_scale=4 / 256), "config")
    with tempfile.TemporaryDirectory() as workdir:
        task = methods.get(config.method).build_task(config, workdir)
        real = pipeline.random_batch(task.data, config.batch_size)
    shaped = accelerator_bench.random_batch_of(config, task.data.source.num_classes)
    assert {k: (v.shape, v.dtype) for k, v in shaped.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    # DeiT: image, erase box, label; DINO: 12 crops, label, and with image_ops='device' each crop's choices;
    # with a canvas, the canvas and each crop's windows instead of the crops
    count = {"deit": 3, "dino": 13, "dino_ops": 25, "dino_crops": 26}
    assert len(shaped) == count[config.method + name[len("dino_vits16_device"):]]


@pytest.mark.parametrize("name,what", [("deit_ti_smoke", "deit"), ("dino_device_ops_smoke", "dino"),
                                       ("dino_device_crops_smoke", "dino")])
def test_a_step_is_measured_without_tensorflow(tmp_path, name, what):
    # the DINO ones apply the photometric ops in the step (image_ops='device'), one also the crops (a canvas), as a
    # GPU machine without TensorFlow would
    run = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "accelerator_bench.py"),
                          "--without_tensorflow", f"--only={name}", "--steps=1", f"--out={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert run.returncode == 0, run.stderr[-3000:]
    line = open(tmp_path / "accelerator_bench.jsonl").read().splitlines()[-1]
    assert f'"what": "{what}_train_step"' in line and '"error"' not in line and '"batch": 4' in line, line
