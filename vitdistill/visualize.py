"""Attention maps of a ViT's last block, drawn as DINO's `visualize_attention.py` draws them.

    python -m vitdistill.visualize --checkpoint=DIR --image=FILE --output=DIR \
        [--model=NAME] [--network=auto] [--image_size=480,480] [--threshold=0.6]

`--checkpoint` is a `vitdistill.convert` output or a training workdir (DINO: its teacher by default). The
image is resized (`--image_size=H,W`, or one number for the shorter side) with PIL's bilinear filter, cut
to a multiple of the patch size, normalised with ImageNet's mean and std, and run through the backbone
(position embeddings resampled as official DINO resamples them). Written to `--output`:

- `img.png`: the image as the network saw it, saved as official DINO saves it (`make_grid(normalize=True,
  scale_each=True)` of the normalised input: min-max rescaled over all three channels, so its colours are
  not the photo's);
- `attn-head{j}.png`: head j's attention from the CLS token to every patch, upsampled (nearest) by the
  patch size, colour-mapped (viridis);
- `mask_th{t}_head{j}.png`: the smallest set of patches holding at least `t` of head j's attention mass
  (DINO's `--threshold`: sort ascending, keep what lies above `1 - t` of the cumulative mass), white;
- `overlay_th{t}_head{j}.png`: that mask drawn on `img.png` (as DINO draws its masks on it), outlined;
- `attention.npy` (float32 [heads, h, w], the raw CLS -> patch maps on the patch grid) and `masks.npy`.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np

from vitdistill.data import IMAGENET_MEAN, IMAGENET_STD, pil_order
from vitdistill.errors import ConfigError, DataError, UserError


def load_image(path: str, image_size: Sequence[int], patch_size: int) -> np.ndarray:
    """uint8 [H, W, 3]: `path` resized as torchvision's `Resize(image_size)` resizes a PIL image (one number:
    the shorter side; two: (height, width)), then cut to a multiple of `patch_size` (bottom and right)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"--image={path!r} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"--image={path!r} is not an image PIL can read ({e})") from None
    if len(image_size) == 1:
        size = pil_order.shorter_side_size(*image.size, int(image_size[0]))  # (width, height)
    elif len(image_size) == 2:
        size = (int(image_size[1]), int(image_size[0]))
    else:
        raise ConfigError(f"--image_size={','.join(map(str, image_size))}: give H,W or one number (shorter side)")
    array = np.asarray(pil_order.resize(image, *size, "bilinear"))  # torchvision's on Pillow <= 12, as DINO ran
    h, w = array.shape[0] - array.shape[0] % patch_size, array.shape[1] - array.shape[1] % patch_size
    if h == 0 or w == 0:
        raise ConfigError(f"--image_size={','.join(map(str, image_size))} is smaller than one {patch_size}-pixel patch")
    return array[:h, :w]


def cls_attention(attention: np.ndarray, grid: tuple[int, int], num_prefix: int) -> np.ndarray:
    """[heads, h, w]: the CLS token's attention to every patch, from one image's [heads, T, T] weights."""
    return np.asarray(attention)[:, 0, num_prefix:].reshape(attention.shape[0], *grid).astype(np.float32)


def mass_mask(maps: np.ndarray, threshold: float) -> np.ndarray:
    """bool [heads, h, w]: per head, the smallest set of patches whose attention sums to at least `threshold`
    of the head's total, taking patches from the largest down (DINO's rule: sort ascending, normalise, keep
    the patches where the cumulative mass exceeds 1 - threshold)."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"--threshold={threshold}: the share of attention mass to keep must be in (0, 1]")
    heads = maps.shape[0]
    flat = maps.reshape(heads, -1).astype(np.float64)
    order = np.argsort(flat, axis=1, kind="stable")
    ascending = np.take_along_axis(flat, order, axis=1)
    cumulative = np.cumsum(ascending / ascending.sum(axis=1, keepdims=True), axis=1)
    keep_sorted = cumulative > 1.0 - threshold
    keep = np.empty_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=1)
    return keep.reshape(maps.shape)


def attention_maps(backbone: tuple, model_name: str, image: np.ndarray) -> np.ndarray:
    """CLS -> patch maps [heads, h, w] of `image` (uint8 [H, W, 3], sides multiples of the patch size) through
    the named ViT; `backbone` is `weights.vit_backbone`'s (params, patch size, native image size)."""
    import jax.numpy as jnp

    from vitdistill import models

    params, patch, native = backbone
    prefix = 2 if "dist_token" in params else 1
    head = params.get("head")
    num_classes = int(head["kernel"].shape[-1]) if isinstance(head, dict) and "kernel" in head else 0
    model = models.create(model_name, img_size=native, patch_size=patch, num_classes=num_classes,
                          pos_embed_interpolation="dino")
    if not isinstance(model, models.VisionTransformer):
        raise ConfigError(f"--model={model_name} is a {type(model).__name__}; attention maps need a ViT")
    attention = models.last_attention(model, {"params": params}, jnp.asarray(normalised(image)[None]))
    h, w = image.shape[0] // patch, image.shape[1] // patch
    return cls_attention(np.asarray(attention[0], np.float32), (h, w), prefix)


