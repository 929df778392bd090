"""Training curves of a workdir, drawn from its `metrics.jsonl`:

    python -m vitdistill.plot --workdir=DIR [--output=DIR/curves.png]

One PNG with a panel for each group that the run logged: the training loss (and its parts), the
learning rate, the evaluations over steps (top-1 / k-NN top-1 per head or k), and DINO's teacher
diagnostics (row entropy and marginal entropy of the teacher's output, against log K when the run
logged it). Runs write it at their end too (`curves.png` in the workdir).
"""
from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

from vitdistill.errors import DataError

CURVES_FILE = "curves.png"
# panel title -> (split, predicate on a metric name)
PANELS = (
    ("training loss", "train", lambda k: k == "loss" or k.startswith("loss_")),
    ("learning rate", "train", lambda k: k == "lr"),
    ("evaluation", "eval", lambda k: k.startswith(("top1", "knn_top1", "ema_top1"))),
    ("teacher output (DINO)", "train", lambda k: k in ("teacher_entropy", "teacher_marginal_entropy")),
)


def read_metrics(workdir: str) -> list[dict]:
    from tensorflow.io import gfile

    path = os.path.join(workdir, "metrics.jsonl")
    if not gfile.exists(path):
        raise DataError(f"{workdir} has no metrics.jsonl: pass the --workdir of a vitdistill run")
    rows = []
    with gfile.GFile(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut by a crash: the rest still plots
                    print(f"warning: {path}:{number} is not JSON; skipped", file=sys.stderr)
    return rows


def series(rows: list[dict]) -> dict:
    """{panel title: {metric: ([steps], [values])}}: what `plot` draws, finite values only; a resumed run's
    repeated steps keep their last value."""
    panels = {}
    for title, split, wanted in PANELS:
        curves = {}
        for row in rows:
            if row.get("split") != split:
                continue
            for key, value in row.items():
                if key in ("step", "split") or not wanted(key) or not isinstance(value, (int, float)):
                    continue
                if math.isfinite(value):
                    curves.setdefault(key, {})[int(row["step"])] = float(value)
        if curves:
            panels[title] = {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in sorted(curves.items())}
    return panels


def plot(workdir: str, output: Optional[str] = None, *, out_dim: Optional[int] = None,
         global_batch: Optional[int] = None) -> str:
    """Writes the curves PNG (default `workdir/curves.png`); returns its path. With `out_dim` (and
    `global_batch`) DINO's panel draws log K and the levels at which train/diagnostics.py warns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorflow.io import gfile

    panels = series(read_metrics(workdir))
    if not panels:
        raise DataError(f"{workdir}/metrics.jsonl has no finite loss, lr or evaluation values to plot yet")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, curves) in zip(axes[0], panels.items()):
        for name, (steps, values) in curves.items():
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=name)
        if title == "teacher output (DINO)" and out_dim:
            from vitdistill.train import diagnostics

            log_k = math.log(out_dim)
            ax.axhline(log_k, color="grey", linestyle="--", linewidth=1, label="log K")
            ax.axhline(diagnostics.UNIFORM_SHARE * log_k, color="tab:red", linestyle=":", linewidth=1,
                       label="row entropy: uniform warning")
            if global_batch:
                floor = diagnostics.few_outputs_floor(out_dim, global_batch)
                ax.axhline(math.log(floor), color="tab:purple", linestyle=":", linewidth=1,
                           label="marginal: few-outputs warning")
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    output = output or os.path.join(workdir, CURVES_FILE)
    with gfile.GFile(output, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return output


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vitdistill.plot", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output", default=None, help="the PNG to write (default: WORKDIR/curves.png)")
    args = parser.parse_args(argv)
    out_dim = global_batch = None
    config = os.path.join(args.workdir, "config.json")
    if os.path.exists(config):
        with open(config) as f:
            saved = json.load(f)
        out_dim, global_batch = saved.get("model", {}).get("out_dim"), saved.get("batch_size")
    try:
        print(f"wrote {plot(args.workdir, args.output, out_dim=out_dim, global_batch=global_batch)}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
