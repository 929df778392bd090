"""The ViT's patch embedding as the image's patches times the kernel (`cpu_gemm.conv_general_dilated`, one
native product and its kernel gradient as another) against XLA:CPU's convolution, as it was: the embedding
alone (DeiT-S's at batch 4, from uint8 levels through normalising and random erasing, forward and the kernel's
gradient, 6 turns of 20 calls), then the train steps built each way, each timed in turns in one process.

    python experiments/patch_products.py [--turns=6] [--per_turn=3] [--configs=deit_s,dino_vits16,deit_s_distilled]

XLA:CPU ran DeiT-S's patch embedding at batch 4 as a YNNPACK convolution (5.3 ms) of the images transposed to
[c, h, w, n] (9.0 ms, random erasing's noise computed in that transpose) and its kernel gradient as another
(4.6 ms); a profile of the distilled step at 53c7957. Prints the medians of the turns' medians.
"""
from absl import flags
import jax

import cpu_gemm as gemm_experiment  # experiments/, on the path when this script runs; defines the flags below

FLAGS = flags.FLAGS
FLAGS.set_default("turns", 6)


def as_convolution():
    from vitdistill import cpu_gemm

    return {(cpu_gemm, "conv_general_dilated"): jax.lax.conv_general_dilated}


def embedding(turns: int = 6, calls: int = 20):
    import jax.numpy as jnp
    import numpy as np

    from vitdistill.data import device_ops
    from vitdistill.models import vit

    rng = np.random.default_rng(0)
    levels = jnp.asarray(rng.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8))
    boxes = jnp.asarray([[1, 10, 20, 100, 80, 5], [0, 0, 0, 0, 0, 6], [1, 50, 60, 30, 120, 7], [0, 0, 0, 0, 0, 8]],
                        jnp.int32)  # device_ops.ERASE_FIELDS
    module = vit.PatchEmbed(16, 384)
    params = module.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    cotangent = jnp.asarray(rng.standard_normal((4, 14, 14, 384)).astype(np.float32))
    key = jax.random.key(1)

    def build():
        def loss(p, key):
            images = device_ops.erase_boxes(key, device_ops.normalize_levels(levels), boxes)
            return jnp.sum(module.apply(p, images) * cotangent)
        return jax.jit(jax.grad(loss)).lower(params, key).compile()

    forms = {"a convolution": gemm_experiment.with_patches(as_convolution(), build), "patch products": build()}
    kernels = [forms[name](params, key)["params"]["proj"]["kernel"] for name in forms]
    print(f"kernel gradient: largest difference {float(jnp.abs(kernels[0] - kernels[1]).max()):.3g} "
          f"of largest {float(jnp.abs(kernels[0]).max()):.3g}")
    rounds = gemm_experiment.calls_in_turns({name: (lambda c=c: c(params, key)) for name, c in forms.items()},
                                            turns, calls)
    print("the embedding alone: on " + gemm_experiment.turns_line(rounds, 2), flush=True)


def main(argv):
    del argv
    gemm_experiment.require(gemm_experiment.custom_calls_in_use, "The native custom calls are not in use here")
    embedding()
    gemm_experiment.ab_steps(as_convolution, "a convolution", "patch products", "the patch embedding")


if __name__ == "__main__":
    gemm_experiment.run_on_one_device(main)
