"""Issue 16's accelerator measurements in one call: the train steps at real batch sizes in bf16 on a GPU.

    python experiments/accelerator_bench.py --out=DIR [--steps=20] [--only=NAME,...] [--batch_scale=0.5]

For each measurement below, the loop's own jitted step (`vitdistill.bench`'s StepBench: shardings,
donation, a device-resident random batch): images/s, step time, compile time, XLA's FLOPs per step,
utilisation against a large bf16 matmul timed in the same run, and peak device memory. One JSON line each
(also appended to DIR/accelerator_bench.jsonl), then a Markdown table.

| name | what |
|---|---|
| deit_b | DeiT-B/16 at 224, no teacher, batch 256 |
| deit_b_remat | the same with `model.remat` (memory against compute) |
| deit_b_scan | the same with `model.scan_blocks` (compile time) |
| deit_s_regnety | DeiT-S distilled (hard) with its RegNetY-16GF teacher, batch 256 |
| dino_vits16 | DINO ViT-S/16, 2x224 + 10x96 crops, 65,536-way head, batch 256 |
| dino_vits16_scan | the same with `model.scan_blocks` |
| dino_vits16_device_ops | the same with `data.image_ops="device"`: the photometric ops in the step |
| dino_vits16_device_crops | also `data.device_canvas=512`: the crops, resizes and flips in the step too |

The targets (issue 16): DINO ViT-S/16 2x224 + 10x96 at >= 2,000 images/s on one H100-class GPU, the DeiT-B step
at >= 50 % of the bf16 peak.

The device machines lent to sessions (the `device` tool) have JAX, Flax, optax, orbax, einops, scikit-learn
and Pillow but neither TensorFlow (too large to carry) nor ml-collections. The train step needs no
TensorFlow: where it is missing, a stand-in module answers the library's imports (`tf.io.gfile` on local
files; anything that would run TensorFlow raises) and the random batch is shaped from the config
(`batch_shapes`, which tests/test_accelerator_bench.py checks against the real pipeline's). ml-collections
travels as a wheel; from the repository's root here:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0

then one `run` with carry [".whl"] and a timeout of 600 s:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 experiments/accelerator_bench.py --out=$OUT

(`--only` and `--batch_scale` cut a run short when the device time left is short, or when a batch does not
fit. XLA counts a scanned loop's body once: a `_scan` row takes its FLOPs from its row without the scan.) The input pipelines are not measured here: they need TensorFlow; their images/s per host core come
from `experiments/tfds_pipeline_throughput.py` on any host.
"""
import argparse
import importlib.util
import json
import os
import shutil
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASUREMENTS = {
    "deit_b": ("deit_b.py", None, {"batch_size": 256}),
    "deit_b_remat": ("deit_b.py", None, {"batch_size": 256, "model.remat": True}),
    "deit_b_scan": ("deit_b.py", None, {"batch_size": 256, "model.scan_blocks": True}),
    "deit_s_regnety": ("deit_s_distilled.py", None, {"batch_size": 256}),
    "dino_vits16": ("dino_vits16.py", None, {"batch_size": 256, "multicrop.num_local": 10}),
    "dino_vits16_scan": ("dino_vits16.py", None, {"batch_size": 256, "multicrop.num_local": 10,
                                                  "model.scan_blocks": True}),
    "dino_vits16_device_ops": ("dino_vits16.py", None, {"batch_size": 256, "multicrop.num_local": 10,
                                                        "data.image_ops": "device"}),
    "dino_vits16_device_crops": ("dino_vits16.py", None, {"batch_size": 256, "multicrop.num_local": 10,
                                                          "data.image_ops": "device", "data.device_canvas": 512}),
}
SMOKE = {"deit_ti_smoke": ("deit_ti.py", None, {"batch_size": 4}),  # tests/test_accelerator_bench.py's, on CPUs
         "dino_device_ops_smoke": ("dino_vits16.py", "runlocal", {"batch_size": 4, "data.image_ops": "device"}),
         "dino_device_crops_smoke": ("dino_vits16.py", "runlocal", {"batch_size": 4, "data.image_ops": "device",
                                                                    "data.device_canvas": 64})}


