"""Data: sources, augmentations (TF, per image), mixup/cutmix (JAX, per batch), tf.data pipelines.

Submodules are imported explicitly (`from vitdistill.data import deit_transforms`), so that
code needing only `mixup` (JAX) never pulls in TensorFlow.
"""

# ImageNet channel statistics in 0..1 units (torchvision/timm); multiply by 255 for 0..255 images.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
