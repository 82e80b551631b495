"""PromptBank: DPL's prompts and architecture logits for any model, one stack of blocks at a time.

A *stack* is a sequence of transformer blocks that take prompts: a tower of a CLIP, the decoder
of a language model, the encoder of a ViT classifier. Per (stack, block) the bank holds

* search mode: one prompt per candidate length n in ``candidate_lengths`` (each with its own
  parameters; n = 0 has none) and a row of architecture logits alpha (the stack's
  (blocks, candidates) matrix), mixed as sum_c softmax(alpha)_c attn_c by the op;
* fixed mode: one prompt of the block's length in a PromptConfig (0: a plain block).

``derive_config()`` is the argmax of alpha per block. Prompts come in two parametrisations
(``PromptShape``): input tokens (n, width) that go through the block's own pre-norm and key/value
projections (CLIP, VPT-deep), or ready key/value vectors (2, kv_heads, n, head_dim) per key/value
head (prefix tuning of language models, grouped-query attention included).

Each block is known by the module that owns its prompts (``site(module)``), never by a bare layer
index: two models in one process, or a self- and a cross-attention in one decoder layer, are
different modules and so different sites. The saved state carries the settings that rebuild the
bank beside its tensors (``PromptBank.from_state``), as a PEFT adapter folder does.

The bank knows nothing of a model family: adapters give it the stacks, applications (CLIP's
FastDPLPrompt, language models, classifiers) run the blocks with what ``block_prompts`` returns.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Sequence

import torch
import torch.nn as nn

from ..config import PromptConfig
from ..ops import normalize_candidate_lengths

MODES = ("search", "fixed")
STATE_FORMAT = "fastdpl-prompt-bank-v1"
KINDS = ("tokens", "kv")


@dataclass(frozen=True)
class PromptShape:
    """What a prompt of length n is: ``tokens`` of ``width`` -> (n, width); ``kv`` with
    ``kv_heads`` heads of ``head_dim`` -> (2, kv_heads, n, head_dim) (keys, then values)."""

    kind: str
    width: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"PromptShape: kind must be one of {KINDS}, got {self.kind!r}")
        sizes = {"tokens": ("width",), "kv": ("kv_heads", "head_dim")}[self.kind]
        for name in sizes:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"PromptShape({self.kind!r}): {name} must be a positive int, got {value!r}")

    @classmethod
    def tokens(cls, width: int) -> "PromptShape":
        return cls("tokens", width=width)

    @classmethod
    def kv(cls, kv_heads: int, head_dim: int) -> "PromptShape":
        return cls("kv", kv_heads=kv_heads, head_dim=head_dim)

    def shape(self, length: int) -> tuple:
        return (length, self.width) if self.kind == "tokens" else (2, self.kv_heads, length, self.head_dim)

    @property
    def length_dim(self) -> int:
        """The dimension that counts prompt rows (where candidates are concatenated)."""
        return 0 if self.kind == "tokens" else 2


@dataclass(frozen=True)
class Stack:
    """One stack: its name, the modules that own each block's prompts (never copied), the prompt
    shape, the modules' qualified names (saved with the state), and the word errors use for it."""

    name: str
    blocks: tuple
    prompt: PromptShape
    paths: tuple = ()
    noun: str = "stack"

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"Stack: name must be an identifier, got {self.name!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "paths", tuple(self.paths))
        if not self.blocks:
            raise ValueError(f"{self.noun} {self.name!r} has no blocks")
        if self.paths and len(self.paths) != len(self.blocks):
            raise ValueError(f"{self.noun} {self.name!r}: {len(self.paths)} paths for {len(self.blocks)} blocks")

    def signature(self) -> dict:
        """What a saved state must match: depth, prompt shape and (where known) module names."""
        return {"blocks": len(self.blocks), "prompt": asdict(self.prompt), "paths": list(self.paths)}


def normal_init(stack: Stack, length: int, generator: torch.Generator) -> torch.Tensor:
    """N(0, 0.02^2), the authors' train-stage initialisation and fastdpl's default."""
    return 0.02 * torch.randn(*stack.prompt.shape(length), generator=generator)


