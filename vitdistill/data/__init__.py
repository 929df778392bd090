"""Data: sources, augmentations (TF, per image), mixup/cutmix (JAX, per batch), tf.data pipelines.

Submodules are imported explicitly (`from vitdistill.data import deit_transforms`), so that
code needing only `mixup` (JAX) never pulls in TensorFlow.
"""

from vitdistill.errors import ConfigError

# ImageNet channel statistics in 0..1 units (torchvision/timm); multiply by 255 for 0..255 images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Begins the message of a transform's in-graph check that an image has the size a setting needs (DeiT's padded
# crop): the loop and the evaluations name the setting instead of calling the image corrupt.
SIZE_CHECK = "vitdistill: image size"


def size_check_text(message: str) -> str:
    """What a failed SIZE_CHECK says, out of TensorFlow's error message."""
    text = message[message.index(SIZE_CHECK) + len(SIZE_CHECK):].lstrip(": ")  # "...] [Condition x ...] ..."
    return text.split("\n")[0].split("] [Condition")[0].rstrip("]").replace("\\'", "'").strip()


def steps_per_epoch(num_examples: int, global_batch: int, repeats: int = 1, keep_partial: bool = False) -> int:
    """The batches of an epoch, as the official samplers give them with drop_last: DistributedSampler's
    `num_examples // global_batch`; with repeated augmentation DeiT's RASampler, whose epoch keeps
    `num_examples // 256 * 256` positions of the repeated order (below 256 examples that would be none, and the
    official run would train nothing: there the whole `num_examples`). The rest of an epoch is dropped, and the
    next epoch starts a new order (`pipeline.index_stream`). Fewer positions than one batch: ConfigError.
    `keep_partial` (eval_linear.py's loader, without drop_last): ceil(num_examples / global_batch), the last
    batch holding the rest (`pipeline.train_dataset` pads it and masks the padding)."""
    if keep_partial:
        if repeats > 1:
            raise ValueError("keep_partial with repeated augmentation: no official loader does both")
        return -(-num_examples // global_batch)
    used = num_examples // 256 * 256 if repeats > 1 and num_examples >= 256 else num_examples
    if used < global_batch:
        if used < num_examples:
            raise ConfigError(f"batch_size {global_batch} is larger than the {used} positions an epoch of repeated "
                              f"augmentation keeps of the {num_examples} training examples (RASampler's "
                              f"N // 256 * 256); lower --config.batch_size, or set --config.augment.repeats=1")
        raise ConfigError(f"batch_size {global_batch} is larger than the {num_examples} training examples; "
                          "lower --config.batch_size")
    return used // global_batch
