"""Config file of tests/nano_main.py: `:deit` (a nano DeiT, hard distillation from a nano ResNet trained first)
or `:dino` (a nano DINO), 3 steps each, checkpointing only at the end."""
import legacy_workdirs


def get_config(method: str):
    config = {"deit": legacy_workdirs.deit_config, "dino": legacy_workdirs.dino_config}[method](max_steps=3)
    config.checkpoint_every_steps = 1000
    return config
