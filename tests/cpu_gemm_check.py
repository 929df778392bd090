"""Run by tests/test_cpu_gemm.py in a one-device process (the suite's own processes have two CPU devices, where
vitdistill.cpu_gemm leaves every product to XLA). Prints one JSON object of measured errors and facts."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from vitdistill import cpu_gemm
from vitdistill.models import regnet, vit


def mkl_calls(text: str) -> int:
    """Calls in a lowering to MKL's products: plain or batched, or strided (attention's, `qkv_attention`)."""
    return text.count(cpu_gemm.TARGET) + text.count("vitdistill_strided_gemm")


def product_calls(text: str) -> int:
    """Calls in a lowering to MKL's products or the native plain product (cpu_conv.cc's, on AVX-512 CPUs)."""
    return mkl_calls(text) + text.count("vitdistill_matmul")


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
    """`product` and both of its gradients against float64 NumPy for each of the four transpose settings, over
    shapes that split by rows (m >= n), by columns, by whole products of a batch, not at all (small), and that
    are empty or contract over nothing; on cpu_conv.cc's kernel (`products_on_each_library`): threads split by
    columns (130 x 90, 40 x 2000) or rows (300 and 1000 rows, in blocks of 448), the depth in blocks (600
    inputs: 208, 208, 184), columns off the vector width (90, 1), batches in whole products a thread (5 x 37 x
    64 x 37: DINO's local crops' attention) or one after another where a batch has fewer products than threads
    (the batch of 1)."""
    rng = np.random.default_rng(0)
    errors = {}
    shapes = [((), 130, 70, 90), ((), 40, 256, 2000), ((), 60, 200, 50), ((), 3, 5, 7), ((), 1, 1, 1), ((), 5, 0, 3),
              ((), 0, 4, 3), ((), 97, 33, 1), ((), 300, 600, 40), ((), 1000, 40, 24), ((6,), 50, 40, 60), ((2, 3), 70, 64, 70),
              ((1,), 90, 80, 100), ((5,), 37, 64, 37)]
    for batch, m, k, n in shapes:
        x = rng.standard_normal((*batch, m, k))
        w = rng.standard_normal((*batch, k, n))
        g = rng.standard_normal((*batch, m, n))
        want = (x @ w, g @ np.swapaxes(w, -1, -2), np.swapaxes(x, -1, -2) @ g)
        for ta in (False, True):
            for tb in (False, True):
                a = np.swapaxes(x, -1, -2) if ta else x  # stored as the product takes it
                b = np.swapaxes(w, -1, -2) if tb else w
                y, vjp = jax.vjp(jax.jit(lambda a, b: cpu_gemm.product(a, b, ta, tb)),
                                 *(jnp.asarray(t, jnp.float32) for t in (a, b)))
                grad_a, grad_b = vjp(jnp.asarray(g, jnp.float32))
                got = (y, np.swapaxes(grad_a, -1, -2) if ta else grad_a, np.swapaxes(grad_b, -1, -2) if tb else grad_b)
                name = "x".join(map(str, (*batch, m, k, n))) + f" ta={int(ta)} tb={int(tb)}"
                errors[name] = max(relative_error(o, r) for o, r in zip(got, want))
    return errors


def strided_item(buffer, at, i0, i1, rows, columns):
    """Item (i0, i1) of a flat `buffer` laid out as `at` (see `cpu_gemm._strided`): a [rows, columns] view."""
    _, offset, ld, stride0, stride1 = at
    start = offset + i0 * stride0 + i1 * stride1
    return buffer[start:start + rows * ld].reshape(rows, ld)[:, :columns]


def strided():
    """`_strided` against float64 NumPy: op(a) op(b) over a [2, 3] batch of items read from and written into
    larger buffers (offsets, row strides above the row length, batch strides), each transpose setting, into a
    fresh buffer and into a given one (whose other elements must be kept), split into whole products (6 items)
    and, for one item, into rows and into columns; and a layout that reaches outside its buffer, refused."""
    rng = np.random.default_rng(2)
    errors = {}
    for (batch0, batch1), m, k, n in [((2, 3), 33, 20, 17), ((1, 1), 300, 64, 40), ((1, 1), 30, 64, 500)]:
        for ta in (False, True):
            for tb in (False, True):
                a_rows, a_cols = (k, m) if ta else (m, k)
                b_rows, b_cols = (n, k) if tb else (k, n)
                # each item's operand in a row of the buffer: 5 elements before it, rows 3 longer than needed
                at_a = ((batch0, batch1), 5, a_cols + 3, batch1 * a_rows * (a_cols + 3), a_rows * (a_cols + 3))
                at_b = ((batch0, batch1), 2, b_cols + 1, b_rows * (b_cols + 1), batch0 * b_rows * (b_cols + 1))
                at_c = ((batch0, batch1), 7, n + 4, batch1 * m * (n + 4), m * (n + 4))
                a = rng.standard_normal(5 + batch0 * batch1 * a_rows * (a_cols + 3))
                b = rng.standard_normal(2 + batch0 * batch1 * b_rows * (b_cols + 1))
                into = rng.standard_normal(7 + batch0 * batch1 * m * (n + 4))
                want, written = into.copy(), np.zeros(into.shape, bool)
                for i0 in range(batch0):
                    for i1 in range(batch1):
                        x = strided_item(a, at_a, i0, i1, a_rows, a_cols)
                        y = strided_item(b, at_b, i0, i1, b_rows, b_cols)
                        strided_item(want, at_c, i0, i1, m, n)[:] = 0.5 * (x.T if ta else x) @ (y.T if tb else y)
                        strided_item(written, at_c, i0, i1, m, n)[:] = True
                args = dict(m=m, n=n, k=k, ta=ta, tb=tb, alpha=0.5, at_a=at_a, at_b=at_b, at_c=at_c)
                got = jax.jit(lambda a, b, c: cpu_gemm._strided(a, b, c.shape, c, **args))(
                    *(jnp.asarray(t, jnp.float32) for t in (a, b, into)))
                fresh = jax.jit(lambda a, b: cpu_gemm._strided(a, b, into.shape, **args))(
                    *(jnp.asarray(t, jnp.float32) for t in (a, b)))
                name = f"{batch0}x{batch1}x{m}x{k}x{n} ta={int(ta)} tb={int(tb)}"
                errors[name + " into"] = relative_error(got, want)
                errors[name + " fresh"] = relative_error(np.asarray(fresh)[written], want[written])
    try:
        jax.block_until_ready(cpu_gemm._strided(jnp.ones(10), jnp.ones(10), (4,), m=2, n=2, k=2,
                                                at_a=((1, 1), 0, 2, 0, 0), at_b=((1, 1), 7, 2, 0, 0),
                                                at_c=((1, 1), 0, 2, 0, 0)))
        refused = None
    except Exception as e:  # XlaRuntimeError
        refused = str(e)
    return {"strided_errors": errors, "strided_refused": refused}


def attention_reference(qkv, g, heads):
    """float64 softmax(q kᵀ / sqrt(d)) v with timm's qkv layout, heads concatenated, and its gradient by qkv with
    cotangent g (from the formulas: dv = wᵀ g, dw = g vᵀ, dl = softmax's vjp, dq = dl k / sqrt(d),
    dk = dlᵀ q / sqrt(d))."""
    b, t, three_dim = qkv.shape
    d = three_dim // 3 // heads
    q, k, v = (part.reshape(b, t, heads, d).transpose(0, 2, 1, 3) for part in np.split(qkv, 3, axis=-1))
    gh = g.reshape(b, t, heads, d).transpose(0, 2, 1, 3)
    weights, grad_logits = softmax_reference(q @ k.transpose(0, 1, 3, 2) / np.sqrt(d), gh @ v.transpose(0, 1, 3, 2))
    grads = (grad_logits @ k / np.sqrt(d), grad_logits.transpose(0, 1, 3, 2) @ q / np.sqrt(d),
             weights.transpose(0, 1, 3, 2) @ gh)
    grad_qkv = np.concatenate([x.transpose(0, 2, 1, 3).reshape(b, t, -1) for x in grads], axis=-1)
    return (weights @ v).transpose(0, 2, 1, 3).reshape(b, t, -1), grad_qkv


def attention():
    """`qkv_attention` and its gradient against float64 NumPy: DeiT-S's block (4 x 197, 6 heads of 64), DINO's
    local crops' (37 tokens), one image with one head (split by rows) and odd sizes."""
    rng = np.random.default_rng(3)
    errors = {}
    for b, t, heads, d in [(4, 197, 6, 64), (3, 37, 6, 64), (1, 150, 1, 16), (2, 7, 3, 5)]:
        qkv = rng.standard_normal((b, t, 3 * heads * d)).astype(np.float32).astype(np.float64)
        g = rng.standard_normal((b, t, heads * d)).astype(np.float32).astype(np.float64)
        y, vjp = jax.vjp(jax.jit(lambda x: cpu_gemm.qkv_attention(x, heads)), jnp.asarray(qkv, jnp.float32))
        got = (y, *vjp(jnp.asarray(g, jnp.float32)))
        want = attention_reference(qkv, g, heads)
        errors[f"{b}x{t} {heads}x{d}"] = max(relative_error(o, r) for o, r in zip(got, want))
    return errors


