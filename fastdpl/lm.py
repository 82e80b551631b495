"""FastDPLPrefix: DPL's per-layer prefix-length search for Hugging Face language models.

    dpl = FastDPLPrefix(model)                          # search over {0, 4, 8, 16, 32, 64} per layer
    loss = dpl(input_ids=ids, attention_mask=mask, labels=ids).loss
    arch_opt = torch.optim.Adam(dpl.arch_parameters(), lr=3e-3)        # on validation batches
    prompt_opt = torch.optim.AdamW(dpl.prompt_parameters(), lr=1e-2)   # on training batches
    config = dpl.derive_config()                        # argmax of alpha per layer
    subnet = FastDPLPrefix(model, mode="fixed", config=config)         # retrain fresh

Semantics (DESIGN.md section 6): at layer l a learned prefix of n key and n value vectors per
key/value head, appended after the rotary embedding (no position) and visible to every query;
the real tokens keep positions 0..L-1. Search mode mixes every candidate length of a layer with
softmax(alpha_l) inside one attention (the fused op); fixed mode runs one length per layer
(0: the plain layer). The model is frozen and otherwise untouched: it is switched to
``attn_implementation="fastdpl"`` (fastdpl/adapters/hf_lm.py), which runs exactly the base
model when every length is 0, and back with ``detach()``. Prompts stay out of the KV cache, so
``generate`` and gradient checkpointing work as for the base model.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from .config import PromptConfig
from .core import MODES, BankHolder, PromptBank, PromptShape, Stack
from .ops import IMPLS
from .adapters import hf_lm
from .atomic import replace_atomically, save_atomic, write_text_atomic

LM_LENGTHS = (0, 4, 8, 16, 32, 64)
PREFIXES_FILE = "prefixes.pt"


class FastDPLPrefix(BankHolder, nn.Module):
    """Differentiable Prompt Learning of per-layer prefix lengths around a transformers model.

    Args:
        model: a transformers model whose attention dispatches through its AttentionInterface
            (Llama, Qwen2/3, Mistral, GPT-2, BERT, ...); frozen here (requires_grad=False).
        mode: "search" (a supernet over ``candidate_lengths``) or "fixed" (lengths from ``config``).
        candidate_lengths: distinct non-negative prefix lengths searched per layer.
        config: a PromptConfig over the stack "decoder" (fixed mode), e.g. ``dpl.derive_config()``.
        impl: op engine: "auto" (Triton on CUDA, eager otherwise), "eager", "triton" or "reference".
        generator: draws the initial prefixes (N(0, 0.02^2)) and alpha; a private one seeded 0 when
            None, so the global RNG is never touched and the same arguments give the same prefixes.
    """

    def __init__(self, model: nn.Module, *, mode: str = "search", candidate_lengths: Sequence[int] = LM_LENGTHS,
                 config: PromptConfig | None = None, impl: str = "auto", generator: torch.Generator | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        names, modules, kv_heads, head_dim = hf_lm.prefix_sites(model)
        stack = Stack(hf_lm.STACK, modules, PromptShape.kv(kv_heads, head_dim), paths=names, noun="decoder")
        self.bank = PromptBank([stack], mode=mode, candidate_lengths=candidate_lengths, config=config,
                               generator=generator)
        device = next(model.parameters()).device
        self.bank.to(device)
        self.impl = impl
        # The model is not a submodule: the wrapper's state is the prompts and alpha only.
        object.__setattr__(self, "model", model)
        model.requires_grad_(False)
        self._previous_attention = model.config._attn_implementation
        hf_lm.register()
        hf_lm.bind(stack.blocks, self.bank, impl)
        model.set_attn_implementation(hf_lm.NAME)

    @classmethod
    def from_peft(cls, model: nn.Module, folder, *, impl: str = "auto") -> "FastDPLPrefix":
        """A PEFT prefix-tuning adapter (``save_pretrained`` folder, ``prefix_projection=False``) as a
        fixed configuration of its length in every layer. PEFT puts its prefix in the KV cache and
        shifts the tokens to positions n..n+L-1; rotary embeddings commute, so the same model has
        the keys ``R(-n) k_peft`` and the tokens at 0..L-1 (docs/language-models.md). Absolute-position
        models (GPT-2) are refused: there the shift changes the token embeddings themselves."""
        names, modules, kv_heads, head_dim = hf_lm.prefix_sites(model)
        n, prefixes = hf_lm.read_peft_prefix(folder, kv_heads, head_dim, len(modules))
        for module in modules[:1]:
            hf_lm.rotate_keys(model, module, prefixes[0][0], -n)  # refuses before anything changes
        config = PromptConfig({hf_lm.STACK: (n,) * len(modules)}, stacks=(hf_lm.STACK,))
        dpl = cls(model, mode="fixed", config=config, impl=impl)
        with torch.no_grad():
            for layer, (module, (keys, values)) in enumerate(zip(modules, prefixes)):
                prompt = dpl.prompt(layer, n)
                keys = hf_lm.rotate_keys(model, module, keys.to(prompt.device), -n)
                prompt.copy_(torch.stack([keys, values.to(prompt.device)]))
        return dpl

    def to_peft(self, folder, task_type: str = "CAUSAL_LM") -> None:
        """Write this configuration as a PEFT prefix-tuning adapter (``PeftModel.from_pretrained``
        loads it): only a uniform length n > 0 in every layer has a PEFT equivalent; the keys are
        rotated to PEFT's scheme, ``k_peft = R(n) k_ours``."""
        lengths = set(self.derive_config().lengths[hf_lm.STACK])
        if self.mode != "fixed" or len(lengths) != 1 or 0 in lengths:
            raise ValueError(f"to_peft needs a fixed configuration with one length > 0 in every layer (PEFT's "
                             f"prefix tuning has one length); this one has lengths {sorted(lengths)} in "
                             f"{self.mode} mode")
        (n,) = lengths
        stack = self.bank.stacks[hf_lm.STACK]
        prefixes = []
        for layer, module in enumerate(stack.blocks):
            keys, values = self.prompt(layer, n).detach()
            prefixes.append(torch.stack([hf_lm.rotate_keys(self.model, module, keys, n), values]))
        config, weights = hf_lm.peft_prefix_files(prefixes, stack.prompt.kv_heads, stack.prompt.head_dim, task_type,
                                                  getattr(self.model.config, "_name_or_path", None) or None)
        _write_adapter(Path(folder), config, weights)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        """The model's own forward (logits, loss with ``labels=``, cache) with the prefixes. The named
        arguments are what the HF Trainer keeps of a batch (it drops columns forward does not name)."""
        if labels is not None:
            kwargs["labels"] = labels
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args, **kwargs):
        return self.model.generate(*args, **kwargs)

    def detach(self) -> nn.Module:
        """Unbind the prefixes and give the model back its previous attention implementation."""
        hf_lm.unbind(self.bank.stacks[hf_lm.STACK].blocks)
        self.model.set_attn_implementation(self._previous_attention)
        return self.model

    # ---- what a training loop needs ------------------------------------------------------------------
    def derive_config(self) -> PromptConfig:
        """The argmax of alpha per layer (search), or the fixed configuration."""
        return self.bank.derive_config(allowed=(hf_lm.STACK,))

    def prompt(self, layer: int, length: int) -> nn.Parameter:
        """Layer ``layer``'s prefix of ``length``: (2, H_kv, length, head_dim), keys then values."""
        return self.bank.prompt(hf_lm.STACK, layer, length)

    def save(self, folder) -> Path:
        """``folder/prefixes.pt`` (the prefixes, alpha and the settings that rebuild them) and
        ``folder/config.json`` (derive_config()), each written atomically."""
        folder = Path(folder)
        save_atomic(self.bank.state(), folder / PREFIXES_FILE)
        write_text_atomic(folder / "config.json", json.dumps(self.derive_config().to_dict(), indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, model: nn.Module, folder, *, impl: str = "auto") -> "FastDPLPrefix":
        """The FastDPLPrefix that ``save`` wrote, around ``model`` (the same architecture)."""
        path = Path(folder) / PREFIXES_FILE
        if not path.is_file():
            raise ValueError(f"{folder}: no {PREFIXES_FILE} (not a folder written by FastDPLPrefix.save)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        settings = state.get("settings", {}) if isinstance(state, dict) else {}
        config = PromptConfig.from_dict(settings["config"]) if settings.get("config") else None
        dpl = cls(model, mode=settings.get("mode", "search"), candidate_lengths=settings.get("candidate_lengths") or (0,),
                  config=config, impl=impl)
        try:
            dpl.bank.load_state(state)
        except ValueError:
            dpl.detach()  # the model goes back as it came
            raise
        return dpl

    def prompt_state_dict(self) -> dict:
        return self.bank.state()

    def load_prompt_state_dict(self, state) -> None:
        self.bank.load_state(state)

    def extra_repr(self) -> str:
        return f"model={type(self.model).__name__}, {self.bank.extra_repr()}, impl={self.impl!r}"


def _write_adapter(folder: Path, config: dict, weights: torch.Tensor) -> None:
    """adapter_model.safetensors, then adapter_config.json (each atomically: a reader never sees half
    a file), into a folder that holds no adapter yet."""
    from safetensors.torch import save_file

    if (folder / "adapter_config.json").exists() or (folder / "adapter_model.safetensors").exists():
        raise FileExistsError(f"{folder} already holds an adapter; choose an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    replace_atomically(folder / "adapter_model.safetensors",
                       lambda tmp: save_file({"prompt_embeddings": weights}, str(tmp)))
    write_text_atomic(folder / "adapter_config.json", json.dumps(config, indent=2) + "\n")
