"""CoOp and CoCoOp: learnable context vectors at the text input of a frozen CLIP.

CoOp (Zhou et al., IJCV 2022) learns n context vectors that take the place of the
template's words: the class text is [SOS, ctx_1..ctx_n, class name, ".", EOT] (class
token at the ``end``; ``front`` puts the name first, ``middle`` between the halves
of the context). The context is shared by all classes, or one per class
(``class_specific``). It starts from the embeddings of words (``ctx_init``, e.g.
"a photo of a": then the first forward is zero-shot CLIP with that template) or
from N(0, 0.02^2).

CoCoOp (Zhou et al., CVPR 2022) conditions the context on each image: a meta-network
(Linear -> ReLU -> Linear, image feature width -> width/16 -> text width) maps the
image's normalised feature to a bias added to every context vector, so every image
has its own C class texts: B x C sequences through the text tower per step.

How it runs (same results as the literal per-image loop, fastdpl.literal): the
frozen CLIP runs through a FastDPLPrompt with no prompts, so the text tower stops
at the longest end-of-text token and its last block computes only the end-of-text
rows; the class-text token embeddings are looked up once per step and the B x C
sequences of CoCoOp go through the tower in batched passes, in checkpointed chunks
of ``text_chunk_size`` sequences when memory asks for it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import PromptConfig
from ..core import check_saved_tensors, check_state_header
from ..prompt import FastDPLPrompt
from ..adapters import UnsupportedModelError, adapt, place_context

POSITIONS = ("end", "middle", "front")
STATE_FORMAT = "fastdpl-context-v1"
CLIP_VOCAB = 49408  # the BPE vocabulary of open_clip.tokenize, which places the context slots
PLACEHOLDER = "X"  # a one-token word that holds a context slot in the token ids (its embedding is replaced)


def _bpe(text: str) -> list:
    """CLIP's BPE ids of ``text`` (no start- or end-of-text token, never truncated)."""
    from open_clip.tokenizer import _tokenizer

    return _tokenizer.encode(text)


def _bpe_length(text: str) -> int:
    return len(_bpe(text))


def context_words(ctx_init) -> str | None:
    """The words of a word start, or None for a random one: None, "" and blank (CoOp's and
    CoCoOp's configs write ``CTX_INIT ""`` for a random start). Underscores become spaces."""
    if ctx_init is not None and not isinstance(ctx_init, str):
        raise ValueError(f"ctx_init must be words such as 'a photo of a', or None / '' for a random start, "
                         f"got {ctx_init!r}")
    words = (ctx_init or "").replace("_", " ").strip()
    return words or None


