"""MKL's float32 products for the Dense layers on a one-device CPU process (vitdistill/cpu_gemm.py): their
numbers against float64 NumPy, where they are used and where not, and the messages when they cannot be."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from vitdistill import cpu_gemm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_COMPILER = bool(os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++"))


@pytest.fixture
def fresh_load(monkeypatch, tmp_path):
    """A process state in which `_load` has not run, with its own build cache."""
    monkeypatch.setattr(cpu_gemm, "_loaded", {})
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))


def test_an_unknown_choice_names_the_variable_and_the_choices(monkeypatch):
    monkeypatch.setenv(cpu_gemm.CHOICE, "openblas")
    with pytest.raises(cpu_gemm.CpuGemmError, match=r"VITDISTILL_CPU_GEMM='openblas'.*auto.*mkl.*xla"):
        cpu_gemm.choice()


def test_the_command_line_names_a_bad_choice_in_one_line(tmp_path):
    env = {**os.environ, cpu_gemm.CHOICE: "bogus", "VITDISTILL_MALLOC": "system"}
    done = subprocess.run([sys.executable, "-m", "vitdistill.main", "--config=configs/dino_quickstart.py",
                           f"--workdir={tmp_path}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "vitdistill: VITDISTILL_CPU_GEMM='bogus': use auto (native kernels or MKL where they run), mkl (required) or "
        "xla (never)")


def test_without_mkl_or_avx_the_products_stay_with_xla_and_mkl_required_says_how_to_install(monkeypatch,
                                                                                             fresh_load):
    monkeypatch.setattr(cpu_gemm, "find_mkl", lambda: None)
    monkeypatch.setattr(cpu_gemm, "cpu_has_native_isa", lambda: False)
    monkeypatch.setattr(cpu_gemm, "build", lambda *args: pytest.fail("built with nothing to run on"))
    monkeypatch.setattr(cpu_gemm.jax, "device_count", lambda: 1)
    monkeypatch.setenv(cpu_gemm.CHOICE, "auto")
    assert cpu_gemm.enabled() is False
    assert cpu_gemm.status() == (
        "xla (MKL is not installed (pip install mkl) and this CPU has neither AVX-512F nor AVX2 with FMA for the "
        "native kernels)")
    monkeypatch.setenv(cpu_gemm.CHOICE, "mkl")
    with pytest.raises(cpu_gemm.CpuGemmError, match=r"pip install mkl.*VITDISTILL_CPU_GEMM=auto"):
        cpu_gemm.enabled()


WITHOUT_MKL = """
import json, jax, numpy as np
from vitdistill import cpu_gemm
cpu_gemm.find_mkl = lambda: None  # as after `pip install -e .`, without the cpu extra
a = np.random.default_rng(1).standard_normal((300, 200)).astype(np.float32)
b = np.random.default_rng(2).standard_normal((200, 90)).astype(np.float32)
dense = jax.jit(lambda a, b: cpu_gemm.dot_general(a, b, (((1,), (0,)), ((), ()))))
text = dense.lower(a, b).as_text()
error = np.abs(np.asarray(dense(a, b), np.float64) - a.astype(np.float64) @ b).max() / np.abs(a @ b).max()
softmax = jax.jit(cpu_gemm.softmax_last).lower(a).as_text().count("vitdistill_softmax")
print(json.dumps({"status": cpu_gemm.status(), "mkl": cpu_gemm.mkl_loaded(), "error": float(error),
                  "native_calls": text.count("vitdistill_matmul"), "mkl_calls": text.count(cpu_gemm.TARGET),
                  "isa": cpu_gemm.native_isa(), "rows": cpu_gemm.rows_enabled(), "softmax_calls": softmax}))
