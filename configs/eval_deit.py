"""DeiT top-1 of a converted checkpoint or a training workdir, nothing trained: for a distilled model all
three heads (class token, distillation token, and their average, which is what DeiT's eval forward returns).

    python -m vitdistill.convert --checkpoint=deit_small_distilled_patch16_224-649709d9.pth \
        --model=deit_small_distilled_patch16_224 --output=/ckpt/deit_s_distilled
    python -m vitdistill.main --config=configs/eval_deit.py:deit_small_distilled_patch16_224 \
        --config.model.init_from=/ckpt/deit_s_distilled --workdir=/tmp/vitdistill/eval_deit_s_distilled

The argument is the model (default deit_small_patch16_224). Data: TFDS imagenet2012's validation split,
resize int(size / 0.875) + centre crop, as DeiT's build_transform; only that split is read (it also gives
the class count), so the training split need not be there. Another set: --config.data.source=folder
--config.data.data_dir=DIR --config.data.eval_split=val (DIR/val/<class>/...).
"""
from vitdistill import models, recipes


def get_config(arg=None):
    deits = tuple(name for name in models.MODELS if name.startswith("deit_"))
    recipes.check_config_arg("configs/eval_deit.py", arg, deits)
    model = arg or "deit_small_patch16_224"
    config = recipes.deit(model, distilled="distilled" in model)
    config.data.image_size = 384 if model.endswith("_384") else 224
    # Nothing trains: the evaluated split also names the classes (a reference, so --config.data.eval_split=
    # moves both).
    config.data.train_split = config.data.get_ref("eval_split")
    config.epochs = 0.0
    config.distill.kind = "none"  # no teacher: its heads are evaluated, not trained
    config.model_ema_decay = 0.0
    config.batch_size = 256
    return config
