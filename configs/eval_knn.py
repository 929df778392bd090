"""k-NN evaluation of a frozen ViT, as DINO's eval_knn.py (k 10, 20, 100, 200; T 0.07; float32 CLS features):

    python -m vitdistill.main --config=configs/eval_knn.py --config.model.init_from=WORKDIR_OR_CONVERTED \
        --config.model.name=vit_small_patch16_224 --workdir=/tmp/vitdistill/knn

--config.knn.features_dir=DIR writes the features as .npy, and a later run with the same DIR reads them
back. `:digits`: scikit-learn's digits at 32 px (a micro ViT's checkpoint), for a CPU run.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/eval_knn.py", arg, ("digits",))
    config = recipes.knn_eval()
    if arg == "digits":
        small_data.use_small_data(config, "digits")
        config.model.name = "vit_micro_patch4_32"
        config.batch_size = 128
        config.progress_bar = False
    return config
