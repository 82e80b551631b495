"""FastDPLPrompt: DPL's supernet (search) and subnet (fixed) prompts around an open_clip CLIP.

    dpl = FastDPLPrompt(model, classnames)                 # search mode, lengths 0..6 everywhere
    logits = dpl(images)                                  # (B, num_classes), CLIP's logit scale applied
    arch_opt = torch.optim.Adam(dpl.arch_parameters(), lr=3.5e-3, betas=(0.5, 0.999))
    prompt_opt = torch.optim.SGD(dpl.prompt_parameters(), lr=3.5e-3)
    config = dpl.derive_config()                          # argmax per block
    subnet = FastDPLPrompt(model, classnames, mode="fixed", config=config)

Every block of a prompted tower gets per-block prefix keys/values (DESIGN.md
section 1): the prompt is normalised by the block's ln_1 and projected by its
key/value projections once per step, and only the original tokens are queries.
In search mode each block mixes its candidates' attentions with softmax(alpha)
through the fused op; in fixed mode the op runs with a single candidate.

Exact savings (DESIGN section 2): the text tower runs only up to the longest
end-of-text position among the classes (causal attention: later tokens never
reach it); in the last block of each tower only the consumed row (class token,
end-of-text token) goes through the output projection and the MLP.

The backbone is frozen (requires_grad=False) and otherwise untouched: its
forward and state_dict are unchanged and no weight is copied.
"""
from __future__ import annotations

import functools

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .config import TOWERS, PromptConfig
from .core import MODES, BankHolder, PromptBank, PromptShape, Stack, check_saved_tensors, check_state_header  # noqa: F401
from .ops import IMPLS
from .profiling import nvtx_range
from .templates import resolve_template, tokenize_classes
from .adapters import adapt, check_mixable, place_context, project_prompts, prompted_block

# The exact savings of DESIGN section 2; tests switch each off to show it changes no output.
SAVINGS = frozenset({"truncate_text", "last_block_rows"})
INITS = ("normal", "paper")
STATE_FORMAT = "fastdpl-prompts-v1"


def _slice_bounds(classes: slice, count: int) -> tuple[int, int]:
    """``classes.indices(count)[:2]`` for a step-1 slice, in plain arithmetic: torch 2.11's Dynamo
    cannot trace ``slice.indices`` (a graph break in every compiled step)."""
    def bound(value, default):
        if value is None:
            return default
        value = int(value) + count if value < 0 else int(value)
        return min(max(value, 0), count)
    return bound(classes.start, 0), bound(classes.stop, count)