def prompt_key(stack: str, block: int, length: int) -> str:
    return f"{stack}_block{block}_len{length}"


class PromptBank(nn.Module):
    """Prompts and architecture logits per (stack, block), in search or fixed mode.

    Args:
        stacks: the model's stacks (``Stack``), in a fixed order.
        mode: "search" (a supernet over ``candidate_lengths``) or "fixed" (lengths from ``config``).
        candidate_lengths: distinct non-negative lengths per block (search).
        searched: the stacks that get candidates in search mode (default: all).
        config: a PromptConfig over the stacks' names (fixed).
        initial: (stack, length, generator) -> a prompt's initial value (default ``normal_init``).
        generator: draws the prompts (stack by stack, block by block, candidate by candidate),
            then alpha (1e-3 N(0, 1)); a private one seeded 0 when None, so the global RNG is
            never touched and the same arguments give the same bank.
    """

    def __init__(self, stacks: Sequence[Stack], *, mode: str = "search", candidate_lengths: Sequence[int] = range(7),
                 searched: Sequence[str] | None = None, config: PromptConfig | None = None,
                 initial: Callable | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.stacks = {s.name: s for s in stacks}
        if len(self.stacks) != len(stacks):
            raise ValueError(f"stack names must be distinct, got {[s.name for s in stacks]}")
        self.mode = mode
        if mode == "search":
            lengths = normalize_candidate_lengths(candidate_lengths)
            if len(set(lengths)) != len(lengths):
                raise ValueError(f"candidate_lengths must be distinct, got {list(lengths)}")
            searched = list(self.stacks) if searched is None else list(searched)
            unknown = [s for s in searched if s not in self.stacks]
            if unknown:
                raise ValueError(f"searched: unknown stacks {unknown}; this model has {list(self.stacks)}")
            self.candidate_lengths, self.config = lengths, None
            self.lengths = {s: [lengths] * len(self.stacks[s].blocks) for s in searched}
        else:
            if not isinstance(config, PromptConfig):
                raise ValueError("mode='fixed' needs config=PromptConfig(...) (e.g. dpl.derive_config())")
            for name, per_block in config.lengths.items():
                stack = self.stacks.get(name)
                if stack is None:
                    raise ValueError(f"config: this model has no {name!r} stack (it has {list(self.stacks)})")
                if len(per_block) != len(stack.blocks):
                    raise ValueError(f"config: {stack.noun} {name!r} has {len(per_block)} block lengths but the "
                                     f"model's {name} {stack.noun} has {len(stack.blocks)} blocks")
            self.candidate_lengths, self.config = None, config
            self.lengths = {s: [(n,) for n in config.lengths[s]] for s in config.towers}
        self._sites = {module: (s.name, b) for s in stacks for b, module in enumerate(s.blocks)}

        initial = initial or normal_init
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.prompts = nn.ParameterDict()
        for name, per_block in self.lengths.items():
            for block, lengths in enumerate(per_block):
                for n in lengths:
                    if n > 0:
                        self.prompts[prompt_key(name, block, n)] = nn.Parameter(
                            initial(self.stacks[name], n, generator))
        self.arch_logits = nn.ParameterDict()
        if mode == "search":
            for name in self.lengths:
                shape = (len(self.stacks[name].blocks), len(self.candidate_lengths))
                self.arch_logits[name] = nn.Parameter(1e-3 * torch.randn(shape, generator=generator))
        self.register_buffer("_one", torch.ones(1), persistent=False)

    # ---- what is where -------------------------------------------------------------------------------
    def site(self, module: nn.Module) -> tuple[str, int]:
        """(stack, block) of the module that owns a block's prompts; KeyError for any other module."""
        try:
            return self._sites[module]
        except KeyError:
            raise KeyError(f"{type(module).__name__} is not a block of this bank's stacks") from None

    def prompt(self, stack: str, block: int, length: int) -> nn.Parameter:
        """The prompt of a candidate (search) or of the block (fixed)."""
        key = prompt_key(stack, block, length)
        if key not in self.prompts:
            raise KeyError(f"no prompt for stack {stack!r}, block {block}, length {length}")
        return self.prompts[key]

    def arch_parameters(self) -> list[nn.Parameter]:
        return list(self.arch_logits.values())

    def prompt_parameters(self) -> list[nn.Parameter]:
        return list(self.prompts.values())

    def parameter_groups(self) -> dict:
        """{group: parameters}: "prompt" (training batches) and, in search mode, "arch" (alpha)."""
        return {"prompt": self.prompt_parameters(), **({"arch": self.arch_parameters()} if self.arch_logits else {})}

    def derive_config(self, order: Sequence[str] | None = None, allowed: Sequence[str] | None = None) -> PromptConfig:
        """argmax of alpha per block (fixed mode: its config); stacks without prompts get zeros.
        ``order``: the stacks in the config (default all); ``allowed``: its stack names (PromptConfig)."""
        if self.mode != "search":
            return self.config
        lengths = {}
        for name in order or self.stacks:
            if name in self.arch_logits:
                best = self.arch_logits[name].detach().argmax(dim=1).tolist()
                lengths[name] = tuple(self.candidate_lengths[i] for i in best)
            else:
                lengths[name] = (0,) * len(self.stacks[name].blocks)
        return PromptConfig(lengths, stacks=tuple(allowed or self.stacks))

    # ---- what the op takes ---------------------------------------------------------------------------
    def is_plain(self, stack: str, block: int) -> bool:
        """No prompt reaches this block (an unprompted stack, or length 0 in fixed mode)."""
        per_block = self.lengths.get(stack)
        return per_block is None or (self.mode == "fixed" and per_block[block][0] == 0)

    def weights(self, stack: str, block: int) -> torch.Tensor:
        """The candidates' mixture weights softmax(alpha) (search), or the single candidate's 1."""
        return torch.softmax(self.arch_logits[stack][block], dim=0) if self.mode == "search" else self._one

    def block_prompts(self, stack: str, block: int, dtype: torch.dtype | None = None):
        """(prompts, candidate lengths, weights) of one block, the candidates concatenated along
        their rows ((P, width) tokens, (2, kv_heads, P, head_dim) key/values); None for a plain block."""
        if self.is_plain(stack, block):
            return None
        lengths = self.lengths[stack][block]
        shape = self.stacks[stack].prompt
        rows = [self.prompts[prompt_key(stack, block, n)] for n in lengths if n > 0]
        dtype = dtype or (rows[0].dtype if rows else torch.float32)
        prompts = (torch.cat(rows, dim=shape.length_dim).to(dtype) if rows
                   else torch.zeros(shape.shape(0), dtype=dtype, device=self._one.device))
        return prompts, lengths, self.weights(stack, block)

    def prompts_for(self, module: nn.Module, dtype: torch.dtype | None = None):
        """block_prompts of the block ``module`` owns (a registered attention function's look-up)."""
        return self.block_prompts(*self.site(module), dtype=dtype)

    # ---- state ---------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What rebuilds this bank around the same stacks (saved beside the tensors)."""
        return {"mode": self.mode,
                "candidate_lengths": list(self.candidate_lengths) if self.candidate_lengths else None,
                "searched": list(self.lengths) if self.mode == "search" else None,
                "config": self.config.to_dict() if self.config else None,
                "stacks": {name: s.signature() for name, s in self.stacks.items()}}

    def state(self) -> dict:
        return {"format": STATE_FORMAT, "settings": self.settings(),
                "prompts": {k: v.detach().clone() for k, v in self.prompts.items()},
                "arch_logits": {k: v.detach().clone() for k, v in self.arch_logits.items()}}

    # the names the training loop checkpoints a module by (pipeline.training.fit)
    def prompt_state_dict(self) -> dict:
        return self.state()

    def load_prompt_state_dict(self, state: Mapping) -> None:
        self.load_state(state)

    @classmethod
    def from_state(cls, state: Mapping, stacks: Sequence[Stack]) -> "PromptBank":
        """The bank a ``state()`` was saved from, rebuilt around ``stacks`` from its own settings."""
        settings = _check_format(state)["settings"]
        config = PromptConfig.from_dict(settings["config"]) if settings["config"] else None
        bank = cls(stacks, mode=settings["mode"], candidate_lengths=settings["candidate_lengths"] or (0,),
                   searched=settings["searched"], config=config)
        bank.load_state(state)
        return bank

    def load_state(self, state: Mapping) -> None:
        """Load what ``state()`` saved; a mismatch is a ValueError naming it (nothing is copied then)."""
        saved = _check_format(state)["settings"]
        mine = self.settings()
        for name, signature in mine["stacks"].items():
            other = saved["stacks"].get(name)
            if other is None:
                raise ValueError(f"stacks mismatch: the state has {list(saved['stacks'])}, this bank {list(mine['stacks'])}")
            for field in ("blocks", "prompt", "paths"):
                if other[field] != signature[field] and (field != "paths" or (other[field] and signature[field])):
                    raise ValueError(f"stack {name!r}: saved {field} {other[field]!r}, this model has "
                                     f"{signature[field]!r}")
        for field in ("mode", "candidate_lengths", "searched", "config"):
            if saved[field] != mine[field]:
                raise ValueError(f"{field} mismatch: saved {saved[field]!r}, this bank has {mine[field]!r}")
        self.copy_tensors(state)

    def copy_tensors(self, state: Mapping) -> None:
        """Copy saved "prompts" and "arch_logits" into this bank after checking every key and shape."""
        groups = (("prompts", self.prompts), ("arch_logits", self.arch_logits))
        for group, params in groups:  # check everything before copying anything
            check_saved_tensors(group, state[group], params)
        with torch.no_grad():
            for group, params in groups:
                for key, value in state[group].items():
                    params[key].copy_(value)

    def extra_repr(self) -> str:
        what = f"candidate_lengths={list(self.candidate_lengths)}" if self.mode == "search" else "config=fixed"
        return f"mode={self.mode}, {what}, stacks={list(self.lengths)}"


class BankHolder:
    """What an application that holds its PromptBank as ``self.bank`` offers a training loop
    (FastDPLPrompt, FastDPLPrefix): the mode and the two parameter groups."""

    bank: PromptBank

    @property
    def mode(self) -> str:
        return self.bank.mode

    @property
    def candidate_lengths(self):
        return self.bank.candidate_lengths

    @property
    def arch_logits(self) -> nn.ParameterDict:
        return self.bank.arch_logits

    def arch_parameters(self) -> list[nn.Parameter]:
        return self.bank.arch_parameters()

    def prompt_parameters(self) -> list[nn.Parameter]:
        return self.bank.prompt_parameters()

    def parameter_groups(self) -> dict:
        """{group: parameters}: "prompt" (training batches) and, in search mode, "arch" (alpha)."""
        return self.bank.parameter_groups()


def check_state_header(state, fmt: str, kind: str, saved: str, backbone) -> None:
    """A ValueError unless ``state`` is a saved state of format ``fmt`` ("not a fastdpl ``kind``
    state") for this ``backbone`` ("``saved`` saved for ...")."""
    if not isinstance(state, dict) or state.get("format") != fmt:
        raise ValueError(f"not a fastdpl {kind} state (format {fmt!r})")
    if state["backbone"] != backbone:
        raise ValueError(f"backbone mismatch: {saved} saved for {state['backbone']}, this model is {backbone}")


def check_saved_tensors(group: str, saved: Mapping, params, hint: str = "") -> None:
    """A ValueError naming the keys or the first shape in which ``saved`` tensors differ from
    ``params`` (``hint`` is added to a shape mismatch)."""
    if set(saved) != set(params):
        raise ValueError(f"{group}: saved keys {sorted(saved)} != {sorted(params)}")
    for key, value in saved.items():
        if tuple(value.shape) != tuple(params[key].shape):
            raise ValueError(f"{group}[{key!r}]: saved shape {tuple(value.shape)} != "
                             f"{tuple(params[key].shape)}{hint}")


def _check_format(state) -> Mapping:
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a fastdpl prompt-bank state (format {STATE_FORMAT!r})")
    return state
