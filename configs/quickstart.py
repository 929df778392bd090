"""Quick start: a CNN teacher, then a distilled DeiT student, on scikit-learn's digits (no download).

    python -m vitdistill.main --config=configs/quickstart.py --workdir=/tmp/vitdistill/quickstart

Trains `resnet_micro` on the 1,438 training digits, then `deit_micro_distilled_patch4_32` with
hard distillation from it, and prints teacher top-1 and student top-1 per head and averaged on
the 359 test digits. About 5 minutes on 2 CPU cores.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/quickstart.py", arg, ())
    config = recipes.deit("deit_micro_distilled_patch4_32", distilled=True)
    small_data.use_small_data(config, "digits")
    small_data.light_deit_augment(config)
    config.data.image_size = 16  # digits are 8x8: 16 px and 4-px patches give 16 tokens
    small_data.short_schedule(config, epochs=100, batch_size=64, lr=2e-3, warmup_epochs=5)
    config.model.drop_path_rate = 0.0
    config.distill.kind = "hard"
    config.teacher.train = small_data.cnn_teacher("digits", epochs=15)
    config.teacher.train.data.image_size = 16
    config.eval_every_epochs = 0
    return config
