"""The papers' recipes as ml_collections configs, with every default of the official code.

Config files in `configs/` call these and change what differs; `main.py` locks the result so
a mistyped override fails with the key's name and the valid ones.
"""
from __future__ import annotations

from ml_collections import ConfigDict, config_dict


def _opt(kind):
    """An optional field: None until set, typed so `--config.KEY=VALUE` still parses."""
    return config_dict.placeholder(kind)


def _data(source: str, *, name: str = "", image_size: int = 224) -> ConfigDict:
    return ConfigDict({
        "source": source,              # digits | fashion_mnist | folder | tfds
        "name": name,                  # TFDS name (source=tfds)
        "data_dir": _opt(str),         # TFDS data dir, image-folder root, or Fashion-MNIST IDX folder
        "manual_dir": _opt(str),       # ImageNet's manual download folder (TFDS)
        "train_split": "train",
        "eval_split": "validation",
        "train_limit": _opt(int),      # keep the first N examples (Fashion-MNIST)
        "eval_limit": _opt(int),
        "image_size": image_size,
        "crop_pct": 0.875,             # eval: resize to image_size / crop_pct, centre crop image_size
        "resize": "pil",               # pil: PIL's Image.resize bit for bit (torchvision's) | tf: tf.image.resize
        "image_ops": "pil",            # training augmentations applied by pil: Pillow itself inside tf.data
                                       # (torchvision's ops, fast) | tf: TF ops (DeiT's RandAugment in floats)
                                       # | device: DINO's photometric ops in the train step (accelerators)
        "device_canvas": 0,            # DINO with image_ops=device: N ships each image in an N x N canvas and
                                       # its crops and resizes too run in the train step (0: on the host)
        "jpeg_decoding": "accurate",   # accurate: PIL's (torchvision's) pixels exactly | fast: TF's fast IDCT
        "scan_images": False,          # folder: decode every image before training; list every bad one at once
        "skip_bad_images": False,      # folder: scan, then train without the bad images (listed at start and end)
    })


def check_config_arg(path: str, arg, valid: tuple) -> None:
    """A config file's `:ARG` must be one it knows: a misspelt variant fails instead of silently training
    the default."""
    if arg is not None and arg not in valid:
        from vitdistill.errors import ConfigError

        if not valid:
            raise ConfigError(f"{path}:{arg} is not a variant of this config, which has none: use {path}")
        raise ConfigError(f"{path}:{arg} is not a variant of this config; valid: {', '.join(valid)} "
                          f"(or none: {path})")


def _run(config: ConfigDict, *, epochs: float, batch_size: int) -> ConfigDict:
    config.seed = 0
    config.epochs = epochs
    config.batch_size = batch_size     # global, over all devices and hosts
    config.max_steps = _opt(int)       # stop early (smoke runs; 0 or unset: no); schedules still span `epochs`
    config.log_every_steps = 100
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 1000
    config.skip_nonfinite_steps = 0    # 0: stop at a non-finite loss; N: skip such updates, stop after N in a row
    config.keep_checkpoints = 3
    config.progress_bar = True
    config.mesh = ConfigDict({"data": -1, "fsdp": 1})  # axis sizes; -1: the remaining devices (train/sharding.py)
    return config


