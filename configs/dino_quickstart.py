"""DINO quick start on scikit-learn's digits (no download): k-NN top-1 before and after self-distillation.

    python -m vitdistill.main --config=configs/dino_quickstart.py --workdir=/tmp/vitdistill/dino_quickstart

The small-data recipe (`configs/dino_small_data.py`, sized to the data at the start of the run by the rules
of `vitdistill/small_data.py`, which were chosen on held-out letters, not on these digits): a micro ViT with a
BatchNorm head learns from 2 global 16-px crops and 6 local 8-px crops of the 1,438 training digits for 1,200
steps of 64, without their labels; the k-NN classifier (k 20, T 0.07) on its teacher's CLS features is
measured on the 359 test digits at initialisation and at the end.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/dino_quickstart.py", arg, ())
    return small_data.small_dino_recipe("digits")
