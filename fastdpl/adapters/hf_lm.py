"""Hugging Face transformers language models: fastdpl's attention and mask functions in its registry.

transformers 5 dispatches the attention of every modern model (Llama, Qwen2/3, Mistral, GPT-2,
BERT, ...) through ``AttentionInterface``: the attention module calls
``fn(module, query, key, value, attention_mask, scaling=..., dropout=..., **kwargs)`` with the
rotated q (B, H, N, D) and k, v (B, H_kv, N_k, D) (the cache's real tokens included) and expects
(B, N, H, D). The mask comes from ``AttentionMaskInterface``, looked up by the same name: without a
mask function of its own an implementation gets no mask at all, and padded batches go silently
wrong. fastdpl registers both under ``"fastdpl"``:

* the mask function builds transformers' own boolean mask (``sdpa_mask``, no shortcut) and checks
  that it is exactly what the op computes: causal with the queries as the last N of the N_k keys,
  or bidirectional, and a per-sequence key mask. Anything else (a sliding window shorter than the
  sequence, packed sequences, a custom mask) is refused by name. It returns the key mask as
  (B, 1, 1, N_k) bool (None without padding);
* the attention function finds the module's prompts and alpha in the PromptBank registered for it
  (``bind``), appends them after the rotary embedding (they carry no position) and runs the op.

Prompts never enter the cache: a layer's prefix comes from the bank on every call, so per-layer
lengths, generation and gradient checkpointing need nothing from the cache (DESIGN.md section 6).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn

from ..ops import mixture_prefix_attention
from .base import UnsupportedModelError

NAME = "fastdpl"
STACK = "decoder"
# module -> (weak reference to the bank, impl). Weak both ways: the bank holds its modules (its
# sites), so a strong value would keep its own key, and with it the layer's weights, alive forever.
_BOUND: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_ONE = {}


def _transformers():
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:  # pragma: no cover - transformers is a dependency of the lm extra
        raise ImportError("language models need transformers >= 5 (pip install 'fastdpl[lm]')") from exc
    return transformers, AttentionInterface, AttentionMaskInterface


def register() -> None:
    """Register fastdpl's attention and mask functions under "fastdpl" (idempotent)."""
    _, attention, masks = _transformers()
    attention.register(NAME, fastdpl_attention)
    masks.register(NAME, fastdpl_mask)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every self-attention module that dispatches through the registry, by layer."""
    found = [(name, m) for name, m in model.named_modules()
             if hasattr(m, "layer_idx") and hasattr(m, "is_causal") and type(m).__name__.endswith("Attention")
             and not getattr(m, "is_cross_attention", False)]
    return sorted(found, key=lambda item: item[1].layer_idx)


def check_model(model: nn.Module) -> None:
    """UnsupportedModelError naming what fastdpl cannot run exactly on this model."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a Hugging Face transformers model")
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(f"{type(model).__name__} does not dispatch its attention through transformers' "
                                    "AttentionInterface (its _supports_attention_backend is False)")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("attn_logit_softcapping", "attn_softcapping"):
        if getattr(text, name, None):
            raise UnsupportedModelError(f"{type(model).__name__}: attention logit softcapping (config.{name} = "
                                        f"{getattr(text, name)}) is not supported by fastdpl's op")
    if getattr(text, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{type(model).__name__}: encoder-decoder models are not supported")


def prefix_sites(model: nn.Module):
    """(names, modules, kv_heads, head_dim): the self-attention modules that take prefixes, and the
    size of a prefix key/value vector set per module (H_kv heads of head_dim)."""
    check_model(model)
    found = attention_modules(model)
    if not found:
        raise UnsupportedModelError(f"{type(model).__name__}: no self-attention module with a layer_idx found")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(found[0][1], "head_dim", None) or config.hidden_size // heads
    return tuple(n for n, _ in found), tuple(m for _, m in found), kv_heads, head_dim


def bind(modules, bank, impl: str) -> None:
    """Make the attention function find ``bank``'s prompts for each of ``modules``."""
    for module in modules:
        _BOUND[module] = (weakref.ref(bank), impl)


def bound(module) -> tuple:
    """(bank, impl) bound to an attention module; a RuntimeError naming it when there is none."""
    entry = _BOUND.get(module)
    where = f"{type(module).__name__} (layer {getattr(module, 'layer_idx', '?')})"
    if entry is None:
        raise RuntimeError(f"{where} runs attn_implementation='fastdpl' but no fastdpl prompts are bound to it: "
                           "wrap the model with fastdpl.FastDPLPrefix")
    bank = entry[0]()
    if bank is None:
        raise RuntimeError(f"{where}: the FastDPLPrefix bound to this model was garbage-collected; keep it while the "
                           "model runs, or call its detach() to give the model back its own attention")
    return bank, entry[1]


def unbind(modules) -> None:
    for module in modules:
        _BOUND.pop(module, None)


# ---- the mask function ----------------------------------------------------------------------------
def _key_mask(attention_mask, batch_size, kv_length, kv_offset, device):
    """(B, N_k) bool: the 2D padding mask's columns of these keys; None when there is none."""
    if attention_mask is None:
        return None
    mask = attention_mask.to(device=device, dtype=torch.bool)[:, kv_offset:kv_offset + kv_length]
    if mask.shape[-1] != kv_length:  # a cache that holds more than the mask says
        raise ValueError(f"attention_mask covers {mask.shape[-1]} of the {kv_length} keys (past + new tokens): "
                         "pass the mask of every token seen so far")
    return mask.expand(batch_size, -1)


def fastdpl_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, device="cpu", **kwargs):
    """transformers' mask, checked against what the op computes; returns (B, 1, 1, N_k) bool or None."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    keys = _key_mask(attention_mask, batch_size, kv_length, kv_offset, device)
    if not torch.compiler.is_compiling():  # the check compares values: it would break a compiled graph
        expected = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                             kv_offset=kv_offset, mask_function=mask_function or causal_mask_function,
                             attention_mask=attention_mask, allow_is_causal_skip=False,
                             allow_is_bidirectional_skip=False, device=device)
        if expected is not None and not _matches(expected, keys, batch_size, q_length, kv_length, device):
            raise NotImplementedError(
                "fastdpl's attention runs causal or bidirectional masks with key padding only; this model asked "
                f"for another mask over {q_length} queries and {kv_length} keys (a sliding window shorter than the "
                "sequence, packed sequences or a custom mask). Shorten the sequences to the window, or use an "
                "attention implementation without prefixes.")
    return None if keys is None else keys[:, None, None, :]


def _matches(expected, keys, batch_size, q_length, kv_length, device) -> bool:
    """Whether transformers' (B, 1, N, N_k) mask is the op's causal or bidirectional mask with ``keys``."""
    expected = expected.to(torch.bool).expand(batch_size, 1, q_length, kv_length)
    real = keys[:, None, None, :] if keys is not None else torch.ones(1, 1, 1, kv_length, dtype=torch.bool,
                                                                      device=device)
    causal = torch.ones(q_length, kv_length, dtype=torch.bool, device=device).tril(kv_length - q_length)
    return bool(torch.equal(expected, (causal & real).expand_as(expected))
                or torch.equal(expected, real.expand_as(expected)))


# ---- the attention function -----------------------------------------------------------------------
def _no_prompts(query, kv_heads):
    empty = query.new_zeros(2, kv_heads, 0, query.shape[-1])
    key = (query.device, query.dtype)
    if key not in _ONE:
        _ONE[key] = torch.ones(1, device=query.device, dtype=torch.float32)
    return empty, (0,), _ONE[key]


def fastdpl_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The registered attention: the op over [prompts of this module ; keys], (B, N, H, D) out."""
    bank, impl = bound(module)
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("fastdpl's attention does not support logit softcapping (softcap)")
    if dropout:
        raise NotImplementedError(f"fastdpl's attention has no attention dropout (got p = {dropout}); set the "
                                  "model config's attention dropout to 0 or call model.eval()")
    if attention_mask is not None and (attention_mask.dtype != torch.bool or attention_mask.shape[-2] != 1):
        raise ValueError("fastdpl's attention got a mask it did not build (it expects the (B, 1, 1, N_k) key mask "
                         "of fastdpl_mask); pass a 2D attention_mask to the model, not a 4D one")
    found = bank.prompts_for(module, dtype=query.dtype)
    prompts, lengths, weights = found if found is not None else _no_prompts(query, key.shape[1])
    key_mask = None if attention_mask is None else attention_mask[:, 0, 0, :]
    out = mixture_prefix_attention(query, key, value, prompts[0], prompts[1], lengths, weights,
                                   causal=bool(module.is_causal), impl=impl, scale=scaling, key_mask=key_mask)
    return out.transpose(1, 2), None


