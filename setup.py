"""Install moe_jax: `pip install -e ".[test]"`."""
from setuptools import find_packages, setup

setup(
    name="moe_jax",
    version="0.1.0",
    description="Mixture-of-Experts transformers in JAX/Flax NNX: routers, dispatch, experts, kernels.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["moe_jax", "moe_jax.*", "pallas_kernels", "pallas_kernels.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "ml-collections>=1.1.0",
        "absl-py",
        "numpy",
        # Offline data through TFDS's array_record files and tfds.data_source (TensorFlow not needed).
        "tensorflow-datasets==4.9.10",
        "array_record>=0.5",
        "tensorboardX",  # TensorBoard event files without TensorFlow
        "tqdm",
        "matplotlib",
        "qwix>=0.1.8",  # quantize/dequantize numerics of the int8/int4 routed experts
        "safetensors>=0.4",  # Hugging Face checkpoints in and out (moe_jax.hf); no installed package brought it
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist>=3.6", "hypothesis", "tokenizers==0.23.3", "scipy", "threadpoolctl>=3.5",
                 "nbclient>=0.11", "nbformat>=5.10", "ipykernel>=6"],  # the notebooks run headless in tests
        "experiments": ["scipy", "threadpoolctl>=3.5"],  # experiments/fit.py
        "bpe": ["tokenizers==0.23.3"],
        # Hugging Face parity fixtures are regenerated with these (CPU torch only):
        #   pip install torch==2.13.0 transformers==5.23.0
        "hf": ["torch==2.13.0", "transformers==5.23.0"],
    },
)
