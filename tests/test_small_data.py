"""The small-data recipes size themselves to the data: the rules, command-line values kept, an image folder."""
import os
import subprocess
import sys

import numpy as np
import pytest

from vitdistill import small_data
from vitdistill.data import sources
from vitdistill.train import schedules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_rules_give_the_values_their_docstrings_state():
    # DeiT: 16 tokens a global crop whatever the images: digits' 8 px and fashion_small's 14 px are trained at
    # 16 px (4-px patches), Fashion-MNIST at its 28 px (7-px patches), photographs at 32 px (8-px patches)...
    assert [small_data.global_crop_size(s) for s in (8, 14, 16, 17, 28, 224)] == [16, 16, 16, 20, 28, 32]
    # ... but DINO trains at 16 px whatever the side (held-out 28-px letters: k-NN gains -0.38 and +1.69 in
    # 7-px patches, +6.19 and +8.92 at 16 px; small_data.DINO_SIDE).
    for side in (8, 28, 224):
        dino = small_data.dino_settings(small_data.DataFacts("", 60_000, side, 10), steps=1200, batch_size=64)
        assert (dino["data.image_size"], dino["model.patch_size"], dino["multicrop.local_size"]) == (16, 4, 8)
    # K: the largest power of two <= the training images, within [64, 1024].
    assert [small_data.output_dim(n) for n in (10, 100, 300, 1023, 1024, 1438, 60_000)] == [
        64, 64, 256, 512, 1024, 1024, 1024]
    # warm-up: a tenth of the run, at least 200 steps, at most a quarter.
    assert [small_data.warmup_steps(t) for t in (400, 1200, 2000, 5000)] == [100, 200, 200, 500]
    # regularisation: linear in the passes over the data up to the official 300.
    assert small_data.regularisation(150) == 0.5 and small_data.regularisation(600) == 1.0


@pytest.mark.parametrize("source, side, images, classes", [("digits", 8, 1438, 10), ("fashion_small", 14, 3000, 5)])
def test_a_recipe_is_sized_from_its_training_split(source, side, images, classes):
    if source == "fashion_small" and not os.path.exists(sources.FASHION_MNIST_DIR):
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    config = small_data.small_dino_recipe(source)
    config.lock()
    assert config.dino.momentum_teacher is None and config.epochs is None  # open until the data is read
    chosen = small_data.size_to_data(config)
    facts = chosen["data"]
    assert (facts.train_size, facts.image_side, facts.num_classes) == (images, side, classes)
    per_epoch = images // 64
    assert config.data.image_size == 16 and config.model.patch_size == 4 and config.multicrop.local_size == 8
    assert round(config.epochs * per_epoch) == 1200
    assert round(config.optim.warmup_epochs * per_epoch) == 200 == round(config.optim.freeze_last_layer * per_epoch)
    assert config.model.out_dim == 1024 and config.dino.momentum_teacher == 0.99  # the rule 0.96, floored
    # DINO's official linear rule, 5e-4 x batch / 256, as the run applies it
    assert schedules.scaled_lr(config.optim.lr, config.batch_size, config.optim.lr_reference_batch) == 1.25e-4
    line = small_data.describe(config, chosen)
    assert f"{images:,} images, {side} px, {classes} classes" in line and "dino.momentum_teacher=0.99" in line
    # the line names the peak lr the run applies, so that an --config.optim.lr given for another batch shows
    assert line.endswith("; peak lr 0.000125 (optim.lr 0.0005 given for optim.lr_reference_batch=256, at batch 64)")
    config.unlock()
    config.optim.lr = 1.25e-4  # as --config.optim.lr=1.25e-4 would: still given for batch 256, a quarter applied
    assert "peak lr 3.125e-05 (optim.lr 0.000125 given" in small_data.describe(config, chosen)


def test_dino_doubles_the_linear_rule_for_a_run_of_fewer_than_two_passes():
    def lr(images, steps=1200, batch=64):
        return small_data.dino_settings(small_data.DataFacts("", images, 28, 10), steps=steps, batch_size=batch)[
            "optim.lr"]

    # optim.lr is given for a batch of 256: 5e-4 is the linear rule (1.25e-4 applied at 64), 1e-3 twice it.
    assert lr(60_000) == 1e-3                  # Fashion-MNIST: 1,200 x 64 / 60,000 = 1.28 passes
    assert lr(38_400) == 5e-4                  # exactly 2 passes keeps the rule
    assert lr(10_400) == lr(1_438) == 5e-4     # the 28-px letters (7.4 passes), digits (53)
    assert lr(60_000, steps=2400) == 5e-4      # the same data over a longer run: 2.56 passes
    config = small_data.small_dino_recipe("digits")
    config.lock()
    config.optim.lr = 2e-3                     # as --config.optim.lr=2e-3 would: kept
    config.small_data.steps = 20               # 20 x 64 / 1,438 = 0.89 passes
    chosen = small_data.size_to_data(config)
    assert config.optim.lr == 2e-3 and "optim.lr" not in chosen
    config = small_data.small_dino_recipe("digits", steps=20)
    chosen = small_data.size_to_data(config)
    assert config.optim.lr == chosen["optim.lr"] == 1e-3


