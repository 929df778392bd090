"""Float32 matrix products (and softmax, LayerNorm, RegNet's grouped convolutions) on the CPU as XLA FFI custom
calls: this package's native kernels (`vitdistill/native/`) on CPUs with AVX-512F or AVX2 (MKL's products on AVX2
CPUs where it is installed, `pip install mkl`), XLA's own otherwise. How it came to this:

XLA:CPU runs its matrix products with YNNPACK, whose float32 kernel on these AVX-512 machines reaches about
148 GFLOP/s a core against MKL's 181 (the library PyTorch's CPU build uses): at DeiT-S's Dense shapes on
2 cores, forward plus both gradient products took 31.45 ms a block with XLA's dots, 26.70 ms with MKL's and
26.39 ms in PyTorch (`experiments/cpu_gemm.py`), and attention's six batched products 6.78 ms with XLA's
against PyTorch's 2.61 (`experiments/attention_products.py`). So on a one-device CPU process, the models'
Dense layers (the ViT's qkv, proj, fc1, fc2 and heads, the DINO head's MLP and last layer, RegNet's 1x1
products) and the ViT's attention (q kᵀ and the weights times v) compute their products and both gradient
products with MKL's `cblas_sgemm`, called from the compiled step as an XLA FFI custom call
(`vitdistill/native/cpu_gemm.cc`). Results agree with XLA's dots to float32 rounding (about 1e-6
relative); the parameters and checkpoints are the same.

The custom calls are compiled once per jaxlib version with the machine's C++ compiler, against the FFI
headers that the installed jaxlib ships, into `~/.cache/vitdistill/native` (`$XDG_CACHE_HOME` if set).
`VITDISTILL_CPU_GEMM` chooses: unset or `auto` (the custom calls where they can run: an AVX-512F CPU or MKL installed
for the products, an AVX-512F or AVX2 CPU for the grouped convolution; XLA's dots otherwise, with one warning if the
build fails), `mkl` (the custom calls, or an error
that says why; the name predates the native kernels), `xla` (never). Accelerators, multi-device meshes and
other dtypes always use XLA's dots.

The same library carries row kernels (`vitdistill/native/cpu_rows.cc`), used under the same conditions:
attention's softmax (`softmax_last`) and the ViT's LayerNorms (`layer_norm`, through `vit._layer_norm`), each
forward and backward in one vectorised pass over the rows. XLA:CPU runs these reductions on one thread and
in several passes: at a DeiT-S block's shapes at batch 4, softmax forward and backward took 1.12 ms with
JAX's against 0.49 native and 0.50 in PyTorch, LayerNorm 0.32 (Flax's) against 0.15 and 0.15; the DeiT-S
step 756.7 -> 711.3 ms (`experiments/row_kernels.py`, on a 2-core AMD EPYC host).

And a grouped convolution (`grouped_conv`, `vitdistill/native/cpu_conv.cc`, AVX-512 and AVX2 CPUs), used by
`regnet.GroupedConv` for RegNetY's grouped 3x3 convolutions: XLA:CPU runs these as one slow convolution or as
one small convolution per group, at 114-149 GFLOP/s on that host against 154-191 native and 123-195 in PyTorch
(`experiments/grouped_conv.py`). On AVX-512 CPUs its register tile also computes every product of two
matrices (`_op_product`: each Dense layer's forward pass and both its gradients, RegNet's 1x1 convolutions) in
BLIS's order (each thread packs blocks of its rows and of b once for many rows; transposed operands through
16 x 16 register transposes): -0.5 to +24 % against MKL at RegNetY-16GF's and DeiT-S's shapes on that host; the
distilled step 1,433.8 -> 1,394.5 ms with the forward passes, then DeiT-S 819.2 -> 720.1 ms and DINO 3,126.6 ->
2,886.9 with the gradients too (`experiments/native_matmul.py`). Attention's batched products run on it as well,
whole products a thread (-3 to +36 % against MKL at DeiT-S's and DINO's attention shapes). On such a CPU MKL is
not used at all, and not needed: the native kernels load without it. Except on Intel's AVX-512 CPUs: there MKL's
products were faster than the native kernel's (`native_products`), so where MKL is installed they run on MKL, and
only the grouped convolution and the row kernels stay native.

Where the products run on MKL, the ViT's attention (`qkv_attention`) writes its output and its gradient of qkv
by strided products (`_strided`, MKL's lda / ldb / ldc): the heads side by side into the output, dq, dk, dv into
their thirds of one buffer, so the heads-first layout's copies back are not made. q, k and v are still copied
heads-first by XLA, which fuses the qkv bias add into that copy: reading them in place too was as fast alone but
not in the model. DeiT-S forward and backward, 10-30 turns in one process, four runs: 518.8 -> 500.9, 566.9 ->
546.9, 548.5 -> 516.2 and 633.7 -> 667.0 ms (`experiments/strided_attention.py`; the host was noisy). The DINO
step, 50 turns of one step, once in each order: 2,083.2 -> 2,069.9 and 1,997.7 -> 1,977.8 ms.

On CPUs with AVX2 and FMA but not AVX-512F, the grouped convolution runs on a register tile of 6 pixels x 16
lanes (two 8-lane vectors a pixel: 12 accumulators of the 16 registers) over the same layouts. On such a host (a
2-core AMD EPYC, Zen 3) RegNetY-16GF's grouped convolutions took 286.4 ms a step against 375.4 per group on lax
and 313.0 in PyTorch (`experiments/grouped_conv.py`). The products stay MKL's there, or XLA's without MKL: both
were faster than that tile (`native_products`). The row kernels and `stored` run on any x86-64 CPU
(`rows_enabled`), without MKL too.

Last, `stored`: a custom call that takes its input's buffer as its result and does nothing, a fusion barrier
that XLA:CPU keeps (it drops `optimization_barrier`s before fusing). RegNet stores its blocks' outputs with it:
XLA had fused each into the next block's output fusion as well, recomputing whole stages (RegNetY-16GF's
forward pass 684.7 -> 669.2 ms, `experiments/stored_block_outputs.py`).
"""
import contextlib
import ctypes
import functools
import glob
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from vitdistill.errors import ConfigError

