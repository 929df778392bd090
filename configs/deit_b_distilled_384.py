"""Fine-tunes a 224-px DeiT-B at 384 px (paper: 85.2 top-1 after 1000 epochs at 224), as the official README does.

    python -m vitdistill.convert --checkpoint=deit_base_distilled_patch16_224-*.pth --model=deit_base_distilled_patch16_224 --output=DEIT_224
    python -m vitdistill.main --config=configs/deit_b_distilled_384.py --workdir=DIR --config.data.data_dir=TFDS_DIR --config.model.init_from=DEIT_224 --config.teacher.checkpoint=TEACHER_DIR

The 224-px position embedding is resampled bicubically to the 24x24 grid on loading. Official
fine-tuning settings: 30 epochs, lr 5e-6 x batch/512 held constant (min lr 5e-6), weight decay 1e-8,
images resized to 384 with crop_pct 1.0 at evaluation.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    config = recipes.deit_finetune("deit_base_distilled_patch16_384", distilled=True)
    return small_data.runlocal(config) if arg == "runlocal" else config