def softmax_reference(x, g):
    """float64 softmax over the last axis and its vector-Jacobian product with cotangent g."""
    e = np.exp(x - x.max(-1, keepdims=True))
    y = e / e.sum(-1, keepdims=True)
    return y, y * (g - (g * y).sum(-1, keepdims=True))


def layer_norm_reference(x, scale, bias, g, eps):
    """float64 LayerNorm (mean squared deviation) and the gradients of <LayerNorm(x), g> by x, scale, bias,
    from the formula dx = rstd (g scale - mean(g scale) - xhat mean(g scale xhat))."""
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    gs = g * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    rows = tuple(range(x.ndim - 1))
    return xhat * scale + bias, dx, (g * xhat).sum(rows), g.sum(rows)


def rows():
    """The native softmax and LayerNorm and their gradients against float64 NumPy, over shapes split into
    blocks across threads or not (small), with row lengths off the vector width, empty, and wide-ranging
    inputs (softmax logits to +-60, where exp underflows; LayerNorm rows far from zero mean and constant)."""
    rng = np.random.default_rng(1)
    errors = {}
    for shape, spread in [((4, 6, 197, 197), 3.0), ((3, 5), 1.0), ((700, 1), 1.0), ((2, 300, 33), 60.0),
                          ((64, 1000), 10.0), ((0, 7), 1.0)]:
        x = (rng.standard_normal(shape) * spread).astype(np.float32).astype(np.float64)  # the kernel's inputs
        g = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
        y, vjp = jax.vjp(jax.jit(cpu_gemm.softmax), jnp.asarray(x, jnp.float32))
        got = (y, *vjp(jnp.asarray(g, jnp.float32)))
        want = softmax_reference(x, g)
        errors["softmax " + "x".join(map(str, shape))] = max(relative_error(o, r) for o, r in zip(got, want))
    for shape, offset in [((4, 197, 384), 0.5), ((3, 5), 0.0), ((2, 1000, 17), 100.0), ((1, 64), 0.0),
                          ((0, 8), 0.0)]:
        x = rng.standard_normal(shape) + offset
        if shape == (3, 5):
            x[1] = 2.5  # a constant row: variance 0, normalised by sqrt(eps)
        x = x.astype(np.float32).astype(np.float64)
        scale, bias, g = (rng.standard_normal(s).astype(np.float32).astype(np.float64) for s in
                          (shape[-1:], shape[-1:], shape))
        y, vjp = jax.vjp(jax.jit(lambda x, s, b: cpu_gemm.layer_norm(x, s, b, 1e-6)),
                         *(jnp.asarray(t, jnp.float32) for t in (x, scale, bias)))
        got = (y, *vjp(jnp.asarray(g, jnp.float32)))
        want = layer_norm_reference(x, scale, bias, g, 1e-6)
        errors["layer_norm " + "x".join(map(str, shape))] = max(relative_error(o, r) for o, r in zip(got, want))
    nan_row = np.zeros((3, 40), np.float32)
    nan_row[1, 7] = np.nan
    out = np.asarray(cpu_gemm.softmax(jnp.asarray(nan_row)))
    errors["softmax NaN stays in its row"] = 0.0 if (np.isnan(out[1]).all() and np.allclose(out[[0, 2]], 1 / 40)) \
        else float("inf")
    return errors


