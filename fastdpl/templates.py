"""Class-name templates of the text input, as the DPL authors use them.

A template is a format string ("a photo of a {}."), or one of three names, the
options of the authors' train stage (``CTX_INIT`` in Differentiable-Prompt-Learn):

* ``"default"``: "a photo of a {}." (their search stage's "a photo of a" + " " + name + ".");
* ``"ensemble"``: the input token embeddings are the per-position mean of the token
  embeddings of ``IMAGENET_TEMPLATES`` (the class name in each), and the end-of-text
  position is that of the *last* template; their train stage's setting;
* ``"custom"``: one hand-written template per dataset (``CUSTOM_TEMPLATES``).

A sequence of format strings is an ensemble over that list (same rule: mean of the
token embeddings, end-of-text of the last one).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

DEFAULT = "a photo of a {}."

# The subset and order of CLIP's ImageNet prompt-engineering templates (OpenAI's CLIP notebook)
# that the DPL authors average. The order matters: the end-of-text position is the last one's.
IMAGENET_TEMPLATES = (
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.",
    "graffiti of a {}.", "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.",
    "the embroidered {}.", "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.",
)

# Per dataset (fastdpl's dataset keys), the CoOp-family hand-written templates.
CUSTOM_TEMPLATES = {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a type of food, a photo of {}.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenet_v2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}

NAMES = ("default", "ensemble", "custom")


def check_format(template: str, what: str = "template") -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"{what} must be a format string with one '{{}}' for the class name "
                         f"(or one of {', '.join(NAMES)}), got {template!r}")
    return template


def resolve_template(template: str | Sequence[str], dataset: str | None = None) -> tuple[str, ...]:
    """The format strings a template setting stands for: one, or an ensemble (last one's end-of-text).

    ``"custom"`` needs the dataset's name; datasets without a hand-written template
    (your own folders, the built-in digits) are an error naming the alternatives.
    """
    if isinstance(template, str):
        if template == "default":
            return (DEFAULT,)
        if template == "ensemble":
            return IMAGENET_TEMPLATES
        if template == "custom":
            from .data.datasets import canonical_name

            key = canonical_name(dataset) if dataset else None
            if key not in CUSTOM_TEMPLATES:
                raise ValueError(f"template 'custom': no hand-written template for dataset {dataset!r} (known: "
                                 f"{', '.join(CUSTOM_TEMPLATES)}); give a format string such as '{DEFAULT}'")
            return (CUSTOM_TEMPLATES[key],)
        return (check_format(template),)
    if isinstance(template, Sequence) and template:
        return tuple(check_format(t, "every template of an ensemble") for t in template)
    raise ValueError(f"template must be a format string, one of {', '.join(NAMES)}, or a non-empty list of "
                     f"format strings, got {template!r}")


def tokenize_classes(classnames, template: str, tokenizer: Callable | None, context_length: int) -> torch.Tensor:
    """(num_classes, context_length) token ids of ``template`` filled with each class name
    (underscores as spaces); ``tokenizer`` defaults to open_clip's CLIP tokenizer."""
    texts = [template.format(name.replace("_", " ")) for name in classnames]
    if tokenizer is None:
        import open_clip

        return open_clip.tokenize(texts, context_length=context_length)
    tokens = tokenizer(texts)
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] != len(texts):
        raise ValueError("tokenizer must return a (num_classes, context_length) tensor of token ids")
    return tokens
