"""A held-out small data set for choosing the small-data recipes' rules: capital letters drawn in matplotlib's
21 text fonts, written as an image folder. It is never scored in the README's table (digits, Fashion-MNIST,
fashion_small), so a setting picked on it is not fitted to the data it is reported on.

    python experiments/heldout_letters.py --root=/tmp/vitdistill/letters
    python -m vitdistill.main --config=configs/dino_small_data.py --workdir=DIR \
        --config.data.source=folder --config.data.data_dir=/tmp/vitdistill/letters

26 classes (A-Z), 400 training and 100 test images each: 28x28 grey PNGs, white on black as MNIST. Each image
is one letter in a random font (DejaVu Sans / Sans Mono / Serif and STIX in their four styles, Computer Modern
roman, sans, italic, typewriter and bold), at 14-24 px, turned by up to 15 degrees and moved by up to 3 px,
with a little pixel noise. Seeded: the same files every time.

`--side`, `--train_per_class` and `--test_per_class` make a smaller cut, drawn the same way and then averaged
down (PIL's box filter), e.g. one shaped like scikit-learn's digits (1,430 images at 8 px):

    python experiments/heldout_letters.py --root=/tmp/vitdistill/letters8 --side=8 --train_per_class=55 \
        --test_per_class=20

`--classes=N` keeps the first N letters, e.g. digits' shape in classes too (10 classes of 144 / 36 at 8 px):

    python experiments/heldout_letters.py --root=/tmp/vitdistill/letters8c10 --side=8 --classes=10 \
        --train_per_class=144 --test_per_class=36
"""
import argparse
import os
import pathlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SIDE = 28
FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique", "DejaVuSansMono",
         "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique", "DejaVuSansMono-BoldOblique", "DejaVuSerif",
         "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic", "STIXGeneral", "STIXGeneralBol",
         "STIXGeneralItalic", "STIXGeneralBolIta", "cmr10", "cmss10", "cmti10", "cmtt10", "cmb10")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def font_files() -> list:
    import matplotlib

    folder = pathlib.Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [str(folder / f"{name}.ttf") for name in FONTS]


def draw(letter: str, font_file: str, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image of `letter`: drawn at 3x on a 84x84 canvas, turned, moved, shrunk, noised."""
    scale = 3
    size = int(rng.integers(14, 25)) * scale
    font = ImageFont.truetype(font_file, size)
    canvas = Image.new("L", (SIDE * scale, SIDE * scale), 0)
    pen = ImageDraw.Draw(canvas)
    left, top, right, bottom = pen.textbbox((0, 0), letter, font=font)
    shift = rng.integers(-3, 4, size=2) * scale
    x = (SIDE * scale - (right - left)) / 2 - left + shift[0]
    y = (SIDE * scale - (bottom - top)) / 2 - top + shift[1]
    pen.text((x, y), letter, fill=255, font=font)
    canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BICUBIC)
    image = np.asarray(canvas.resize((SIDE, SIDE), Image.LANCZOS), dtype=np.float32)
    image += rng.normal(0.0, 8.0, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def write(root: str, *, train_per_class: int = 400, test_per_class: int = 100, seed: int = 0,
          side: int = SIDE, classes: int = len(LETTERS)) -> None:
    fonts = font_files()
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for letter in LETTERS[:classes]:
            folder = os.path.join(root, split, letter)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                image = Image.fromarray(draw(letter, fonts[int(rng.integers(len(fonts)))], rng))
                if side != SIDE:
                    image = image.resize((side, side), Image.BOX)
                image.save(os.path.join(folder, f"{i:04d}.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="/tmp/vitdistill/letters")
    parser.add_argument("--side", type=int, default=SIDE, help="image side in px (at most 28)")
    parser.add_argument("--train_per_class", type=int, default=400)
    parser.add_argument("--test_per_class", type=int, default=100)
    parser.add_argument("--classes", type=int, default=len(LETTERS), help="the first N letters (2 to 26)")
    args = parser.parse_args()
    if (not 1 <= args.side <= SIDE or args.train_per_class < 1 or args.test_per_class < 1
            or not 2 <= args.classes <= len(LETTERS)):
        parser.error(f"--side must be 1 to {SIDE}, the counts at least 1 and --classes 2 to {len(LETTERS)}")
    write(args.root, train_per_class=args.train_per_class, test_per_class=args.test_per_class, side=args.side,
          classes=args.classes)
    print(f"wrote {args.classes} classes to {args.root}/train and {args.root}/test")


if __name__ == "__main__":
    main()