# ---- PEFT prefix-tuning adapters ------------------------------------------------------------------
def read_peft_prefix(folder, kv_heads: int, head_dim: int, layers: int):
    """The per-layer (2, H_kv, n, head_dim) prefixes of a PEFT prefix-tuning adapter folder (what
    ``save_pretrained`` writes), as PEFT lays them into its cache: its ``prompt_embeddings`` (n,
    layers * 2 * H_kv * head_dim) viewed as (n, layers * 2, H_kv, head_dim), keys of layer l at 2l,
    values at 2l + 1. ValueError naming the file or field that does not fit."""
    import json
    from pathlib import Path

    folder = Path(folder)
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: no adapter_config.json (not a PEFT adapter folder)")
    config = json.loads(config_path.read_text())
    if config.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{config_path}: peft_type is {config.get('peft_type')!r}, not 'PREFIX_TUNING'")
    if config.get("prefix_projection"):
        raise ValueError(f"{config_path}: prefix_projection=True (an MLP reparametrisation) is not supported; "
                         "merge it into the prefix first (export with prefix_projection=False)")
    weights = _load_peft_weights(folder)["prompt_embeddings"]
    n = int(config["num_virtual_tokens"])
    expected = (n, layers * 2 * kv_heads * head_dim)
    if tuple(weights.shape) != expected:
        raise ValueError(f"{folder}: prompt_embeddings has shape {tuple(weights.shape)}, this model needs {expected} "
                         f"({layers} layers x keys and values x {kv_heads} key/value heads x head dim {head_dim})")
    per_layer = weights.float().view(n, layers, 2, kv_heads, head_dim).permute(1, 2, 3, 0, 4)
    return n, list(per_layer.unbind(0))


