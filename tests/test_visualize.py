"""Attention maps (`python -m vitdistill.visualize`): the mass mask against its definition, the maps of a
converted DINO checkpoint against the softmax(q k^T / sqrt(d)) of timm's own last block, and the files."""

import numpy as np
import pytest
from PIL import Image

from vitdistill import visualize
from vitdistill.errors import UserError

try:
    import timm
    import torch
except ImportError:
    torch = timm = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch/timm is not installed (pip install -e '.[torch]')")


@pytest.mark.parametrize("threshold", [0.6, 0.9, 1.0, 0.01])
def test_the_mask_is_the_smallest_set_of_patches_holding_the_share_of_mass(threshold):
    rng = np.random.RandomState(int(threshold * 100))
    maps = rng.gamma(0.3, size=(6, 7, 9))  # skewed, as attention is
    maps[5] = 1.0  # one flat head: every patch holds the same mass
    masks = visualize.mass_mask(maps, threshold)
    for head, mask in zip(maps, masks):
        total, values = head.sum(), np.sort(head.ravel())[::-1]
        kept = int(mask.sum())
        assert head[mask].sum() >= threshold * total * (1 - 1e-12)  # keeps at least the share
        assert values[:kept - 1].sum() < threshold * total  # no smaller set of patches does
        if kept < head.size:
            assert head[mask].min() >= head[~mask].max()  # and it is the heaviest patches
    with pytest.raises(UserError, match="threshold"):
        visualize.mass_mask(maps, 0.0)


def _timm_last_attention(model, images):
    """softmax(q k^T * scale) of timm's last block, from its own qkv projection of its own norm1 output."""
    seen = {}
    block = model.blocks[-1]
    hook = block.norm1.register_forward_hook(lambda m, i, out: seen.setdefault("x", out))
    with torch.no_grad():
        model(images)
        hook.remove()
        x = seen["x"]
        b, t, c = x.shape
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(x).reshape(b, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        return ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(-1).numpy()


@needs_torch
def test_maps_of_a_converted_dino_checkpoint_are_timms_attention_and_the_command_writes_them(tmp_path):
    from vitdistill.convert import from_torch
    from vitdistill.weights import save_variables

    torch.manual_seed(0)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, num_classes=0).eval()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in reference.state_dict().items()}}, tmp_path / "dino.pth")
    save_variables(str(tmp_path / "converted"), from_torch(str(tmp_path / "dino.pth"), "vit_micro_patch4_32"),
                   model="vit_micro_patch4_32")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / "photo.png")

    # At the native 32 x 32: the maps are timm's CLS -> patch attention.
    assert visualize.main([f"--checkpoint={tmp_path / 'converted'}", f"--image={tmp_path / 'photo.png'}",
                           f"--output={tmp_path / 'native'}", "--image_size=32,32"]) == 0
    image = visualize.load_image(str(tmp_path / "photo.png"), (32, 32), 4)
    # torchvision's Resize on the Pillow DINO ran (<= 12): the horizontal pass, stored, then the vertical. Pillow 13's
    # one call may run the vertical pass first: here 570 pixels one level off.
    expected_image = np.asarray(Image.open(tmp_path / "photo.png").resize((32, 40), Image.BILINEAR)
                                .resize((32, 32), Image.BILINEAR))
    np.testing.assert_array_equal(image, expected_image)
    # img.png as visualize_attention.py writes it: save_image(make_grid(img, normalize=True, scale_each=True)) of the
    # normalised [1, 3, h, w] input (min-max rescaled: not the photo's colours)
    transforms, utils = pytest.importorskip("torchvision.transforms"), pytest.importorskip("torchvision.utils")
    tensor = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(
        transforms.ToTensor()(Image.fromarray(expected_image)))
    utils.save_image(utils.make_grid(tensor[None], normalize=True, scale_each=True), tmp_path / "official_img.png")
    saved = np.asarray(Image.open(tmp_path / "native" / "img.png"))
    np.testing.assert_array_equal(saved, np.asarray(Image.open(tmp_path / "official_img.png")))
    assert (saved != expected_image).mean() > 0.5
    pixels = (image / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    attention = _timm_last_attention(reference, torch.tensor(pixels.transpose(2, 0, 1)[None], dtype=torch.float32))
    maps = np.load(tmp_path / "native" / "attention.npy")
    assert maps.shape == (4, 8, 8)
    np.testing.assert_allclose(maps, attention[0, :, 0, 1:].reshape(4, 8, 8), atol=2e-6)

    # Another size (the shorter side 44 -> 44 x 58, cut to 44 x 56): every file, at the image's size.
    assert visualize.main([f"--checkpoint={tmp_path / 'converted'}", f"--image={tmp_path / 'photo.png'}",
                           f"--output={tmp_path / 'out'}", "--image_size=44", "--threshold=0.6"]) == 0
    maps, masks = np.load(tmp_path / "out" / "attention.npy"), np.load(tmp_path / "out" / "masks.npy")
    assert maps.shape == (4, 14, 11) and np.allclose(maps.sum(axis=(1, 2)) < 1, True)
    np.testing.assert_array_equal(masks, visualize.mass_mask(maps, 0.6))
    for j in range(4):
        for name in (f"attn-head{j}.png", f"mask_th0.6_head{j}.png", f"overlay_th0.6_head{j}.png"):
            assert Image.open(tmp_path / "out" / name).size == (44, 56)
        mask_png = np.asarray(Image.open(tmp_path / "out" / f"mask_th0.6_head{j}.png")) > 0
        np.testing.assert_array_equal(mask_png, np.kron(masks[j], np.ones((4, 4), bool)))


def test_bad_inputs_are_named(tmp_path, capsys):
    from vitdistill.weights import save_variables

    variables = {"params": {"stem": {"conv": {"kernel": np.zeros((3, 3, 3, 4), np.float32)}}}}  # a CNN's arrays
    save_variables(str(tmp_path / "resnet"), variables, model="resnet_micro")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    assert visualize.main([f"--checkpoint={tmp_path / 'resnet'}", f"--image={tmp_path / 'a.png'}",
                           f"--output={tmp_path / 'o'}"]) == 1
    assert "holds no Vision Transformer" in capsys.readouterr().err
    assert visualize.main([f"--checkpoint={tmp_path / 'nowhere'}", f"--image={tmp_path / 'a.png'}",
                           f"--output={tmp_path / 'o'}"]) == 1
    assert "No model checkpoint" in capsys.readouterr().err
    with pytest.raises(UserError, match="does not exist"):
        visualize.load_image(str(tmp_path / "missing.png"), (32,), 4)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="not an image"):
        visualize.load_image(str(tmp_path / "bad.png"), (32,), 4)
