"""DINO on any small data set, sized to it at the start of the run (`vitdistill/small_data.py`):

    python -m vitdistill.main --config=configs/dino_small_data.py --workdir=DIR \
        [--config.data.source=folder --config.data.data_dir=ROOT]   # ROOT/train/<class>/*, ROOT/val/<class>/*

By default scikit-learn's digits (no download). A micro ViT learns from 2 global crops of 16 tokens and 6
local crops of 4 tokens for 1,200 steps at batch 64 (`--config.small_data.steps=N`), about 10 minutes on 2
CPU cores whatever the data, at 16 px in 4-px patches whatever the images' side. The output dimension, run
length in epochs, warm-up, frozen last layer, teacher momentum and lr follow from the training split's size by
the rules of `small_data.dino_settings` (the first line of the run prints what they chose); a value given on
the command line is kept. k-NN (k 20, T 0.07) is measured at initialisation and at the end; the labels are
used for nothing else. The same recipe, unchanged, is the README's three-dataset table
(`experiments/small_data_table.py`).
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/dino_small_data.py", arg, ())
    return small_data.small_dino_recipe("digits")
