"""DeiT-S's Dense products on the CPU: XLA's dots against MKL's through vitdistill.cpu_gemm, with PyTorch's
(MKL as well) for reference, then the train steps built each way, in turns in one process.

    python experiments/cpu_gemm.py [--turns=5] [--per_turn=3] [--configs=deit_s,deit_s_distilled,dino_vits16]
        [--out=experiments/results/cpu_gemm.json]

Products: per Dense layer of a block (qkv, proj, fc1, fc2 over the 788 tokens of a batch of 4), the forward
product x w, and the two gradient products ȳ wᵀ and xᵀ ȳ, each jitted alone, medians of 30 calls. Steps: the
loop's jitted step (vitdistill.bench.StepBench) at batch 4, one built with `VITDISTILL_CPU_GEMM=xla` and one
with MKL, timed in turns (`--turns` turns of `--per_turn` steps each); medians of the rounds' medians.
Runs in a one-device process (unset XLA_FLAGS' host device count).
"""
import importlib
import json
import os
import statistics
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_integer("turns", 5, "Turns of the two steps.")
flags.DEFINE_integer("per_turn", 3, "Timed steps per turn.")
flags.DEFINE_list("configs", ["deit_s", "deit_s_distilled", "dino_vits16"], "configs/NAME.py to build steps of.")
flags.DEFINE_string("out", None, "Write the results here as JSON.")

ROWS = 788  # 4 images x 197 tokens
SHAPES = {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)}


def median_ms(fn, calls=30):
    from vitdistill import bench

    return 1000 * bench.median_seconds(fn, calls, warmup=3)


def products():
    import jax
    import numpy as np
    import torch

    from vitdistill import cpu_gemm

    rng = np.random.default_rng(0)
    rows = {}
    for name, (cin, cout) in SHAPES.items():
        x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((ROWS, cin), (cin, cout), (ROWS, cout)))
        forms = {
            "forward": ((x, w), lambda a, b: a @ b, lambda a, b: cpu_gemm._gemm(a, b), lambda a, b: a @ b),
            "input_grad": ((g, w), lambda a, b: a @ b.T, lambda a, b: cpu_gemm._gemm(a, b, tb=True),
                           lambda a, b: a @ b.t()),
            "weight_grad": ((x, g), lambda a, b: a.T @ b, lambda a, b: cpu_gemm._gemm(a, b, ta=True),
                            lambda a, b: a.t() @ b),
        }
        for form, (args, xla_fn, mkl_fn, torch_fn) in forms.items():
            jargs = [jax.numpy.asarray(a) for a in args]
            targs = [torch.from_numpy(a) for a in args]
            xla_j, mkl_j = jax.jit(xla_fn), jax.jit(mkl_fn)
            rows[f"{name}_{form}"] = {
                "xla_ms": median_ms(lambda: xla_j(*jargs).block_until_ready()),
                "mkl_ms": median_ms(lambda: mkl_j(*jargs).block_until_ready()),
                "torch_ms": median_ms(lambda: torch_fn(*targs)),
                "max_abs_difference": float(np.abs(np.asarray(xla_j(*jargs)) - np.asarray(mkl_j(*jargs))).max()),
            }
            print(f"{name:4s} {form:11s} " + " ".join(f"{k} {v:.3g}" for k, v in rows[f"{name}_{form}"].items()),
                  flush=True)
    totals = {k: sum(r[k] for r in rows.values()) for k in ("xla_ms", "mkl_ms", "torch_ms")}
    print("a block's products: " + ", ".join(f"{k} {v:.2f}" for k, v in totals.items()), flush=True)
    return {"rows": rows, "block_totals": totals}


def config_module(name):
    """configs/NAME.py as a module."""
    sys.path.insert(0, os.path.join(ROOT, "configs"))
    return importlib.import_module(name)


def step_bench(module):
    """The loop's step for the config `module` at batch 4, on benchmark data, compiled (as traced now)."""
    from vitdistill import bench, methods

    config = bench.bench_config(module.get_config(None))
    config.batch_size = 4
    return bench.StepBench(methods.get(config.method).build_task(config, tempfile.mkdtemp()), config)


def with_patches(patches: dict, build):
    """build() with each (object, attribute name) of `patches` set to its value, restored after: the
    experiments' "before" builds (an empty dict: as shipped)."""
    saved = {key: getattr(*key) for key in patches}
    for (owner, name), value in patches.items():
        setattr(owner, name, value)
    try:
        return build()
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


def step_bench_with(module, patches: dict):
    """`step_bench(module)` traced under `with_patches(patches, ...)`."""
    return with_patches(patches, lambda: step_bench(module))


