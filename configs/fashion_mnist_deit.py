"""DeiT at small scale on Fashion-MNIST: the paper's distillation ablation on a CPU.

    python -m vitdistill.main --config=configs/fashion_mnist_deit.py:hard --workdir=DIR

The argument picks the run: `teacher` (a ResNet trained on the same images), `none` (a micro DeiT
without distillation token), `soft` or `hard` (a micro distilled DeiT taught by that teacher, found in
--config.teacher.checkpoint, by default the workdir's `teacher/` — trained first if missing).
All students train for the same number of steps on the first 10,000 training images; evaluation
uses the 10,000 test images. Needs `apt-get install dataset-fashion-mnist`.
`experiments/deit_fashion_mnist.py` runs all four and prints the table in the README.
"""
from vitdistill import recipes, small_data

TRAIN_IMAGES = 10_000


def get_config(arg="hard"):
    recipes.check_config_arg("configs/fashion_mnist_deit.py", arg, ("teacher", "none", "soft", "hard"))
    if arg == "teacher":
        config = small_data.cnn_teacher("fashion_mnist", epochs=15)
    else:  # none, soft, hard
        distilled = arg != "none"
        model = "deit_micro_distilled_patch4_32" if distilled else "deit_micro_patch4_32"
        config = recipes.deit(model, distilled=distilled)
        small_data.use_small_data(config, "fashion_mnist")
        small_data.light_deit_augment(config)
        small_data.short_schedule(config, epochs=40, batch_size=64, lr=2e-3, warmup_epochs=2)
        config.model.drop_path_rate = 0.0
        config.distill.kind = arg
        if arg == "soft":
            config.distill.tau = 3.0  # the paper's soft-distillation runs: tau 3, lambda 0.1
            config.distill.alpha = 0.1
        if distilled:
            config.teacher.train = small_data.cnn_teacher("fashion_mnist", epochs=15)
    for run in (config, config.teacher.train) if config.teacher.train else (config,):
        run.data.image_size = 28
        run.data.train_limit = TRAIN_IMAGES
        run.eval_every_epochs = 0
    return config
