"""Install fastdpl: fused Differentiable Prompt Learning for CLIP models, language models and ViT classifiers.

Dependencies are given as minimum versions: the oldest the test suite has passed on. Three stacks
are tested: the GPU machine's (torch 2.11.0, triton 3.6.0, transformers 5.17.0, timm 1.0.30, peft
0.21.0, numpy 2.5; benchmarks/gpu-machine/machine.txt pins it), a capped install (torch 2.14.1,
triton 3.8.0, transformers 5.25) and the newest pip serves (torch 2.15, triton 3.9), with
open_clip 3.3.0 and xformers 0.0.35 on all three; the kernels' compiled-code check is clean on
triton 3.6, 3.8 and 3.9 (fastdpl/kernels/configs.py). The Triton kernels live in fastdpl/kernels/
(not in a top-level kernels/ folder: that name would shadow Hugging Face's `kernels` package, which
transformers 5.25 imports, for anything run from the repository root).
"""
from setuptools import find_packages, setup

setup(
    name="fastdpl",
    version="0.1.0",
    description="Fast Differentiable Prompt Learning (DPL) for CLIP, language models and ViT classifiers: "
                "fused mixture-of-prompt-lengths attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fastdpl", "fastdpl.*"]),
    package_data={"fastdpl": ["assets/*.pt", "assets/tiny_lm/*"]},  # the built-in tiny CLIP and tiny LM (demos)
    install_requires=[
        "torch>=2.11",
        "triton>=3.6",  # the launch table is compiled and checked for 3.6, 3.8 and 3.9 (fastdpl/kernels/configs.py)
        "open_clip_torch>=3.3",
        "timm>=1.0.30",  # open_clip's timm image towers (fastdpl.adapters.open_clip_timm), timm:NAME classifiers
        "xformers>=0.0.35",  # a peer of the op benchmark
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
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3.5",  # the README's `-n auto`
                 "tensorboard>=2.14", "transformers>=5.17",
                 "peft>=0.21",  # peft: the oracle of FastDPLPrefix.from_peft / to_peft
                 "datasets>=2.14"],  # the save_to_disk folders of `fastdpl lm`
        "tensorboard": ["tensorboard>=2.14"],  # TensorBoard events beside each stage's metrics.jsonl
        "hf": ["transformers>=5.17"],  # Hugging Face CLIPModel backbones (fastdpl.adapters.hf_clip)
        # Language models (fastdpl.lm, fastdpl lm, fastdpl demo lm): transformers 5's attention and
        # mask registries; peft for PEFT adapters (from_peft / to_peft) and the demo's PEFT row
        "lm": ["transformers>=5.17", "safetensors>=0.4", "peft>=0.21"],
        "text": ["datasets>=2.14"],  # `fastdpl lm` reading datasets' save_to_disk folders
    },
    entry_points={"console_scripts": ["fastdpl=fastdpl.cli:main"]},
)
