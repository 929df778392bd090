"""Teachers for DeiT: a CNN trained on a small data set, or the paper's RegNetY-16GF evaluated on ImageNet.

    python -m vitdistill.main --config=configs/teacher_cnn.py:fashion_mnist --workdir=DIR

`:digits` and `:fashion_mnist` train `resnet_micro` (a ResNet with a CIFAR-style stem) with plain
supervised learning; point a student's `--config.teacher.checkpoint` at the workdir afterwards.
`:regnety_160` trains nothing (epochs = 0): it evaluates the converted official teacher on ImageNet
(paper: 82.9 top-1), e.g. after
    python -m vitdistill.convert --checkpoint=regnety_160-a5fe301d.pth --model=regnety_160 --output=DIR
    python -m vitdistill.main --config=configs/teacher_cnn.py:regnety_160 --workdir=W \
        --config.model.init_from=DIR --config.data.data_dir=TFDS_DIR
"""
from vitdistill import recipes, small_data


def get_config(arg="fashion_mnist"):
    recipes.check_config_arg("configs/teacher_cnn.py", arg, ("digits", "fashion_mnist", "regnety_160"))
    if arg in ("digits", "fashion_mnist"):
        return small_data.cnn_teacher(arg, epochs=15)
    config = recipes.deit("regnety_160")  # regnety_160
    config.epochs = 0.0
    config.model.drop_path_rate = 0.0
    config.model_ema_decay = 0.0
    return config
