"""DINO ViT-B/16 (README: k-NN 76.1, linear 78.2).

    python -m vitdistill.main --config=configs/dino_vitb16.py --workdir=DIR --config.data.data_dir=TFDS_DIR

The official main_dino.py defaults (see configs/dino_vits16.py) at batch 1024 (16 GPUs x 64, as the
README's multi-node commands run); `:runlocal` for a CPU smoke run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/dino_vitb16.py", arg, ("runlocal",))
    config = recipes.dino("vit_base_patch16_224", batch_size=1024)
    return small_data.runlocal(config) if arg == "runlocal" else config
