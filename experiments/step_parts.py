"""What the DeiT step does beyond the PyTorch reference's, and what each part costs on the CPU.

`shared/bench/torch_reference.py`'s DeiT step times the forward and backward pass, the loss and AdamW on a
random float batch. The loop's step (what `vitdistill.bench --compare` times) also normalises uint8 levels, fills
random-erasing boxes with noise, mixes the batch (mixup/cutmix), updates the model EMA and computes the logged
gradient, parameter and update norms. Each variant here removes one of those parts (`reference_work`: all of
them), so its saving is that part's cost in the step; the numbers change on purpose, so this times only.

    python experiments/step_parts.py [--configs=deit_s] [--turns=5] [--per_turn=3] [--out=FILE.json]

Variants are built as `vitdistill.bench.StepBench` builds the step (batch 4, benchmark data), compiled, then
run in turns (`--turns` turns of `--per_turn` steps); the medians of the turns are reported. Runs in a
one-device process (unset XLA_FLAGS' host device count).
"""
import os
import statistics
import tempfile

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = gemm_experiment.FLAGS
FLAGS.set_default("configs", ["deit_s"])
FLAGS.set_default("turns", 5)

# variant -> the parts it removes
VARIANTS = {"as_shipped": (), "no_norms": ("norms",), "no_erase": ("erase",), "no_mixing": ("mixing",),
            "no_ema": ("ema",), "reference_work": ("norms", "erase", "mixing", "ema")}


def build(module, parts: tuple):
    """The step of configs/`module` at batch 4 without `parts`, compiled."""
    import jax.numpy as jnp

    from vitdistill import bench, methods
    from vitdistill.data import pipeline
    from vitdistill.train import optim

    config = bench.bench_config(module.get_config(None))
    config.batch_size = 4
    if "mixing" in parts:
        config.mixup.update(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
    if "ema" in parts:
        config.model_ema_decay = 0.0
    patches = {(optim, "tree_l2_norm"): lambda tree: jnp.zeros((), jnp.float32)} if "norms" in parts else {}
    if "erase" in parts:  # a batch without erase boxes: the step fills none (train_images)
        random_batch = pipeline.random_batch
        patches[(pipeline, "random_batch")] = lambda *a, **k: {
            name: value for name, value in random_batch(*a, **k).items() if name != "erase"}
    return gemm_experiment.with_patches(
        patches, lambda: bench.StepBench(methods.get(config.method).build_task(config, tempfile.mkdtemp()), config))


def main(argv):
    del argv
    gemm_experiment.require(lambda cpu_gemm: True, "")
    from vitdistill import cpu_gemm

    results = {"gemm": cpu_gemm.status(), "turns": FLAGS.turns, "steps_per_turn": FLAGS.per_turn, "batch": 4,
               "cpus": os.cpu_count(), "configs": {}}
    for name in FLAGS.configs:
        module = gemm_experiment.config_module(name)
        benches = {variant: build(module, parts) for variant, parts in VARIANTS.items()}
        rounds = gemm_experiment.turns_ms(benches, FLAGS.turns, FLAGS.per_turn)
        medians = {k: statistics.median(v) for k, v in rounds.items()}
        full = medians["as_shipped"]
        print(f"{name} ({cpu_gemm.status()}): " + "; ".join(
            f"{k} {v:.1f} ms ({100 * (full - v) / full:+.1f} % saved; turns {', '.join(f'{x:.0f}' for x in rounds[k])})"
            for k, v in medians.items()), flush=True)
        results["configs"][name] = {"median_ms": medians, "turns_ms": rounds}
    gemm_experiment.write_out(results)


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
