"""Test set-up: two CPU devices so sharded code paths run on every test machine."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # torch/TF stay on the CPU in tests
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes; run from benchmarks, not the default suite")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
