"""Install fastdpl: fused Differentiable Prompt Learning for CLIP models.

Dependencies are given as minimum versions. torch and triton: the oldest the test suite has
passed on (torch 2.14.1 with triton 3.8.0, torch 2.15.0 with triton 3.9.0); the kernels'
compiled-code check is clean on triton 3.6, 3.8 and 3.9 (fastdpl/kernels/configs.py). The others
are the oldest the code is written against; the suite ran with open_clip 3.3.0, timm 1.0.31,
transformers 5.24 and 5.25 and xformers 0.0.35. The Triton kernels live in fastdpl/kernels/ (not
in a top-level kernels/ folder: that name would shadow Hugging Face's `kernels` package, which
transformers 5.25 imports, for anything run from the repository root).
"""
from setuptools import find_packages, setup

setup(
    name="fastdpl",
    version="0.1.0",
    description="Fast Differentiable Prompt Learning (DPL) for CLIP: fused mixture-of-prompt-lengths attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdpl", "fastdpl.*"]),
    package_data={"fastdpl": ["assets/*.pt", "assets/tiny_lm/*"]},  # the built-in tiny CLIP and tiny LM (demos)
    install_requires=[
        "torch>=2.14",
        "triton>=3.6",  # the launch table is compiled and checked for 3.6, 3.8 and 3.9 (fastdpl/kernels/configs.py)
        "open_clip_torch>=2.24",
        "timm>=1.0",  # open_clip's timm image towers (fastdpl.adapters.open_clip_timm); tested at 1.0.31
        "xformers>=0.0.28",
        "nvtx>=0.2.10",
        "numpy>=1.24",
        "pillow>=10.1",
        "tqdm>=4.60",
        "pyyaml>=6",
        "scipy>=1.10",
        "scikit-learn>=1.3",
        "matplotlib>=3.7",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "tensorboard>=2.14", "transformers>=5.0",
                 "peft>=0.17",  # peft: the oracle of FastDPLPrefix.from_peft / to_peft
                 "datasets>=2.14"],  # the save_to_disk folders of `fastdpl lm`
        "tensorboard": ["tensorboard>=2.14"],  # TensorBoard events beside each stage's metrics.jsonl
        "hf": ["transformers>=4.40"],  # Hugging Face CLIPModel backbones (fastdpl.adapters.hf_clip)
        # Language models (fastdpl.lm): transformers 5's attention and mask registries
        "lm": ["transformers>=5.0", "safetensors>=0.4"],
        "text": ["datasets>=2.14"],  # `fastdpl lm` reading datasets' save_to_disk folders
    },
    entry_points={"console_scripts": ["fastdpl=fastdpl.cli:main"]},
)
