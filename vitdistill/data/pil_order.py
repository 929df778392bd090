"""Pillow's resize in the order Pillow <= 12 ran it, without TensorFlow (the attention-map tool uses it too).

Pillow 13 may run a resize's vertical pass before the horizontal one (python-pillow/Pillow#9549); DeiT
and DINO ran on Pillow <= 12, horizontal first, so `resize` makes the two one-axis calls itself.
"""
from PIL import Image

FILTERS = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def resize(picture: Image.Image, width: int, height: int, method: str = "bicubic") -> Image.Image:
    """`picture.resize((width, height))` as Pillow <= 12 runs it: the horizontal pass, then the vertical."""
    resample = FILTERS[method]
    if width != picture.width:
        picture = picture.resize((width, picture.height), resample)
    if height != picture.height:
        picture = picture.resize((width, height), resample)
    return picture


def shorter_side_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) of torchvision's Resize(shorter) for a PIL image of `width` x `height`: the shorter side to
    `shorter`, the longer to int(shorter * long / short)."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter
