"""Test set-up: two CPU devices so sharded code paths run on every test machine."""
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # torch/TF stay on the CPU in tests
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("VITDISTILL_CURVES", "0")  # runs skip curves.png (~1 s each); tests/test_linear.py asks for it

# torch's optional triton import crashes the process once TensorFlow is loaded; the CPU paths never need it.
sys.modules.setdefault("triton", None)



def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run from benchmarks, not the default suite")
    import jax

    # Tests build the same small train steps many times; a persistent compilation cache compiles each once.
    jax.config.update("jax_compilation_cache_dir", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                "vitdistill-test-jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
