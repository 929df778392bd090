"""What the training pipelines leave to the jitted step, in JAX: normalising uint8 levels, and DeiT's random
erasing, its boxes drawn in the pipeline and its noise here.

The pipelines ship each view as uint8 levels: four times fewer bytes to the device, and the cast and
normalisation (for DINO's 2x224 + 8x96 views 1.6 of the 2.5 ms of TF work an image, on one core) run inside
the step's program instead of on the host. Erasing's noise is then drawn here too: timm erases the normalised
tensor, so the box is filled after `normalize_levels`, with N(0, 1) noise per pixel and channel.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import cpu_gemm
from vitdistill.data import IMAGENET_MEAN, IMAGENET_STD

# An erase box's int32 fields, in this order; `noise_seed` is drawn in the pipeline from the example's own seed.
ERASE_FIELDS = ("erase", "top", "left", "height", "width", "noise_seed")


def normalize_levels(images):
    """uint8 levels -> float32 (x - 255 mean) / (255 std): `deit_transforms.normalize`'s operations in its order
    and precision, so equal to it to the bit (tests/test_multicrop.py). Floating-point images are taken as
    normalised already and returned as they are."""
    if images.dtype != jnp.uint8:
        return images
    mean = np.asarray(IMAGENET_MEAN, np.float32) * np.float32(255.0)
    std = np.asarray(IMAGENET_STD, np.float32) * np.float32(255.0)
    return exact_divide(images.astype(jnp.float32) - mean, std)


def exact_divide(x, divisor):
    """x / divisor (float32, `divisor` broadcast to x's shape), rounded once as C and TF divide. XLA turns a
    division by a broadcast (a constant or not) into a multiplication by the reciprocal, one ulp off at times
    (on about a fifth of the levels in `normalize_levels`); divided by a full-shape operand from behind a
    barrier, the division stays a division."""
    divisor = jnp.broadcast_to(jnp.asarray(divisor, jnp.float32), x.shape)
    return x / jax.lax.optimization_barrier(divisor)


def erase_boxes(rng, images, boxes):
    """timm RandomErasing(mode='pixel', max_count=1) applied to a batch of normalised images [B, H, W, C], the
    boxes drawn already (`deit_transforms.erase_box`: [B, 6] int32, `ERASE_FIELDS`): where a box's `erase` is
    set, its rows top:top+height and columns left:left+width get N(0, 1) noise, every pixel and channel its own
    draw. An image's noise comes from `rng` folded with its box's `noise_seed`, so it follows the example, not
    its row: the same whatever the batch's order, its split over devices or the step."""
    fields = dict(zip(ERASE_FIELDS, (boxes[:, i].astype(jnp.int32) for i in range(len(ERASE_FIELDS)))))
    erase, top, left, height, width = (fields[k][:, None, None, None] for k in ERASE_FIELDS[:5])
    rows = jnp.arange(images.shape[1], dtype=jnp.int32)[None, :, None, None]
    cols = jnp.arange(images.shape[2], dtype=jnp.int32)[None, None, :, None]
    inside = (erase > 0) & (rows >= top) & (rows < top + height) & (cols >= left) & (cols < left + width)
    keys = jax.vmap(lambda seed: jax.random.fold_in(rng, seed))(fields["noise_seed"].astype(jnp.uint32))
    # Drawn flat and reshaped: the same values as a draw at the image's shape (threefry's partitionable counters
    # are the flat index either way), but XLA:CPU builds no per-dimension counters: 9.6 -> 4.2 ms for the
    # normalise-and-erase of 4 x 224 x 224 x 3 (tests/test_deit_transforms.py checks the values).
    size = int(np.prod(images.shape[1:]))
    noise = jax.vmap(lambda key: jax.random.normal(key, (size,), images.dtype))(keys).reshape(images.shape)
    # Stored on XLA:CPU: fused into mixup/cutmix, which reads each image and its partner twice, the noise was drawn
    # over again for every read (the DeiT-S step's input fusion 23.4 -> 4.6 ms at batch 4, the same values).
    return cpu_gemm.stored(jnp.where(inside, noise, images))
