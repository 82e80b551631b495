"""Prompt interpretation: the vocabulary tokens nearest to each learned vector (CoOp's
``interpret_prompt.py``: Euclidean distance to every row of CLIP's token embedding).

Only vectors that live in the token-embedding space are read this way: CoOp's and CoCoOp's
contexts (they replace the template's word embeddings; CoCoOp's shared context, before the
meta-network's per-image bias; class-specific contexts per class) and DPL's text prompts at the
first text block (they sit beside the token embeddings at the tower's input, without a position
embedding). Everything else is reported as not interpretable, with the reason: image prompts
(the image tower's width, patch embeddings), deeper text prompts (they enter after some blocks,
in the residual stream of those blocks), a classifier's prompts.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

PROMPT_KEY = re.compile(r"^(image|text)_block(\d+)_len(\d+)$")  # core.bank.prompt_key


def nearest_tokens(vectors: torch.Tensor, embedding: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, distances), each (N, topk): the ``topk`` rows of ``embedding`` (V, W) nearest to each of
    ``vectors`` (N, W) by Euclidean distance, nearest first, in float32. Computed directly (CoOp's
    ``torch.cdist`` uses the ||a||^2 + ||b||^2 - 2ab form, which is ~1e-4 off for a vector at a
    token's own embedding: a word start would not read back at distance 0)."""
    distance = torch.cdist(vectors.float(), embedding.float(), compute_mode="donot_use_mm_for_euclid_dist")
    found = distance.topk(min(topk, embedding.shape[0]), dim=1, largest=False)
    return found.indices, found.values


def interpretable_vectors(state: dict) -> tuple[list, list]:
    """([(label, (n, W) vectors)], [(label, reason)]) of a saved prompts file's state."""
    from .methods.context import STATE_FORMAT as CONTEXT_FORMAT
    from .prompt import STATE_FORMAT as PROMPT_FORMAT

    if not isinstance(state, dict):
        raise ValueError("not a fastdpl prompts file")
    if state.get("format") == CONTEXT_FORMAT:
        ctx = state["tensors"]["ctx"]
        method = state["method_settings"]["method"]
        if ctx.dim() == 3:  # class-specific: one context per class
            return [(f"{method} context, class {c}", ctx[c]) for c in range(ctx.shape[0])], []
        skipped = [("cocoop meta-network bias", "it depends on each image; the shared context is read")] \
            if method == "cocoop" else []
        return [(f"{method} context", ctx)], skipped
    if state.get("format") == PROMPT_FORMAT:
        found, skipped = [], []
        for key, value in sorted(state["prompts"].items(), key=lambda kv: _order(kv[0])):
            tower, block, length = _parse(key)
            label = f"{tower} prompts, block {block}, length {length}"
            if tower == "text" and block == 0:
                found.append((label, value))
            elif tower == "text":
                skipped.append((label, f"it enters block {block} of the text tower, after {block} blocks: "
                                       "not the token-embedding space"))
            else:
                skipped.append((label, "image prompts live in the image tower's width (patch embeddings), not "
                                       "the token-embedding space"))
        return found, skipped
    if "bank" in state and "head" in state:
        return [], [("every prompt", "a timm classifier's prompts are image prompts: no vocabulary to compare with")]
    raise ValueError(f"not a fastdpl prompts file (format {state.get('format')!r})")


def _parse(key: str):
    match = PROMPT_KEY.match(key)
    if not match:
        raise ValueError(f"unexpected prompt key {key!r}")
    return match.group(1), int(match.group(2)), int(match.group(3))


def _order(key: str):
    tower, block, length = _parse(key)
    return tower != "text", block, length


def interpret(state: dict, embedding: torch.Tensor, decode, topk: int = 3) -> dict:
    """{"vectors": [{label, index, tokens, distances}], "not_interpretable": [{label, reason}]}:
    ``decode(id) -> str`` names a token."""
    if topk < 1:
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    found, skipped = interpretable_vectors(state)
    rows = []
    for label, vectors in found:
        if vectors.shape[-1] != embedding.shape[1]:
            raise ValueError(f"{label}: width {vectors.shape[-1]} differs from the token embedding's "
                             f"{embedding.shape[1]}: the prompts were trained on another model")
        ids, distances = nearest_tokens(vectors, embedding, topk)
        for i, (row_ids, row_d) in enumerate(zip(ids.tolist(), distances.tolist())):
            rows.append({"label": label, "index": i + 1, "tokens": [decode(t) for t in row_ids], "ids": row_ids,
                         "distances": row_d})
    return {"topk": topk, "vectors": rows,
            "not_interpretable": [{"label": label, "reason": reason} for label, reason in skipped]}


def format_interpretation(result: dict) -> str:
    lines = []
    for row in result["vectors"]:
        pairs = ", ".join(f"{t!r} {d:.4f}" for t, d in zip(row["tokens"], row["distances"]))
        lines.append(f"{row['label']} #{row['index']}: {pairs}")
    for row in result["not_interpretable"]:
        lines.append(f"not interpretable: {row['label']} ({row['reason']})")
    return "\n".join(lines)


def interpret_file(path: str | Path, model: str | None = None, pretrained: str | None = None, topk: int = 3) -> dict:
    """Interpret a saved prompts file against its CLIP's token embedding (the model it was trained
    on, from the file's settings, unless ``model`` / ``pretrained`` name another)."""
    from open_clip.tokenizer import _tokenizer

    from .adapters import adapt
    from .methods.context import CLIP_VOCAB
    from .models import is_classifier, load_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompts file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # not a torch file
        raise ValueError(f"{path} is not a fastdpl prompts file ({type(exc).__name__})") from exc
    settings = state.get("settings", {}) if isinstance(state, dict) else {}
    model = model or settings.get("model")
    if model is None:
        raise ValueError(f"{path} does not say which model it was trained on: pass --model (and --pretrained)")
    if is_classifier(model):
        skipped = interpretable_vectors(state)[1]
        return {"source": str(path), "model": model, "topk": topk, "vectors": [],
                "not_interpretable": [{"label": label, "reason": reason} for label, reason in skipped]}
    pretrained = pretrained if pretrained is not None else settings.get("pretrained")
    embedding = adapt(load_clip(model, pretrained)).token_embedding.weight.detach()
    if embedding.shape[0] != CLIP_VOCAB:
        raise ValueError(f"{model}'s vocabulary has {embedding.shape[0]} tokens: interpret decodes CLIP's BPE "
                         f"vocabulary ({CLIP_VOCAB} tokens)")
    result = interpret(state, embedding, lambda i: _tokenizer.decoder[i], topk)
    return {"source": str(path), "model": model, **result}
