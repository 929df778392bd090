"""Fine-tunes a 224-px distilled DeiT-B at 384 px (paper: DeiT-B⚗↑384, 85.2 top-1 after 1000 epochs at 224).

    python -m vitdistill.convert --checkpoint=deit_base_distilled_patch16_224-*.pth --model=deit_base_distilled_patch16_224 --output=DEIT_224
    python -m vitdistill.main --config=configs/deit_b_distilled_384.py --workdir=DIR --config.data.data_dir=TFDS_DIR --config.model.init_from=DEIT_224

What the official code runs: its main.py refuses to fine-tune with distillation (NotImplementedError,
"Finetuning with distillation not yet supported") and fine-tunes in inference mode (the paper's code,
`set_training_mode=args.finetune == ''`; today's with --no-train-mode), so both heads start from the
224-px model, no drop path runs, and the cross-entropy takes the mean of the two heads, which both
train (`model.train_mode=False`). The paper fine-tuned with its RegNetY teacher at the target
resolution: `:distill` does that (hard distillation, in training mode: the loss needs the heads apart;
give the teacher with --config.teacher.checkpoint=TEACHER_DIR). Otherwise as configs/deit_b_384.py: 30 epochs, lr 5e-6 x
batch/512 with min lr 5e-6 after 5 warm-up epochs from 1e-6, evaluation resize 438 + centre crop 384.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/deit_b_distilled_384.py", arg, ("distill", "runlocal"))
    config = recipes.deit_finetune("deit_base_distilled_patch16_384", distilled=True)
    if arg == "distill":
        config.distill.kind = "hard"
        config.model.train_mode = True
    return small_data.runlocal(config) if arg == "runlocal" else config
