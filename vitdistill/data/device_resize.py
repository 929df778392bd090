"""DINO's crops, resizes and flips in JAX, level for level as Pillow makes them, for `config.data.device_canvas`.

With `data.image_ops="device"` and `data.device_canvas=N` the DINO pipeline ships each image once, in an N x N
uint8 canvas (the image at its top left), and for each view the two passes of Pillow's resize of the view's
crop as integer windows (`multicrop.canvas_views`): per output row and column, where its window starts in the
canvas and the window's weights, from `pil_resize.coefficient_table` (Resample.c's own coefficients, checked
against Pillow for every crop length up to N). The step resamples here: the horizontal pass into uint8 levels,
then the vertical one, each `clip((sum(pixel * weight) + 2^21) >> 22, 0, 255)` in int32, as Resample.c sums,
so the levels are Pillow's on any backend. A flip is the horizontal windows in reverse order. An image larger
than the canvas has its views made on the host (Pillow, as with a canvas of 0) and packed into the canvas; their
windows are then one pixel each, weight 1, which copies them.

That leaves the host only the decoding and the random choices: on one host core those were 3.2 of a DINO
image's 13.3 ms once the photometric ops had moved to the device (`experiments/dino_view_costs.py`).
"""
import jax.numpy as jnp

from vitdistill.data.pil_resize import PRECISION_BITS  # Resample.c's fraction bits for 8-bit images

ROWS, COLUMNS = 0, 1  # a view's windows: [axis, output, (first tap | weight of each tap)]


def _resample(image, first, weight, *, axis: int):
    """One Resample.c pass along `axis` (1: rows, 2: columns) of uint8 [B, H, W, C] images: output pixel o is
    clip((sum_k image[first[o] + k] * weight[o, k] + 2^21) >> 22) along that axis -> uint8; first int32 [B, out],
    weight int32 [B, out, K]. Taps past a window's end weigh 0 (past the image's edge they read its last pixel)."""
    b, out, k = weight.shape
    shape = [b, 1, 1, 1]
    shape[axis] = out * k
    index = (first[:, :, None] + jnp.arange(k, dtype=first.dtype)).reshape(shape)
    taps = jnp.take_along_axis(image, index, axis=axis, mode="clip").astype(jnp.int32)
    split = list(taps.shape)
    split[axis:axis + 1] = [out, k]
    weight_shape = [b, 1, 1, 1, 1]
    weight_shape[axis:axis + 2] = [out, k]
    total = jnp.sum(taps.reshape(split) * weight.reshape(weight_shape), axis=axis + 1)
    return jnp.clip((total + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255).astype(jnp.uint8)


def resized_crops(canvas, windows):
    """A view of each image in the batch: uint8 canvas [B, H, W, C] and the view's int32 windows
    [B, 2, size, 1 + K] (`multicrop.view_windows`) -> uint8 [B, size, size, C], Pillow's levels."""
    columns = _resample(canvas, windows[:, COLUMNS, :, 0], windows[:, COLUMNS, :, 1:], axis=2)  # Pillow's order
    return _resample(columns, windows[:, ROWS, :, 0], windows[:, ROWS, :, 1:], axis=1)