def _load_peft_weights(folder):
    safetensors_file, bin_file = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise ValueError(f"{folder}: no adapter_model.safetensors or adapter_model.bin")


def rotate_keys(model: nn.Module, module: nn.Module, keys: torch.Tensor, position: int) -> torch.Tensor:
    """(H_kv, n, head_dim) keys rotated by the model's rotary embedding as if at ``position``:
    R(position) k. UnsupportedModelError for a model without one (absolute positions: GPT-2) or
    whose rotary embedding also scales (its cos/sin are then not a rotation)."""
    import sys

    rotary = next((m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")), None)
    apply = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        raise UnsupportedModelError(f"{type(model).__name__} has no rotary embedding: a PEFT prefix shifts its "
                                    "tokens' absolute positions, which no fastdpl prefix reproduces")
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise UnsupportedModelError(f"{type(model).__name__}: its rotary embedding scales by "
                                    f"{rotary.attention_scaling} (not a pure rotation)")
    x = keys[None].float()  # the rotation in fp32 whatever the model dtype: the prefix is a parameter
    positions = torch.full((1, keys.shape[1]), position, dtype=torch.long, device=keys.device)
    cos, sin = rotary(x, positions)
    _, rotated = apply(x, x, cos, sin)
    return rotated[0].to(keys.dtype)


def peft_prefix_files(prefixes, kv_heads: int, head_dim: int, task_type: str, base_model=None):
    """(adapter_config.json's dict, prompt_embeddings) of a PEFT prefix-tuning adapter holding the
    per-layer (2, H_kv, n, head_dim) prefixes in PEFT's cache layout (read_peft_prefix's inverse)."""
    n, layers = prefixes[0].shape[2], len(prefixes)
    stacked = torch.stack([p.detach().float().cpu() for p in prefixes])          # (L, 2, H_kv, n, D)
    weights = stacked.permute(3, 0, 1, 2, 4).reshape(n, layers * 2 * kv_heads * head_dim).contiguous()
    token_dim = kv_heads * head_dim
    config = {"peft_type": "PREFIX_TUNING", "task_type": task_type, "num_virtual_tokens": n, "num_layers": layers,
              "token_dim": token_dim, "num_attention_heads": kv_heads, "encoder_hidden_size": token_dim,
              "num_transformer_submodules": 1, "prefix_projection": False, "inference_mode": True,
              "base_model_name_or_path": base_model, "revision": None, "modules_to_save": None, "auto_mapping": None}
    return config, weights
