"""The configs of the committed legacy workdirs (tests/fixtures/legacy_workdirs/): DeiT with a model EMA and a
teacher trained first, and DINO with BatchNorm in its head, on nano models so the fixtures stay small.

`tests/fixtures/make_legacy_workdirs.py` wrote them with the code of commit 8802cdc (before the methods/loop
split); `tests/test_legacy_workdirs.py` resumes them with today's code. Both build their configs here.
"""
from vitdistill import models, recipes, small_data

ROOT_NAME = "legacy_workdirs"
SAVED_AT = 2  # the step the fixtures' checkpoints hold

# Nano variants, registered only while the fixtures are written or read (the tests' monkeypatch).
NANO_MODELS = {
    "deit_nano_patch4_16": (models.VisionTransformer, dict(img_size=16, patch_size=4, embed_dim=16, depth=1,
                                                           num_heads=2, num_classes=10)),
    "deit_nano_distilled_patch4_16": (models.VisionTransformer, dict(img_size=16, patch_size=4, embed_dim=16,
                                                                     depth=1, num_heads=2, num_classes=10,
                                                                     distilled=True)),
    "vit_nano_patch4_16": (models.VisionTransformer, dict(img_size=16, patch_size=4, embed_dim=16, depth=1,
                                                          num_heads=2, num_classes=0)),
    "resnet_nano": (models.ResNet, dict(block="basic", layers=(1, 1, 1, 1), widths=(4, 8, 8, 8), stem_width=4,
                                        cifar_stem=True, num_classes=10)),
}


def with_overrides(config, overrides: dict):
    """`config` with each dotted key of `overrides` ('optim.lr': 0.1) set to its value."""
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def deit_config(max_steps: int = SAVED_AT):
    """A distilled nano DeiT (hard distillation, mixup/cutmix, model EMA) whose nano ResNet teacher trains first."""
    config = recipes.deit("deit_nano_distilled_patch4_16", distilled=True)
    small_data.runlocal(config)
    config.model.name = "deit_nano_distilled_patch4_16"
    config.data.image_size = 16
    config.data.eval_limit = 16
    config.batch_size = 8
    config.max_steps = max_steps
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.mixup.mixup_alpha = 0.8
    config.mixup.cutmix_alpha = 1.0
    config.augment.rand_augment = False
    config.model_ema_decay = 0.9
    teacher = small_data.cnn_teacher("digits", epochs=1, model="resnet_nano")
    teacher.data.image_size = 16
    teacher.data.eval_limit = 16
    teacher.batch_size = 8
    teacher.max_steps = 2
    teacher.checkpoint_every_steps = 2
    teacher.progress_bar = False
    config.teacher.train = teacher
    return config


def dino_config(max_steps: int = SAVED_AT):
    """A nano DINO with BatchNorm in the head (batch statistics in the state), 2 local crops."""
    config = recipes.dino("vit_nano_patch4_16")
    small_data.runlocal(config)
    config.model.name = "vit_nano_patch4_16"
    config.model.use_bn_in_head = True
    config.batch_size = 8
    config.max_steps = max_steps
    config.checkpoint_every_steps = 2
    config.log_every_steps = 1
    config.multicrop.global_size = 16
    config.multicrop.local_size = 8
    config.multicrop.num_local = 2
    config.knn.train_limit = 32
    config.knn.eval_limit = 16
    return config
