"""fastdpl: fast Differentiable Prompt Learning for CLIP vision-language models.

* ``fastdpl.ops.mixture_prefix_attention``: the softmax(alpha)-weighted mixture of
  prefix-prompted attentions over candidate prompt lengths, as one fused attention.
* ``FastDPLPrompt``: DPL's supernet (search) and subnet (fixed) prompts around an
  open_clip CLIP model; ``PromptConfig``: per-block prompt lengths.
* ``load_clip``: open_clip backbones by name and tag, local file or HF cache, and the built-in tiny CLIP.
* ``TestTimePromptTuner``: test-time prompt tuning (TPT) of a context or of DPL's text prompts.
* ``fastdpl.pipeline``: the search / train / evaluation stages behind the ``fastdpl`` command.
"""
from .config import PromptConfig
from .models import load_clip
from .ops import IMPLS, mixture_prefix_attention
from .profiling import enable_nvtx
from .prompt import FastDPLPrompt
from .tpt import TestTimePromptTuner

__version__ = "0.1.0"
__all__ = ["IMPLS", "FastDPLPrompt", "PromptConfig", "TestTimePromptTuner", "enable_nvtx", "load_clip",
           "mixture_prefix_attention", "__version__"]