def test_settings_given_on_the_command_line_are_kept_and_the_teacher_reads_the_students_data():
    config = small_data.small_deit_recipe("digits", distill="hard", steps=600)
    config.lock()
    config.augment.ra_magnitude = 7.0        # as --config.augment.ra_magnitude=7 would
    config.data.train_limit = 640            # both runs must see these 640 images
    chosen = small_data.size_to_data(config)
    assert config.augment.ra_magnitude == 7.0 and "augment.ra_magnitude" not in chosen
    assert chosen["data"].train_size == 640
    # 600 steps of 64 over 640 images: 60 passes, a fifth of the official strengths (m9, 0.25, 0.1 at 300)
    assert (config.augment.erase_prob, config.model.drop_path_rate) == (0.05, 0.02)
    assert config.augment.rand_augment and "augment.rand_augment" in chosen
    assert round(config.epochs * 10) == 600
    teacher = config.teacher.train
    assert teacher.data.train_limit == 640 and round(teacher.epochs * 10) == 300
    assert teacher.data.image_size == config.data.image_size == 16


def test_a_single_pass_over_a_large_set_trains_without_randaugment():
    facts = small_data.DataFacts("big", 60_000, 28, 10)
    settings = small_data.deit_settings(facts, steps=1200, batch_size=64)  # 1.28 passes
    assert settings["augment.rand_augment"] is False
    assert settings["augment.erase_prob"] == 0.0 and settings["model.drop_path_rate"] == 0.0
    full = small_data.deit_settings(facts, steps=300 * 60_000 // 64, batch_size=64)  # the official 300 passes
    assert (full["augment.ra_magnitude"], full["augment.erase_prob"], full["model.drop_path_rate"]) == (9, 0.25, 0.1)


def _grey_folder(root, side=20, per_class=40):
    """Two classes of `side`-px images: dark and light squares with noise, 'train' and 'val' splits."""
    from PIL import Image

    rng = np.random.RandomState(0)
    for split, count in (("train", per_class), ("val", 8)):
        for c, level in enumerate((60, 190)):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = np.clip(level + rng.randint(-50, 50, (side, side)), 0, 255).astype(np.uint8)
                Image.fromarray(image).convert("RGB").save(folder / f"{i}.png")


def test_facts_of_an_image_folder():
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        _grey_folder(pathlib.Path(tmp), side=20)
        config = small_data.small_dino_recipe()
        config.data.source, config.data.data_dir, config.data.eval_split = "folder", tmp, "val"
        facts = small_data.facts_of(config.data)
        assert (facts.train_size, facts.image_side, facts.num_classes) == (80, 20, 2)


@pytest.mark.parametrize("config", ["configs/dino_small_data.py", "configs/deit_small_data.py:hard"])
def test_one_command_trains_either_method_on_a_users_folder(tmp_path, config):
    _grey_folder(tmp_path / "data", side=20)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    run = subprocess.run(
        [sys.executable, "-m", "vitdistill.main", f"--config={config}", "--config.data.source=folder",
         f"--config.data.data_dir={tmp_path / 'data'}", "--config.data.eval_split=val", "--config.batch_size=16",
         "--config.max_steps=2", "--config.progress_bar=False", f"--workdir={tmp_path / 'run'}"]
        + (["--config.teacher.train.max_steps=2", "--config.teacher.train.batch_size=16"] if "deit" in config else []),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    # 80 images of 20 px: K 64, the run's 1,200 steps as 240 epochs of 5 steps; DeiT trains at 20 px in 5-px
    # patches, DINO at 16 px in 4-px patches
    assert "sized to folder:" in run.stdout and "(80 images, 20 px, 2 classes)" in run.stdout
    assert "epochs=240" in run.stdout
    if "dino" in config:
        assert "data.image_size=16, model.patch_size=4" in run.stdout
        assert "model.out_dim=64" in run.stdout and "k-NN" in run.stdout
    else:
        assert "data.image_size=20, model.patch_size=5" in run.stdout
        assert "teacher.train.data.image_size=20" in run.stdout and "distillation=hard" in run.stdout


@pytest.mark.skipif(not os.path.exists(sources.FASHION_MNIST_DIR), reason="needs apt-get install dataset-fashion-mnist")
def test_fashion_small_is_fashion_mnists_last_five_classes_reduced_by_pil():
    from PIL import Image

    full_images, full_labels = sources.fashion_mnist("test").arrays
    small = sources.fashion_small("test")
    images, labels = small.arrays
    kept = np.flatnonzero(full_labels >= 5)[:1000]
    assert small.num_examples == 1000 and small.num_classes == 5 and small.class_names[0] == "Sandal"
    np.testing.assert_array_equal(labels, full_labels[kept] - 5)
    # PIL's Image.reduce(2): each pixel the 2x2 block's mean, rounded half up, as ours
    reference = np.stack([np.asarray(Image.fromarray(full_images[i]).reduce(2)) for i in kept])
    np.testing.assert_array_equal(images, reference)


def test_a_step_budget_below_one_is_refused_by_name_without_a_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, "-m", "vitdistill.main", "--config=configs/dino_small_data.py",
                          "--config.small_data.steps=0", f"--workdir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    assert "config.small_data.steps=0" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.parametrize("recipe", [small_data.small_dino_recipe, small_data.small_deit_recipe])
def test_a_recipe_for_a_source_that_is_not_built_in_names_the_way_to_a_folder(recipe):
    from vitdistill.errors import ConfigError

    with pytest.raises(ConfigError, match=r"not 'folder'.*config.data.source='folder' and config.data.data_dir"):
        recipe("folder")


def test_the_small_dino_recipe_uses_the_official_knn_protocol_up_to_a_cap():
    """Every training image in the bank and every test image a query (Fashion-MNIST's 60,000 and 10,000 whole),
    capped for folders larger than small data."""
    config = small_data.small_dino_recipe("fashion_mnist")
    assert (config.knn.train_limit, config.knn.eval_limit) == (60_000, 10_000)
