"""Tower adapters: the only place that knows a library's module names (base.py says what a family
provides). ``adapt(model)`` picks the family of a model; ``prompted_block`` and ``project_prompts``
run any family's block.

Families: open_clip (open_clip.py), Hugging Face transformers' CLIPModel (hf_clip.py) and
SiglipModel (hf_siglip.py).
"""
from __future__ import annotations

from .base import (
    Tower, UnsupportedModelError, attention_with_own_prompts, block_ops, check_mixable, place_context,
    project_prompts, prompted_block,
)
from .hf_clip import HFCLIPAdapter
from .hf_siglip import HFSiglipAdapter
from .open_clip import OpenClipAdapter

ADAPTERS = [OpenClipAdapter, HFCLIPAdapter, HFSiglipAdapter]


def adapt(model):
    """The adapter of ``model``'s family; UnsupportedModelError naming what is missing otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported CLIP: fastdpl runs open_clip's CLIP "
                                "and transformers' CLIPModel and SiglipModel")


__all__ = ["adapt", "Tower", "UnsupportedModelError", "attention_with_own_prompts", "block_ops", "check_mixable",
           "place_context", "project_prompts", "prompted_block", "ADAPTERS"]