CHOICE = "VITDISTILL_CPU_GEMM"
TARGET = "vitdistill_cpu_gemm"
NATIVE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native")
SOURCES = tuple(os.path.join(NATIVE, name) for name in ("cpu_gemm.cc", "cpu_rows.cc", "cpu_conv.cc"))
HEADERS = (os.path.join(NATIVE, "pool.h"),)
NATIVE_TARGETS = {"softmax": "VdSoftmax", "softmax_grad": "VdSoftmaxGrad", "layer_norm": "VdLayerNorm",
                  "layer_norm_grad": "VdLayerNormGrad", "store": "VdStore",  # cpu_rows.cc's, registered as vitdistill_<key>
                  "grouped_conv": "VdGroupedConv", "matmul": "VdMatmul"}  # cpu_conv.cc's

MKL_TARGETS = {"strided_gemm": "VdStridedGemm", "strided_gemm_into": "VdStridedGemmInto"}  # cpu_gemm.cc's, as above

NO_PRODUCTS = ("MKL is not installed (pip install mkl), and on this CPU (AVX2, no AVX-512F) XLA's products are faster "
               "than the native ones")
NOTHING_TO_RUN = ("MKL is not installed (pip install mkl) and this CPU has neither AVX-512F nor AVX2 with FMA for the "
                  "native kernels")

_lock = threading.Lock()
_loaded: dict = {}  # {"ok": bool, "why": str}: the outcome of the one attempt a process makes
_forced_xla = threading.local()


class CpuGemmError(ConfigError):
    """`VITDISTILL_CPU_GEMM=mkl` where the custom calls cannot be used, or an unknown choice: a UserError, so
    the command-line tools print its one line without a traceback."""


def choice(environ=os.environ) -> str:
    value = environ.get(CHOICE, "auto") or "auto"
    if value not in ("auto", "mkl", "xla"):
        raise CpuGemmError(f"{CHOICE}={value!r}: use auto (native kernels or MKL where they run), mkl (required) "
                           "or xla (never)")
    return value


def find_mkl() -> str | None:
    """The path of MKL's single dynamic library (libmkl_rt) of the `mkl` pip package, or of this prefix."""
    candidates = []
    try:
        for file in importlib.metadata.files("mkl") or ():
            if os.path.basename(str(file)).startswith("libmkl_rt.so"):
                candidates.append(os.path.realpath(str(file.locate())))
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates += sorted(glob.glob(os.path.join(sys.prefix, "lib", "libmkl_rt.so*")))
    return next((path for path in candidates if os.path.isfile(path)), None)


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "vitdistill", "native")


