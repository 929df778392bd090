"""DINO quick start on scikit-learn's digits (no download): k-NN top-1 before and after self-distillation.

    python -m vitdistill.main --config=configs/dino_quickstart.py --workdir=/tmp/vitdistill/dino_quickstart

A micro ViT (4 blocks, width 128) learns from 2 global 16-px crops and 4 local 8-px crops of the
1,438 training digits, without their labels; the k-NN classifier (k 20, T 0.07) on its teacher's CLS
features is measured on the 359 test digits at initialisation and at the end.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/dino_quickstart.py", arg, ())
    return small_data.small_dino("digits", image_size=16, local_size=8, num_local=4, epochs=60,
                                 warmup_epochs=10, freeze_last_layer_epochs=10)
