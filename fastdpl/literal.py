"""The authors'-style forwards, written literally: the oracles of FastDPLPrompt, CoOp/CoCoOp
and TPT, and the baselines of the benchmarks.

For every block and every candidate prompt P_c it runs the block's own
``nn.MultiheadAttention`` with queries ``ln_1(x)`` and keys/values
``ln_1([x ; P_c])`` (prompts broadcast over the batch; in the text tower a mask
that is causal on the original tokens and open on the prompts), then the
softmax(alpha)-weighted sum, then the rest of the block. The text tower runs on
all 77 positions and the last block on every row: none of FastDPLPrompt's
savings, and nothing shared with its code beyond reading the same parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .templates import tokenize_classes


def _text(model):
    """open_clip's text tower: the CLIP itself, or CustomTextCLIP's ``.text``."""
    return model.text if hasattr(model, "text") and hasattr(model.text, "transformer") else model


def _candidates(dpl, tower: str, block: int, overrides=None):
    """[(weight, prompt or None)] of one block, as FastDPLPrompt holds them (``overrides``: block ->
    prompt replacing a fixed-mode block's own, e.g. a prompt being tuned at test time)."""
    if overrides and block in overrides:
        return [(None, overrides[block])]
    if tower not in dpl.prompted:
        return [(None, None)]
    lengths = dpl.prompted[tower][block]
    if dpl.mode == "search":
        weights = torch.softmax(dpl.arch_logits[tower][block], dim=0)
    else:
        weights = [None]
    return [(weights[c], dpl.prompt(tower, block, n) if n > 0 else None) for c, n in enumerate(lengths)]


def _literal_block(block, x, candidates, causal_mask):
    h = block.ln_1(x)
    out = 0
    for weight, prompt in candidates:
        if prompt is None:
            kv, mask = h, causal_mask
        else:
            expanded = prompt.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            kv = block.ln_1(torch.cat([x, expanded], dim=1))
            mask = None if causal_mask is None else F.pad(causal_mask, (0, prompt.shape[0]))  # prompts: 0 = open
        if isinstance(block.attn, torch.nn.MultiheadAttention):
            attended = block.attn(h, kv, kv, need_weights=False, attn_mask=mask)[0]
        else:  # open_clip 4's Attention: queries from h, keys and values from kv
            attended = block.attn(h, k_x=kv, v_x=kv, attn_mask=mask)
        out = out + (attended if weight is None else weight * attended)
    x = x + block.ls_1(out)
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def literal_encode_image(dpl, images: torch.Tensor) -> torch.Tensor:
    x = dpl.adapter.image_embeddings(images)
    for b, block in enumerate(dpl.adapter.image.blocks):
        x = _literal_block(block, x, _candidates(dpl, "image", b), None)
    return dpl.adapter.image_head(x[:, 0])


def literal_token_embeddings(dpl) -> torch.Tensor:
    """The text input's token embeddings over all positions, from the templates themselves: each
    template's class texts tokenized and embedded, then averaged (one template: itself)."""
    embedding = dpl.adapter.token_embedding
    length = dpl.class_tokens.shape[1]
    per_template = [embedding(tokenize_classes(dpl.classnames, t, None, length).to(embedding.weight.device))
                    for t in dpl.templates]
    return torch.stack(per_template).mean(0)


def literal_encode_text(dpl, context=None, text_prompts=None) -> torch.Tensor:
    """All class texts over all positions; ``context`` (n, W) replaces tokens 1..n (CoOp/TPT),
    ``text_prompts`` {block: (n_b, W)} replaces a fixed-mode module's text prompts."""
    tokens = dpl.class_tokens
    x = dpl.adapter.text_embeddings(literal_token_embeddings(dpl))
    if context is not None:  # swap the words' embeddings for the context, positions kept
        pos = _text(dpl.model).positional_embedding[1:1 + context.shape[0]].to(x.dtype)
        x = x.clone()
        x[:, 1:1 + context.shape[0]] = context.to(x.dtype) + pos
    n = tokens.shape[1]
    causal = torch.full((n, n), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
    for b, block in enumerate(dpl.adapter.text.blocks):
        x = _literal_block(block, x, _candidates(dpl, "text", b, text_prompts), causal)
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    return dpl.adapter.text_head(x[rows, dpl.end_of_text])


def literal_logits(dpl, images: torch.Tensor) -> torch.Tensor:
    image_features = F.normalize(literal_encode_image(dpl, images), dim=-1)
    text_features = F.normalize(literal_encode_text(dpl), dim=-1)
    return dpl.model.logit_scale.exp() * image_features @ text_features.T


def literal_tpt_predict(tuner, views: torch.Tensor) -> torch.Tensor:
    """TPT on one image as the usual implementation does it: every forward runs the image tower
    on the views (without a graph) and the full, untruncated text tower over every class with plain
    autograd; the prediction runs both towers again. views (V, 3, S, S) -> logits (C,) of view 0."""
    from .tpt import average_entropy, confident_views

    dpl = tuner.dpl
    if tuner.tune == "learned_context":  # CoOp's learned context, or CoCoOp's from the original view
        if dpl.image_conditioned:
            with torch.no_grad():
                feature = dpl.model.encode_image(views[:1])
                feature = F.normalize(feature, dim=-1) if tuner.meta_input == "normalized" else feature
                start = dpl.ctx + dpl.meta_net(feature.to(dpl.ctx.dtype))[0]
        else:
            start = dpl.ctx
        tuned = {"context": start.detach().clone().requires_grad_()}
    else:
        tuned = {k: v.clone().requires_grad_() for k, v in tuner.initial.items()}
    optimizer = torch.optim.AdamW(list(tuned.values()), lr=tuner.lr, weight_decay=tuner.weight_decay)
    prompts = {k: v for k, v in tuned.items() if k != "context"}

    def logits_of(images):
        if tuner.tune == "learned_context":
            with torch.no_grad():
                image_features = F.normalize(dpl.model.encode_image(images), dim=-1)
            text = _literal_text_features(dpl.model, *_literal_context_prompts(dpl, tuned["context"]))
            return dpl.model.logit_scale.exp() * image_features @ F.normalize(text, dim=-1).T
        with torch.no_grad():
            image_features = F.normalize(literal_encode_image(dpl, images), dim=-1)
        text_features = F.normalize(literal_encode_text(dpl, tuned.get("context"), prompts), dim=-1)
        return dpl.model.logit_scale.exp() * image_features @ text_features.T

    selected = None
    for _ in range(tuner.steps):
        logits = logits_of(views)
        if selected is None:
            selected = confident_views(logits.detach(), tuner.keep_fraction)
        loss = average_entropy(logits[selected])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return logits_of(views[:1])[0]


def _literal_context_prompts(method, ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CoOp's class prompts as its reference code builds them: the token embeddings of
    "X ... X <name>." split into the start token, the context's slots and the rest; the class
    name moved in front of or amid the context (``class_token_position``). ctx (n, W) or (C, n, W).
    Returns (C, 77, W) embeddings and the token ids (whose argmax is the end-of-text position)."""
    import open_clip

    model, n = method.model, method.n_ctx
    names = [c.replace("_", " ") for c in method.classnames]
    tokens = open_clip.tokenize([" ".join(["X"] * n) + f" {name}." for name in names],
                                context_length=_text(model).positional_embedding.shape[0])
    embedded = _text(model).token_embedding(tokens.to(ctx.device))
    prefix, suffix = embedded[:, :1], embedded[:, 1 + n:]
    ctx = ctx.expand(len(names), *ctx.shape[-2:]) if ctx.dim() == 2 else ctx
    prompts = []
    for i, name in enumerate(names):
        name_len = int(open_clip.tokenize([name])[0].argmax()) - 1
        name_tokens, rest = suffix[i, :name_len], suffix[i, name_len:]
        if method.class_token_position == "end":
            parts = [ctx[i], name_tokens, rest]
        elif method.class_token_position == "front":
            parts = [name_tokens, ctx[i], rest]
        else:
            parts = [ctx[i, :n // 2], name_tokens, ctx[i, n // 2:], rest]
        prompts.append(torch.cat([prefix[i], *[p.to(prefix.dtype) for p in parts]]))
    return torch.stack(prompts), tokens


def _literal_text_features(model, prompts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text transformer over all positions (its causal mask), then its final norm and
    projection at the end-of-text tokens."""
    text = _text(model)
    x = prompts + text.positional_embedding.to(prompts.dtype)
    x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask))
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ text.text_projection


def literal_context_logits(method, images: torch.Tensor) -> torch.Tensor:
    """CoOp or CoCoOp logits as their reference code computes them: open_clip's own image encoder;
    for CoCoOp a loop over the images, each with its C prompts (context + meta_net(normalised
    feature)) through the full, untruncated text transformer."""
    model = method.model
    image_features = F.normalize(model.encode_image(images), dim=-1)
    scale = model.logit_scale.exp()
    if method.method == "coop":
        text = F.normalize(_literal_text_features(model, *_literal_context_prompts(method, method.ctx)), dim=-1)
        return scale * image_features @ text.T
    bias = method.meta_net(image_features.to(method.ctx.dtype))
    logits = []
    for feature, shift in zip(image_features, bias):
        text = _literal_text_features(model, *_literal_context_prompts(method, method.ctx + shift))
        logits.append(scale * feature @ F.normalize(text, dim=-1).T)
    return torch.stack(logits)