class FastDPLPrompt(BankHolder, nn.Module):
    """Differentiable Prompt Learning around an open_clip CLIP model.

    Args:
        model: an open_clip CLIP (or CustomTextCLIP) with ViT image and text transformers.
        classnames: the class names; underscores become spaces in the template.
        mode: "search" (supernet over ``candidate_lengths``) or "fixed" (lengths from ``config``).
        candidate_lengths: distinct non-negative prompt lengths searched per block (search mode).
        config: a PromptConfig (fixed mode).
        template: the text input: a class template such as "a photo of a {}." (the authors' search
            stage), "default" (that one), "ensemble" (the authors' train stage: the mean of the token
            embeddings of 60 ImageNet templates, end-of-text of the last; fastdpl.templates), or a
            list of templates to ensemble the same way.
        towers: towers that get prompts in search mode.
        impl: op engine, "auto", "eager", "triton" or "reference".
        init: prompt initialisation, "normal" (N(0, 0.02^2): the authors' train stage, and fastdpl's
            default for search too) or "paper" (the authors' search stage: image prompts N(0, 1),
            text prompts U[0, 1)).
        text_chunk_size: run the text tower over the classes in chunks of this size with activation
            checkpointing (memory for many classes); None runs all classes at once.
        tokenizer: callable texts -> (num_classes, context_length) token ids; default open_clip.tokenize.
        generator: draws the initial prompts and arch logits. None: a private generator seeded 0,
            so the global RNG is never read or advanced (``torch.manual_seed`` changes nothing) and
            the same arguments give the same start; pass one to choose the seed (the pipeline
            passes ``--seed``'s). Every fastdpl method follows this rule.
    """

    image_conditioned = False  # the class texts do not depend on the image (fastdpl.methods' interface)

    def __init__(self, model: nn.Module, classnames: Sequence[str], *, mode: str = "search",
                 candidate_lengths: Sequence[int] = range(7), config: PromptConfig | None = None,
                 template: str | Sequence[str] = "a photo of a {}.", towers: Sequence[str] = TOWERS, impl: str = "auto",
                 init: str = "normal", text_chunk_size: int | None = None, tokenizer: Callable | None = None,
                 generator: torch.Generator | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if text_chunk_size is not None and (not isinstance(text_chunk_size, int) or text_chunk_size < 1):
            raise ValueError(f"text_chunk_size must be a positive int or None, got {text_chunk_size!r}")
        self.adapter = adapt(model)  # the only place that knows the model's module names
        self._parts = {"image": self.adapter.image, "text": self.adapter.text}
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.impl, self.init, self.text_chunk_size = impl, init, text_chunk_size
        self.classnames = self._check_classnames(classnames)
        self.template = template if isinstance(template, str) else list(template)
        self.templates = resolve_template(template)
        if mode == "search":
            towers = self._check_towers(towers)
            for tower in towers:
                check_mixable(self._parts[tower])
        elif config is None or not isinstance(config, PromptConfig):
            raise ValueError("mode='fixed' needs config=PromptConfig(...) (e.g. dpl.derive_config())")
        # The prompts and alpha: the core's bank over both towers (prompts as tokens of the tower's width).
        names = {module: name for name, module in model.named_modules()}
        stacks = [Stack(t, part.blocks, PromptShape.tokens(part.width), [names.get(b, "") for b in part.blocks],
                        noun="tower") for t, part in self._parts.items()]
        self.bank = PromptBank(stacks, mode=mode, candidate_lengths=candidate_lengths, searched=towers, config=config,
                               initial=lambda stack, n, g: self._initial_prompt(stack.name, n, g), generator=generator)

        context_length = self.adapter.context_length
        self.tokenizer = tokenizer
        per_template = [tokenize_classes(self.classnames, t, tokenizer, context_length) for t in self.templates]
        tokens = per_template[-1]  # an ensemble reads the last template's end-of-text position
        # An ensemble's input is the per-position mean of its templates' token embeddings (in float64,
        # then the model's dtype); a single template looks its embeddings up on the fly.
        ensemble = None
        if len(per_template) > 1:
            embedding = self.adapter.token_embedding
            with torch.no_grad():
                ensemble = torch.stack([embedding(t.to(embedding.weight.device)).double() for t in per_template])
                ensemble = ensemble.mean(0).to(embedding.weight.dtype)
        self.register_buffer("_ensemble_embeddings", ensemble, persistent=False)
        eot = self.adapter.end_of_text(tokens)
        self.register_buffer("class_tokens", tokens, persistent=False)
        self.register_buffer("end_of_text", eot, persistent=False)
        self._end_of_text_list = eot.tolist()  # host-side: the truncation lengths are static
        self.register_buffer("_one", torch.ones(1), persistent=False)
        self._text_cache = None
        self._savings = set(SAVINGS) & self.adapter.savings  # only where exact for this family
        self._to_backbone_device()

    # ---- construction helpers ------------------------------------------------------------------------
    def _tokenize(self, texts) -> torch.Tensor:
        return tokenize_classes(texts, "{}", self.tokenizer, self.adapter.context_length)

    @functools.cached_property
    def text_start(self) -> int:
        """The tokenizer's leading special tokens: 1 for CLIP's start-of-text, 0 for SigLIP's (none)."""
        empty, word = self._tokenize(["", "x"])
        return int((empty != word).int().argmax())

    def leading_words(self, words: str) -> int:
        """How many tokens ``words`` are at the start of the (single) template, from ``text_start``: the
        positions a context of those words replaces (TPT's "a photo of a")."""
        template = self.templates[0]
        if len(self.templates) > 1 or not words.strip() or not template.startswith(words.strip()):
            raise ValueError(f"context {words!r}: the template {template!r} must start with these words")
        alone, start = self._tokenize([words])[0].to(self.class_tokens.device), self.text_start
        same = (self.class_tokens[:, start:] == alone[start:]).all(dim=0).int()
        count = int(same.cumprod(0).sum())  # the shared run of tokens after the start
        if count == 0:
            raise ValueError(f"context {words!r}: its tokens are not the template {template!r}'s first tokens")
        return count


    @staticmethod
    def _check_classnames(classnames):
        if isinstance(classnames, str) or not isinstance(classnames, Sequence):
            raise ValueError(f"classnames must be a list of strings, got {type(classnames).__name__}")
        names = list(classnames)
        if not names:
            raise ValueError("classnames is empty: give at least one class name")
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"classnames must hold non-empty strings, got {name!r}")
        return names

    @staticmethod
    def _check_towers(towers):
        towers = tuple(towers)
        unknown = [t for t in towers if t not in TOWERS]
        if unknown or len(set(towers)) != len(towers):
            raise ValueError(f"towers must be distinct names from {TOWERS}, got {list(towers)}")
        return towers

    def _initial_prompt(self, tower: str, length: int, generator) -> torch.Tensor:
        width = self._parts[tower].width
        if self.init == "paper":
            if tower == "image":
                return torch.randn(length, width, generator=generator)
            return torch.rand(length, width, generator=generator)
        return 0.02 * torch.randn(length, width, generator=generator)

    def _to_backbone_device(self):
        self.bank.to(next(self.model.parameters()).device)

    # ---- the core's state, as this module's attributes -------------------------------------------------
    @property
    def config(self):
        return self.bank.config

    @property
    def prompts(self) -> nn.ParameterDict:
        return self.bank.prompts

    @property
    def prompted(self) -> dict:
        """{tower: per-block candidate lengths} of the prompted towers."""
        return self.bank.lengths

    # ---- public API ----------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def set_impl(self, impl: str) -> None:
        """Switch the op engine ("auto", "eager", "triton", "reference") on a live module."""
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl = impl
        self._text_cache = None

    def prompt(self, tower: str, block: int, length: int) -> nn.Parameter:
        """The (length, width) prompt of a candidate (search) or of the block (fixed)."""
        return self.bank.prompt(tower, block, length)

    def derive_config(self) -> PromptConfig:
        """argmax of the architecture logits per block; towers without prompts get zeros."""
        return self.bank.derive_config(order=TOWERS, allowed=TOWERS)

    # ---- forward -------------------------------------------------------------------------------------
    def _block_inputs(self, tower: str, dtype, skip=()):
        """Per block: (prompt_kv or None, candidate lengths, weights). Prompts projected once per step.
        Blocks in ``skip`` are left unprojected (their caller supplies the prompts, e.g. TPT)."""
        blocks = self._parts[tower].blocks
        if tower not in self.prompted:
            return [(None, None, None)] * len(blocks)
        inputs = []
        with nvtx_range(f"fastdpl/{tower}/prompts"):
            for b, block in enumerate(blocks):
                found = None if b in skip else self.bank.block_prompts(tower, b, dtype)
                if found is None:
                    inputs.append((None, None, None))  # a plain block
                    continue
                prompts, lengths, weights = found
                inputs.append((project_prompts(block, prompts), lengths, weights))
        return inputs

    def _check_images(self, images):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        channels, size = self.adapter.image_channels, self.adapter.image_size
        if images.dim() != 4 or images.shape[1] != channels:
            raise ValueError(f"images must have shape (B, {channels}, H, W), got {tuple(images.shape)}")
        if size and tuple(images.shape[2:]) != size:
            raise ValueError(f"images must be {size[0]}x{size[1]} pixels for this model, "
                             f"got {images.shape[2]}x{images.shape[3]}")
        if images.shape[0] == 0:
            raise ValueError("images is an empty batch")

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Image features (B, embed_dim), unnormalised."""
        if not torch.compiler.is_compiling():
            self._check_images(images)
        adapter = self.adapter
        x = adapter.image_embeddings(images)
        blocks = self._parts["image"].blocks
        # the row the feature is read from (class token), or None when the head pools every row
        pooled = adapter.image_pooled_rows(x.shape[0], x.device)
        last = len(blocks) - 1
        for b, (block, (kv, lengths, weights)) in enumerate(zip(blocks, self._block_inputs("image", x.dtype))):
            name = f"fastdpl/image/block{b}"
            with nvtx_range(name):
                keep = pooled if b == last and pooled is not None and "last_block_rows" in self._savings else None
                x = prompted_block(block, x, kv, lengths, weights, False, self.impl, keep_rows=keep, name=name)
        if pooled is None:
            return adapter.image_head(x)
        if x.shape[1] != 1:
            x = x[torch.arange(x.shape[0], device=x.device), pooled].unsqueeze(1)
        return adapter.image_head(x[:, 0])

    def _text_trainables(self):
        return [p for k, p in self.prompts.items() if k.startswith("text_")] + \
            ([self.arch_logits["text"]] if "text" in self.arch_logits else [])

    def token_embeddings(self, classes: slice = slice(None), length: int | None = None) -> torch.Tensor:
        """The text input's token embeddings (classes, length, W), before positions: the class texts'
        own, or an ensemble's mean."""
        if self._ensemble_embeddings is not None:
            return self._ensemble_embeddings[classes, :length]
        return self.adapter.token_embedding(self.class_tokens[classes, :length])

    def text_length(self, classes: slice = slice(None)) -> int:
        """Positions the text tower runs for ``classes``: up to the longest end-of-text token (causal
        attention: later positions never reach it), or all of them with that saving off."""
        if "truncate_text" not in self._savings:
            return self.class_tokens.shape[1]
        return max(self._end_of_text_list[classes]) + 1

    def text_block_inputs(self, skip=()):
        """The text tower's per-block prompt inputs for encode_text_embeddings (prompts projected once)."""
        return self._block_inputs("text", self.adapter.text_dtype, skip=skip)

    def encode_text_embeddings(self, embeddings: torch.Tensor, end_of_text: torch.Tensor,
                               block_inputs=None) -> torch.Tensor:
        """Text features (S, E) of S token-embedding sequences (S, L, W) (before positions), read at
        ``end_of_text`` (S,): the text tower with this module's prompts (``block_inputs``, default
        text_block_inputs()) and its savings (the last block computes the end-of-text rows only)."""
        block_inputs = self.text_block_inputs() if block_inputs is None else block_inputs
        x = self.adapter.text_embeddings(embeddings)
        blocks = self._parts["text"].blocks
        for b, (block, (kv, lengths, weights)) in enumerate(zip(blocks, block_inputs)):
            name = f"fastdpl/text/block{b}"
            with nvtx_range(name):
                keep = end_of_text if b == len(blocks) - 1 and "last_block_rows" in self._savings else None
                x = prompted_block(block, x, kv, lengths, weights, self._parts["text"].causal, self.impl,
                                   keep_rows=keep, name=name)
        if "last_block_rows" not in self._savings:
            x = x[torch.arange(x.shape[0], device=x.device), end_of_text].unsqueeze(1)
        return self.adapter.text_head(x[:, 0])

    def chunked_text(self, count: int, encode: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
        """``encode(lo, hi)`` over [0, count) in chunks of ``text_chunk_size`` (all at once when None),
        each chunk recomputed in the backward (activation checkpointing) when gradients are on."""
        chunk = self.text_chunk_size or count
        if chunk >= count:
            return encode(0, count)
        checkpointed = torch.is_grad_enabled()
        features = [checkpoint(encode, lo, min(lo + chunk, count), use_reentrant=False) if checkpointed
                    else encode(lo, min(lo + chunk, count)) for lo in range(0, count, chunk)]
        return torch.cat(features)

    def encode_text(self, classes: slice | None = None) -> torch.Tensor:
        """Text features of the class texts (num_classes, embed_dim), unnormalised.

        ``classes``: a contiguous slice of the classes to encode (for example one
        rank's share when the class texts are split across processes).
        Cached in eval mode when nothing in the text tower needs a gradient (the cache
        follows in-place updates of the text prompts and logits).
        """
        lo, hi = self._class_range(classes)
        trainables = self._text_trainables()
        cacheable = (not self.training and not torch.compiler.is_compiling()
                     and not (torch.is_grad_enabled() and any(p.requires_grad for p in trainables)))
        if cacheable:
            key = (self.impl, lo, hi, self.class_tokens.device, tuple((id(p), p._version) for p in trainables))
            if self._text_cache is not None and self._text_cache[0] == key:
                return self._text_cache[1]
        block_inputs = self.text_block_inputs()

        def encode(start, stop):  # classes lo + start .. lo + stop, truncated per chunk
            classes = slice(lo + start, lo + stop)
            embeddings = self.token_embeddings(classes, self.text_length(classes))
            return self.encode_text_embeddings(embeddings, self.end_of_text[classes], block_inputs)

        features = self.chunked_text(hi - lo, encode)
        if cacheable:
            self._text_cache = (key, features.detach())
        return features

    def encode_text_with_context(self, context: torch.Tensor | None = None,
                                 text_prompts: dict | None = None) -> torch.Tensor:
        """Text features (G, C, E) of every class under each of G independent text inputs (TPT tunes
        one per test image): ``context`` (G, n, W), a CoOp-style context replacing the template's
        first n words, and/or ``text_prompts`` {block: (G, n_b, W)} replacing a fixed-mode module's
        text prompts of those blocks. Sequence g * C + c is class c under input g; they run as one
        truncated batch (last block: end-of-text rows only), the other blocks' prompts projected once."""
        text_prompts = text_prompts or {}
        given = [t for t in (context, *text_prompts.values()) if t is not None]
        if not given:
            raise ValueError("give a context and/or text_prompts")
        if text_prompts and self.mode != "fixed":
            raise ValueError("text_prompts replace a fixed-mode module's prompts (mode='fixed')")
        groups, classes = given[0].shape[0], self.num_classes
        dtype = self.adapter.text_dtype
        inputs = self.text_block_inputs(skip=set(text_prompts))
        for b, prompt in text_prompts.items():
            block = self._parts["text"].blocks[b]
            if groups == 1:  # one prompt for every class: the fused op
                kv = project_prompts(block, prompt[0].to(dtype))
            else:  # each input's own prompt for its C sequences
                pk, pv = project_prompts(block, prompt.to(dtype))
                kv = (pk.repeat_interleave(classes, 0), pv.repeat_interleave(classes, 0))
            inputs[b] = (kv, (prompt.shape[1],), self._one)
        embeddings = self.token_embeddings(length=self.text_length()).repeat(groups, 1, 1)
        if context is not None:
            embeddings = place_context(embeddings, context.repeat_interleave(classes, 0) if groups > 1 else context,
                                       start=self.text_start)
        features = self.encode_text_embeddings(embeddings, self.end_of_text.repeat(groups), inputs)
        return features.view(groups, classes, -1)

    def _class_range(self, classes: slice | None) -> tuple[int, int]:
        if classes is not None and (not isinstance(classes, slice) or classes.step not in (None, 1)):
            raise ValueError(f"classes must be a contiguous slice, got {classes!r}")
        lo, hi = _slice_bounds(classes or slice(None), self.num_classes)
        if hi <= lo:
            raise ValueError(f"classes={classes!r} selects no class of {self.num_classes}")
        return lo, hi

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """CLIP logits (B, num_classes): logit_scale * cos(image feature, class text feature); with
        ``return_features`` also {"image": (B, E), "text": (num_classes, E)}, unnormalised (what a
        regulariser of the training loop reads)."""
        image_features = self.encode_image(images)
        with nvtx_range("fastdpl/text"):
            text_features = self.encode_text()
        logits = self.logits(image_features, text_features)
        return (logits, {"image": image_features, "text": text_features}) if return_features else logits

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP's head: logit_scale * cos(image, text) (+ logit_bias where the model has one).

        (B, E) x (C, E) -> (B, C); (B, E) x (B, C, E) -> (B, C), each image with its own class texts
        (CoCoOp); (G, V, E) x (G, C, E) -> (G, V, C), G groups of V views (TPT)."""
        image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
        if text.dim() == 2:
            cosine = image @ text.T
        elif image.dim() == 2:
            cosine = torch.einsum("be,bce->bc", image, text)
        else:
            cosine = torch.einsum("gve,gce->gvc", image, text)
        logits = self.adapter.logit_scale.exp() * cosine
        bias = self.adapter.logit_bias
        return logits + bias if bias is not None else logits

    def train(self, mode: bool = True):
        self._text_cache = None
        return super().train(mode)

    # ---- small state dict: prompts and alpha only ----------------------------------------------------
    def backbone_signature(self) -> dict:
        """What a saved prompt state must match: tower depths, widths and heads."""
        return {t: {"blocks": len(p.blocks), "width": p.width, "heads": p.heads} for t, p in self._parts.items()}

    def prompt_state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "mode": self.mode,
            "candidate_lengths": list(self.candidate_lengths) if self.candidate_lengths else None,
            "config": self.config.to_dict() if self.config else None,
            "towers": list(self.prompted),
            "text_input": self.template,  # what the prompts were trained with (not checked on load)
            "init": self.init,
            "backbone": self.backbone_signature(),
            "prompts": {k: v.detach().clone() for k, v in self.prompts.items()},
            "arch_logits": {k: v.detach().clone() for k, v in self.arch_logits.items()},
        }

    def load_prompt_state_dict(self, state: dict) -> None:
        """Load prompts and alpha saved by prompt_state_dict; a mismatch is a ValueError naming it."""
        check_state_header(state, STATE_FORMAT, "prompt", "the prompts were", self.backbone_signature())
        mine = self.prompt_state_dict()
        for field in ("mode", "candidate_lengths", "config", "towers"):
            if state[field] != mine[field]:
                raise ValueError(f"{field} mismatch: saved {state[field]!r}, this module has {mine[field]!r}")
        self.bank.copy_tensors(state)
        self._text_cache = None

    def extra_repr(self) -> str:
        what = f"candidate_lengths={list(self.candidate_lengths)}" if self.mode == "search" else "config=fixed"
        return f"mode={self.mode}, {what}, towers={list(self.prompted)}, classes={self.num_classes}, impl={self.impl}"
