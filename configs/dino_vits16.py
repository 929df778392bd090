"""DINO ViT-S/16: the DINO README's vanilla 100-epoch run (k-NN 69.3, linear 74.0).

    python -m vitdistill.main --config=configs/dino_vits16.py --workdir=DIR --config.data.data_dir=TFDS_DIR

facebookresearch/dino main_dino.py defaults as the README's command runs them on one node of 8 GPUs
(`--nproc_per_node=8`, 64 images each: batch 512): 100 epochs, AdamW lr 5e-4 x batch/256 (peak 1e-3) with
10 warm-up epochs then cosine to 1e-6, weight decay cosine 0.04 -> 0.4, teacher momentum 0.996 -> 1,
2 global 224-px crops + 8 local 96-px crops, teacher temperature 0.04, center momentum 0.9, clipping 3.0
per tensor, the head's last layer frozen for the first epoch, drop path 0.1.
`:boost` is the README's "Boosting DINO performance" full command (73.3 / 76.0): 300 epochs, teacher
temperature 0.04 -> 0.07 over 30 epochs, no weight normalisation of the last layer, batch 1024 (its 2 nodes).
The paper's own figures (74.5 / 77.0 after 800 epochs) come from runs whose arguments the README links to
but does not state. `:runlocal` is a micro model on scikit-learn's digits for a CPU smoke run.
On a GPU whose host cores cannot make the views fast enough, `--config.data.image_ops=device` applies the
colour jitter, grayscale, blur and solarisation in the train step (the same levels; slower on a CPU), and
`--config.data.device_canvas=512` (or the side of most of the data's images) the crops and resizes too.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/dino_vits16.py", arg, ("boost", "runlocal"))
    config = recipes.dino("vit_small_patch16_224", batch_size=512)
    if arg == "boost":
        recipes.dino_boost(config)
    return small_data.runlocal(config) if arg == "runlocal" else config