def build(include_dir: str, out_dir: str) -> str:
    """The custom call's shared library for this jaxlib: compiled once into `out_dir`, named by a hash of the
    source, the jaxlib version and the headers' path. Raises RuntimeError with the compiler's message."""
    source = b"".join(open(name, "rb").read() for name in SOURCES + HEADERS)
    key = hashlib.sha256(source + jax.lib.__version__.encode() + include_dir.encode()).hexdigest()[:16]
    path = os.path.join(out_dir, f"libvitdistill_cpu_gemm-{key}.so")
    if os.path.isfile(path):
        return path
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found (apt-get install g++, or set CXX)")
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        done = subprocess.run([compiler, "-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w",
                               f"-I{include_dir}", f"-I{NATIVE}", *SOURCES, "-o", tmp, "-ldl"],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{os.path.basename(compiler)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, path)  # atomic: concurrent builds (test workers) each leave a whole file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _cpuinfo(field: str) -> str:
    """The first `field` line's value in /proc/cpuinfo ('' where there is none or it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.split(":", 1)[0].strip() == field and ":" in line), "")
    except OSError:
        return ""


def cpu_has_native_isa() -> bool:
    """Whether /proc/cpuinfo lists AVX-512F, or AVX2 and FMA (False where it cannot be read): the native kernels'
    need, checked before building them where MKL is not installed; the built library's own check decides after."""
    flags = set(_cpuinfo("flags").split())
    return "avx512f" in flags or {"avx2", "fma"} <= flags


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id: 'GenuineIntel', 'AuthenticAMD', ... ('' where it cannot be read)."""
    return _cpuinfo("vendor_id")


def _load() -> dict:
    """Builds, loads and registers the custom calls once per process; {'ok', 'why', 'conv', 'mkl', 'isa',
    'products', 'native_products'}: ok where the library loaded (on an AVX-512F or AVX2 CPU, or with MKL), products
    where the products can run on it, native_products where they run on the native kernel rather than MKL's (on
    AVX-512F, unless the CPU is Intel's and MKL is loaded: `native_products`)."""
    with _lock:
        if _loaded:
            return _loaded
        mkl = find_mkl()
        if mkl is None and not cpu_has_native_isa():
            _loaded.update(ok=False, why=NOTHING_TO_RUN)
            return _loaded
        try:
            library = ctypes.CDLL(build(jax.ffi.include_dir(), cache_dir()))
            isa = {512: "AVX-512F", 2: "AVX2"}.get(library.vd_native_isa())  # None: no native kernels here
            conv = isa is not None
            if mkl is not None and library.vd_gemm_init(mkl.encode()) != 0:
                if not conv:
                    raise RuntimeError(f"{mkl} has no cblas_sgemm")
                mkl = None
            if mkl is None and not conv:
                raise RuntimeError(NOTHING_TO_RUN)
            for name, symbol in {"cpu_gemm": "VdGemm", **MKL_TARGETS, **NATIVE_TARGETS}.items():
                jax.ffi.register_ffi_target(f"vitdistill_{name}", jax.ffi.pycapsule(getattr(library, symbol)),
                                            platform="cpu")
        except (OSError, RuntimeError) as e:
            _loaded.update(ok=False, why=f"the native custom calls could not be built or loaded: {e}")
            logging.warning("vitdistill: %s; matrix products run on XLA's own kernels (set %s=xla to say so "
                            "and silence this)", _loaded["why"], CHOICE)
            return _loaded
        native = isa == "AVX-512F" and not (mkl is not None and cpu_vendor() == "GenuineIntel")
        _loaded.update(ok=True, conv=conv, mkl=mkl is not None, isa=isa, products=isa == "AVX-512F" or mkl is not None,
                       native_products=native, why=f"native kernels ({isa})" if conv else f"MKL ({mkl})")
        return _loaded


def native_isa() -> str | None:
    """The vectors the native kernels run on here: 'AVX-512F', 'AVX2' (with FMA; on AVX-512 CPUs too where
    VITDISTILL_NATIVE_ISA=avx2, for tests), or None where they do not run."""
    return _loaded["isa"] if conv_available() else None


def mkl_loaded() -> bool:
    """Whether MKL's `cblas_sgemm` is loaded (`_gemm` runs): MKL installed and the library built."""
    return _load()["ok"] and _loaded["mkl"]


@contextlib.contextmanager
def xla_dots():
    """Within: products traced on this thread use XLA's dots whatever the choice (for XLA's FLOP count of a
    step, which does not see into custom calls)."""
    before = getattr(_forced_xla, "on", False)
    _forced_xla.on = True
    try:
        yield
    finally:
        _forced_xla.on = before


def _unavailable(products: bool = True) -> str | None:
    """Why products (or, where not `products`, the other custom calls) traced now would not use the custom calls
    (None where they would), with `VITDISTILL_CPU_GEMM=mkl`'s error where the products cannot."""
    mode = choice()
    if mode == "xla":
        return f"{CHOICE}=xla"
    if getattr(_forced_xla, "on", False):
        return "within xla_dots()"
    if jax.default_backend() != "cpu" or jax.device_count() != 1:
        return "not a one-device CPU process"
    loaded = _load()
    why = loaded["why"] if not loaded["ok"] else NO_PRODUCTS if products and not loaded["products"] else None
    if mode == "mkl" and why is not None:
        raise CpuGemmError(f"{CHOICE}=mkl, but {why}; or set {CHOICE}=auto to fall back to XLA's dots")
    return why if not loaded["ok"] or products else None


def enabled() -> bool:
    """Whether products traced now use the custom calls (native or MKL's): a CPU backend with one device in
    one process, the library loaded, and the native products (AVX-512F) or MKL (`VITDISTILL_CPU_GEMM`
    permitting; not within `xla_dots()`)."""
    return _unavailable() is None


def rows_enabled() -> bool:
    """Whether the other custom calls run (the row kernels: softmax, LayerNorm; the grouped convolution where the
    CPU has AVX-512F or AVX2; `stored`): as `enabled()`, but without MKL on an AVX2 CPU too, where the products
    stay XLA's."""
    return _unavailable(products=False) is None


def status() -> str:
    """What traced products use now: 'native' (cpu_conv.cc's kernels), 'mkl' or 'xla (why)' (for benchmark
    records)."""
    why = _unavailable()
    if why is not None:
        return f"xla ({why})"
    return "native" if native_products() else "mkl"


def _require_loaded():
    """The custom calls registered, or a CpuGemmError saying why not (for calls made outside `enabled()`)."""
    if not _load()["ok"]:
        raise CpuGemmError(f"vitdistill.cpu_gemm: {_loaded['why']}")


def _gemm(a, b, *, ta: bool = False, tb: bool = False):
    """op(a) @ op(b) over the last two dimensions (the leading ones, equal in both, index a batch) by MKL."""
    _require_loaded()
    m = a.shape[-1] if ta else a.shape[-2]
    n = b.shape[-2] if tb else b.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32),
                            vmap_method="sequential")
    return call(a, b, ta=ta, tb=tb)