"""


@pytest.mark.skipif(not HAS_COMPILER or not cpu_gemm.cpu_has_native_isa(), reason="needs an AVX-512F or AVX2 CPU and g++")
@pytest.mark.parametrize("isa", ["auto", "avx2"])
def test_without_mkl_an_avx512_cpu_runs_the_products_on_the_native_kernels_and_an_avx2_cpu_on_xla(isa):
    """Products native on AVX-512F, XLA's on AVX2 (VITDISTILL_NATIVE_ISA=avx2 stands for an AVX2 CPU on an AVX-512
    one), where XLA's dots were faster than the AVX2 tile; the row kernels native on both."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_gemm.CHOICE)}  # one CPU device
    if isa == "avx2":
        env["VITDISTILL_NATIVE_ISA"] = "avx2"
    done = subprocess.run([sys.executable, "-c", WITHOUT_MKL], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["mkl"] is False and facts["rows"] is True and facts["softmax_calls"] == 1
    if facts["isa"] == "AVX-512F":
        assert facts["status"] == "native" and facts["native_calls"] == 1
    else:
        assert facts["isa"] == "AVX2" and facts["native_calls"] == 0
        assert facts["status"] == f"xla ({cpu_gemm.NO_PRODUCTS})"
    assert facts["mkl_calls"] == 0
    assert facts["error"] < 1e-5


VENDOR = """
import json, sys
import numpy as np, jax
from vitdistill import cpu_gemm
cpu_gemm.cpu_vendor = lambda: sys.argv[1]
a, b = np.ones((300, 200), np.float32), np.ones((200, 90), np.float32)
text = jax.jit(lambda a, b: cpu_gemm.dot_general(a, b, (((1,), (0,)), ((), ())))).lower(a, b).as_text()
print(json.dumps({"status": cpu_gemm.status(), "native_calls": text.count("vitdistill_matmul"),
                  "mkl_calls": text.count(cpu_gemm.TARGET)}))
"""


@pytest.mark.skipif(cpu_gemm.find_mkl() is None or not HAS_COMPILER
                    or "avx512f" not in cpu_gemm._cpuinfo("flags").split(),
                    reason="needs an AVX-512F CPU, MKL (pip install mkl, in the test extra) and g++")
@pytest.mark.parametrize("vendor, library", [("GenuineIntel", "mkl"), ("AuthenticAMD", "native")])
def test_with_mkl_an_intel_avx512_cpu_runs_the_products_on_mkl_and_an_amd_one_on_the_native_kernel(vendor, library):
    """Where both run, the faster as measured (cpu_gemm.native_products): MKL on Intel's CPUs, native on AMD's."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_gemm.CHOICE)}  # one CPU device
    done = subprocess.run([sys.executable, "-c", VENDOR, vendor], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["status"] == library
    assert (facts["native_calls"], facts["mkl_calls"]) == ((1, 0) if library == "native" else (0, 1))


def test_a_failed_build_falls_back_to_xla_with_the_compilers_message(monkeypatch, fresh_load, tmp_path):
    monkeypatch.setattr(cpu_gemm, "find_mkl", lambda: "/nonexistent/libmkl_rt.so.2")
    monkeypatch.setattr(cpu_gemm.jax, "device_count", lambda: 1)
    monkeypatch.setenv("CXX", "false")  # a compiler that fails
    assert cpu_gemm.enabled() is False
    assert cpu_gemm.status().startswith("xla (the native custom calls could not be built or loaded: false failed")
    assert not os.listdir(tmp_path / "vitdistill" / "native")  # no half-written library left in the cache


def test_two_devices_keep_xlas_dots(monkeypatch, fresh_load):
    """A sharded step must not gather its operands into one custom call: with several devices nothing loads."""
    monkeypatch.setattr(cpu_gemm.jax, "device_count", lambda: 2)
    monkeypatch.setattr(cpu_gemm, "_load", lambda: pytest.fail("loaded on a two-device process"))
    assert cpu_gemm.enabled() is False
    assert cpu_gemm.status() == "xla (not a one-device CPU process)"


@pytest.mark.skipif(cpu_gemm.find_mkl() is None or not HAS_COMPILER,
                    reason="needs MKL (pip install mkl, in the test extra) and a C++ compiler (g++)")
def test_mkl_products_equal_float64_numpy_and_a_vit_trains_the_same(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_gemm.CHOICE)}  # one CPU device
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cpu_gemm_check.py")], capture_output=True,
                          text=True, env={**env, "XDG_CACHE_HOME": str(tmp_path)}, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    cpuinfo = open("/proc/cpuinfo").read()
    avx512 = bool(re.search(r"\bavx512f\b", cpuinfo))
    intel = bool(re.search(r"^vendor_id\s*:\s*GenuineIntel$", cpuinfo, re.M))
    native = cpu_gemm.cpu_has_native_isa()  # the grouped convolutions are native on AVX-512F and on AVX2 CPUs
    # With MKL installed, the products are native on AVX-512F CPUs but Intel's, MKL's on those and on AVX2 ones
    # (cpu_gemm.native_products).
    assert facts["status"] == ("native" if avx512 and not intel else "mkl")
    # Each of op(a) op(b) and its two gradients within float32 rounding of float64 NumPy, on MKL and, on an AVX-512
    # CPU, on the native kernel: a wrong transpose, leading dimension, batch stride or block offset in the custom
    # call gives errors of order 1.
    assert sorted(facts["products"]) == (["mkl", "native"] if avx512 else ["mkl"])
    for library, errors in facts["products"].items():
        assert len(errors) == 14 * 4  # shapes x transpose settings
        for shape, error in errors.items():
            assert error < 1e-5, (library, shape, error)
    assert facts["vmap_error"] < 1e-6
    # MKL's strided products (attention's, writing its output and dq, dk, dv in place): within float32 rounding of
    # float64 NumPy over offsets, row strides and batch strides in both batch dimensions, into a fresh buffer and
    # into a given one whose other elements are kept; a wrong stride, offset or split gives errors of order 1, an
    # element overwritten outside the layout an error of order 1 in the "into" case.
    assert len(facts["strided_errors"]) == 3 * 4 * 2
    for case, error in facts["strided_errors"].items():
        assert error < 1e-5, (case, error)
    assert "reaches outside its buffer" in facts["strided_refused"]
    # Attention from qkv on them, and its gradient by qkv, within float32 rounding of the float64 formula.
    assert len(facts["attention"]) == 4
    for case, error in facts["attention"].items():
        assert error < 1e-5, (case, error)
    # Softmax and LayerNorm with their gradients (the native row kernels) within float32 rounding of float64
    # NumPy: a wrong row offset, block split, reduction or gradient term gives errors of order 1.
    assert len(facts["rows"]) == 6 + 5 + 1
    for case, error in facts["rows"].items():
        assert error < 2e-5, (case, error)
    # The grouped convolution (cpu_conv.cc) and its gradients within float32 rounding of float64 NumPy on 7
    # shapes: a wrong tap, padding, stride, group offset or tile tail gives errors of order 1. It takes
    # float32 shapes with 16 | group_out, k*k*group_in <= 1,152 and an odd kernel, and leaves the rest to lax.
    conv = facts["convolutions"]
    assert conv["available"] == native
    if conv["available"]:
        assert len(conv["errors"]) == 7
        for case, error in conv["errors"].items():
            assert error < 1e-5, (case, error)
        assert [name for name, taken in conv["taken"].items() if not taken] == [
            "1x6x6x32 kernel 3x3x16x40 float32", "1x6x6x256 kernel 3x3x256x256 float32",
            "1x6x6x32 kernel 2x2x16x32 float32", "1x6x6x32 kernel 3x3x16x32 bfloat16"]
    # A small RegNetY: each grouped 3x3 convolution is the native one (where available), its logits lax's.
    assert facts["regnet_conv_calls_mkl"] == (facts["regnet_grouped_convs"] if conv["available"] else 0)
    assert facts["regnet_grouped_convs"] == 3
    assert facts["regnet_conv_calls_xla"] == 0
    assert facts["regnet_error"] < 1e-5
    # Each block's output is stored (cpu_gemm.stored): XLA's fusions otherwise recompute each earlier block of a
    # stage inside the next block's output fusion, five more operands a block (RegNetY-16GF's stage 3: 62).
    assert facts["regnet_stages"] == [1, 1, 2]  # the last stage: a block whose shortcut is the one before
    assert facts["regnet_stores"] == {"auto": 4, "xla": 0}
    assert facts["regnet_largest_fusion"]["auto"] <= 12 < facts["regnet_largest_fusion"]["xla"]
    assert facts["stored_grad_error"] < 1e-6 and facts["stored_vmap_error"] == 0
    # DeiT's erased batch is stored before mixup/cutmix, whose fusion read each image and its partner twice and drew
    # erasing's noise again for each read (23.4 -> 4.6 ms at 4 x 224 x 224 x 3); the values as without the calls.
    assert facts["erase_mix_stores"] == {"auto": 1, "xla": 0}
    assert facts["erase_mix_difference"] == 0
    # Without the native kernels the plain products go to MKL and the grouped convolutions to lax.
    assert facts["without_avx512"] == {"mkl_calls": 1, "native_calls": 0, "regnet_conv_calls": 0}
    # Float32 Dense products go to MKL unless VITDISTILL_CPU_GEMM=xla or within xla_dots(); bfloat16 ones never.
    assert facts["dense_auto"] >= 1
    assert facts["dense_xla"] == facts["dense_forced_xla"] == facts["bfloat16"] == 0
    # A two-block ViT: every Dense product (qkv, proj, fc1, fc2 a block, and the head) and attention's two, each
    # forward and with both gradients, is a custom call, and its loss and gradients are XLA's to float32 rounding.
    assert facts["custom_calls_xla"] == 0
    assert facts["custom_calls_mkl"] >= 3 * (2 * (4 + 2) + 1)
    # On an AVX-512 CPU all of them, attention's batched ones too, are the native kernel's, none MKL's.
    assert facts["vit_mkl_calls"] == (0 if facts["status"] == "native" else facts["custom_calls_mkl"])
    # Where the products are MKL's, attention's are strided ones (`qkv_attention`, no heads-first copies): two
    # forward and four backward a block. Attention maps (the weights collected) keep the explicit form, equal to XLA's.
    assert facts["vit_strided_calls"] == (0 if facts["status"] == "native" else 2 * 6)
    assert facts["vit_maps_error"] < 1e-5
    # ... and its softmax (forward, backward) and LayerNorms (two a block and the final one) the row kernels.
    assert facts["row_calls_xla"] == 0
    assert facts["row_calls_mkl"] >= 2 * (2 + 2 * 2 + 1)
    assert facts["loss_error"] < 1e-5
    # Its patch embedding is the patches times the kernel (a product, forward and gradient), not a convolution;
    # on 36 x 40 images with 8 x 8 patches the same as lax's to float32 rounding (a wrong patch order, or
    # rows and columns not dropped as VALID drops them, gives errors of order 1); other convolutions stay lax's.
    assert facts["vit_convolutions"]["auto"] == 0 < facts["vit_convolutions"]["xla"]
    assert facts["patch_conv_error"] < 1e-5 and facts["patch_conv_grad_error"] < 1e-5
    assert facts["patch_conv_products"] == 1 and facts["other_conv_products"] == 0
    assert facts["nchw_conv_error"] == 0  # dimension_numbers=None is lax's NCHW, not taken for patches
    assert facts["grad_error"] < 1e-4


AVX2_KERNELS = """
import json, sys
sys.path.insert(0, "tests")
import jax.numpy as jnp
import cpu_gemm_check as check
from vitdistill import cpu_gemm
cpu_gemm.find_mkl = lambda: None
try:
    cpu_gemm._native_product(jnp.ones((4, 4)), jnp.ones((4, 4)), False, False).block_until_ready()
    refused = None
except Exception as e:  # XlaRuntimeError
    refused = str(e)
print(json.dumps({"isa": cpu_gemm.native_isa(), "status": cpu_gemm.status(), "rows": cpu_gemm.rows_enabled(),
                  "convolutions": check.convolutions(), "refused": refused}))
"""


@pytest.mark.skipif(not HAS_COMPILER or not cpu_gemm.cpu_has_native_isa(), reason="needs an AVX-512F or AVX2 CPU and g++")
def test_the_avx2_grouped_convolution_equals_float64_numpy(tmp_path):
    """VITDISTILL_NATIVE_ISA=avx2 (on an AVX-512 CPU too): the grouped convolution on the AVX2 register tile (6
    pixels x 16 lanes) against float64 NumPy on cpu_gemm_check's 7 shapes (pixel counts off the tile of 6, 1x1 to
    5x5 kernels, strides 1 and 2): a wrong sub-tile offset or lane half gives errors of order 1. The native
    products refuse to run there (MKL's or XLA's are used)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu_gemm.CHOICE)}  # one CPU device
    done = subprocess.run([sys.executable, "-c", AVX2_KERNELS], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**env, "XDG_CACHE_HOME": str(tmp_path), "VITDISTILL_NATIVE_ISA": "avx2"})
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["isa"] == "AVX2" and facts["rows"] is True
    assert facts["status"] == f"xla ({cpu_gemm.NO_PRODUCTS})"
    assert "vitdistill matmul: needs AVX-512F" in facts["refused"]
    assert len(facts["convolutions"]["errors"]) == 7
    for case, error in facts["convolutions"]["errors"].items():
        assert error < 1e-5, (case, error)
