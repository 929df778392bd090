"""DINO ViT-S/16 (README: k-NN 74.5, linear 77.0 after 800 epochs; 100 epochs: 69.3 / 74.0).

    python -m vitdistill.main --config=configs/dino_vits16.py --workdir=DIR --config.data.data_dir=TFDS_DIR

facebookresearch/dino main_dino.py defaults: 100 epochs, AdamW lr 5e-4 x batch/256 with 10
warm-up epochs then cosine to 1e-6, weight decay cosine 0.04 -> 0.4, teacher momentum 0.996 -> 1,
2 global 224-px crops + 8 local 96-px crops, teacher temperature 0.04, center momentum 0.9,
clipping 3.0 per tensor, the head's last layer frozen for the first epoch, drop path 0.1.
`:paper` uses the paper's teacher-temperature warm-up 0.04 -> 0.07 over 30 epochs and 10 local
crops; `:runlocal` is a micro model on scikit-learn's digits for a CPU smoke run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    config = recipes.dino("vit_small_patch16_224", paper=arg == "paper")
    return small_data.runlocal(config) if arg == "runlocal" else config
