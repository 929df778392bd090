"""The README's attention-map figures, made with `python -m vitdistill.visualize`:

    python experiments/attention_figures.py --dino_workdir=/tmp/vitdistill/dino_quickstart --out=docs/figures

1. `attention_converted_vit_s16.png`: a DINO ViT-S/16 checkpoint in the official layout (timm's randomly
   initialised weights, seed 0, saved as main_dino.py saves its teacher), converted with
   `vitdistill.convert.from_torch`, on scikit-learn's china.jpg at 224 x 224: the image, then per head the
   CLS -> patch attention (top row) and the mask holding 60 % of its mass (bottom row). Random weights
   follow colour and position, not objects; the figure shows the command and the layout, not a trained
   network.
2. `attention_dino_quickstart.png`: the teacher of the DINO quick start (`configs/dino_quickstart.py`; run
   it first, or pass its workdir) on test digits at its 16-px global-crop size, upsampled for display.
Needs torch and timm for the first (`pip install -e '.[torch]'`).
"""
import argparse
import os
import sys
import tempfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from vitdistill import visualize  # noqa: E402


def montage(folder: str, heads: int, threshold: float, tile: int) -> Image.Image:
    """The image, then per head its attention map over its masked overlay, each tile `tile` px wide."""
    def load(name):
        image = Image.open(os.path.join(folder, name)).convert("RGB")
        return image.resize((tile, round(tile * image.height / image.width)), Image.NEAREST)

    first = load("img.png")
    sheet = Image.new("RGB", ((heads + 1) * tile, 2 * first.height), "white")
    sheet.paste(first, (0, 0))
    for j in range(heads):
        sheet.paste(load(f"attn-head{j}.png"), ((j + 1) * tile, 0))
        sheet.paste(load(f"overlay_th{threshold}_head{j}.png"), ((j + 1) * tile, first.height))
    return sheet


def converted_figure(out: str, workdir: str) -> str:
    import timm
    import torch
    from sklearn.datasets import load_sample_images

    from vitdistill.convert import from_torch
    from vitdistill.weights import save_variables

    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    pth = os.path.join(workdir, "dino_vits16.pth")
    torch.save({"teacher": {f"backbone.{k}": v for k, v in vit.state_dict().items()}}, pth)
    converted = os.path.join(workdir, "converted")
    save_variables(converted, from_torch(pth, "vit_small_patch16_224"), model="vit_small_patch16_224")
    photo = os.path.join(workdir, "china.png")
    Image.fromarray(load_sample_images().images[0]).save(photo)
    maps = os.path.join(workdir, "maps_converted")
    visualize.visualize(converted, photo, maps, image_size=(224, 224), threshold=0.6)
    path = os.path.join(out, "attention_converted_vit_s16.png")
    montage(maps, 6, 0.6, 112).save(path)
    return path


def quickstart_figure(out: str, workdir: str, dino_workdir: str) -> str:
    from vitdistill.data import sources
    import tensorflow as tf

    test = sources.digits("test")
    tiles = []
    for i in range(3):
        image = test.load(tf.constant(i, tf.int64))["image"].numpy()
        photo = os.path.join(workdir, f"digit{i}.png")
        Image.fromarray(image).save(photo)
        maps = os.path.join(workdir, f"maps_digit{i}")
        visualize.visualize(dino_workdir, photo, maps, image_size=(16, 16), threshold=0.6)
        tiles.append(montage(maps, 4, 0.6, 64))
    sheet = Image.new("RGB", (tiles[0].width, sum(t.height for t in tiles)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (0, i * tile.height))
    path = os.path.join(out, "attention_dino_quickstart.png")
    sheet.save(path)
    return path


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dino_workdir", default="/tmp/vitdistill/dino_quickstart")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "figures"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        print("wrote", converted_figure(args.out, workdir))
        if os.path.isdir(os.path.join(args.dino_workdir, "checkpoints")):
            print("wrote", quickstart_figure(args.out, workdir, args.dino_workdir))
        else:
            print(f"no DINO run in {args.dino_workdir}: run `python -m vitdistill.main "
                  f"--config=configs/dino_quickstart.py --workdir={args.dino_workdir}` first")


if __name__ == "__main__":
    main()