def custom_calls_in_use(cpu_gemm) -> bool:
    """`require`'s test for the scripts that compare the custom calls (native or MKL's) with what they replace."""
    return not cpu_gemm.status().startswith("xla")


def require(ok, what: str):
    """Hides TensorFlow's GPUs (the steps run on the CPU) and exits naming `what` and vitdistill.cpu_gemm's
    status unless ok(cpu_gemm)."""
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    from vitdistill import cpu_gemm

    if not ok(cpu_gemm):
        sys.exit(f"{what}: {cpu_gemm.status()}")


def turns_ms(benches: dict, turns: int, per_turn: int) -> dict:
    """Each StepBench timed in turns, `turns` times: name -> the turns' median milliseconds."""
    rounds = {name: [] for name in benches}
    for _ in range(turns):
        for name, step in benches.items():
            rounds[name].append(1000 * step.time(per_turn))
    return rounds


def wall_and_cpu_turns(benches: dict, turns: int, per_turn: int) -> dict:
    """Each StepBench's steps timed in turns (`turns` turns of `per_turn` steps, after two untimed): name ->
    {"wall_ms": [...], "cpu_ms": [...]}, each step's wall time and this process's CPU time. On a shared, noisy host
    the CPU time a step takes varies less than its wall time."""
    times = {name: {"wall_ms": [], "cpu_ms": []} for name in benches}
    for step in benches.values():
        step._run(), step._run()
    for _ in range(turns):
        for name, step in benches.items():
            for _ in range(per_turn):
                wall, cpu = time.perf_counter(), time.process_time()
                step._run()
                times[name]["wall_ms"].append(1000 * (time.perf_counter() - wall))
                times[name]["cpu_ms"].append(1000 * (time.process_time() - cpu))
    return times


def calls_in_turns(forms: dict, turns: int, calls: int) -> dict:
    """Each zero-argument function of `forms` timed in turns, `turns` times (each its result waited for):
    name -> the turns' median milliseconds of `calls` calls."""
    import jax

    rounds = {name: [] for name in forms}
    for _ in range(turns):
        for name, call in forms.items():
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(call())
                times.append(time.perf_counter() - start)
            rounds[name].append(1000 * statistics.median(times))
    return rounds


def turns_line(rounds: dict, digits: int = 1) -> str:
    """"<name> <median> ms (turns ...)" for each of `rounds` (name -> milliseconds a turn), joined by "; on "."""
    return "; on ".join(f"{k} {statistics.median(v):.{digits}f} ms (turns {', '.join(f'{x:.{digits}f}' for x in v)})"
                        for k, v in rounds.items())


def ab_steps(before_patches, before: str, after: str, what: str):
    """For each of --configs, the step traced under `with_patches(before_patches(), ...)` (named `before`) and the
    step as shipped (`after`), timed in turns; prints one line each: "<config>: <what> on <before> ... ms; on
    <after> ... ms"."""
    patches = before_patches()
    for name in FLAGS.configs:
        module = config_module(name)
        rounds = turns_ms({before: step_bench_with(module, patches), after: step_bench(module)}, FLAGS.turns,
                          FLAGS.per_turn)
        print(name + f": {what} on " + turns_line(rounds), flush=True)


def steps(config_name):
    module = config_module(config_name)
    benches = {}
    for choice in ("xla", "auto"):
        os.environ["VITDISTILL_CPU_GEMM"] = choice  # read when the step is traced, in StepBench
        benches[choice] = step_bench(module)
    os.environ.pop("VITDISTILL_CPU_GEMM")
    rounds = turns_ms(benches, FLAGS.turns, FLAGS.per_turn)
    result = {"xla_ms": statistics.median(rounds["xla"]), "mkl_ms": statistics.median(rounds["auto"]),
              "rounds_xla_ms": rounds["xla"], "rounds_mkl_ms": rounds["auto"]}
    print(f"{config_name}: step {result['xla_ms']:.1f} ms with XLA's dots, {result['mkl_ms']:.1f} with MKL's "
          f"({result['xla_ms'] / result['mkl_ms']:.3f}x)", flush=True)
    return result


def main(argv):
    del argv
    require(custom_calls_in_use, "The custom calls are not in use here")
    results = {"products": products(), "steps": {name: steps(name) for name in FLAGS.configs},
               "rounds": FLAGS.turns, "steps_per_round": FLAGS.per_turn, "batch": 4, "cpus": os.cpu_count()}
    write_out(results)


def write_out(results: dict):
    """`results` as JSON to --out, where given."""
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)


def run_on_one_device(main):
    """app.run(main) in a one-device process: XLA_FLAGS' host device count unset before JAX starts."""
    os.environ.pop("XLA_FLAGS", None)
    app.run(main)


if __name__ == "__main__":
    run_on_one_device(main)