def _op_product(a, b, ta: bool, tb: bool):
    """op(a) @ op(b) over the last two dimensions (the leading ones, equal in both, index a batch): by
    cpu_conv.cc's kernel where `native_products()`, else by MKL (`_gemm`)."""
    if native_products():
        return _native_product(a, b, ta, tb)
    return _gemm(a, b, ta=ta, tb=tb)


def _native_product(a, b, ta: bool, tb: bool):
    """`_op_product` by cpu_conv.cc's kernel, whatever `native_products` says (where `conv_available`)."""
    shape = (*a.shape[:-2], a.shape[-1] if ta else a.shape[-2], b.shape[-2] if tb else b.shape[-1])
    return _rows_call("matmul", shape)(a, b, ta=ta, tb=tb)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def product(a, b, ta: bool = False, tb: bool = False):
    """op(a) @ op(b) in float32 over the last two dimensions, op a transpose where `ta` / `tb` (a [..., k, m]
    stands for its [..., m, k] transpose), and both gradients as products with the transposes folded in; each
    by `_op_product` (the native kernel or MKL's, `native_products`). CPU only; a
    CpuGemmError where the library cannot be loaded. Models call it through `dot_general` and
    `batched_matmul`, which check `enabled()`."""
    return _op_product(a, b, ta, tb)


