"""Training curves (`python -m vitdistill.plot`, and curves.png at the end of every run): what is drawn is
what metrics.jsonl holds."""
import json

import numpy as np
import pytest
from PIL import Image

from vitdistill import plot


def _write(workdir, rows):
    with open(workdir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row, allow_nan=True) + "\n")
        f.write('{"step": 9, "split": "tr')  # a line cut by a crash


def test_the_panels_hold_the_logged_values_and_the_png_is_written(tmp_path, capsys):
    rows = [{"step": s, "split": "train", "loss": 6.0 - s, "lr": 1e-3 * s, "teacher_entropy": 2.0 + s,
             "teacher_marginal_entropy": 5.0, "grad_norm": 3.0} for s in (1, 2, 3)]
    rows.append({"step": 2, "split": "train", "loss": 4.5, "lr": 2e-3})  # a resumed run logs step 2 again
    rows.append({"step": 4, "split": "train", "loss": float("nan"), "lr": 4e-3})
    rows += [{"step": 3, "split": "eval", "knn_top1": 0.4, "knn_top5": 0.8}, {"step": 4, "split": "eval",
                                                                             "knn_top1": 0.5}]
    _write(tmp_path, rows)
    panels = plot.series(plot.read_metrics(str(tmp_path)))
    assert "not JSON" in capsys.readouterr().err
    assert panels["training loss"] == {"loss": ([1, 2, 3], [5.0, 4.5, 3.0])}  # last value per step, NaN dropped
    assert panels["learning rate"]["lr"] == ([1, 2, 3, 4], [1e-3, 2e-3, 3e-3, 4e-3])
    assert panels["evaluation"] == {"knn_top1": ([3, 4], [0.4, 0.5])}
    assert set(panels["teacher output (DINO)"]) == {"teacher_entropy", "teacher_marginal_entropy"}
    assert plot.main([f"--workdir={tmp_path}"]) == 0
    image = np.asarray(Image.open(tmp_path / "curves.png"))
    assert image.shape[1] > 4 * 300 and image.std() > 10  # four panels, not a blank canvas


def test_a_workdir_without_metrics_is_named(tmp_path, capsys):
    assert plot.main([f"--workdir={tmp_path}"]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err
    with pytest.raises(Exception, match="nothing|no finite"):
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "split": "train", "grad_norm": 1.0}\n')
        plot.plot(str(tmp_path))


def test_dinos_panel_draws_log_k_and_the_levels_the_warnings_use(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline",
                        lambda self, y=0, *a, **k: drawn.append((k.get("label"), y)) or original(self, y, *a, **k))
    _write(tmp_path, [{"step": s, "split": "train", "loss": 6.0, "teacher_entropy": 4.0,
                       "teacher_marginal_entropy": 3.0} for s in (1, 2)])
    (tmp_path / "config.json").write_text(json.dumps({"model": {"out_dim": 1024}, "batch_size": 64}))
    assert plot.main([f"--workdir={tmp_path}"]) == 0
    assert dict(drawn) == pytest.approx({"log K": np.log(1024), "row entropy: uniform warning": 0.75 * np.log(1024),
                                         "marginal: few-outputs warning": np.log(64 / 16)})
