"""Runs ../shared/bench/torch_reference.py (or $VITDISTILL_TORCH_REFERENCE) with its arguments, after giving
PIL.ImageOps.posterize the bits=0 behaviour of Pillow <= 12 (every level to 0).

timm's RandAugment at magnitude 9 with std 0.5 draws posterize with 0 bits now and then; Pillow 13 refuses
bits=0 with a ValueError, so the reference's DeiT pipeline stops on it. vitdistill's own Pillow backend
keeps the old behaviour (`vitdistill/data/pil_ops.posterize`). Use as
`python -m vitdistill.bench ... --compare --reference=experiments/torch_reference_pillow13.py`.
"""
import os
import runpy
import sys

import PIL.ImageOps

_posterize = PIL.ImageOps.posterize


def posterize(image, bits):
    if bits == 0:
        return image.point([0] * 256 * len(image.getbands()))
    return _posterize(image, bits)


if __name__ == "__main__":
    PIL.ImageOps.posterize = posterize
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.environ.get("VITDISTILL_TORCH_REFERENCE", "")
    if not script or os.path.basename(script) == os.path.basename(__file__):  # not this wrapper again
        script = os.path.join(os.path.dirname(here), "shared", "bench", "torch_reference.py")
    sys.argv[0] = script
    runpy.run_path(script, run_name="__main__")