def deit(model: str = "deit_small_patch16_224", *, distilled: bool = False) -> ConfigDict:
    """DeiT (facebookresearch/deit main.py defaults): 300 epochs, batch 1024, AdamW 5e-4 x batch/512."""
    c = ConfigDict()
    c.method = "deit"
    c.model = ConfigDict({
        "name": model,
        "num_classes": _opt(int),      # default: the data's class count
        "patch_size": _opt(int),       # ViTs; default: the model's own
        "drop_path_rate": 0.1,
        "drop_rate": 0.0,
        "train_mode": True,            # train the student in training mode (drop path on, a distilled one's heads
                                       # apart); False: in inference mode, as DeiT fine-tunes (--no-train-mode)
        "dtype": "auto",               # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
        "remat": False,                # ViTs: recompute each block in the backward pass (less memory, more compute)
        "fused_attention": True,       # ViTs: cuDNN flash attention on GPUs in half precision
        "scan_blocks": False,          # ViTs: the blocks as one lax.scan: one block to compile, not depth
        "init_from": _opt(str),        # orbax dir from `python -m vitdistill.convert` or a workdir (fine-tuning)
        "init_from_network": "auto",   # of a workdir: auto (DINO: teacher, else student) | student | teacher | ema
    })
    c.data = _data("tfds", name="imagenet2012")
    c.augment = ConfigDict({
        "crop": "auto",                # auto (build_transform's rule: padded at image_size <= 32) | resized | padded
        "scale": (0.08, 1.0),
        "ratio": (3 / 4, 4 / 3),
        "hflip": 0.5,
        "rand_augment": True,          # timm rand-m9-mstd0.5-inc1
        "ra_num_ops": 2,
        "ra_magnitude": 9.0,
        "ra_magnitude_std": 0.5,
        "erase_prob": 0.25,            # random erasing, per-pixel values
        "repeats": 3,                  # repeated augmentation
    })
    c.mixup = ConfigDict({
        "mixup_alpha": 0.8,
        "cutmix_alpha": 1.0,
        "switch_prob": 0.5,
        "prob": 1.0,
        "label_smoothing": 0.1,
        "groups": 0,                   # one lam/box per device's rows, as each GPU under DeiT's DDP; 1: per batch
    })
    c.distill = ConfigDict({
        "kind": "hard" if distilled else "none",  # none | soft | hard
        "alpha": 0.5,
        "tau": 1.0,
    })
    c.teacher = ConfigDict({
        "model": "regnety_160",
        "checkpoint": _opt(str),       # orbax dir (convert output, or a teacher run's workdir)
        "train": ConfigDict(),         # a full config: train the teacher first, in workdir/teacher
    })
    c.optim = ConfigDict({
        "lr": 5e-4,                    # scaled by batch_size / lr_reference_batch
        "lr_reference_batch": 512,
        "weight_decay": 0.05,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "warmup_epochs": 5.0,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
        "schedule_per_epoch": True,    # the official scheduler steps once per epoch
        "schedule_official_lag": True,  # ...after the epoch: epoch e trains at the value for e-1 (main.py)
        "clip_grad": 0.0,              # global-norm clipping; 0 = off (the official default)
    })
    c.model_ema_decay = 0.99996        # official DeiT keeps (and saves) a model EMA; 0 = off
    return _run(c, epochs=300.0, batch_size=1024)


def deit_finetune(model: str = "deit_base_patch16_384", *, distilled: bool = False, image_size: int = 384) -> ConfigDict:
    """DeiT fine-tuning at a higher resolution, as the official README's command runs main.py --finetune:
    30 epochs, batch 512, lr 5e-6 x batch/512 with min lr 5e-6 (so constant after main.py's default 5
    warm-up epochs from 1e-6, with its one-epoch lag), weight decay 1e-8; evaluation resizes to
    int(size / 0.875) (438 for 384) and centre-crops, as build_transform does with eval_crop_ratio 0.875.
    The student trains in inference mode (`model.train_mode=False`), as main.py fine-tunes: the paper's code
    (`set_training_mode=args.finetune == ''`, "keep in eval mode during finetuning") and today's with
    `--no-train-mode` ("keep in eval mode for deit finetuning"): no drop path, and a distilled model's one
    output, the mean of its heads, takes the cross-entropy, so both heads train.
    Without distillation: main.py refuses --finetune with a distillation type ("Finetuning with
    distillation not yet supported"); `distill.kind` may still be set (the paper's ⚗↑384 used a teacher),
    with `model.train_mode=True` (the distillation loss needs the two heads apart)."""
    c = deit(model, distilled=distilled)
    c.data.image_size = image_size
    c.epochs = 30.0
    c.batch_size = 512
    c.optim.lr = 5e-6
    c.optim.min_lr = 5e-6
    c.optim.weight_decay = 1e-8
    c.distill.kind = "none"
    c.model.train_mode = False
    return c


def dino(model: str = "vit_small_patch16_224", *, batch_size: int = 1024) -> ConfigDict:
    """DINO: facebookresearch/dino main_dino.py defaults, 64 images per GPU; `batch_size` is the global batch
    of the run it stands for (8 GPUs: 512, the README's 100-epoch ViT-S/16; 16 GPUs: 1024, its ViT-B runs)."""
    c = ConfigDict()
    c.method = "dino"
    c.model = ConfigDict({
        "name": model,
        "patch_size": _opt(int),       # default: the model's own
        "drop_path_rate": 0.1,         # student only
        "out_dim": 65536,
        "hidden_dim": 2048,
        "bottleneck_dim": 256,
        "norm_last_layer": True,
        "use_bn_in_head": False,       # official option; BatchNorm in the head's MLP
        "dtype": "auto",               # compute dtype: auto = bfloat16 on GPU/TPU, float32 on CPU
        "remat": False,                # recompute each block in the backward pass (less memory, more compute)
        "fused_attention": True,       # cuDNN flash attention on GPUs in half precision
        "scan_blocks": False,          # the blocks as one lax.scan: one block to compile, not depth
        "init_from": _opt(str),        # a `python -m vitdistill.convert` output or a workdir
        "init_from_network": "auto",   # of a workdir: auto (DINO: teacher, else student) | student | teacher | ema
    })
    c.data = _data("tfds", name="imagenet2012")
    c.multicrop = ConfigDict({
        "global_size": 224,
        "local_size": 96,
        "global_scale": (0.4, 1.0),
        "local_scale": (0.05, 0.4),
        "num_local": 8,
        "blur_sigma": (0.1, 2.0),      # Gaussian blur sigma range, in pixels of the crop
    })
    c.dino = ConfigDict({
        "student_temp": 0.1,
        "teacher_temp": 0.04,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 0.0,
        "center_momentum": 0.9,
        "momentum_teacher": 0.996,     # cosine to 1 over the run
    })
    c.optim = ConfigDict({
        "lr": 5e-4,                    # scaled by batch_size / lr_reference_batch
        "lr_reference_batch": 256,
        "min_lr": 1e-6,
        "warmup_epochs": 10.0,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "b1": 0.9,
        "b2": 0.999,
        "eps": 1e-8,
        "clip_grad": 3.0,              # per parameter tensor
        "freeze_last_layer": 1.0,       # epochs without updates to the head's last layer
    })
    c.knn = ConfigDict({
        "every_epochs": 10.0,           # 0 = only at the end
        "k": 20,
        "temperature": 0.07,
        "train_limit": _opt(int),      # labelled examples used as the k-NN memory bank
        "eval_limit": _opt(int),
        "before_training": False,      # also measure the network at initialisation
    })
    return _run(c, epochs=100.0, batch_size=batch_size)


def dino_boost(config: ConfigDict) -> ConfigDict:
    """The DINO README's "Boosting DINO performance" full command for ViT-S/16 (73.3 k-NN, 76.0 linear):
    `run_with_submitit.py --arch vit_small --epochs 300 --teacher_temp 0.07 --warmup_teacher_temp_epochs 30
    --norm_last_layer false` on its default 2 nodes x 8 GPUs x 64 images (batch 1024). The last layer without
    weight normalisation is "only safe with --arch vit_small"."""
    config.epochs = 300.0
    config.batch_size = 1024
    config.dino.teacher_temp = 0.07
    config.dino.warmup_teacher_temp = 0.04
    config.dino.warmup_teacher_temp_epochs = 30.0
    config.model.norm_last_layer = False
    return config