def _product_fwd(a, b, ta, tb):
    return _op_product(a, b, ta, tb), (a, b)


def _product_bwd(ta, tb, residuals, grad):
    a, b = residuals
    # c = op(a) op(b): op(a)' = c' op(b)ᵀ and op(b)' = op(a)ᵀ c', transposed back where a or b is stored transposed.
    grad_a = _op_product(b, grad, tb, True) if ta else _op_product(grad, b, False, not tb)
    grad_b = _op_product(grad, a, True, ta) if tb else _op_product(a, grad, not ta, False)
    return grad_a, grad_b


product.defvjp(_product_fwd, _product_bwd)


def matmul(x, w):
    """x [m, k] @ w [k, n]: `product(x, w)`."""
    return product(x, w, False, False)


def _on_mkl(*arrays) -> bool:
    """Float32 arrays whose products run on the custom calls (`enabled()`)."""
    return all(x.dtype == jnp.float32 for x in arrays) and enabled()


def _on_native(*arrays) -> bool:
    """Float32 arrays for the row kernels, `stored` or the grouped convolution (`rows_enabled()`)."""
    return all(x.dtype == jnp.float32 for x in arrays) and rows_enabled()


def batched_matmul(a, b, *, tb: bool = False):
    """a [..., m, k] @ b [..., k, n] (b [..., n, k] transposed where `tb`) for attention's products: `product`'s
    where `enabled()` and both are float32, else XLA's batched dot."""
    if _on_mkl(a, b):
        return product(a, b, False, tb)
    return a @ (jnp.swapaxes(b, -1, -2) if tb else b)


def _strided(a, b, shape, into=None, *, m: int, n: int, k: int, ta: bool = False, tb: bool = False,
             alpha: float = 1.0, at_a, at_b, at_c):
    """c[i0, i1] = alpha op(a[i0, i1]) op(b[i0, i1]) for each of at_c's [batch0, batch1] items by MKL, each operand
    read or written in place: `at_x` = (batch0, batch1), offset, row stride (ld), stride0, stride1 in elements of
    its buffer. Into a fresh float32 array of `shape` (only what at_c reaches is written), or into `into`'s buffer,
    keeping its other elements. CPU only; a CpuGemmError where the library cannot be loaded."""
    _require_loaded()
    (batch0, batch1), *_ = at_c
    attrs = dict(sizes=np.array([batch0, batch1, m, n, k], np.int64), ta=ta, tb=tb, alpha=np.float32(alpha),
                 layouts=np.array([number for at in (at_a, at_b, at_c) for number in at[1:]], np.int64))
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    if into is None:
        return jax.ffi.ffi_call("vitdistill_strided_gemm", out, vmap_method="sequential")(a, b, **attrs)
    return jax.ffi.ffi_call("vitdistill_strided_gemm_into", out, input_output_aliases={2: 0},
                            vmap_method="sequential")(a, b, into, **attrs)


def strided_attention_enabled(qkv) -> bool:
    """Whether `qkv_attention` runs for float32 `qkv`: where the products run on MKL (`status() == 'mkl'`: Intel's
    AVX-512 CPUs and AVX2 ones with MKL installed), whose products take row strides. Elsewhere the models keep
    the heads-first batched products."""
    return _on_mkl(qkv) and not native_products()


def _attention_layouts(heads_shape):
    """qkv_attention's layouts (see `_strided`) of q, k, v [b, h, t, d], of the output and its gradient [b, t, h d],
    of the [b, h, t, t] logits, weights and their gradients, and of q, k, v's thirds of qkv [b, t, 3 h d]."""
    b, h, t, d = heads_shape
    dim = h * d
    items = (b, h)
    heads_first = (items, 0, d, h * t * d, t * d)
    side_by_side = (items, 0, dim, t * dim, d)
    square = (items, 0, t, h * t * t, t * t)
    thirds = tuple((items, part * dim, 3 * dim, t * 3 * dim, d) for part in range(3))
    return heads_first, side_by_side, square, thirds


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def qkv_attention(qkv, num_heads: int):
    """Multi-head attention from the fused projection `qkv` [b, t, 3 dim] (timm's [q | k | v], each split into
    `num_heads` heads of d): softmax(q kᵀ / sqrt(d)) v with the heads concatenated, [b, t, dim]. q, k and v are
    rearranged heads-first by XLA (which fuses the projection's bias add into that copy); the products are MKL's,
    the weights times v written with the heads side by side into the output, and the backward pass's dq, dk, dv
    written into their thirds of the gradient of qkv, each in place by MKL's strides, so neither layout copy back
    is made. The softmax is `softmax`'s (the native row kernel). CPU with MKL only (`strided_attention_enabled`)."""
    return _qkv_attention_fwd(qkv, num_heads)[0]


