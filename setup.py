"""hear_msm: masked spectrogram models (SSAST, SSAM, AxLSTM) behind the HEAR API."""
import re
from pathlib import Path

from setuptools import setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "hear_msm" / "__init__.py").read_text()).group(1)

setup(
    name="hear_msm",
    version=VERSION,
    description="Self-supervised audio embeddings from masked spectrogram models (SSAST, SSAM, AxLSTM), HEAR-compatible",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # `weights/` (the registry of weight tags and the shipped demo weights) sits at the top of the
    # repository per the design card and is installed as the subpackage `hear_msm.weights`.
    packages=["hear_msm", "hear_msm.models", "hear_msm.ops", "hear_msm.training", "hear_msm.weights"],
    package_dir={"hear_msm": "hear_msm", "hear_msm.weights": "weights"},
    package_data={
        "hear_msm.weights": ["*.json", "*/*.json", "*/*.safetensors", "*/*.md", "*/*.png"],
        "hear_msm.ops": ["csrc/*.c"],  # compiled on first use with the system C compiler
    },
    install_requires=[
        "torch>=2.4",
        "torchaudio>=2.4",
        "xlstm==2.0.6",
        "huggingface-hub>=0.24",
        # the authors' checkpoints on Google Drive, fetched on first use (hear_msm/_drive.py); filelock
        # (also a huggingface-hub dependency) serialises concurrent downloads of one model
        "gdown>=6.5",
        "filelock>=3.12",
        "safetensors>=0.4",
        "soundfile>=0.12",
        "msgpack>=1.0",  # the authors' Flax checkpoints (MW-MAE / MAE), read without JAX
        "numpy",
        "tqdm",
    ],
    extras_require={
        # fused selective-scan kernels; only usable with CUDA (see README)
        "cuda": ["mamba-ssm>=2.2"],
        "plot": ["matplotlib"],
        "dev": ["pytest>=7"],
    },
    entry_points={"console_scripts": ["hear-msm=hear_msm.cli:main"]},
)
