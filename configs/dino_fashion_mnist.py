"""DINO at small scale on Fashion-MNIST: a micro ViT learns without labels; k-NN measures it.

    python -m vitdistill.main --config=configs/dino_fashion_mnist.py --workdir=DIR

Self-distillation of a micro ViT with 7-px patches on the 60,000 training images (labels unused),
2 global 28-px crops and 6 local 14-px crops; k-NN (k 20, T 0.07) with the first 10,000 training
images as memory bank and the first 2,000 test images as queries, at initialisation and at the end. Needs
`apt-get install dataset-fashion-mnist`. `experiments/dino_fashion_mnist.py` compares it with k-NN on
raw pixels.
"""
from vitdistill import small_data


def get_config(arg=None):
    del arg
    config = small_data.small_dino("fashion_mnist", image_size=28, local_size=14, num_local=6, epochs=4.5,
                                   patch_size=7)
    config.knn.train_limit = 10_000
    config.knn.eval_limit = 2_000
    return config
