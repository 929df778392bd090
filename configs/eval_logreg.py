"""Logistic-regression probe of a frozen ViT (SimCLR's / CLIP's transfer protocol: features computed once,
l2 picked on a 10 % validation split of the training set, L-BFGS to convergence, scored once on the test split):

    python -m vitdistill.main --config=configs/eval_logreg.py --config.model.init_from=WORKDIR_OR_CONVERTED \
        --config.model.name=vit_small_patch16_224 --workdir=/tmp/vitdistill/logreg

DINO's own linear evaluation (SGD on augmented crops, 100 epochs) is configs/eval_linear.py.
--config.logreg.features_dir=DIR keeps the features as .npy for a later run. `:digits`: scikit-learn's
digits at 32 px (a micro ViT's checkpoint), for a CPU run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/eval_logreg.py", arg, ("digits",))
    config = recipes.logreg()
    if arg == "digits":
        small_data.use_small_data(config, "digits")
        config.model.name = "vit_micro_patch4_32"
        config.logreg.n_last_blocks = 2
        config.batch_size = 128
        config.progress_bar = False
    return config
