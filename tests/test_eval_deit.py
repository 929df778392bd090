"""configs/eval_deit.py: the top-1 of a converted official-layout distilled DeiT, nothing trained, per head
(class token, distillation token, and their average, DeiT's eval forward) equals what the same weights in
timm's VisionTransformerDistilled score on the same preprocessed images, image by image."""
import os

import numpy as np
import pytest
import tensorflow as tf

from test_convert import REPO, needs_torch, run_convert
from test_linear import _colour_folder
from vitdistill import methods
from vitdistill.data import deit_transforms, sources

try:
    import timm.models.deit
    import torch
except ImportError:
    torch = None


def _config(arg):
    from vitdistill import recipes

    return recipes.from_file(os.path.join(REPO, "configs", "eval_deit.py"), arg)


@needs_torch
def test_three_heads_of_a_converted_distilled_deit_score_as_timms_forward(tmp_path, capsys):
    _colour_folder(tmp_path / "data")
    source = sources.image_folder(str(tmp_path / "data"), "val")
    images, labels = [], []
    for i in range(source.num_examples):  # the eval transform, image by image
        example = source.load(tf.constant(i, tf.int64))
        images.append(deit_transforms.eval_transform(example["image"], size=32, crop_pct=1.0).numpy())
        labels.append(int(example["label"]))
    batch, labels = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2)), np.asarray(labels)

    torch.manual_seed(0)
    reference = timm.models.deit.VisionTransformerDistilled(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=4).eval()
    # Heads that disagree by clear margins, fitted by least squares (129 features, 32 images: exactly): the
    # class head onto the labels; the distillation head onto a wrong class, twice as strong, for class 0 (the
    # average is wrong too), half as strong for class 1 (the average stays right), the labels elsewhere.
    # Expected: class 100 %, distillation 50 %, average 75 %.
    onehot = torch.eye(4)[torch.from_numpy(labels)]
    wrong = torch.eye(4)[torch.from_numpy((labels + 1) % 4)]
    scale = torch.from_numpy(np.select([labels == 0, labels == 1], [2.0, 0.5], 1.0)).float()[:, None]
    dist_targets = torch.where(torch.from_numpy(labels < 2)[:, None], scale * wrong, onehot)
    with torch.no_grad():
        tokens = reference.forward_features(batch)
        for head, position, targets in ((reference.head, 0, onehot), (reference.head_dist, 1, dist_targets)):
            features = torch.cat([tokens[:, position], torch.ones(len(labels), 1)], dim=1).double()
            solution = torch.linalg.lstsq(features, targets.double()).solution.float()
            head.weight.copy_(solution[:-1].T)
            head.bias.copy_(solution[-1])
    torch.save({"model": reference.state_dict()}, tmp_path / "deit.pth")
    run_convert(f"--checkpoint={tmp_path / 'deit.pth'}", "--model=deit_micro_distilled_patch4_32",
                f"--output={tmp_path / 'converted'}")

    config = _config("deit_micro_distilled_patch4_32")
    config.model.init_from = str(tmp_path / "converted")
    config.data.source = "folder"
    config.data.data_dir = str(tmp_path / "data")
    config.data.eval_split = "val"
    config.data.image_size = 32
    config.data.crop_pct = 1.0
    config.augment.crop = "resized"  # 16-px images resized, as above (DeiT's rule at 32 px takes 32 x 32 as they are)
    config.batch_size = 8
    config.progress_bar = False
    assert config.data.train_split == "val"  # follows eval_split: only the evaluated split is read
    final = methods.train_and_evaluate(config, str(tmp_path / "run"))

    with torch.no_grad():
        tokens = reference.forward_features(batch)
        cls, dist = reference.head(tokens[:, 0]).numpy(), reference.head_dist(tokens[:, 1]).numpy()
        average = reference(batch).numpy()
    np.testing.assert_allclose(average, (cls + dist) / 2, atol=1e-5)  # timm's eval forward: the heads' mean
    expected = {name: np.mean(np.argmax(logits, axis=1) == labels)
                for name, logits in (("top1_cls", cls), ("top1_dist", dist), ("top1", average))}
    assert expected == {"top1_cls": 1.0, "top1_dist": 0.5, "top1": 0.75}, expected  # the heads disagree as built
    for name, value in expected.items():
        assert final[name] == pytest.approx(value, abs=1e-9), (name, final[name], value)
    # engine.evaluate's loss: CrossEntropyLoss on the model's eval output (the heads' mean), over the images
    loss = torch.nn.CrossEntropyLoss()(torch.from_numpy(average), torch.from_numpy(labels).long()).item()
    assert final["loss"] == pytest.approx(loss, rel=1e-5)
    assert final["step"] == 0
    out = capsys.readouterr().out
    assert "distillation" in out and "average" in out and "32 images" in out


def test_the_summary_adds_the_best_of_several_evaluations_as_deits_max_accuracy(tmp_path):
    """main.py prints "Max accuracy" after each epoch's evaluation: the highest acc1 so far (of the averaged
    heads). The summary adds it, with its step, once metrics.jsonl holds more than one evaluated step (a step
    evaluated again by a resumed run counts once; of equal maxima, the first)."""
    import json
    from types import SimpleNamespace

    from vitdistill import recipes
    from vitdistill.methods import deit

    config = recipes.deit("deit_tiny_patch16_224")
    config.distill.kind = "none"
    final = {"top1": 0.6, "count": 50, "step": 40}
    summary = lambda: deit.summary_table(final, config=config, eval_source=SimpleNamespace(name="val"),  # noqa: E731
                                         distilled=False, teacher=None, mesh=None, workdir=str(tmp_path))
    rows = [{"step": 10, "split": "eval", "top1": 0.5}, {"step": 10, "split": "train", "loss": 2.0, "top1": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "Max accuracy" not in summary()  # one evaluation: the table's figure is all there is
    rows += [{"step": 20, "split": "eval", "top1": 0.7}, {"step": 20, "split": "eval", "top1": 0.7},
             {"step": 30, "split": "eval", "top1": 0.7}, {"step": 40, "split": "eval", "top1": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = summary()
    assert "| deit_tiny_patch16_224 | class | 60.00   |" in table
    assert table.endswith("best top-1 of the run's 4 evaluations (DeiT's \"Max accuracy\"): 70.00 % at step 20"), table
