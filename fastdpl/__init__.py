"""fastdpl: fast Differentiable Prompt Learning for CLIP vision-language models.

The core is ``fastdpl.ops.mixture_prefix_attention``: the softmax(alpha)-weighted
mixture of prefix-prompted attentions over candidate prompt lengths, computed as
one fused attention.
"""
from .ops import IMPLS, mixture_prefix_attention

__version__ = "0.1.0"
__all__ = ["IMPLS", "mixture_prefix_attention", "__version__"]
