"""Throughput of a config's train step and input pipeline, one JSON object per line.

    python -m vitdistill.bench --config=configs/deit_s_distilled.py [--config.KEY=VALUE ...] [--steps=N]

`{method}_train_step`: the jitted step alone on device-resident random batches (the model, loss,
optimiser and, for DeiT, the frozen teacher; a teacher without a checkpoint is randomly initialised).
`pipeline_{method}`: the tf.data pipeline alone (decode + the config's augmentations), fed by
scikit-learn's two sample JPEGs as PyTorch's reference pipeline is. Every line carries `what`,
`images_per_sec` (source images), `step_ms` (median), `flops_per_step` (XLA's count for the step,
0 for the pipeline), `peak_rss_mb`, and the device. Compare with `shared/bench/torch_reference.py`
on the same machine, as ratios.
"""
import json
import os
import resource
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file, configs/NAME.py[:ARG].", lock_config=False)
flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps); the median is reported.")
flags.DEFINE_list("what", ["step", "pipeline"], "What to time: step, pipeline.")
flags.DEFINE_enum("data", "sample_images", ["sample_images", "config"],
                  "The pipeline's source: scikit-learn's two sample JPEGs (as the PyTorch reference), or the "
                  "config's own data.")
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
    config.data.eval_limit = config.batch_size
    if config.method == "deit":
        config.teacher.train = type(config.teacher.train)()
        if not config.teacher.checkpoint:
            config.teacher.checkpoint = "random"
    if config.method == "dino":
        config.knn.train_limit = config.batch_size
        config.knn.eval_limit = config.batch_size
    return config


def bench_step(task, config) -> dict:
    """The loop's own jitted step (shardings, donation) on one device-resident random batch, timed."""
    import jax

    from vitdistill.data import pipeline
    from vitdistill.train import loop, sharding

    mesh = sharding.make_mesh(config.get("mesh"))
    _, state_shardings = loop.state_layout(task, mesh, seed=0)
    state = loop.init_state(task, state_shardings, seed=0)
    frozen = loop.place_frozen(task, mesh)
    batch = sharding.to_global(pipeline.random_batch(task.data, config.batch_size), mesh)
    compiled = loop.jit_train_step(task, mesh, state_shardings, frozen).lower(state, batch, frozen).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, frozen)
        jax.block_until_ready(metrics["loss"])

    seconds = median_seconds(run, FLAGS.steps)
    return {"what": f"{config.method}_train_step", "model": config.model.name, "batch": config.batch_size,
            "images_per_sec": config.batch_size / seconds, "step_ms": 1000 * seconds, "flops_per_step": flops,
            "tflops_per_sec": flops / seconds / 1e12, "peak_rss_mb": peak_rss_mb(),
            "device": str(jax.devices()[0].device_kind), "devices": jax.device_count()}


def bench_pipeline(task, config) -> dict:
    from vitdistill.data import pipeline

    ds = pipeline.train_dataset(task.data.source, task.data.transform, seed=0, global_batch=config.batch_size,
                                repeats=task.data.repeats)
    batches = ds.as_numpy_iterator()
    seconds = median_seconds(lambda: next(batches), 4 * FLAGS.steps)
    extra = {"n_local": config.multicrop.num_local} if config.method == "dino" else {}
    return {"what": f"pipeline_{config.method}", "batch": config.batch_size, **extra,
            "images_per_sec": config.batch_size / seconds, "step_ms": 1000 * seconds, "flops_per_step": 0,
            "peak_rss_mb": peak_rss_mb(), "cpus": os.cpu_count()}


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    import tempfile

    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import methods

    config = bench_config(FLAGS.config, FLAGS.data)
    with tempfile.TemporaryDirectory() as workdir:
        task = methods.get(config.method).build_task(config, workdir)
        for what in FLAGS.what:
            result = {"step": bench_step, "pipeline": bench_pipeline}[what](task, config)
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}),
                  flush=True)


if __name__ == "__main__":
    app.run(main)
