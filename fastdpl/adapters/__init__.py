"""Tower adapters: the only place that knows a library's module names (base.py says what a family
provides). ``adapt(model)`` picks the family of a model; ``prompted_block`` and ``project_prompts``
run any family's block.

Families: open_clip (open_clip.py), open_clip with a timm image tower (open_clip_timm.py: SigLIP
and the like), Hugging Face transformers' CLIPModel (hf_clip.py) and SiglipModel (hf_siglip.py).
docs/backbones.md lists what each supports and which exact savings apply.
"""
from __future__ import annotations

from .base import (
    Tower, UnsupportedModelError, attention_with_own_prompts, block_ops, check_mixable, place_context,
    project_prompts, prompted_block,
)
from .hf_clip import HFCLIPAdapter
from .hf_siglip import HFSiglipAdapter
from .open_clip import OpenClipAdapter
from .open_clip_timm import OpenClipTimmAdapter

ADAPTERS = [OpenClipTimmAdapter, OpenClipAdapter, HFCLIPAdapter, HFSiglipAdapter]  # the first that matches


def adapt(model):
    """The adapter of ``model``'s family; UnsupportedModelError naming what is missing otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter(model)
    raise UnsupportedModelError(f"{type(model).__name__} is not a supported CLIP: fastdpl runs open_clip's CLIP "
                                "(ViT or timm ViT image tower) and transformers' CLIPModel and SiglipModel")


__all__ = ["adapt", "Tower", "UnsupportedModelError", "attention_with_own_prompts", "block_ops", "check_mixable",
           "place_context", "project_prompts", "prompted_block", "ADAPTERS"]
