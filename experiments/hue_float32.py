"""Can the DINO colour jitter's hue run in float32 alone, as JAX runs it without x64? Checked on all 2^24 colours.

    python experiments/hue_float32.py

torchvision's adjust_hue converts a PIL image to 8-bit HSV (Convert.c rgb2hsv_row): float32 ratios, then
`2.0 + rc - bc` (or `4.0 + gc - rc`), `fmod(h / 6.0 + 1.0, 1.0)` and `h * 255.0` in double, each stored back to
float. `vitdistill.data.multicrop.rgb_to_hsv_levels` (TF) keeps those steps in float64 and equals PIL on every
colour. A device port of the photometric ops (so that the host need not run them) would compute in float32 unless
x64 is on; this counts the colours whose hue level then differs from PIL's, for two float32 forms, with the
float64-step form as the check that the comparison itself is right (it must print 0).
"""
import numpy as np
from PIL import Image


def main():
    index = np.arange(1 << 24, dtype=np.uint32)
    rgb = np.stack([(index >> 16) & 255, (index >> 8) & 255, index & 255], -1).astype(np.uint8)
    pil_hue = np.asarray(Image.fromarray(rgb.reshape(4096, 4096, 3), "RGB").convert("HSV"))[..., 0].reshape(-1)
    r, g, b = (rgb[:, i].astype(np.int32) for i in range(3))
    maxc, minc = np.maximum(r, np.maximum(g, b)), np.minimum(r, np.minimum(g, b))
    grey = maxc == minc
    f32, f64 = np.float32, np.float64
    spread = np.where(grey, 1, maxc - minc).astype(f32)
    rc, gc, bc = ((maxc - c).astype(f32) / spread for c in (r, g, b))

    def differing(hue):
        level = np.where(grey, 0, np.clip(np.floor(hue * f32(255.0)).astype(np.int32), 0, 255))
        return int(np.count_nonzero(level != pil_hue))

    with np.errstate(all="ignore"):
        h32 = np.where(r == maxc, bc - gc, np.where(g == maxc, f32(2.0) + rc - bc, f32(4.0) + gc - rc)).astype(f32)
        forms = {
            "float32 throughout": np.fmod(h32 / f32(6.0) + f32(1.0), f32(1.0)).astype(f32),
            "float32 sums, the wrap in float64": np.fmod(h32.astype(f64) / 6.0 + 1.0, 1.0).astype(f32),
        }
        h64 = np.where(r == maxc, (bc - gc).astype(f64),
                       np.where(g == maxc, 2.0 + rc.astype(f64) - bc.astype(f64),
                                4.0 + gc.astype(f64) - rc.astype(f64))).astype(f32)
        forms["PIL's float64 steps (the TF form)"] = np.fmod(h64.astype(f64) / 6.0 + 1.0, 1.0).astype(f32)
    for name, hue in forms.items():
        print(f"{name}: {differing(hue):,} of {1 << 24:,} colours differ from PIL's hue level")


if __name__ == "__main__":
    main()
