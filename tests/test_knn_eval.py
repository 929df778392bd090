"""k-NN of any backbone (`method='knn'`, configs/eval_knn.py): a checkpoint on an image folder scores what
`knn_accuracies` gives on features computed here image by image, for every k at once; saved features are
read back by the next run."""
import os
import sys

import jax.numpy as jnp
import numpy as np
import tensorflow as tf

from vitdistill import methods, models, recipes
from vitdistill.data import deit_transforms, sources
from vitdistill.evaluate.knn import knn_accuracies

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_linear import _on_colour_folder  # noqa: E402


def test_knn_of_a_checkpoint_scores_every_k_and_rereads_saved_features(tmp_path, capsys):
    config = recipes.knn_eval("vit_micro_patch4_32")
    variables = _on_colour_folder(config, tmp_path, seed=1)
    config.knn.ks = (1, 5, 20, 200)  # 200 > the 128 training images: capped
    config.knn.features_dir = str(tmp_path / "features")
    final = methods.train_and_evaluate(config, str(tmp_path / "run"))

    def one_by_one(split):  # the same features without the pipeline: eval transform, backbone, image by image
        source = sources.image_folder(str(tmp_path / "data"), split)
        images, labels = [], []
        for i in range(source.num_examples):
            example = source.load(tf.constant(i, tf.int64))
            images.append(deit_transforms.eval_transform(example["image"], size=16, crop_pct=1.0).numpy())
            labels.append(int(example["label"]))
        dino_resampling = models.create("vit_micro_patch4_32", num_classes=0, pos_embed_interpolation="dino")
        return np.asarray(dino_resampling.apply(variables, jnp.asarray(np.stack(images)))), np.asarray(labels)

    (train_f, train_l), (test_f, test_l) = one_by_one("train"), one_by_one("val")
    expected = knn_accuracies(train_f, train_l, test_f, test_l, ks=(1, 5, 20, 200), num_classes=4)
    for k in (1, 5, 20, 200):
        assert abs(final[f"knn_top1_k{k}"] - expected[k]["knn_top1"]) < 1e-9
    assert final["knn_top1_k1"] > 0.9  # colour is what random features see
    saved = np.load(tmp_path / "features" / "train_features.npy")
    np.testing.assert_allclose(saved, train_f, atol=1e-5)
    out = capsys.readouterr().out
    assert "| 200 " in out and "128 train / 32 test images" in out

    again = methods.train_and_evaluate(config, str(tmp_path / "run2"))
    assert "features read from" in capsys.readouterr().out
    assert {k: v for k, v in again.items() if k != "step"} == {k: v for k, v in final.items() if k != "step"}
