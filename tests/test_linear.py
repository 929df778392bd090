"""The linear probe (`method='linear'`, DINO's eval_linear.py): its features against timm's
`get_intermediate_layers` with the official concatenation, its SGD and cosine against torch's, and a
probe of a checkpoint on digits, several learning rates in one pass."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitdistill import methods, models, recipes, small_data
from vitdistill.methods import linear

try:
    import timm
    import torch
except ImportError:
    torch = timm = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch/timm is not installed (pip install -e '.[torch]')")


def _micro_timm():
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0).eval()


@needs_torch
@pytest.mark.parametrize("n, avgpool", [(1, False), (3, False), (1, True)])
def test_features_are_eval_linears_concatenation_of_timms_intermediate_layers(tmp_path, n, avgpool):
    from vitdistill.convert import from_torch

    reference = _micro_timm()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "t.pth")
    params = from_torch(str(tmp_path / "t.pth"), "vit_micro_patch4_32")["params"]
    images = np.random.RandomState(1).randn(3, 32, 32, 3).astype(np.float32)
    with torch.no_grad():
        layers = reference.get_intermediate_layers(torch.tensor(images.transpose(0, 3, 1, 2)), n=n, norm=True,
                                                   return_prefix_tokens=True)
        output = torch.cat([prefix[:, 0] for _, prefix in layers], dim=-1)  # eval_linear: x[:, 0] of each
        if avgpool:  # eval_linear: cat((output.unsqueeze(-1), mean(patches).unsqueeze(-1)), -1).reshape(B, -1)
            output = torch.cat((output.unsqueeze(-1), layers[-1][0].mean(dim=1).unsqueeze(-1)), dim=-1)
            output = output.reshape(output.shape[0], -1)
    ours = linear.features(models.create("vit_micro_patch4_32", num_classes=0), params, jnp.asarray(images),
                           n_last_blocks=n, avgpool=avgpool)
    np.testing.assert_allclose(np.asarray(ours), output.numpy(), atol=2e-5)


@needs_torch
def test_sgd_and_the_per_epoch_cosine_follow_torch():
    """Two heads (lrs 0.1 and 0.03), 3 epochs of 2 steps, against torch.optim.SGD(momentum=0.9) on
    nn.Linear and CosineAnnealingLR(T_max=3, eta_min=0) stepped once per epoch. Each epoch's second batch is
    its partial last one, as eval_linear.py's loader (no drop_last) gives it: 5 examples for torch; for the
    step, 8 rows of which the last 3 are padding (other features and labels) with mask 0."""
    rng = np.random.RandomState(0)
    feats = rng.randn(6, 8, 5).astype(np.float32)  # 6 steps of 8 examples, 5-dim features
    labels = rng.randint(0, 3, (6, 8))
    mask = np.ones((6, 8), np.float32)
    mask[1::2, 5:] = 0.0
    real = lambda i: slice(None, 5 if i % 2 else None)  # noqa: E731  torch's batch i
    identity = type("Identity", (), {})()
    setup = linear.LinearSetup(backbone=identity, n_last_blocks=1, avgpool=False, lrs=(0.1, 0.03), momentum=0.9,
                               num_classes=3, feature_dim=5, steps_per_epoch=2, epochs=3.0)
    state = linear.init_state(jax.random.key(0), setup=setup)
    original = linear.features
    linear.features = lambda backbone, params, images, **_: images  # the step on given features
    try:
        step = jax.jit(lambda s, b: linear.train_step(s, b, None, setup=setup))
        ours = state
        for i in range(6):
            ours, _ = step(ours, {"image": jnp.asarray(feats[i]), "label": jnp.asarray(labels[i]),
                                  "mask": jnp.asarray(mask[i])})
    finally:
        linear.features = original
    for h, lr in enumerate(setup.lrs):
        layer = torch.nn.Linear(5, 3)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(np.asarray(state.params["kernel"][h]).T))
            layer.bias.copy_(torch.tensor(np.asarray(state.params["bias"][h])))
        optimizer = torch.optim.SGD(layer.parameters(), lr, momentum=0.9, weight_decay=0)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 3, eta_min=0)
        for epoch in range(3):
            for i in (2 * epoch, 2 * epoch + 1):
                loss = torch.nn.CrossEntropyLoss()(layer(torch.tensor(feats[i][real(i)])),
                                                   torch.tensor(labels[i][real(i)]))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            scheduler.step()
        np.testing.assert_allclose(np.asarray(ours.params["kernel"][h]), layer.weight.detach().numpy().T, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours.params["bias"][h]), layer.bias.detach().numpy(), atol=1e-6)


def _colour_folder(root):
    """An image folder of 4 classes told apart by their colour (noisy 16-px squares): random ViT features
    separate them, so a probe that trains must score well above chance."""
    from PIL import Image

    rng = np.random.RandomState(0)
    colours = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]
    for split, count in (("train", 32), ("val", 8)):
        for c, colour in enumerate(colours):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                image = np.clip(np.array(colour) + rng.randint(-60, 60, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")


def _on_colour_folder(config, tmp_path, seed: int):
    """Points an evaluation `config` at a random micro ViT saved under tmp_path/backbone and at the colour
    folder (16-px images, kept at 16 px); returns the backbone's variables."""
    from vitdistill.weights import save_variables

    backbone = models.create("vit_micro_patch4_32", num_classes=0)
    variables = jax.jit(lambda: backbone.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3))))()
    save_variables(str(tmp_path / "backbone"), variables, model="vit_micro_patch4_32")
    _colour_folder(tmp_path / "data")
    config.model.name = "vit_micro_patch4_32"
    config.model.init_from = str(tmp_path / "backbone")
    config.data.source = "folder"
    config.data.data_dir = str(tmp_path / "data")
    config.data.eval_split = "val"
    config.data.image_size = 16
    config.data.crop_pct = 1.0
    config.batch_size = 16
    config.progress_bar = False
    return variables