def conv_reference(x, w, g, stride, pad):
    """A grouped convolution (NHWC x, HWIO w) and its gradients for cotangent g, in float64 NumPy, tap by tap."""
    k, _, group_in, out = w.shape
    groups = x.shape[-1] // group_in
    group_out = out // groups
    n, ho, wo = g.shape[:3]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    xg = xp.reshape(*xp.shape[:3], groups, group_in)
    wg = w.reshape(k, k, group_in, groups, group_out)
    gg = g.reshape(n, ho, wo, groups, group_out)
    y, dxp, dw = np.zeros((n, ho, wo, groups, group_out)), np.zeros_like(xg), np.zeros_like(wg)
    for kh in range(k):
        for kw in range(k):
            window = (slice(None), slice(kh, kh + stride * (ho - 1) + 1, stride),
                      slice(kw, kw + stride * (wo - 1) + 1, stride))
            y += np.einsum("nhwgi,igo->nhwgo", xg[window], wg[kh, kw])
            dxp[window] += np.einsum("nhwgo,igo->nhwgi", gg, wg[kh, kw])
            dw[kh, kw] += np.einsum("nhwgi,nhwgo->igo", xg[window], gg)
    dx = dxp.reshape(xp.shape)[:, pad:pad + x.shape[1], pad:pad + x.shape[2]]
    return y.reshape(n, ho, wo, out), dx, dw.reshape(w.shape)