def _qkv_attention_fwd(qkv, num_heads):
    q, k, v = jnp.moveaxis(qkv.reshape(*qkv.shape[:2], 3, num_heads, -1), (2, 3), (0, 2))  # each [b, h, t, d]
    b, h, t, d = q.shape
    at_heads, at_out, at_square, _ = _attention_layouts(q.shape)
    logits = _strided(q, k, (b, h, t, t), m=t, n=t, k=d, tb=True, alpha=d**-0.5, at_a=at_heads, at_b=at_heads,
                      at_c=at_square)
    weights = _softmax_fwd(logits)[0]  # the native row kernel: it runs wherever the products run on MKL
    out = _strided(weights, v, (b, t, h * d), m=t, n=d, k=t, at_a=at_square, at_b=at_heads, at_c=at_out)
    return out, (q, k, v, weights)


def _qkv_attention_bwd(num_heads, residuals, grad):
    q, k, v, weights = residuals
    b, h, t, d = q.shape
    at_heads, at_out, at_square, (at_q, at_k, at_v) = _attention_layouts(q.shape)
    grad_weights = _strided(grad, v, weights.shape, m=t, n=t, k=d, tb=True, at_a=at_out, at_b=at_heads, at_c=at_square)
    grad_logits = _softmax_bwd(weights, grad_weights)[0]
    # dv = weightsᵀ dout, dq = dlogits k / sqrt(d), dk = dlogitsᵀ q / sqrt(d): each into its third of one buffer
    shape = (b, t, 3 * h * d)
    grad_qkv = _strided(weights, grad, shape, m=t, n=d, k=t, ta=True, at_a=at_square, at_b=at_out, at_c=at_v)
    grad_qkv = _strided(grad_logits, k, shape, grad_qkv, m=t, n=d, k=t, alpha=d**-0.5, at_a=at_square, at_b=at_heads,
                        at_c=at_q)
    grad_qkv = _strided(grad_logits, q, shape, grad_qkv, m=t, n=d, k=t, ta=True, alpha=d**-0.5, at_a=at_square,
                        at_b=at_heads, at_c=at_k)
    return (grad_qkv,)