def _frozen_backbone(model: str) -> ConfigDict:
    """`config.model` of an evaluation of a frozen ViT: float32 features, as eval_linear.py / eval_knn.py."""
    return ConfigDict({
        "name": model,                 # the backbone's architecture
        "dtype": "float32",            # eval_linear.py and eval_knn.py run the frozen backbone in float32
        "init_from": _opt(str),        # required: a DINO/DeiT workdir or a `python -m vitdistill.convert` output
        "init_from_network": "auto",   # of a workdir: auto (DINO: teacher, else student) | student | teacher | ema
    })


def linear(model: str = "vit_small_patch16_224") -> ConfigDict:
    """DINO's linear evaluation (facebookresearch/dino eval_linear.py defaults): 100 epochs, batch 1024
    (128 x 8 GPUs), SGD momentum 0.9, lr 1e-3 x batch/256, weight decay 0, cosine per epoch; features the
    CLS of the last 4 blocks (the README's ViT-S/16 command; ViT-B: n_last_blocks 1 + avgpool_patchtokens)."""
    c = ConfigDict()
    c.method = "linear"
    c.model = _frozen_backbone(model)
    c.data = _data("tfds", name="imagenet2012")
    c.linear = ConfigDict({
        "n_last_blocks": 4,
        "avgpool_patchtokens": False,
        "lrs": (1e-3,),                # one head per base lr, trained on the same features in one pass
        "momentum": 0.9,
        "scale": (0.08, 1.0),          # RandomResizedCrop(224)'s default scale
        "interpolation": "bilinear",   # ...and its default resampling (the evaluation resize is bicubic)
    })
    return _run(c, epochs=100.0, batch_size=1024)


def logreg(model: str = "vit_small_patch16_224") -> ConfigDict:
    """Logistic-regression probe (SimCLR's and CLIP's transfer protocol, `vitdistill/methods/logreg.py`):
    eval_linear's features (CLS of the last 4 blocks) of the eval transform, computed once; l2 strength from a
    log grid picked on a 10 % validation split of the training set (SimCLR: 1e-6 to 1e5; the rows past 1e-1
    only underfit normalised ViT features), L-BFGS to a gradient norm of 1e-6 or 1000 iterations (CLIP's cap)."""
    c = ConfigDict()
    c.method = "logreg"
    c.model = _frozen_backbone(model)
    c.data = _data("tfds", name="imagenet2012")
    c.logreg = ConfigDict({
        "n_last_blocks": 4,
        "avgpool_patchtokens": False,
        "l2s": (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),  # l2 / 2 * ||W||^2 added to the mean cross-entropy
        "val_fraction": 0.1,           # of the training set, held out (seeded by config.seed) to choose l2
        "max_iter": 1000,
        "tol": 1e-6,                   # on the gradient's norm
        "train_limit": _opt(int),
        "eval_limit": _opt(int),
        "features_dir": _opt(str),     # write the features there as .npy; a later run reads them back
    })
    return _run(c, epochs=0.0, batch_size=256)


def knn_eval(model: str = "vit_small_patch16_224") -> ConfigDict:
    """DINO's k-NN evaluation (facebookresearch/dino eval_knn.py defaults): k in 10, 20, 100, 200, T 0.07,
    float32 CLS features of resize 256 + centre crop 224 (crop_pct 0.875), the whole train split as the bank."""
    c = ConfigDict()
    c.method = "knn"
    c.model = _frozen_backbone(model)
    c.data = _data("tfds", name="imagenet2012")
    c.knn = ConfigDict({
        "ks": (10, 20, 100, 200),
        "temperature": 0.07,
        "train_limit": _opt(int),
        "eval_limit": _opt(int),
        "features_dir": _opt(str),     # write the features there as .npy; a later run reads them back
    })
    return _run(c, epochs=0.0, batch_size=256)


def from_file(path: str, arg: str | None = None) -> ConfigDict:
    """The config of a config file, as `--config=PATH[:ARG]` loads it: `get_config(ARG)`, or `get_config()`
    without one. `path` may carry the `:ARG` itself (`configs/deit_small_data.py:none`)."""
    import importlib.util
    import os

    if arg is None and ":" in os.path.basename(path):
        path, _, arg = path.rpartition(":")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
