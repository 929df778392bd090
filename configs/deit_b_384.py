"""Fine-tunes a 224-px DeiT-B at 384 px (paper: 83.1 top-1), as the official README's command does.

    python -m vitdistill.convert --checkpoint=deit_base_patch16_224-*.pth --model=deit_base_patch16_224 --output=DEIT_224
    python -m vitdistill.main --config=configs/deit_b_384.py --workdir=DIR --config.data.data_dir=TFDS_DIR --config.model.init_from=DEIT_224

The 224-px position embedding is resampled bicubically to the 24x24 grid on loading. Official
fine-tuning settings (main.py --finetune): 30 epochs, lr 5e-6 x batch/512 with min lr 5e-6, after
main.py's 5 warm-up epochs from 1e-6, the model in inference mode while it trains (no drop path;
`model.train_mode=False`, main.py's "keep in eval mode during finetuning"); evaluation resizes to 438
and centre-crops 384.
"""
from vitdistill import recipes, small_data


def get_config(arg=None):
    recipes.check_config_arg("configs/deit_b_384.py", arg, ("runlocal",))
    config = recipes.deit_finetune("deit_base_patch16_384", distilled=False)
    return small_data.runlocal(config) if arg == "runlocal" else config
