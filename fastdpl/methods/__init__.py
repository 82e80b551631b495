"""Prompt-learning methods behind one interface (the pipeline, TPT and the benchmarks use only this):

* ``forward(images)`` -> (B, C) logits; ``encode_image``; ``classnames``; ``model``;
* ``parameter_groups()`` -> {"prompt": [...]} (+ "arch" for DPL's search);
* ``prompt_state_dict()`` / ``load_prompt_state_dict()``: what was learned, with ``settings()`` that
  rebuild the module around a backbone (``build_from_state``);
* ``image_conditioned``: False when the class texts do not depend on the image (then
  ``encode_text(classes)`` exists and the pipeline splits the classes across processes).

DPL (search and fixed configurations, uniform deep prompts, zero-shot CLIP) is FastDPLPrompt
(fastdpl.prompt); CoOp and CoCoOp are CoOpPrompt and CoCoOpPrompt (fastdpl.methods.context).
"""
from .context import CoCoOpPrompt, CoOpPrompt

CONTEXT_METHODS = {"coop": CoOpPrompt, "cocoop": CoCoOpPrompt}

__all__ = ["CoOpPrompt", "CoCoOpPrompt", "CONTEXT_METHODS"]