class _Standin(types.ModuleType):
    """A module whose every attribute is another such module, and which raises when called: enough for the
    import-time references of a library that uses TensorFlow only to read data."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _Standin(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} was called, but TensorFlow is not installed here (only the train step "
                           "can be measured without it)")


def install_tensorflow_standin() -> None:
    """Puts the stand-in in place of `tensorflow` and `tensorflow_datasets` (where TensorFlow is missing)."""
    tf = _Standin("tensorflow")
    gfile = tf.io.gfile
    gfile.exists, gfile.isdir, gfile.listdir, gfile.glob = os.path.exists, os.path.isdir, os.listdir, __import__(
        "glob").glob
    gfile.makedirs = lambda path: os.makedirs(path, exist_ok=True)
    gfile.GFile, gfile.remove, gfile.rmtree = open, os.remove, shutil.rmtree
    tf.config.set_visible_devices = lambda *args, **kwargs: None
    tf.Tensor, tf.Variable = type("Tensor", (), {}), type("Variable", (), {})  # einops' backend probe
    for name in ("OpError", "InvalidArgumentError", "NotFoundError", "PermissionDeniedError",
                 "ResourceExhaustedError", "OutOfRangeError"):
        setattr(tf.errors, name, type(name, (Exception,), {}))
    sys.modules.update({"tensorflow": tf, "tensorflow.io": tf.io, "tensorflow.io.gfile": gfile,
                        "tensorflow_datasets": _Standin("tensorflow_datasets")})


def batch_shapes(config) -> dict:
    """{name: (shape, dtype)} of a training batch of `config`, as its pipeline yields it (without building the
    pipeline): DeiT an image, its erase box (with erasing on) and a label; DINO two global and `num_local` local
    crops (with `data.image_ops="device"` each with its photometric choices, `multicrop.device_ops`; with a
    `data.device_canvas` too, the image's canvas and each crop's windows instead of the crops), and the label.
    Images come as uint8 levels, normalised (and erased) in the step."""
    b = config.batch_size
    if config.method == "deit":
        side = config.data.image_size
        erase = {"erase": ((b, 6), "int32")} if config.augment.erase_prob > 0 else {}
        return {"image": ((b, side, side, 3), "uint8"), **erase, "label": ((b,), "int32")}
    if config.method == "dino":
        mc = config.multicrop
        views = {f"global_{i}": ((b, mc.global_size, mc.global_size, 3), "uint8") for i in range(2)}
        views.update({f"local_{i}": ((b, mc.local_size, mc.local_size, 3), "uint8") for i in range(mc.num_local)})
        if config.data.get("image_ops") == "device":
            from vitdistill.data import multicrop, pil_resize

            views.update({name + multicrop.OPS_SUFFIX: ((b, len(multicrop.DEVICE_OP_FIELDS)), "int32")
                          for name in list(views)})
            canvas = config.data.get("device_canvas", 0)
            if canvas:  # the image once, and each crop as its windows into it
                for name in multicrop.view_names(mc.num_local):
                    size = views.pop(name)[0][1]
                    views[name + multicrop.WINDOWS_SUFFIX] = (
                        (b, 2, size, 1 + pil_resize.taps(canvas, size, "bicubic")), "int32")
                views[multicrop.CANVAS] = ((b, canvas, canvas, 3), "uint8")
        return {**views, "label": ((b,), "int32")}
    raise ValueError(f"no train step to measure for method {config.method!r}")


def random_batch_of(config, num_classes: int, seed: int = 0) -> dict:
    from vitdistill.data import pipeline

    return pipeline.random_arrays(batch_shapes(config), num_classes, seed)


def load_config(file: str, arg, overrides: dict, batch_scale: float):
    from vitdistill import recipes

    config = recipes.from_file(os.path.join(ROOT, "configs", file), arg)
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    config.batch_size = max(1, int(config.batch_size * batch_scale))
    # the benchmark reads no images: digits stands in for ImageNet (its size and classes are not used by the step)
    config.data.source, config.data.eval_split = "digits", "test"
    return config


def measure(name: str, steps: int, batch_scale: float) -> dict:
    import tempfile

    from vitdistill import bench, methods
    from vitdistill.data import pipeline

    file, arg, overrides = {**MEASUREMENTS, **SMOKE}[name]
    config = bench.bench_config(load_config(file, arg, overrides, batch_scale), "config")
    with tempfile.TemporaryDirectory() as workdir:
        task = methods.get(config.method).build_task(config, workdir)
        if isinstance(sys.modules.get("tensorflow"), _Standin):
            pipeline.random_batch = lambda data, global_batch, seed=0: random_batch_of(
                config, data.source.num_classes, seed)
        step = bench.StepBench(task, config)
        result = step.result(step.time(steps))
    result.update(name=name, overrides=overrides)
    return result


def _scan_flops_from_the_loop(rows: list) -> None:
    """XLA's cost analysis counts a while loop's body once, so a `_scan` measurement's FLOPs (and utilisation)
    would cover one block: they are taken from the same step without the scan where it was measured."""
    by_name = {r["name"]: r for r in rows if "error" not in r}
    for name, r in by_name.items():
        base = by_name.get(name[:-len("_scan")]) if name.endswith("_scan") else None
        if base is not None and base["batch"] == r["batch"]:
            seconds = r["step_ms"] / 1000
            r.update(flops_per_step=base["flops_per_step"], flops_from=base["name"],
                     tflops_per_sec=base["flops_per_step"] / seconds / 1e12)
            r["utilisation"] = r["tflops_per_sec"] / r["matmul_peak_tflops"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="a folder for accelerator_bench.jsonl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help="comma-separated names")
    parser.add_argument("--batch_scale", type=float, default=1.0)
    parser.add_argument("--without_tensorflow", action="store_true",
                        help="use the stand-in even where TensorFlow is installed (to try this script on a host)")
    args = parser.parse_args()
    if args.without_tensorflow or importlib.util.find_spec("tensorflow") is None:
        install_tensorflow_standin()
    sys.path.insert(0, ROOT)
    rows = []
    for name in args.only.split(","):
        try:
            result = measure(name, args.steps, args.batch_scale)
        except Exception as e:  # noqa: BLE001 - one failed measurement (out of memory, say) leaves the others
            result = {"name": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        print(json.dumps(result), flush=True)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "accelerator_bench.jsonl"), "a") as f:
                f.write(json.dumps(result) + "\n")
        rows.append(result)
    _scan_flops_from_the_loop(rows)
    print("\n| measurement | batch | img/s | step ms | compile s | utilisation | device peak MB | device |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['name']} | - | {r['error']} | | | | | |")
            continue
        print(f"| {r['name']} | {r['batch']} | {r['images_per_sec']:.1f} | {r['step_ms']:.1f} | {r['compile_s']:.1f} | "
              f"{r['utilisation']:.2f} | {r.get('device_peak_mb') or '-'} | {r['device']} |")


if __name__ == "__main__":
    main()