class CoOpPrompt(nn.Module):
    """CoOp around an open_clip CLIP.

    Args:
        model: an open_clip CLIP (frozen, never copied).
        classnames: the class names (underscores become spaces). Names ending in punctuation
            ("crane (bird)", "st. bernard.") get CoOp's own token layout: CoOp tokenizes
            "<context> <name>." as one text, where the name's last character and the "." may
            merge into one BPE token, and splits the class tokens off by the name's own token count.
        n_ctx: number of context vectors; None: one per token of ``ctx_init``'s words, else 16
            (CoOp's default; CoCoOp's is 4). With a word start an explicit ``n_ctx`` must equal the
            words' token count (it is refused by name otherwise: the words set the length).
        ctx_init: words whose embeddings initialise the context (e.g. "a photo of a"), or None / ""
            for N(0, 0.02^2) (CoOp's configs write ``CTX_INIT ""`` for a random start).
        class_specific: one context per class instead of one shared by all.
        class_token_position: "end", "middle" or "front".
        impl, text_chunk_size: as FastDPLPrompt (the attention engine; checkpointed text chunks).
        generator: draws the random initial context. None: a private generator seeded 0, so the
            global RNG is never read or advanced (``torch.manual_seed`` changes nothing) and the
            same arguments give the same start; pass one to choose the seed (the pipeline passes
            ``--seed``'s).
    """

    method = "coop"
    image_conditioned = False  # text features depend on the classes only: computed once per batch
    default_n_ctx = 16  # CoOp's N_CTX, for a random start

    def __init__(self, model: nn.Module, classnames: Sequence[str], *, n_ctx: int | None = None,
                 ctx_init: str | None = None, class_specific: bool = False, class_token_position: str = "end",
                 impl: str = "auto", text_chunk_size: int | None = None, generator: torch.Generator | None = None):
        super().__init__()
        if class_token_position not in POSITIONS:
            raise ValueError(f"class_token_position must be one of {POSITIONS}, got {class_token_position!r}")
        ctx_init = context_words(ctx_init)
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1):
            raise ValueError(f"n_ctx must be a positive int or None, got {n_ctx!r}")
        adapter = adapt(model)  # refuses unsupported towers before any work
        if adapter.token_embedding.num_embeddings != CLIP_VOCAB:
            raise UnsupportedModelError(
                f"{type(self).__name__} arranges CLIP's BPE tokens (vocabulary {CLIP_VOCAB}); this model's text "
                f"vocabulary has {adapter.token_embedding.num_embeddings} tokens (e.g. SigLIP): not supported yet")
        if ctx_init is not None:
            words = _bpe_length(ctx_init)
            if n_ctx is not None and n_ctx != words:
                raise ValueError(f"n_ctx={n_ctx} and ctx_init={ctx_init!r} ({words} tokens) disagree: the words set "
                                 f"the context length; pass ctx_init=None (or '') for {n_ctx} random vectors, or "
                                 "leave n_ctx unset")
            n_ctx = words
        self.n_ctx, self.ctx_init = n_ctx or self.default_n_ctx, ctx_init
        self.class_specific, self.class_token_position = bool(class_specific), class_token_position
        names = FastDPLPrompt._check_classnames(classnames)
        tokens, slots = self._arrange(names, adapter.context_length)
        blocks = {"image": len(adapter.image.blocks), "text": len(adapter.text.blocks)}
        # The frozen CLIP as fastdpl runs it: no prompts; the class texts are the arranged token ids.
        self.clip = FastDPLPrompt(model, names, mode="fixed", config=PromptConfig.zero_shot(blocks), template="{}",
                                  tokenizer=lambda texts: tokens, impl=impl, text_chunk_size=text_chunk_size)
        self.register_buffer("slots", slots, persistent=False)
        self.ctx = nn.Parameter(self._initial_context(len(names), generator))
        self.to(next(model.parameters()).device)

    # ---- construction --------------------------------------------------------------------------------
    def _arrange(self, names, context_length: int):
        """Token ids per class as CoOp lays them out, and the positions (C, n) of the context slots
        (None when they are 1..n for every class).

        CoOp tokenizes "<n context words> <name>." as one text: [SOS, ctx, rest, EOT], where rest
        is the BPE of "<name>." (the name's last character and the "." may merge into one token),
        then moves the first ``len(BPE(name))`` tokens of rest in front of (``front``) or amid
        (``middle``) the context; the end-of-text token keeps its position."""
        import open_clip

        n, half = self.n_ctx, self.n_ctx // 2
        tokenizer = open_clip.tokenizer._tokenizer
        sot, eot = tokenizer.encoder["<start_of_text>"], tokenizer.encoder["<end_of_text>"]
        placeholder = _bpe(PLACEHOLDER)[0]
        rows, slots = [], []
        for name in names:
            name = name.replace("_", " ")
            rest, name_len = _bpe(f"{name}."), _bpe_length(name)
            need = 1 + n + len(rest) + 1
            if need > context_length:
                raise ValueError(f"class text of {name!r} with {n} context tokens needs {need} positions ([SOS], "
                                 f"the context, {len(rest)} tokens of {name + '.'!r}, [EOT]): it does not fit the "
                                 f"text tower's {context_length} positions")
            if name_len > len(rest) and self.class_token_position != "end":
                raise ValueError(f"class name {name!r}: its {name_len} tokens alone outnumber the {len(rest)} of "
                                 f"{name + '.'!r} (BPE merges), so CoOp's {self.class_token_position!r} layout would "
                                 "move the end-of-text token; use class_token_position='end'")
            ctx = [placeholder] * n
            if self.class_token_position == "end":
                row, slot = ctx + rest, list(range(1, 1 + n))
            elif self.class_token_position == "front":
                row, slot = rest[:name_len] + ctx + rest[name_len:], [1 + name_len + j for j in range(n)]
            else:
                row = ctx[:half] + rest[:name_len] + ctx[half:] + rest[name_len:]
                slot = [1 + j for j in range(half)] + [1 + name_len + j for j in range(half, n)]
            rows.append([sot, *row, eot] + [0] * (context_length - need))
            slots.append(slot)
        tokens = torch.tensor(rows, dtype=torch.long)
        return tokens, None if self.class_token_position == "end" else torch.tensor(slots, dtype=torch.long)

    def _initial_context(self, num_classes: int, generator) -> torch.Tensor:
        embedding = self.clip.adapter.token_embedding
        shape = (num_classes, self.n_ctx) if self.class_specific else (self.n_ctx,)
        if self.ctx_init is None:
            generator = generator if generator is not None else torch.Generator().manual_seed(0)
            return 0.02 * torch.randn(*shape, embedding.weight.shape[1], generator=generator)
        import open_clip

        ids = open_clip.tokenize([self.ctx_init])[0, 1:1 + self.n_ctx].to(embedding.weight.device)
        with torch.no_grad():
            words = embedding(ids).detach().float().cpu()
        return words.expand(*shape, -1).clone()

    # ---- the interface every method shares ------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self.clip.model

    @property
    def classnames(self) -> list:
        return self.clip.classnames

    @property
    def num_classes(self) -> int:
        return self.clip.num_classes

    def parameter_groups(self) -> dict:
        """{group name: parameters}: one SGD group, the context."""
        return {"prompt": [self.ctx]}

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images)

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return self.clip.logits(image_features, text_features)

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """Logits (B, C); with ``return_features`` also {"image": (B, E), "text": (C, E)}."""
        image, text = self.encode_image(images), self.encode_text()
        logits = self.logits(image, text)
        return (logits, {"image": image, "text": text}) if return_features else logits

    # ---- text ----------------------------------------------------------------------------------------
    def _class_embeddings(self) -> torch.Tensor:
        """The class texts' token embeddings (C, L, W), looked up once per call, truncated after the
        longest end-of-text token where that is exact (FastDPLPrompt.text_length)."""
        clip = self.clip
        return clip.adapter.token_embedding(clip.class_tokens[:, :clip.text_length()])

    def _encode_sequences(self, embeddings, classes: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Text features of S sequences: class ``classes`` (S,) under ``context`` (S, n, W)."""
        slots = None if self.slots is None else self.slots[classes]
        return self.clip.encode_text_embeddings(place_context(embeddings[classes], context, slots),
                                                self.clip.end_of_text[classes])

    def encode_text_with_context(self, context: torch.Tensor) -> torch.Tensor:
        """Text features (G, C, E) of every class under each of G contexts: ``context`` (G, n, W)
        (one per image, e.g. CoCoOp or TPT), or (G, C, n, W) (class-specific). The class
        embeddings are looked up once; the G x C sequences run as batched, truncated passes (in
        chunks of ``text_chunk_size`` sequences)."""
        groups, classes = context.shape[0], self.num_classes
        if context.dim() == 3:
            context = context.unsqueeze(1).expand(groups, classes, *context.shape[1:])
        context = context.reshape(groups * classes, *context.shape[2:])
        embeddings = self._class_embeddings()
        class_of = torch.arange(classes, device=embeddings.device).repeat(groups)
        features = self.clip.chunked_text(groups * classes, lambda lo, hi: self._encode_sequences(
            embeddings, class_of[lo:hi], context[lo:hi]))
        return features.view(groups, classes, -1)

    def encode_text(self, classes: slice | None = None) -> torch.Tensor:
        """Text features (classes, E) with the learned context (a contiguous slice of the classes:
        one rank's share under torchrun)."""
        lo, hi = self.clip._class_range(classes)
        context = self.ctx[lo:hi] if self.class_specific else self.ctx.expand(hi - lo, *self.ctx.shape)
        embeddings = self._class_embeddings()
        order = torch.arange(lo, hi, device=embeddings.device)
        return self.clip.chunked_text(hi - lo, lambda a, b: self._encode_sequences(
            embeddings, order[a:b], context[a:b]))

    # ---- state ---------------------------------------------------------------------------------------
    def settings(self) -> dict:
        """What rebuilds this module around a backbone and class names (saved with its state)."""
        return {"method": self.method, "n_ctx": self.n_ctx, "ctx_init": self.ctx_init,
                "class_specific": self.class_specific, "class_token_position": self.class_token_position}

    def prompt_state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "method_settings": self.settings(), "backbone": self.clip.backbone_signature(),
                "num_classes": self.num_classes if self.class_specific else None,
                "tensors": {k: v.detach().clone() for k, v in self._learned_tensors().items()}}

    def _learned_tensors(self) -> dict:
        return {"ctx": self.ctx}

    def load_prompt_state_dict(self, state: dict) -> None:
        """Load what prompt_state_dict saved; any mismatch is a ValueError naming it."""
        check_state_header(state, STATE_FORMAT, "context-prompt", "the context was", self.clip.backbone_signature())
        if state["method_settings"] != self.settings():
            raise ValueError(f"settings mismatch: saved {state['method_settings']}, this module has "
                             f"{self.settings()}")
        mine = self._learned_tensors()
        hint = " (class-specific contexts need the same classes)" if self.class_specific else ""
        check_saved_tensors("tensors", state["tensors"], mine, hint)
        with torch.no_grad():
            for key, value in state["tensors"].items():
                mine[key].copy_(value)

    def extra_repr(self) -> str:
        return (f"n_ctx={self.n_ctx}, ctx_init={self.ctx_init!r}, class_specific={self.class_specific}, "
                f"class_token_position={self.class_token_position!r}, classes={self.num_classes}")


class CoCoOpPrompt(CoOpPrompt):
    """CoCoOp: CoOp's shared context plus an image-conditioned bias from a small meta-network.

    Args as CoOpPrompt (a shared context only: ``class_specific`` is refused), with CoCoOp's
    defaults: the words "a photo of a" (4 context vectors; ``n_ctx=8`` alone is refused by name,
    since the words set the length: pass ``ctx_init=None`` for 8 random ones), and 4 for a random
    start. ``generator`` also draws the meta-network's initial weights (PyTorch's default Linear
    initialisation, drawn under a seed taken from it); None: seed 0, the global RNG untouched.
    ``forward(images)`` gives (B, C) logits; each image's text features use its own context.
    """

    method = "cocoop"
    image_conditioned = True  # every image has its own class texts

    default_n_ctx = 4  # CoCoOp's N_CTX, for a random start

    def __init__(self, model: nn.Module, classnames: Sequence[str], *, n_ctx: int | None = None,
                 ctx_init: str | None = "a photo of a", class_token_position: str = "end", impl: str = "auto",
                 text_chunk_size: int | None = None, generator: torch.Generator | None = None,
                 class_specific: bool = False):
        if class_specific:
            raise ValueError("CoCoOp has one context shared by all classes: class_specific is not supported")
        super().__init__(model, classnames, n_ctx=n_ctx, ctx_init=ctx_init, class_token_position=class_token_position,
                         impl=impl, text_chunk_size=text_chunk_size, generator=generator)
        features = self.clip.adapter.image_feature_width
        width = self.ctx.shape[-1]
        seed = int(torch.randint(2**62, (1,), generator=generator).item()) if generator is not None else 0
        with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global RNG; the caller's is kept
            torch.manual_seed(seed)
            self.meta_net = nn.Sequential(OrderedDict([
                ("linear1", nn.Linear(features, features // 16)), ("relu", nn.ReLU()),
                ("linear2", nn.Linear(features // 16, width))]))
        self.meta_net.to(self.ctx.device)

    def parameter_groups(self) -> dict:
        return {"prompt": [self.ctx, *self.meta_net.parameters()]}

    def image_context(self, image_features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Each image's context (B, n, W): the shared context plus meta_net(normalised feature)
        (``normalize=False``: of the raw feature, as the TPT code's CoCoOp does)."""
        features = F.normalize(image_features, dim=-1) if normalize else image_features
        bias = self.meta_net(features.to(self.ctx.dtype))
        return self.ctx.unsqueeze(0) + bias.unsqueeze(1)

    def logits_with_context(self, image_features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of B images, image b against the class texts under context[b] (B, n, W)."""
        return self.clip.logits(image_features, self.encode_text_with_context(context))

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """Logits (B, C); with ``return_features`` also {"image": (B, E), "text": (B, C, E)} (each
        image's own class texts)."""
        image_features = self.encode_image(images)
        text = self.encode_text_with_context(self.image_context(image_features))
        logits = self.clip.logits(image_features, text)
        return (logits, {"image": image_features, "text": text}) if return_features else logits

    def encode_text(self, classes: slice | None = None) -> torch.Tensor:
        raise ValueError("CoCoOp's class texts depend on the image: use forward(images) or "
                         "logits_with_context(image_features, image_context(image_features))")

    def _learned_tensors(self) -> dict:
        return {"ctx": self.ctx, **{f"meta_net.{k}": v for k, v in self.meta_net.named_parameters()}}
