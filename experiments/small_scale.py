"""Regenerates the README's small-scale tables and figures in one command:

    python experiments/small_scale.py --root=/tmp/vitdistill/small_scale

1. The DINO quick start (`configs/dino_quickstart.py`, digits): its k-NN table and its curves
   (`docs/figures/curves_dino_quickstart.png`).
2. DeiT's distillation ablation on Fashion-MNIST (`experiments/deit_fashion_mnist.py`): the table.
3. DINO on Fashion-MNIST (`experiments/dino_fashion_mnist.py --epochs=1.5`): k-NN, logistic regression and SGD linear probe against
   the network at initialisation and raw pixels, and the run's curves (`docs/figures/curves_dino_fashion_mnist.png`).
4. The small-data recipes on three data sets (`experiments/small_data_table.py`): the table.
5. The attention maps (`experiments/attention_figures.py`): a converted DINO ViT-S/16 and the quick start's
   teacher (`docs/figures/attention_*.png`).

Every table goes into `experiments/results/small_scale.md` with the commit and each part's wall time; the
README's tables are those. Re-running resumes every training run (finished ones only evaluate). Needs
`apt-get install dataset-fashion-mnist` and the torch extra; about 4 hours on 2 CPU cores. `--max_steps=N`
cuts every run short (a smoke test) and then writes under --root only, never into the repository.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: list[str], log: str) -> str:
    """Runs one part, its output teed to `log`; returns its standard output. A failing part stops all."""
    print("+", " ".join(command), flush=True)
    with open(log, "w") as f:
        process = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(process.stdout)
    if process.returncode != 0:
        sys.exit(f"{command[1]} failed (exit {process.returncode}); its output is in {log}")
    return process.stdout


def table_of(stdout: str) -> str:
    """The last Markdown table a run printed, with its title line."""
    lines = stdout.splitlines()
    end = max(i for i, line in enumerate(lines) if line.startswith("|"))
    start = end
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    title = [lines[start - 1]] if start > 0 and not lines[start - 1].startswith("+") else []
    return "\n".join(title + lines[start:end + 1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/vitdistill/small_scale", help="where the runs live")
    parser.add_argument("--max_steps", type=int, default=None, help="cut every run short (a smoke test)")
    args = parser.parse_args()
    smoke = args.max_steps is not None
    os.makedirs(args.root, exist_ok=True)
    figures = os.path.join(args.root, "figures") if smoke else os.path.join(ROOT, "docs", "figures")
    report = os.path.join(args.root, "small_scale.md") if smoke else os.path.join(ROOT, "experiments", "results",
                                                                                 "small_scale.md")
    os.makedirs(figures, exist_ok=True)
    cut = [f"--max_steps={args.max_steps}"] if smoke else []
    python = sys.executable
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "?"
    sections, seconds = [], {}

    def part(name, command):
        start = time.time()
        stdout = run(command, os.path.join(args.root, f"{name}.log"))
        seconds[name] = time.time() - start
        return stdout

    quick = os.path.join(args.root, "dino_quickstart")
    stdout = part("dino_quickstart", [python, "-m", "vitdistill.main", "--config=configs/dino_quickstart.py",
                                         f"--workdir={quick}", "--config.progress_bar=False"]
                  + ([f"--config.max_steps={args.max_steps}"] if smoke else []))
    sections.append(("DINO quick start (digits)", table_of(stdout)))
    shutil.copy(os.path.join(quick, "curves.png"), os.path.join(figures, "curves_dino_quickstart.png"))

    deit = os.path.join(args.root, "deit_fashion_mnist")
    part("deit_fashion_mnist", [python, "experiments/deit_fashion_mnist.py", f"--workdir={deit}"] + cut)
    with open(os.path.join(deit, "results.json")) as f:
        sections.append(("DeiT distillation on Fashion-MNIST", json.load(f)["table"]))

    dino = os.path.join(args.root, "dino_fashion_mnist")
    # The README's run: 1.5 of the config's 4.5 epochs (what fits a session on 2 cores); the script's probes
    part("dino_fashion_mnist", [python, "experiments/dino_fashion_mnist.py", f"--workdir={dino}", "--epochs=1.5"]
         + cut + (["--probe_epochs=0.1"] if smoke else []))
    with open(os.path.join(dino, "results.json")) as f:
        sections.append(("DINO on Fashion-MNIST", json.load(f)["table"]))
    shutil.copy(os.path.join(dino, "curves.png"), os.path.join(figures, "curves_dino_fashion_mnist.png"))

    table = os.path.join(args.root, "small_data_table")
    part("small_data_table", [python, "experiments/small_data_table.py", f"--root={table}"] + cut)
    with open(os.path.join(table, "table.md")) as f:
        sections.append(("Small data sets: one recipe per method, sized to the data", f.read().strip()))

    part("attention_figures", [python, "experiments/attention_figures.py", f"--dino_workdir={quick}",
                               f"--out={figures}"])

    note = f", a smoke run: every run cut at {args.max_steps} steps" if smoke else ""
    times = ", ".join(f"{name} {s / 60:.1f} min" for name, s in seconds.items())
    lines = [f"# Small-scale results (commit {commit}{note})", "",
             f"Regenerated by `python experiments/small_scale.py`; wall time per part on this machine: {times}.", ""]
    for title, table in sections:
        lines += [f"## {title}", "", table, ""]
    lines += ["Figures: " + ", ".join(sorted(name for name in os.listdir(figures) if name.endswith(".png")))
              + f" in {os.path.relpath(figures, ROOT) if not smoke else figures}.", ""]
    with open(report, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
