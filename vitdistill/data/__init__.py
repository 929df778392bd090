"""Data: sources, augmentations (TF, per image), mixup/cutmix (JAX, per batch), tf.data pipelines.

Submodules are imported explicitly (`from vitdistill.data import deit_transforms`), so that
code needing only `mixup` (JAX) never pulls in TensorFlow.
"""

# ImageNet channel statistics in 0..1 units (torchvision/timm); multiply by 255 for 0..255 images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_levels(images):
    """uint8 levels -> float32 (x - 255 mean) / (255 std), in JAX, inside a train step: `deit_transforms.normalize`'s
    operations in its order and precision, so equal to it to the bit (tests/test_multicrop.py). Floating-point
    images are taken as normalised already and returned as they are."""
    import jax.numpy as jnp
    import numpy as np

    if images.dtype != jnp.uint8:
        return images
    import jax

    mean = np.asarray(IMAGENET_MEAN, np.float32) * np.float32(255.0)
    std = np.asarray(IMAGENET_STD, np.float32) * np.float32(255.0)
    # XLA turns a division by a broadcast (a constant or not) into a multiplication by the reciprocal, one ulp
    # off on about a fifth of the levels; divided by a full-shape operand from behind a barrier, the division
    # stays a division, exact as TF's.
    std = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(std), images.shape))
    return (images.astype(jnp.float32) - mean) / std
