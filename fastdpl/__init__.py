"""fastdpl: fast Differentiable Prompt Learning for CLIP, language models and ViT classifiers.

* ``fastdpl.ops.mixture_prefix_attention``: the softmax(alpha)-weighted mixture of
  prefix-prompted attentions over candidate prompt lengths, as one fused attention.
* ``FastDPLPrompt``: DPL's supernet (search) and subnet (fixed) prompts around an
  open_clip CLIP model; ``PromptConfig``: per-block prompt lengths.
* ``load_clip``: open_clip backbones by name and tag, local file or HF cache, and the built-in tiny CLIP.
* ``TestTimePromptTuner``: test-time prompt tuning (TPT) of a context or of DPL's text prompts.
* ``fastdpl.lm.FastDPLPrefix`` (language models), ``fastdpl.vit.FastDPLViT`` (timm ViT classifiers).
* ``fastdpl.pipeline``: the search / train / evaluation stages behind the ``fastdpl`` command.

The names below are imported on first use (PEP 562), so that ``import fastdpl.kernels`` or
``python -m fastdpl.bench.targets`` does not load open_clip and every CLIP module first.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
# name: the module that defines it
_EXPORTS = {"PromptConfig": "config", "load_clip": "models", "IMPLS": "ops", "mixture_prefix_attention": "ops",
            "enable_nvtx": "profiling", "FastDPLPrompt": "prompt", "TestTimePromptTuner": "tpt"}
__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'fastdpl' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
