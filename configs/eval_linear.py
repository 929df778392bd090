"""Linear probe of a frozen ViT, as DINO's eval_linear.py (100 epochs, SGD, lr 1e-3 x batch/256, CLS of the
last 4 blocks):

    python -m vitdistill.main --config=configs/eval_linear.py --config.model.init_from=WORKDIR_OR_CONVERTED \
        --config.model.name=vit_small_patch16_224 --workdir=/tmp/vitdistill/linear

ViT-B (the official command): --config.linear.n_last_blocks=1 --config.linear.avgpool_patchtokens=True.
Several learning rates in one pass: --config.linear.lrs="(0.0001, 0.001, 0.01)".
`:runlocal`: a micro ViT workdir or checkpoint on digits, for a CPU smoke run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/eval_linear.py", arg, ("runlocal",))
    config = recipes.linear()
    if arg == "runlocal":
        small_data.use_small_data(config, "digits")
        config.model.name = "vit_micro_patch4_32"
        config.linear.n_last_blocks = 2
        config.batch_size = 64
        config.epochs = 2.0
        config.log_every_steps = 10
        config.progress_bar = False
    return config
