"""Install the top-level folders as one `stablekd.*` namespace (docs/architecture.md, Code layout).

`pip install -e .` and `pip install .` both work; imports read `from stablekd.model import build`.
torch is a plain range: on a CPU-only machine install the CPU wheel first (README), on a GPU node
pip takes the CUDA build.
"""

from setuptools import setup

PARTS = [
    "launcher",
    "launcher.config",
    "launcher.driver",
    "launcher.rank",
    "launcher.stages",
    "model",
    "objectives",
    "data_pipeline",
    "data_pipeline.shards",
    "ds_configs",
    "evaluation",
    "configs",
]

setup(
    name="stablekd",
    version="0.1.0",
    description="DeepSpeed pipeline: ZeRO teacher -> sharded top-k soft labels -> student KD -> contrastive -> stability eval",
    python_requires=">=3.10",
    packages=[f"stablekd.{p}" for p in PARTS],
    package_dir={f"stablekd.{p}": p.replace(".", "/") for p in PARTS},
    package_data={"stablekd.ds_configs": ["*.json"], "stablekd.configs": ["*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8,<0.20",
        "transformers>=4.50",
        "accelerate>=1.1",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 construction)
        "sentencepiece>=0.2",
        "tensorboard>=2.16",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "tqdm>=4.66",
        "numpy>=1.26",
        "psutil>=5.9",  # (deepspeed needs it too) stopping a job's process tree
        "pillow>=10.1",  # (tensorboard needs it too) eval/report.png
    ],
    extras_require={"dev": ["pytest>=8", "ruff>=0.6"]},
    entry_points={"console_scripts": ["stablekd = stablekd.launcher.driver.cli:console"]},
)
