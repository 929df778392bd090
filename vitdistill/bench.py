"""Throughput of a config's train step and input pipeline, one JSON object per line.

    python -m vitdistill.bench --config=configs/deit_s_distilled.py [--config.KEY=VALUE ...] [--steps=N]
    python -m vitdistill.bench --config=configs/deit_s.py --config.batch_size=4 --what=step --compare

`{method}_train_step`: the loop's own jitted step alone on device-resident random batches (the model,
loss, optimiser and, for DeiT, the frozen teacher; a teacher without a checkpoint is randomly
initialised). `pipeline_{method}`: the tf.data pipeline alone (decode + the config's augmentations), fed
by scikit-learn's two sample JPEGs as PyTorch's reference pipeline is.

Every line carries `what`, `images_per_sec` (source images), `step_ms` (median), `flops_per_step` (XLA's
count for the step as built with XLA's own dots, 0 for the pipeline), `peak_rss_mb`, `allocator` (the
malloc library the process has mapped: see vitdistill/allocator.py) and the device; a step also
`compile_s`, `gemm` (what runs the Dense products: `mkl` or `xla (why)`, see vitdistill/cpu_gemm.py),
`tflops_per_sec`, `matmul_peak_tflops` (a large matmul in the step's compute dtype through the same
library, timed in the same run) and `utilisation` (their ratio), and `device_peak_mb` where the backend
reports its memory.

`--compare` runs `shared/bench/torch_reference.py` (the same steps in PyTorch with timm's models, the
pipelines with torchvision and a DataLoader) for the same config, in turns with ours (`--rounds`, each
of `--steps` timed steps), and adds `torch_images_per_sec` and `ratio` (ours / PyTorch, the median of
the rounds' ratios, so a machine whose speed drifts still compares like with like).
"""
import dataclasses
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from vitdistill import allocator, cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file, configs/NAME.py[:ARG].", lock_config=False)
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps); the median is reported. Pipelines time "
                     "4x as many batches.", lower_bound=1)
flags.DEFINE_list("what", ["step", "pipeline"], "What to time: step, pipeline.")
flags.DEFINE_enum("data", "sample_images", ["sample_images", "config"],
                  "The pipeline's source: scikit-learn's two sample JPEGs (as the PyTorch reference), or the "
                  "config's own data.")
flags.DEFINE_bool("compare", False, "Also time shared/bench/torch_reference.py for the same config, in turns "
                  "with ours, and print the ratio.")
flags.DEFINE_integer("rounds", 5, "With --compare: turns of ours then PyTorch's; the ratio is their median.",
                     lower_bound=1)
flags.DEFINE_string("reference", None, "With --compare: the PyTorch reference script (default: "
                    "$VITDISTILL_TORCH_REFERENCE, else ../shared/bench/torch_reference.py beside the checkout).")
flags.DEFINE_integer("workers", 0, "With --compare: the reference pipeline's DataLoader workers (0: one per core, "
                     "as tf.data uses every core).", lower_bound=0)