def test_a_probe_of_a_checkpoint_on_an_image_folder_trains_one_head_per_learning_rate(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VITDISTILL_CURVES", "1")  # conftest turns the end-of-run curves off elsewhere
    config = recipes.linear()
    _on_colour_folder(config, tmp_path, seed=0)
    config.linear.n_last_blocks = 2
    config.linear.lrs = (1e-4, 1.0)
    config.epochs = 4.0
    final = methods.train_and_evaluate(config, str(tmp_path / "probe"))
    out = capsys.readouterr().out
    assert "| 0.0001" in out and "| 1 " in out  # one row per learning rate
    assert final["step"] == 4 * (128 // 16)
    assert final["top1"] == max(final["top1_head0"], final["top1_head1"])
    assert final["top1_head1"] >= 0.9  # colour is linearly readable from random features: the probe trains
    assert final["top1_head1"] > final["top1_head0"] + 0.2  # and each head trains at its own learning rate
    assert os.listdir(tmp_path / "probe" / "checkpoints")
    assert os.path.getsize(tmp_path / "probe" / "curves.png") > 10_000  # every run draws its curves at the end


def test_the_backbone_is_required_and_checked(tmp_path):
    from vitdistill.errors import ConfigError, UserError

    config = recipes.linear()
    small_data.use_small_data(config, "digits")
    with pytest.raises(UserError, match="needs a backbone"):
        methods.get("linear").build_task(config, str(tmp_path))
    config.linear.n_last_blocks = 2
    config.linear.avgpool_patchtokens = True
    with pytest.raises(ConfigError, match="n_last_blocks=1"):
        methods.get("linear").build_task(config, str(tmp_path))


def test_the_probe_trains_on_eval_linears_bilinear_crops():
    """eval_linear.py's train transform is `RandomResizedCrop(224)` with torchvision's default interpolation,
    bilinear (only its evaluation resize asks for bicubic): each training view is Pillow's bilinear resize of
    the drawn crop, flipped by the drawn coin, normalised."""
    from PIL import Image

    import tensorflow as tf
    from augment_testing import eager, pil_resize_reference, sample_image
    from vitdistill.data import deit_transforms as dt

    config = recipes.linear("vit_micro_patch4_32")
    assert config.linear.interpolation == "bilinear"
    config.data.image_size = 40
    transform = linear.train_transform(config)
    image = sample_image("flower", size=(160, 120))
    mean, std = np.array(dt.IMAGENET_MEAN) * 255, np.array(dt.IMAGENET_STD) * 255
    flips = set()
    for k in range(6):
        seed = np.array([k, 11], np.int64)
        got = eager(lambda s: transform(tf.constant(image), s)["image"], seed)
        crop_seed, flip_seed = eager(lambda s: tf.stack(dt.split_seed(s, 2)), seed)
        top, left, h, w = (int(v) for v in eager(lambda s: tf.stack(dt.sample_crop_box(s, 120, 160)), crop_seed))
        view = pil_resize_reference(Image.fromarray(image).crop((left, top, left + w, top + h)), (40, 40), "bilinear")
        flip = bool(eager(lambda s: dt.coin(s, 0.5), flip_seed))
        flips.add(flip)
        want = (np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view, np.float32) - mean) / std
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert flips == {True, False}


def test_the_probes_training_view_of_a_jpegs_bytes_is_its_view_of_the_decoded_image():
    """The probe's transform takes a file's bytes too (`decodes`) and decodes only its crop's window: the views
    must be those of the decoded image (a 4:2:0 JPEG of odd width, where the window's columns need a margin)."""
    import io

    import tensorflow as tf
    from PIL import Image

    from augment_testing import map_in_tf_data, sample_image
    from vitdistill.data import sources

    config = recipes.linear("vit_micro_patch4_32")
    config.data.image_size = 40
    transform = linear.train_transform(config)
    assert transform.decodes
    out = io.BytesIO()
    Image.fromarray(sample_image("china", size=(171, 121))).save(out, format="JPEG", quality=85, subsampling=2)
    decoded = sources.decode_image(tf.constant(out.getvalue())).numpy()
    seeds = np.array([[k, 2] for k in range(8)], np.int64)
    want = map_in_tf_data(lambda s: transform(decoded, s)["image"], seeds)
    got = map_in_tf_data(lambda s: transform(tf.constant(out.getvalue()), s)["image"], seeds)
    np.testing.assert_array_equal(got, want)
