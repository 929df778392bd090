"""launch/colab.ipynb runs end to end on CPU: every code cell but the `# colab-only` ones (clone, install)
runs in one fresh process with SMOKE on (a few steps per run), in a copy of the repository; no cell is
commented out, and the runs land in the notebook's RUNS folder."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab.ipynb")


def _cells():
    with open(NOTEBOOK) as f:
        return [("".join(c["source"]), c.get("outputs", [])) for c in json.load(f)["cells"] if c["cell_type"] == "code"]


def test_every_cell_is_live_code():
    for source, outputs in _cells():
        code_lines = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        assert code_lines, f"a cell with no live code:\n{source}"
        assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines()), source
        assert outputs == []  # committed without outputs


def test_the_notebook_runs_on_cpu(tmp_path):
    script = "\n\n".join(source for source, _ in _cells() if not source.startswith("# colab-only"))
    (tmp_path / "notebook.py").write_text(script + "\nprint('NOTEBOOK-DONE', RUNS)\n")
    env = dict(os.environ, VITDISTILL_NOTEBOOK_SMOKE="1", VITDISTILL_RUNS=str(tmp_path / "runs"), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    run = subprocess.run([sys.executable, str(tmp_path / "notebook.py")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    done = [line for line in run.stdout.splitlines() if line.startswith("NOTEBOOK-DONE")]
    runs = done[0].split(" ", 1)[1]
    assert runs == str(tmp_path / "runs")
    assert "k-NN top-1 on digits test:" in run.stdout
    assert "loaded the teacher of the training workdir" in run.stdout
    assert "attention maps (8, 4, 4, 4) labels" in run.stdout  # vit_micro at 16 px: 4 heads, 4 x 4 patches
    assert os.path.isdir(os.path.join(runs, "quickstart", "checkpoints"))
    assert os.path.isdir(os.path.join(runs, "dino_short", "checkpoints"))