def _colour(maps: np.ndarray) -> np.ndarray:
    """uint8 RGB of one map through viridis, min-max scaled (what plt.imsave does)."""
    from matplotlib import colormaps

    lo, hi = float(maps.min()), float(maps.max())
    scaled = (maps - lo) / (hi - lo) if hi > lo else np.zeros_like(maps)
    return (colormaps["viridis"](scaled)[..., :3] * 255).round().astype(np.uint8)


def normalised(image: np.ndarray) -> np.ndarray:
    """float32 [H, W, 3]: torchvision's ToTensor then Normalize with ImageNet's mean and std, in float32."""
    return (image.astype(np.float32) / np.float32(255) - np.asarray(IMAGENET_MEAN, np.float32)) \
        / np.asarray(IMAGENET_STD, np.float32)


def saved_view(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: what visualize_attention.py writes as img.png for the network's input `image`:
    `normalised`, make_grid(normalize=True, scale_each=True) (clamp to, and rescale from, the tensor's own min
    and max), and save_image's x * 255 + 0.5, clamped, truncated to uint8."""
    pixels = normalised(image)
    low, high = float(pixels.min()), float(pixels.max())
    scaled = (pixels - np.float32(low)) / np.float32(max(high - low, 1e-5))
    return np.clip(scaled * np.float32(255) + np.float32(0.5), 0, 255).astype(np.uint8)


def _overlay(image: np.ndarray, mask: np.ndarray, colour) -> np.ndarray:
    """The image with `mask` tinted half-way to `colour` and its boundary drawn in it."""
    tinted = image.astype(np.float32)
    colour = np.asarray(colour, np.float32)
    tinted[mask] = 0.5 * tinted[mask] + 0.5 * colour
    padded = np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    tinted[mask & ~interior] = colour
    return tinted.round().astype(np.uint8)


def write_maps(output: str, image: np.ndarray, maps: np.ndarray, patch: int, threshold: float) -> list[str]:
    """Writes the PNGs and arrays described in the module docstring; returns the files written."""
    from PIL import Image

    os.makedirs(output, exist_ok=True)
    masks = mass_mask(maps, threshold)
    written = []

    def save(name, array):
        path = os.path.join(output, name)
        Image.fromarray(array).save(path)
        written.append(path)

    image = saved_view(image)
    save("img.png", image)  # (and DINO draws its masks on what it saved)
    up = lambda a: np.kron(a, np.ones((patch, patch), a.dtype))  # noqa: E731  nearest, scale_factor=patch
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40)]
    for j in range(maps.shape[0]):
        save(f"attn-head{j}.png", _colour(up(maps[j])))
        mask = up(masks[j].astype(np.uint8)).astype(bool)
        save(f"mask_th{threshold}_head{j}.png", (mask * 255).astype(np.uint8))
        save(f"overlay_th{threshold}_head{j}.png", _overlay(image, mask, palette[j % len(palette)]))
    for name, array in (("attention.npy", maps), ("masks.npy", masks)):
        path = os.path.join(output, name)
        np.save(path, array)
        written.append(path)
    return written


def visualize(checkpoint: str, image_path: str, output: str, *, model: Optional[str] = None,
              network: str = "auto", image_size: Sequence[int] = (480, 480), threshold: float = 0.6) -> list[str]:
    """The command's work: read the weights, draw the maps, write them; returns the files written."""
    from vitdistill import weights

    loaded = weights.read_weights(checkpoint, network)
    name = model or loaded.model
    if not name:
        raise ConfigError(f"{checkpoint} does not record its model; pass --model=NAME (e.g. vit_small_patch16_224)")
    backbone = weights.vit_backbone(loaded.variables["params"], loaded.description)
    patch = backbone[1]
    image = load_image(image_path, image_size, patch)
    return write_maps(output, image, attention_maps(backbone, name, image), patch, threshold)


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vitdistill.visualize", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a vitdistill.convert output or a training workdir")
    parser.add_argument("--image", required=True, help="an image file PIL reads")
    parser.add_argument("--output", required=True, help="the folder to write the maps to")
    parser.add_argument("--model", default=None, help="the ViT's name (default: the one the checkpoint records)")
    parser.add_argument("--network", default="auto", help="of a workdir: auto (DINO's teacher), student, teacher, ema")
    parser.add_argument("--image_size", default="480,480", help="H,W, or one number for the shorter side")
    parser.add_argument("--threshold", type=float, default=0.6, help="share of attention mass the masks keep")
    args = parser.parse_args(argv)
    try:
        size = [int(v) for v in args.image_size.split(",") if v.strip()]
    except ValueError:
        print(f"error: --image_size={args.image_size!r}: give H,W or one number", file=sys.stderr)
        return 2
    try:
        written = visualize(args.checkpoint, args.image, args.output, model=args.model, network=args.network,
                            image_size=size, threshold=args.threshold)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    heads = sum(1 for path in written if os.path.basename(path).startswith("attn-head"))
    print(f"wrote {len(written)} files for {heads} heads to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
