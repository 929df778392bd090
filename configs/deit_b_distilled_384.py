"""Fine-tunes a 224-px distilled DeiT-B at 384 px (paper: DeiT-B⚗↑384, 85.2 top-1 after 1000 epochs at 224).

    python -m vitdistill.convert --checkpoint=deit_base_distilled_patch16_224-*.pth --model=deit_base_distilled_patch16_224 --output=DEIT_224
    python -m vitdistill.main --config=configs/deit_b_distilled_384.py --workdir=DIR --config.data.data_dir=TFDS_DIR --config.model.init_from=DEIT_224

What the official code runs by default: its main.py refuses to fine-tune with distillation
(NotImplementedError, "Finetuning with distillation not yet supported"), so both heads start from the
224-px model and only the class head's cross-entropy trains (the distillation head keeps its weights
and is averaged in at inference). The paper fine-tuned with its RegNetY teacher at the target
resolution: `:distill` does that (hard distillation; give the teacher with
--config.teacher.checkpoint=TEACHER_DIR). Otherwise as configs/deit_b_384.py: 30 epochs, lr 5e-6 x
batch/512 with min lr 5e-6 after 5 warm-up epochs from 1e-6, evaluation resize 438 + centre crop 384.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    config = recipes.deit_finetune("deit_base_distilled_patch16_384", distilled=True)
    if arg == "distill":
        config.distill.kind = "hard"
    return small_data.runlocal(config) if arg == "runlocal" else config
