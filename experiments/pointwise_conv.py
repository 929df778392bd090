"""1x1 convolutions on XLA:CPU: `lax.conv_general_dilated` against one matrix product over the pixels, and PyTorch.

RegNetY-16GF's pointwise convolutions (conv1, conv3) at its four stage widths, batch 4, float32 NHWC (PyTorch:
channels-last `conv2d`), each timed alone (median of 30 calls after 3). `vitdistill.models.regnet.GroupedConv`
runs the matrix product on the CPU. Prints the largest difference between the two JAX forms too.

    python experiments/pointwise_conv.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from vitdistill.bench import median_seconds

WIDTHS = ((56, 224), (28, 448), (14, 1232), (7, 3024))  # (side, channels) of RegNetY-16GF's stages at 224 px


def median_ms(fn, calls: int = 30) -> float:
    return 1e3 * median_seconds(fn, calls, warmup=3)


def main():
    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    conv = jax.jit(lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), 'VALID',
                                                             dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
    matmul = jax.jit(lambda x, k: (x.reshape(-1, x.shape[-1]) @ k[0, 0]).reshape(*x.shape[:-1], k.shape[-1]))
    for side, width in WIDTHS:
        x = jnp.asarray(rng.standard_normal((4, side, side, width)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((1, 1, width, width)) * 0.02, jnp.float32)
        gflop = 2 * 4 * side * side * width * width / 1e9
        theirs_x = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).contiguous(
            memory_format=torch.channels_last)
        theirs_k = torch.from_numpy(np.asarray(k).transpose(3, 2, 0, 1).copy())
        with torch.no_grad():
            times = {"conv": median_ms(lambda: conv(x, k).block_until_ready()),
                     "matmul": median_ms(lambda: matmul(x, k).block_until_ready()),
                     "torch": median_ms(lambda: torch.nn.functional.conv2d(theirs_x, theirs_k))}
        diff = float(jnp.abs(conv(x, k) - matmul(x, k)).max())
        print(f"{side}x{side}x{width}: " + ", ".join(f"{n} {t:.2f} ms ({gflop / t * 1e3:.0f} GFLOP/s)"
                                                      for n, t in times.items()) + f"; max diff {diff:.1e}")


if __name__ == "__main__":
    main()
