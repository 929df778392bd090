"""DeiT-S⚗ on ImageNet, hard distillation from RegNetY-16GF (paper: 81.2 top-1 at 300 epochs), the official recipe.

    python -m vitdistill.main --config=configs/deit_s_distilled.py --workdir=DIR --config.data.data_dir=TFDS_DIR --config.teacher.checkpoint=TEACHER_DIR

Official facebookresearch/deit defaults: 300 epochs, batch 1024, AdamW lr 5e-4 x batch/512, weight
decay 0.05, 5 warm-up epochs, cosine per epoch to 1e-5, RandAugment m9, random erasing 0.25,
mixup 0.8 / cutmix 1.0, label smoothing 0.1, repeated augmentation x3, stochastic depth 0.1.
`:runlocal` shrinks it to a micro model on scikit-learn's digits for a CPU smoke run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/deit_s_distilled.py", arg, ("runlocal",))
    config = recipes.deit("deit_small_distilled_patch16_224", distilled=True)
    # The DeiT paper's teacher: RegNetY-16GF (82.9% top-1). Convert the official weights once:
    #   python -m vitdistill.convert --checkpoint=regnety_160-a5fe301d.pth --model=regnety_160 --output=DIR
    # then pass --config.teacher.checkpoint=DIR.
    config.teacher.model = "regnety_160"
    return small_data.runlocal(config) if arg == "runlocal" else config
