"""Run by tests/test_cpu_gemm.py in a one-device process (the suite's own processes have two CPU devices, where
vitdistill.cpu_gemm leaves every product to XLA). Prints one JSON object of measured errors and facts."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import cpu_gemm
from vitdistill.models import vit


def relative_error(ours, reference):
    """max |ours - reference| / max |reference|; inf for a shape mismatch or anything not finite (a NaN
    would otherwise vanish from the max() over several errors)."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape or not np.all(np.isfinite(ours)):
        return float("inf")
    if reference.size == 0:
        return 0.0
    return float(np.abs(ours - reference).max() / max(np.abs(reference).max(), 1e-30))


def products():
    """matmul and both of its gradient products against float64 NumPy, over shapes that split by rows (m >= n),
    by columns, not at all (small), and that are empty or contract over nothing."""
    rng = np.random.default_rng(0)
    errors = {}
    for m, k, n in [(130, 70, 90), (40, 256, 2000), (60, 200, 50), (3, 5, 7), (1, 1, 1), (5, 0, 3), (0, 4, 3), (97, 33, 1)]:
        x = rng.standard_normal((m, k)).astype(np.float32)
        w = rng.standard_normal((k, n)).astype(np.float32)
        g = rng.standard_normal((m, n)).astype(np.float32)
        y, vjp = jax.vjp(jax.jit(cpu_gemm.matmul), jnp.asarray(x), jnp.asarray(w))
        gx, gw = vjp(jnp.asarray(g))
        x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
        errors[f"{m}x{k}x{n}"] = max(relative_error(y, x64 @ w64), relative_error(gx, g64 @ w64.T),
                                     relative_error(gw, x64.T @ g64))
    return errors


def lowered_with(choice, fn, *args):
    """The lowering of a fresh wrapper of `fn` (the choice is read when jit traces, and jit keeps traces per
    function) under `VITDISTILL_CPU_GEMM=choice`."""
    os.environ[cpu_gemm.CHOICE] = choice
    try:
        return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()
    finally:
        os.environ.pop(cpu_gemm.CHOICE, None)


def vit_agreement():
    """A small ViT's loss and gradients with MKL's products against XLA's dots."""
    model = vit.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    params = model.init(jax.random.key(1), images)["params"]

    def loss(params):
        return jnp.sum(jnp.square(model.apply({"params": params}, images)))

    results = {}
    for choice in ("xla", "auto"):
        os.environ[cpu_gemm.CHOICE] = choice
        step = jax.value_and_grad(lambda p: loss(p))  # a fresh function per choice: traced afresh
        results[choice] = jax.jit(step)(params)
        text = jax.jit(step).lower(params).as_text()
        results[choice + "_custom_calls"] = text.count(cpu_gemm.TARGET)
    os.environ.pop(cpu_gemm.CHOICE, None)
    (loss_xla, grads_xla), (loss_mkl, grads_mkl) = results["xla"], results["auto"]
    grad_error = max(relative_error(a, b) for a, b in zip(jax.tree.leaves(grads_mkl), jax.tree.leaves(grads_xla)))
    return {"loss_error": relative_error(loss_mkl, loss_xla), "grad_error": grad_error,
            "custom_calls_mkl": results["auto_custom_calls"], "custom_calls_xla": results["xla_custom_calls"]}


def main():
    x = jnp.ones((4, 6), jnp.float32)
    w = jnp.ones((6, 5), jnp.float32)
    dense = lambda x, w: cpu_gemm.dot_general(x, w, (((1,), (0,)), ((), ())))  # noqa: E731
    batched = jax.vmap(cpu_gemm.matmul)(jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4),
                                        jnp.ones((2, 4, 5), jnp.float32))
    with cpu_gemm.xla_dots():
        forced = jax.jit(lambda x, w: dense(x, w)).lower(x, w).as_text().count(cpu_gemm.TARGET)
    print(json.dumps({
        "status": cpu_gemm.status(),
        "products": products(),
        "dense_auto": lowered_with("auto", dense, x, w).count(cpu_gemm.TARGET),
        "dense_xla": lowered_with("xla", dense, x, w).count(cpu_gemm.TARGET),
        "dense_forced_xla": forced,
        "bfloat16": lowered_with("auto", dense, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)).count(cpu_gemm.TARGET),
        "vmap_error": relative_error(batched, np.einsum("bij,bjk->bik", np.arange(24.0).reshape(2, 3, 4),
                                                        np.ones((2, 4, 5)))),
        **vit_agreement(),
    }))


if __name__ == "__main__":
    main()
