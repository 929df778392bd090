"""DeiT on any small data set, sized to it at the start of the run (`vitdistill/small_data.py`):

    python -m vitdistill.main --config=configs/deit_small_data.py:hard --workdir=DIR \
        [--config.data.source=folder --config.data.data_dir=ROOT]   # ROOT/train/<class>/*, ROOT/val/<class>/*

The argument picks the student: `none` (a micro DeiT without distillation token), `hard` (the default) or
`soft` (a micro distilled DeiT taught by a `resnet_micro` that trains first, on the same data, into
DIR/teacher/). By default scikit-learn's digits (no download). The student trains for 1,200 steps at batch
64 (`--config.small_data.steps=N`; the teacher half as many) on 16-token images; the image size, run length
in epochs, warm-up, RandAugment magnitude, erasing and drop path follow from the training split's size and
image side by the rules of `small_data.deit_settings` (the first line of the run prints what they chose); a
value given on the command line is kept.
"""
from vitdistill import recipes, small_data


def get_config(arg="hard"):
    recipes.check_config_arg("configs/deit_small_data.py", arg, ("none", "soft", "hard"))
    return small_data.small_deit_recipe("digits", distill=arg or "hard")
