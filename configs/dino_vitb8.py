"""DINO ViT-B/8 (README: k-NN 77.4, linear 80.1).

    python -m vitdistill.main --config=configs/dino_vitb8.py --workdir=DIR --config.data.data_dir=TFDS_DIR

The official main_dino.py defaults (see configs/dino_vits16.py) at batch 1024 (16 GPUs x 64, as the
README's multi-node commands run); `:runlocal` for a CPU smoke run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/dino_vitb8.py", arg, ("runlocal",))
    config = recipes.dino("vit_base_patch8_224", batch_size=1024)
    return small_data.runlocal(config) if arg == "runlocal" else config