flags.mark_flags_as_required(["config"])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def median_seconds(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_config(config, data: str = "sample_images"):
    """The config with benchmark data (sample images unless `data='config'`), and a random teacher
    unless one is given."""
    if data == "sample_images":
        config.data.source = "sample_images"
        config.data.train_limit = None
    from vitdistill.data import sources

    def cut(split):  # the evaluations' data is set up, never read: one batch, unless read in order (uncuttable)
        return None if sources.read_in_order(config.data, split) else config.batch_size

    config.data.eval_limit = cut(config.data.eval_split)
    if config.method == "deit":
        config.teacher.train = type(config.teacher.train)()
        if not config.teacher.checkpoint:
            config.teacher.checkpoint = "random"
    if config.method == "dino":
        config.knn.train_limit = cut(config.data.train_split)
        config.knn.eval_limit = cut(config.data.eval_split)
    return config


def matmul_peak_tflops(dtype) -> float:
    """TFLOP/s of a large square matmul in `dtype` on the first device: the peak the step's utilisation is
    measured against (the same machine, the same moment, the same library: `vitdistill.cpu_gemm`'s where the
    step's Dense layers use it: the native kernel's where `cpu_gemm.native_products()`, else MKL's)."""
    import jax

    from vitdistill import cpu_gemm

    size = 1024 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    matmul = jax.jit(lambda a, b: cpu_gemm.dot_general(a, b, (((1,), (0,)), ((), ()))))
    seconds = median_seconds(lambda: matmul(a, b).block_until_ready(), 5)
    return 2 * size**3 / seconds / 1e12


def device_peak_mb():
    """Peak device memory in use, where the backend reports it (GPU, TPU); None on the CPU."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return round(stats["peak_bytes_in_use"] / 2**20, 1) if "peak_bytes_in_use" in stats else None


class StepBench:
    """The loop's own jitted step (shardings, donation) on one device-resident random batch."""

    def __init__(self, task, config):
        import jax

        from vitdistill import cpu_gemm, models
        from vitdistill.data import pipeline
        from vitdistill.train import loop, sharding

        self.config = config
        mesh = sharding.make_mesh(config.get("mesh"))
        _, state_shardings = loop.state_layout(task, mesh, seed=0)
        self.state = loop.init_state(task, state_shardings, seed=0)
        self.frozen = loop.place_frozen(task, mesh)
        self.batch = sharding.to_global(pipeline.random_batch(task.data, config.batch_size), mesh)
        start = time.perf_counter()
        lowered = loop.jit_train_step(task, mesh, state_shardings, self.frozen).lower(self.state, self.batch,
                                                                                    self.frozen)
        self.compiled = lowered.compile()
        self.compile_s = time.perf_counter() - start
        cost = self.compiled.cost_analysis()
        if cpu_gemm.rows_enabled():
            # XLA counts no FLOPs inside custom calls: count the step as built with XLA's own dots (a new
            # partial, so that jit traces it afresh rather than reusing the trace above).
            with cpu_gemm.xla_dots():
                counting = dataclasses.replace(task, train_step=functools.partial(task.train_step))
                cost = loop.jit_train_step(counting, mesh, state_shardings, self.frozen).lower(
                    self.state, self.batch, self.frozen).cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float((cost or {}).get("flops", 0.0))
        self.peak = matmul_peak_tflops(models.compute_dtype(config.model.get("dtype", "float32")))
        self.device = str(jax.devices()[0].device_kind)

    def _run(self):
        import jax

        self.state, metrics = self.compiled(self.state, self.batch, self.frozen)
        jax.block_until_ready(metrics["loss"])

    def time(self, steps: int) -> float:
        return median_seconds(self._run, steps)

    def result(self, seconds: float) -> dict:
        import jax

        from vitdistill import cpu_gemm

        tflops = self.flops / seconds / 1e12
        config = self.config
        return {"what": f"{config.method}_train_step", "model": config.model.name, "batch": config.batch_size,
                "images_per_sec": config.batch_size / seconds, "step_ms": 1000 * seconds,
                "flops_per_step": self.flops, "tflops_per_sec": tflops, "matmul_peak_tflops": self.peak,
                "utilisation": tflops / self.peak, "compile_s": self.compile_s, "peak_rss_mb": peak_rss_mb(),
                "device_peak_mb": device_peak_mb(), "device": self.device, "devices": jax.device_count(),
                "allocator": allocator.in_use(), "gemm": cpu_gemm.status(),
                "native_isa": cpu_gemm.native_isa() if cpu_gemm.rows_enabled() else None}


class PipelineBench:
    """The tf.data pipeline alone; a fresh iterator per timing, so nothing runs between timings (a
    compared reference gets the machine to itself)."""

    def __init__(self, task, config):
        from vitdistill.data import pipeline

        self.config = config
        self.ds = pipeline.train_dataset(task.data.source, task.data.transform, seed=0,
                                         global_batch=config.batch_size, repeats=task.data.repeats,
                                         keep_partial=task.data.keep_partial)

    def time(self, steps: int) -> float:
        batches = self.ds.as_numpy_iterator()
        seconds = median_seconds(lambda: next(batches), 4 * steps)
        del batches
        return seconds

    def result(self, seconds: float) -> dict:
        config = self.config
        extra = {"n_local": config.multicrop.num_local} if config.method == "dino" else {}
        return {"what": f"pipeline_{config.method}", "batch": config.batch_size, **extra,
                "images_per_sec": config.batch_size / seconds, "step_ms": 1000 * seconds, "flops_per_step": 0,
                "peak_rss_mb": peak_rss_mb(), "cpus": os.cpu_count(), "allocator": allocator.in_use()}


def default_reference() -> str:
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.environ.get("VITDISTILL_TORCH_REFERENCE") or os.path.join(
        os.path.dirname(checkout), "shared", "bench", "torch_reference.py")


def reference_args(config, what: str, steps: int, workers: int) -> list:
    """torch_reference.py's arguments for the same measurement as ours; a ConfigError where it has none."""
    from vitdistill.errors import ConfigError

    batch = ["--batch", str(config.batch_size), "--steps", str(steps)]
    if what == "step" and config.method == "deit":
        if config.data.image_size != 224:
            raise ConfigError(f"--compare: the PyTorch reference trains at 224 px, this config at "
                              f"{config.data.image_size}; use --config.data.image_size=224")
        teacher = config.teacher.model if config.distill.kind != "none" else "none"
        return ["--what", "deit", "--model", config.model.name, "--teacher", teacher] + batch
    if what == "step" and config.method == "dino":
        mc = config.multicrop
        if (mc.global_size, mc.local_size) != (224, 96):
            raise ConfigError(f"--compare: the PyTorch reference's DINO step has 224-px global and 96-px local crops, "
                              f"this config {mc.global_size} and {mc.local_size}")
        return ["--what", "dino", "--dino_model", config.model.name, "--n_local", str(mc.num_local),
                "--out_dim", str(config.model.out_dim)] + batch
    if what == "pipeline" and config.method in ("deit", "dino"):
        local = ["--n_local", str(config.multicrop.num_local)] if config.method == "dino" else []
        return ["--what", f"pipeline_{config.method}", "--workers", str(workers)] + local + batch
    raise ConfigError(f"--compare: the PyTorch reference has no {what} for method {config.method!r} (it has DeiT's "
                      "and DINO's steps and pipelines)")


def run_reference(script: str, args: list) -> dict:
    """One run of the reference; its JSON line."""
    from vitdistill.errors import UserError

    done = subprocess.run([sys.executable, script] + args, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"the PyTorch reference failed ({script} {' '.join(args)}): {tail[0]}. It needs torch, "
                        "torchvision and timm: pip install -e '.[torch]'")
    return json.loads(lines[-1])


def compare(bench, config, what: str) -> dict:
    """Ours and the reference in turns, `FLAGS.rounds` times; ours' line with the reference's figures and the
    median ratio of the rounds."""
    from vitdistill.errors import UserError

    script = FLAGS.reference or default_reference()
    if not os.path.exists(script):
        raise UserError(f"--compare needs the PyTorch reference script, not found at {script}: pass "
                        "--reference=PATH/torch_reference.py or set VITDISTILL_TORCH_REFERENCE")
    args = reference_args(config, what, FLAGS.steps, FLAGS.workers or os.cpu_count())
    ours, theirs = [], []
    for _ in range(FLAGS.rounds):
        ours.append(bench.time(FLAGS.steps))
        theirs.append(run_reference(script, args)["images_per_sec"])
    seconds = statistics.median(ours)
    result = bench.result(seconds)
    ratios = [config.batch_size / s / t for s, t in zip(ours, theirs)]
    result.update(torch_images_per_sec=statistics.median(theirs), ratio=statistics.median(ratios),
                  ratio_min=min(ratios), ratio_max=max(ratios), rounds=FLAGS.rounds,
                  reference=" ".join(["python", os.path.basename(script)] + args))
    return result


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import tempfile

    from vitdistill import tf_import
    from vitdistill.errors import UserError

    tf = tf_import.tensorflow()

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import methods, small_data

    try:
        small_data.size_to_data(FLAGS.config)  # a small-data recipe, sized to its own data as a run would be
        config = bench_config(FLAGS.config, FLAGS.data)
        methods.check(config)  # the checks a run makes before it builds anything (batch size, the method's own)
        for what in FLAGS.what:
            if what not in ("step", "pipeline"):
                raise UserError(f"--what={what}: valid are step, pipeline")
            if FLAGS.compare:
                reference_args(config, what, FLAGS.steps, 1)  # refused before anything is built
        with tempfile.TemporaryDirectory() as workdir:
            task = methods.get(config.method).build_task(config, workdir)
            for what in FLAGS.what:
                bench = {"step": StepBench, "pipeline": PipelineBench}[what](task, config)
                result = compare(bench, config, what) if FLAGS.compare else bench.result(bench.time(FLAGS.steps))
                print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}),
                      flush=True)
                del bench
    except UserError as e:
        print(f"vitdistill.bench: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    allocator.reexec_under_tcmalloc()  # as vitdistill.main runs: see vitdistill/allocator.py
    app.run(main, flags_parser=lambda argv: cli.parse_flags(argv, "vitdistill.bench"))