qkv_attention.defvjp(_qkv_attention_fwd, _qkv_attention_bwd)


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for `nn.Dense(dot_general=...)`: the Dense contraction ([..., k] · [k, n]) of two
    float32 arrays through `matmul` where `enabled()`, anything else through lax."""
    dense = (((lhs.ndim - 1,), (0,)), ((), ()))
    if (rhs.ndim == 2 and tuple(tuple(map(tuple, part)) for part in dimension_numbers) == dense
            and preferred_element_type in (None, jnp.float32) and _on_mkl(lhs, rhs)):
        out = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
        return out.reshape(*lhs.shape[:-1], rhs.shape[1])
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, preferred_element_type=None):
    """`lax.conv_general_dilated` for `nn.Conv(conv_general_dilated=...)`: a convolution whose stride is its
    kernel (a ViT's patch embedding: NHWC float32 images, an HWIO kernel, no padding, dilation or groups) as
    the image's patches [n, k * k * c] times the kernel [k * k * c, out] through `matmul` where `enabled()`,
    anything else through lax. XLA:CPU ran DeiT-S's as a convolution of the images transposed to [c, h, w, n]
    (the noise of random erasing computed in that transpose) and its kernel gradient as another: from uint8
    levels through normalising and erasing, forward and kernel gradient, 9.33 -> 7.32 ms at batch 4 on a 2-core
    CPU (`experiments/patch_products.py`; the images are `_store`d first: fused into the patches' transpose
    instead they took 8.27)."""
    size = rhs.shape[:2]
    nhwc = ("NHWC", "HWIO", "NHWC")  # (None is lax's NCHW, OIHW, NCHW)
    patches = (lhs.ndim == 4 and dimension_numbers is not None
               and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
               == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, nhwc)
               and tuple(window_strides) == size and feature_group_count == 1
               and (padding == "VALID" or (not isinstance(padding, str) and all(tuple(p) == (0, 0) for p in padding)))
               and all(d in (None, 1) for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
               and preferred_element_type in (None, jnp.float32) and _on_mkl(lhs, rhs))
    if not patches:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                            rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                            feature_group_count=feature_group_count, precision=precision,
                                            preferred_element_type=preferred_element_type)
    (kh, kw), (n, h, w, c) = size, lhs.shape
    rows, cols = h // kh, w // kw
    lhs = _store(lhs)  # what makes the images (normalising, erasing's noise) not fused into the patches' transpose
    x = lhs[:, :rows * kh, :cols * kw].reshape(n, rows, kh, cols, kw, c).transpose(0, 1, 3, 2, 4, 5)
    out = matmul(x.reshape(n * rows * cols, kh * kw * c), rhs.reshape(kh * kw * c, rhs.shape[-1]))
    return out.reshape(n, rows, cols, rhs.shape[-1])


def _rows_call(name, *shapes):
    """The native handler `vitdistill_<name>` (NATIVE_TARGETS) as a function with float32 results of `shapes`."""
    _require_loaded()
    out = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
    return jax.ffi.ffi_call(f"vitdistill_{name}", out[0] if len(out) == 1 else out, vmap_method="sequential")


@jax.custom_vjp
def softmax(x):
    """Softmax of float32 `x` over its last dimension in one pass of the native kernel (cpu_rows.cc), and
    its gradient dx = y (dy - <dy, y>) in one more. CPU only; models call it through `softmax_last`."""
    return _softmax_fwd(x)[0]


def _softmax_fwd(x):
    y = _rows_call("softmax", x.shape)(x)
    return y, y


def _softmax_bwd(y, grad):
    return (_rows_call("softmax_grad", y.shape)(y, grad),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


def softmax_last(x):
    """`jax.nn.softmax(x, axis=-1)`: the native kernel's where `rows_enabled()` and x is float32, else JAX's."""
    if _on_native(x):
        return softmax(x)
    return jax.nn.softmax(x, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm of float32 `x` over its last dimension, (x - mean) / sqrt(var + eps) * scale + bias with
    the variance as the mean squared deviation (PyTorch's two passes), by the native kernel, and its
    gradients (x, scale, bias) in one more pass. CPU only; models call it through `vit.NativeLayerNorm`."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    rows = x.shape[:-1]
    y, mean, rstd = _rows_call("layer_norm", x.shape, rows, rows)(x, scale, bias, eps=np.float32(eps))
    return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, residuals, grad):
    x, scale, mean, rstd = residuals
    return tuple(_rows_call("layer_norm_grad", x.shape, scale.shape, scale.shape)(x, scale, mean, rstd, grad))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_jvp
def _store(x):
    return jax.ffi.ffi_call("vitdistill_store", jax.ShapeDtypeStruct(x.shape, x.dtype), input_output_aliases={0: 0},
                            vmap_method="broadcast_all")(x)


_store.defjvp(lambda primals, tangents: (_store(*primals), *tangents))


def stored(x):
    """x, computed once and stored where `rows_enabled()` and x is float32 (a native custom call that takes x's buffer
    as its result, so nothing moves: a fusion barrier that XLA:CPU keeps, where it drops `optimization_barrier`s
    before fusing); x itself otherwise. For a value that feeds a custom call and also an elementwise op that XLA
    would otherwise recompute it into (RegNet's block outputs)."""
    if _on_native(x):
        return _store(x)
    return x


CONV_DEPTH = 1152  # cpu_conv.cc's kRow: k * k * group_in at most


def grouped_conv_supported(x, kernel, stride: int) -> bool:
    """Whether `grouped_conv` takes this convolution (x NHWC, kernel [k, k, in / groups, out] HWIO): float32, a
    square odd kernel with k * k * group_in <= 1152, output groups a multiple of 16 channels, an AVX-512 or AVX2 CPU,
    and `rows_enabled()`."""
    k, _, group_in, out = kernel.shape
    if kernel.shape[0] != kernel.shape[1] or k % 2 == 0 or x.shape[-1] % group_in or stride < 1:
        return False
    groups = x.shape[-1] // group_in
    if out % groups or (out // groups) % 16 or k * k * group_in > CONV_DEPTH:
        return False
    return _on_native(x, kernel) and conv_available()


def native_products() -> bool:
    """Whether products run on cpu_conv.cc's kernel rather than MKL's: on AVX-512F CPUs, except Intel's where MKL is
    installed.

    On an AVX-512 AMD host (2-core EPYC, Zen 4) the native kernel was -0.5 to +24 % faster than MKL at RegNetY-16GF's
    and DeiT-S's shapes and the steps faster with it (DeiT-S 819.2 -> 720.1 ms). On an Intel one (2-core Xeon,
    Emerald Rapids, 2026-12-07) MKL, Intel's own library, was as fast or faster at all 20 shapes (1.00-1.50x; 1.5x
    at DINO's local crops' attention) and the steps with every product on MKL faster, in 5 turns each: DeiT-S
    695.6 -> 645.5 ms, DINO ViT-S/16 2,981.0 -> 2,458.0, the distilled DeiT-S with RegNetY-16GF 1,124.9 -> 1,087.5
    (`experiments/native_matmul.py`). So on Intel CPUs the products are MKL's where it is installed, native where
    not.

    On an AVX2 host (a 2-core AMD EPYC, Zen 3) the same products on a 6 x 16 AVX2 tile were slower than MKL's (MKL
    0.92-1.28x as fast at RegNetY-16GF's and DeiT-S's shapes, median 1.12x; 0.96-3.0x at attention's batched ones)
    and than XLA's own dots (0.80-0.97x XLA's speed at DeiT-S's); so there the products are MKL's, or XLA's without
    MKL, and only the grouped convolution runs on that tile."""
    return conv_available() and _loaded["native_products"]


def conv_available() -> bool:
    """Whether cpu_conv.cc's kernels (the grouped convolution, the two-matrix products) can run here: the library
    loaded on a CPU with AVX-512F, or AVX2 with FMA."""
    return _load()["ok"] and _loaded["conv"]


def per_group_conv(x, kernel, stride: int, pad: int):
    """The grouped convolution in lax as one dense convolution per group, concatenated (XLA:CPU's fast form of
    it): `regnet.GroupedConv`'s CPU path where `grouped_conv` does not run, and `grouped_conv`'s gradients."""
    group_in = kernel.shape[2]
    groups = x.shape[-1] // group_in
    group_out = kernel.shape[-1] // groups
    conv = functools.partial(jax.lax.conv_general_dilated, window_strides=(stride, stride), padding=[(pad, pad)] * 2,
                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.concatenate([conv(x[..., g * group_in:(g + 1) * group_in], kernel[..., g * group_out:(g + 1) * group_out])
                            for g in range(groups)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def grouped_conv(x, kernel, stride: int, pad: int):
    """A grouped k x k convolution of float32 NHWC `x` with the HWIO `kernel` ([k, k, in / groups, out]; the
    groups are in / group_in), stride `stride`, `pad` zeros on each side, by the native kernel (cpu_conv.cc).
    Its gradients are lax's, of the per-group convolutions (the DeiT teacher, its user, needs none). CPU
    only; models call it where `grouped_conv_supported`."""
    if not conv_available():
        raise CpuGemmError("vitdistill.cpu_gemm.grouped_conv: " + (_loaded["why"] if not _loaded["ok"] else
                                                                    "this CPU lacks AVX-512F and AVX2"))
    k = kernel.shape[0]
    n, h, w, _ = x.shape
    shape = (n, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, kernel.shape[-1])
    return _rows_call("grouped_conv", shape)(x, kernel, stride=np.int64(stride), pad=np.int64(pad))


def _grouped_conv_fwd(x, kernel, stride, pad):
    return grouped_conv(x, kernel, stride, pad), (x, kernel)


def _grouped_conv_bwd(stride, pad, residuals, grad):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda a, b: per_group_conv(a, b, stride, pad), x, kernel)
    return vjp(grad)


grouped_conv.defvjp(_grouped_conv_fwd, _grouped_conv_bwd)
