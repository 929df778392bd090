"""XLA:CPU flags against the default, on one train step, in turns: which of the CPU compiler's options speed it up.

    python experiments/xla_cpu_flags.py --rounds=3 --out=experiments/results/xla_cpu_flags.json

Each variant is a separate `python -m vitdistill.bench --what=step` process (XLA_FLAGS is read once, when the
backend starts), run in turns with the default (round 1: every variant, round 2: every variant, ...), so the
machine's drift falls on all of them alike. Reported per variant: the median of its rounds' step times and the
median of its per-round ratio to the default's step time of the same round (> 1: faster than the default).
The variants are the flags this jaxlib has that were not tried before (the measurement diary,
experiments/results/README.md, names those that were: oneDNN matmuls, XNNPACK fusions): AVX-512 vectors for the
emitted loops (this machine has AVX-512 and the compiler prefers 256-bit vectors), the concurrency-optimised
scheduler (the thunk executor runs independent operations at once, the small ops XLA:CPU leaves on one core),
YNNPACK fusions, and fast math (numerics change: for the record only, not for adoption).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "default": "",
    "vector_width_512": "--xla_cpu_prefer_vector_width=512",
    "concurrency_scheduler": "--xla_cpu_enable_concurrency_optimized_scheduler=true",
    "ynn_fusions": "--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce",
    "fast_math": "--xla_cpu_enable_fast_math=true",
    # Added 2026-12-05 (second batch): the compiler's runtime-first preset, the experimental tiling propagation
    # of its tiled fusion emitter, and the older (pre-MLIR) fusion emitters in place of the new ones.
    "opt_preset_fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "tiling_propagation": "--xla_cpu_experimental_enable_tiling_propagation=true",
    "fusion_emitters_off": "--xla_cpu_use_fusion_emitters=false",
    # Added 2026-12-06 (third batch): oneDNN's fusions, which `--xla_cpu_use_onednn=true` alone does not turn on
    # (the dots stay YNNPACK fusions; with a fusion type they become `onednn_fusion`s), and the memory-optimised
    # scheduler.
    "onednn_dot": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot",
    "onednn_dot_eltwise": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise",
    "onednn_dot_eltwise_reduce":
        "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "memory_scheduler": "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED",
    # Added 2026-12-07: no YNNPACK fusions at all (jaxlib 0.10.2 sends reductions to YNNPACK by default: the step's
    # 155 squared-norm reductions of the logged grad / param / update norms ran as ynn_fusions, 13 ms a step on an
    # Intel host), and YNNPACK for dots only.
    "ynn_none": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=dot",
}


def one(flags: str, config_args: list, steps: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags])))
    out = subprocess.run([sys.executable, "-m", "vitdistill.bench", *config_args, "--what=step", f"--steps={steps}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not rows:
        return {"error": (out.stderr or out.stdout)[-600:]}
    return rows[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/deit_s_distilled.py")
    parser.add_argument("--overrides", default="--config.distill.kind=none --config.batch_size=4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    config_args = [f"--config={args.config}", *args.overrides.split()]
    names = args.variants.split(",")
    if names[0] != "default":
        names = ["default"] + [n for n in names if n != "default"]
    times = {n: [] for n in names}
    ratios = {n: [] for n in names}
    errors = {}
    for r in range(args.rounds):
        this_round = {}
        for name in names:
            row = one(VARIANTS[name], config_args, args.steps)
            if "error" in row:
                errors[name] = row["error"]
                print(f"round {r + 1} {name}: failed: {row['error'][-300:]}", flush=True)
                continue
            this_round[name] = row["step_ms"]
            times[name].append(row["step_ms"])
            print(f"round {r + 1} {name}: {row['step_ms']:.1f} ms", flush=True)
        for name, ms in this_round.items():
            if "default" in this_round:
                ratios[name].append(this_round["default"] / ms)
    result = {"config": config_args, "steps": args.steps, "rounds": args.rounds,
              "variants": {n: {"flags": VARIANTS[n], "step_ms": times[n],
                               "median_ms": statistics.median(times[n]) if times[n] else None,
                               "speedup_vs_default": statistics.median(ratios[n]) if ratios[n] else None}
                           for n in names},
              "errors": errors}
    for n in names:
        v = result["variants"][n]
        if v["median_ms"] is not None:
            print(f"{n:24s} {v['median_ms']:8.1f} ms  x{v['speedup_vs_default']:.3f} vs default")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