def convolutions():
    """The native grouped convolution (and its gradients, lax's) against float64 NumPy: RegNetY-16GF's third
    stage, strides 1 and 2, pixel counts off the 28-pixel tile, group widths off the vector width (20, 8),
    5x5 and 1x1 kernels, an image smaller than the kernel's reach, an empty batch; and whether each shape is
    taken (`grouped_conv_supported`). Only `available` on a CPU without AVX-512F."""
    if not cpu_gemm.conv_available():
        return {"available": False}
    rng = np.random.default_rng(2)
    errors, taken = {}, {}
    # (x shape, k, group_in, out channels, stride)
    for shape, k, group_in, out, stride in [((2, 14, 14, 1232), 3, 112, 1232, 1), ((3, 9, 7, 64), 3, 32, 96, 2),
                                            ((1, 5, 6, 60), 3, 20, 48, 1), ((2, 11, 11, 32), 5, 8, 128, 2),
                                            ((2, 4, 3, 48), 1, 24, 32, 1), ((1, 1, 1, 32), 3, 16, 32, 1),
                                            ((0, 6, 6, 32), 3, 16, 32, 1)]:
        pad = k // 2
        x = rng.standard_normal(shape).astype(np.float32)
        w = (rng.standard_normal((k, k, group_in, out)) / np.sqrt(k * k * group_in)).astype(np.float32)
        ho, wo = ((d + 2 * pad - k) // stride + 1 for d in shape[1:3])
        g = rng.standard_normal((shape[0], ho, wo, out)).astype(np.float32)
        name = f"{'x'.join(map(str, shape))} k{k} group_in {group_in} out {out} stride {stride}"
        taken[name] = cpu_gemm.grouped_conv_supported(jnp.asarray(x), jnp.asarray(w), stride)
        y, vjp = jax.vjp(jax.jit(lambda a, b: cpu_gemm.grouped_conv(a, b, stride, pad)), jnp.asarray(x), jnp.asarray(w))
        got = (y, *vjp(jnp.asarray(g)))
        want = conv_reference(*(t.astype(np.float64) for t in (x, w, g)), stride, pad)
        errors[name] = max(relative_error(o, r) for o, r in zip(got, want))
    # Left to lax: output groups off the vector width (20 channels), a kernel deeper than 1,152 inputs, an
    # even kernel, bfloat16.
    for shape, kernel, dtype in [((1, 6, 6, 32), (3, 3, 16, 40), jnp.float32), ((1, 6, 6, 256), (3, 3, 256, 256),
                                 jnp.float32), ((1, 6, 6, 32), (2, 2, 16, 32), jnp.float32),
                                 ((1, 6, 6, 32), (3, 3, 16, 32), jnp.bfloat16)]:
        name = f"{'x'.join(map(str, shape))} kernel {'x'.join(map(str, kernel))} {jnp.dtype(dtype).name}"
        taken[name] = cpu_gemm.grouped_conv_supported(jnp.zeros(shape, dtype), jnp.zeros(kernel, dtype), 1)
    return {"available": True, "errors": errors, "taken": taken}


def largest_fusion(compiled_text: str) -> int:
    """The most operands any fusion of the entry computation takes."""
    entry = compiled_text.split("ENTRY")[1]
    return max(line.count("%") for line in entry.splitlines() if " fusion(" in line)


def regnet_agreement():
    """A small RegNetY's logits with the native grouped convolutions against lax's, the calls in each, and the
    largest output fusion each way (its last stage has 2 blocks); `stored`'s gradient and vmap."""
    model = regnet.RegNet(w0=16, wa=16.0, wm=2.0, group_size=16, depth=4, stem_width=16, num_classes=10)
    images = jax.random.normal(jax.random.key(0), (3, 32, 32, 3))
    variables = model.init(jax.random.key(1), images)
    results = {}
    for choice in ("xla", "auto"):
        os.environ[cpu_gemm.CHOICE] = choice
        apply = lambda v, x: model.apply(v, x)  # noqa: E731  (a fresh function per choice: traced afresh)
        results[choice] = jax.jit(apply)(variables, images)
        lowered = jax.jit(apply).lower(variables, images)
        results[choice + "_calls"] = lowered.as_text().count("vitdistill_grouped_conv")
        compiled = lowered.compile().as_text()
        results[choice + "_stores"] = compiled.count('custom_call_target="vitdistill_store"')
        results[choice + "_fusion"] = largest_fusion(compiled)
    os.environ.pop(cpu_gemm.CHOICE, None)
    x = jax.random.normal(jax.random.key(2), (5, 7))
    grad = jax.jit(jax.grad(lambda a: jnp.sum(jnp.sin(cpu_gemm.stored(a * 3.0)))))(x)
    mapped = jax.jit(jax.vmap(lambda a: cpu_gemm.stored(a + 1.0)))(x)
    return {"regnet_error": relative_error(results["auto"], results["xla"]),
            "regnet_conv_calls_mkl": results["auto_calls"], "regnet_conv_calls_xla": results["xla_calls"],
            "regnet_grouped_convs": sum(depth for width, depth, group in regnet.regnet_stages(16, 16.0, 2.0, 4, 16)
                                        if width // group > 1),
            "regnet_stages": [depth for _, depth, _ in regnet.regnet_stages(16, 16.0, 2.0, 4, 16)],
            "regnet_stores": {"auto": results["auto_stores"], "xla": results["xla_stores"]},
            "regnet_largest_fusion": {"auto": results["auto_fusion"], "xla": results["xla_fusion"]},
            "stored_grad_error": float(jnp.abs(grad - 3.0 * jnp.cos(3.0 * x)).max()),
            "stored_vmap_error": float(jnp.abs(mapped - (x + 1.0)).max())}


def erase_and_mix():
    """DeiT's step inputs (uint8 levels normalised, two of four erase boxes on, then mixed) built with the custom
    calls and without: the largest difference, and the stores in each compiled program (the erased batch is
    stored, so that mixup/cutmix's fusion does not draw the noise again for each read)."""
    from vitdistill.methods import deit

    rng = np.random.default_rng(0)
    levels = jnp.asarray(rng.integers(0, 256, (4, 32, 24, 3)).astype(np.uint8))
    boxes = jnp.asarray([[1, 3, 2, 20, 10, 7], [0, 0, 0, 32, 24, 8], [1, 0, 0, 32, 24, 9], [0, 1, 1, 2, 2, 10]],
                        jnp.int32)
    mixing = deit.Mixing(0.8, 1.0, 0.5, 1.0, 0.1, 1)
    batch = {"image": levels, "erase": boxes, "label": jnp.arange(4)}
    results = {}
    for choice in ("xla", "auto"):
        os.environ[cpu_gemm.CHOICE] = choice
        fn = jax.jit(lambda b: deit.mixed_targets(jax.random.key(1), deit.train_images(b, jax.random.key(2)),
                                                  b["label"], num_classes=10, mixing=mixing)[0])
        results[choice] = np.asarray(fn(batch))
        results[choice + "_stores"] = fn.lower(batch).compile().as_text().count('custom_call_target="vitdistill_store"')
    os.environ.pop(cpu_gemm.CHOICE, None)
    return {"erase_mix_difference": float(np.abs(results["auto"] - results["xla"]).max()),
            "erase_mix_stores": {"auto": results["auto_stores"], "xla": results["xla_stores"]}}


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
        results[choice + "_custom_calls"] = product_calls(text)
        results[choice + "_row_calls"] = text.count("vitdistill_softmax") + text.count("vitdistill_layer_norm")
        results[choice + "_mkl_calls"] = mkl_calls(text)
        results[choice + "_strided_calls"] = text.count("vitdistill_strided_gemm")
        results[choice + "_maps"] = jax.jit(lambda p: vit.last_attention(model, {"params": p}, images))(params)
        results[choice + "_convolutions"] = text.count("stablehlo.convolution")
    os.environ.pop(cpu_gemm.CHOICE, None)
    (loss_xla, grads_xla), (loss_mkl, grads_mkl) = results["xla"], results["auto"]
    grad_error = max(relative_error(a, b) for a, b in zip(jax.tree.leaves(grads_mkl), jax.tree.leaves(grads_xla)))
    return {"loss_error": relative_error(loss_mkl, loss_xla), "grad_error": grad_error,
            "custom_calls_mkl": results["auto_custom_calls"], "custom_calls_xla": results["xla_custom_calls"],
            "row_calls_mkl": results["auto_row_calls"], "row_calls_xla": results["xla_row_calls"],
            "vit_mkl_calls": results["auto_mkl_calls"], "vit_strided_calls": results["auto_strided_calls"],
            "vit_maps_error": relative_error(results["auto_maps"], results["xla_maps"]),
            "vit_convolutions": {"auto": results["auto_convolutions"], "xla": results["xla_convolutions"]},
            **patch_convolutions()}


def patch_convolutions():
    """`cpu_gemm.conv_general_dilated` against lax's on 36 x 40 images (8 x 8 patches: the last rows and
    columns dropped, as VALID does), with the kernel's gradient; whether a stride-1 and a padded one stay lax's."""
    x = jax.random.normal(jax.random.key(3), (2, 36, 40, 3))
    w = jax.random.normal(jax.random.key(4), (8, 8, 3, 16))
    g = jax.random.normal(jax.random.key(5), (2, 4, 5, 16))
    dims = ("NHWC", "HWIO", "NHWC")

    def outputs(conv):
        return jax.jit(lambda a, b: jax.vjp(lambda k: conv(a, k, (8, 8), "VALID", dimension_numbers=dims), b))(x, w)

    (ours, ours_vjp), (lax_out, lax_vjp) = outputs(cpu_gemm.conv_general_dilated), outputs(jax.lax.conv_general_dilated)
    others = [jax.jit(lambda a, b: cpu_gemm.conv_general_dilated(a, b, (1, 1), "VALID", dimension_numbers=dims)),
              jax.jit(lambda a, b: cpu_gemm.conv_general_dilated(a, b, (8, 8), [(1, 1), (1, 1)], dimension_numbers=dims))]
    # lax's default dimension numbers (None: NCHW, OIHW) with a kernel whose first two sizes equal the strides
    nchw = (jnp.ones((2, 8, 16, 16)), jnp.ones((8, 8, 2, 2)))
    nchw_error = relative_error(jax.jit(lambda a, b: cpu_gemm.conv_general_dilated(a, b, (8, 8), "VALID"))(*nchw),
                                jax.lax.conv_general_dilated(*nchw, (8, 8), "VALID"))
    return {"patch_conv_error": relative_error(ours, lax_out), "nchw_conv_error": nchw_error,
            "patch_conv_grad_error": relative_error(ours_vjp(g)[0], lax_vjp(g)[0]),
            "patch_conv_products": product_calls(jax.jit(lambda a, b: cpu_gemm.conv_general_dilated(
                a, b, (8, 8), "VALID", dimension_numbers=dims)).lower(x, w).as_text()),
            "other_conv_products": sum(product_calls(f.lower(x, w).as_text()) for f in others)}


def products_on_each_library():
    """`products()` on each library that can run them here: {'native': errors} on an AVX-512F CPU, {'mkl': errors}
    where MKL is loaded (both on an AVX-512F CPU with MKL, whichever `native_products` picks for the models)."""
    saved = cpu_gemm._loaded.get("native_products")
    libraries = {}
    if cpu_gemm.native_isa() == "AVX-512F":
        libraries["native"] = True
    if cpu_gemm.mkl_loaded():
        libraries["mkl"] = False
    try:
        errors = {}
        for name, native in libraries.items():
            cpu_gemm._loaded["native_products"] = native
            errors[name] = products()
        return errors
    finally:
        cpu_gemm._loaded["native_products"] = saved


def without_avx512(dense, x, w):
    """As on a CPU without AVX-512F (the native convolution and product unavailable): the Dense product's calls
    (MKL's, native) and a small RegNetY's native convolution calls."""
    saved = cpu_gemm._loaded.get("conv")
    cpu_gemm._loaded["conv"] = False
    try:
        text = jax.jit(lambda x, w: dense(x, w)).lower(x, w).as_text()
        model = regnet.RegNet(w0=16, wa=16.0, wm=2.0, group_size=16, depth=4, stem_width=16, num_classes=10)
        images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
        variables = model.init(jax.random.key(1), images)
        regnet_text = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, images).as_text()
        return {"mkl_calls": text.count(cpu_gemm.TARGET), "native_calls": text.count("vitdistill_matmul"),
                "regnet_conv_calls": regnet_text.count("vitdistill_grouped_conv")}
    finally:
        cpu_gemm._loaded["conv"] = saved


def main():
    x = jnp.ones((4, 6), jnp.float32)
    w = jnp.ones((6, 5), jnp.float32)
    dense = lambda x, w: cpu_gemm.dot_general(x, w, (((1,), (0,)), ((), ())))  # noqa: E731
    batched = jax.vmap(cpu_gemm.matmul)(jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4),
                                        jnp.ones((2, 4, 5), jnp.float32))
    with cpu_gemm.xla_dots():
        forced = product_calls(jax.jit(lambda x, w: dense(x, w)).lower(x, w).as_text())
    print(json.dumps({
        "status": cpu_gemm.status(),
        "products": products_on_each_library(),
        **(strided() if cpu_gemm.mkl_loaded() else {}),
        "attention": attention() if cpu_gemm.mkl_loaded() else {},
        "rows": rows(),
        "convolutions": convolutions(),
        **regnet_agreement(),
        **erase_and_mix(),
        "dense_auto": product_calls(lowered_with("auto", dense, x, w)),
        "dense_xla": product_calls(lowered_with("xla", dense, x, w)),
        "dense_forced_xla": forced,
        "bfloat16": product_calls(lowered_with("auto", dense, x.astype(jnp.bfloat16), w.astype(jnp.bfloat16))),
        "vmap_error": relative_error(batched, np.einsum("bij,bjk->bik", np.arange(24.0).reshape(2, 3, 4),
                                                        np.ones((2, 4, 5)))),
        **vit_agreement(),
        "without_avx512": without_avx512(dense, x, w),
    }))


if __name__ == "__main__":
    main()
