"""Benchmark of one DPL optimisation step (fastdpl bench step).

A step is the forward and backward of the CLIP logits of an image batch against
all class texts (cross-entropy; gradients of the prompts and, in search mode,
the architecture logits). Providers, timed interleaved in one run:

* ``search``: FastDPLPrompt in search mode (candidate lengths 0..6, both towers);
* ``single_path``: FastDPLPrompt in fixed mode with every block at the largest
  length, i.e. one prompted model: the cost the supernet should approach;
* ``literal``: the authors'-style supernet (fastdpl.literal): one full
  nn.MultiheadAttention per candidate, untruncated text;
* ``train`` and ``train_literal``: the train stage's step (fixed mode, a
  heterogeneous configuration drawn with a seed) and the same literally;
* ``search_compiled``: the search step through ``torch.compile`` (what ``--compile`` runs), on
  the shapes that name a backend (``StepShape.compiled``: inductor on GPU and CPU shapes, aot_eager
  in smoke runs, which check the plumbing, not the speed). Its ``first_call_s`` includes the compile.

The literal providers exist for open_clip models only (they call its attention
modules); Hugging Face CLIP and SigLIP shapes (models ``hf-clip-*``,
``hf-siglip-*``, random weights from transformers' configs) and open_clip's SigLIP (timm image
tower: ``ViT-B-16-SigLIP``, ``siglip-tiny``) time the others.

Reported: median and interquartile range, peak memory (CUDA), and the ratios
search / single_path, literal / search and train_literal / train.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastdpl.adapters import adapt
from fastdpl.config import PromptConfig
from fastdpl.literal import literal_logits
from fastdpl.prompt import FastDPLPrompt
from .suite import COMPILED_COLUMNS, Suite, add_ratios, run_suite, suite_main, table, time_calls


@dataclass(frozen=True)
class StepShape:
    name: str
    model: str
    batch: int
    classes: int
    lengths: tuple = tuple(range(7))
    compiled: str | None = None  # the torch.compile backend of a search_compiled row; None: no such row


GPU_SHAPES = [
    StepShape("b4-100cls", "ViT-B-16", 4, 100, compiled="inductor"),
    StepShape("b32-100cls", "ViT-B-16", 32, 100),
    StepShape("b4-1000cls", "ViT-B-16", 4, 1000),
    StepShape("b32-1000cls", "ViT-B-16", 32, 1000),
    StepShape("hf-clip-b32-100cls", "hf-clip-b16", 32, 100),
    StepShape("hf-siglip-b32-100cls", "hf-siglip-b16", 32, 100),
    StepShape("siglip-b32-100cls", "ViT-B-16-SigLIP", 32, 100),
]
CPU_SHAPES = [StepShape("b8-10cls", "ViT-B-16", 8, 10, compiled="inductor")]
SMOKE_SHAPES = [StepShape("smoke", "tiny", 2, 3, (0, 1, 2), compiled="aot_eager"),
                StepShape("hf-clip-smoke", "hf-clip-tiny", 2, 3, (0, 1, 2)),
                StepShape("hf-siglip-smoke", "hf-siglip-tiny", 2, 3, (0, 1, 2)),
                StepShape("siglip-smoke", "siglip-tiny", 2, 3, (0, 1, 2))]
LITERAL = ("literal", "train_literal")  # open_clip ViT models only (fastdpl.literal runs their blocks)


def tiny_clip(seed: int = 0, **text_overrides):
    """A 3-block open_clip CLIP with random weights (32 px images, 8 px patches): tests and smoke runs."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    text_cfg = dict(context_length=77, vocab_size=49408, width=48, heads=3, layers=3)
    text_cfg.update(text_overrides)
    vision_cfg = CLIPVisionCfg(image_size=32, patch_size=8, width=64, head_width=16, layers=3)
    with torch.random.fork_rng(devices=[]):  # open_clip initialises from the global RNG; the caller's stays as it was
        torch.manual_seed(seed)
        return open_clip.CLIP(embed_dim=32, vision_cfg=vision_cfg, text_cfg=CLIPTextCfg(**text_cfg)).eval()


def _hf_model(name: str):
    """transformers' CLIPModel / SiglipModel with random weights: ``*-b16`` ViT-B/16 at 224 px (their
    default text towers), ``*-tiny`` a 3-block model at 32 px."""
    import transformers

    tiny = name.endswith("-tiny")
    vision = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, image_size=32,
                  patch_size=8) if tiny else dict(patch_size=16, image_size=224)
    if name.startswith("hf-clip"):
        text = dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3,
                    eos_token_id=49407) if tiny else dict(eos_token_id=49407)
        return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                              projection_dim=32 if tiny else 512))
    text = dict(hidden_size=48, intermediate_size=96, num_attention_heads=3, num_hidden_layers=3, vocab_size=1000,
                max_position_embeddings=16, projection_size=64, bos_token_id=None, eos_token_id=1,
                pad_token_id=1) if tiny else {}
    return transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))


def _tiny_open_clip_siglip():
    """open_clip's ViT-B-16-SigLIP config with timm's vit_tiny trunk and a 3-block text tower."""
    import copy

    import open_clip

    cfg = copy.deepcopy(open_clip.get_model_config("ViT-B-16-SigLIP"))
    cfg.pop("custom_text", None)
    cfg["vision_cfg"]["timm_model_name"], cfg["embed_dim"] = "vit_tiny_patch16_224", 192
    cfg["text_cfg"].update(width=48, heads=3, layers=3, vocab_size=1000, context_length=16)
    return open_clip.CustomTextCLIP(**cfg)


def build_model(name: str, device):
    """A model with random weights (no download): an open_clip name, "tiny" (tiny_clip()),
    "siglip-tiny" (open_clip's SigLIP config with a tiny timm trunk), or ``hf-clip-b16`` /
    ``hf-siglip-b16`` / ``hf-clip-tiny`` / ``hf-siglip-tiny`` (transformers)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):  # random weights from seed 0; the caller's RNG stays as it was
        torch.manual_seed(0)
        if name.startswith("hf-"):
            model = _hf_model(name)
        else:
            model = tiny_clip() if name == "tiny" else _tiny_open_clip_siglip() if name == "siglip-tiny" else \
                open_clip.create_model(name, pretrained=None)
    return model.to(device).eval()


def word_ids(length: int, vocab: int):
    """A stand-in tokenizer for models whose tokenizer files are not here (SigLIP's SentencePiece):
    one id per word from its characters, then end-of-text and padding (id 1) to ``length``."""
    def tokenize(texts):
        rows = [[2 + sum(map(ord, w)) % (vocab - 2) for w in t.split()][: length - 1] + [1] for t in texts]
        return torch.tensor([r + [1] * (length - len(r)) for r in rows])
    return tokenize


def tokenizer_for(model):
    """None (open_clip's CLIP BPE) for CLIP vocabularies, else word_ids at the model's context length."""
    adapter = adapt(model)
    vocab = adapter.token_embedding.num_embeddings
    return None if vocab == 49408 else word_ids(adapter.context_length, vocab)


def classnames(count: int) -> list[str]:
    words = ["red", "small", "striped", "wooden", "flying", "old", "golden", "spotted", "tall", "round"]
    return [f"{words[i % len(words)]} object {i}" for i in range(count)]


def step_fn(logits_fn, params, labels):
    def run(images):
        logits = logits_fn(images)
        loss = F.cross_entropy(logits, labels)
        return torch.autograd.grad(loss, params)
    return run


def providers(model, shape: StepShape, impl: str):
    names = classnames(shape.classes)
    tokenizer = tokenizer_for(model)
    search = FastDPLPrompt(model, names, candidate_lengths=shape.lengths, impl=impl, tokenizer=tokenizer).train()
    blocks = {t: len(search._parts[t].blocks) for t in ("image", "text")}
    single = FastDPLPrompt(model, names, mode="fixed", impl=impl, tokenizer=tokenizer,
                           config=PromptConfig({t: (max(shape.lengths),) * n for t, n in blocks.items()})).train()
    device = next(model.parameters()).device
    labels = torch.arange(shape.batch, device=device) % shape.classes
    search_params = search.arch_parameters() + search.prompt_parameters()
    # The train stage: a heterogeneous configuration such as a search derives (lengths drawn with a seed).
    g = torch.Generator().manual_seed(0)
    derived = PromptConfig({t: tuple(shape.lengths[i] for i in torch.randint(len(shape.lengths), (n,), generator=g))
                            for t, n in blocks.items()})
    train = FastDPLPrompt(model, names, mode="fixed", impl=impl, config=derived, tokenizer=tokenizer).train()
    calls = {
        "search": step_fn(search, search_params, labels),
        "single_path": step_fn(single, single.prompt_parameters(), labels),
        "literal": step_fn(functools.partial(literal_logits, search), search_params, labels),
        "train": step_fn(train, train.prompt_parameters(), labels),
        "train_literal": step_fn(functools.partial(literal_logits, train), train.prompt_parameters(), labels),
    }
    if shape.compiled:
        calls["search_compiled"] = step_fn(torch.compile(search, backend=shape.compiled), search_params, labels)
    return {k: v for k, v in calls.items() if k in provider_names(shape)}


def provider_names(shape: StepShape) -> list:
    """The providers a shape has: the literal ones for open_clip ViT models only."""
    names = ["search", "single_path", "literal", "train", "train_literal"] + ["search_compiled"] * bool(shape.compiled)
    literal = not (shape.model.startswith("hf-") or "siglip" in shape.model.lower())
    return [n for n in names if literal or n not in LITERAL]


def make_calls(shape: StepShape, device, dtype, impl) -> dict:
    """{provider: call(i)}: one step on input set i (two random image batches rotate)."""
    model = build_model(shape.model, device).to(dtype)
    image_size = adapt(model).image_size[0]
    gen = torch.Generator().manual_seed(0)
    image_sets = [torch.randn(shape.batch, 3, image_size, image_size, generator=gen).to(device, dtype)
                  for _ in range(2)]
    return {name: functools.partial(lambda fn, i: fn(image_sets[i % len(image_sets)]), fn)
            for name, fn in providers(model, shape, impl).items()}


def bench_shape(shape: StepShape, device, dtype, impl, repeats, warmup):
    rows = time_calls(shape.name, make_calls(shape, device, dtype, impl), device, repeats, warmup)
    add_ratios(rows, "single_path", "vs_single_path")
    add_ratios(rows, "literal", "literal_over_this", invert=True, only=lambda name: not name.startswith("train"))
    add_ratios(rows, "search", "vs_search", only=lambda name: name == "search_compiled")
    add_ratios(rows, "train_literal", "literal_over_this", invert=True, only=lambda name: name.startswith("train"))
    single_mem = {r["shape"]: r.get("peak_memory_mb") for r in rows if r["provider"] == "single_path"}
    for r in rows:
        mem = single_mem.get(r["shape"])
        r["memory_vs_single_path"] = r["peak_memory_mb"] / mem if mem and r.get("peak_memory_mb") else None
    return rows


def format_table(rows) -> str:
    return table(rows, [("shape", 20), ("provider", 15)],
                 [("median ms", "median_ms", ".1f"), ("IQR ms", "iqr", ".1f"), ("peak MB", "peak_memory_mb", ".0f"),
                  ("x single", "vs_single_path", ".2f"), ("mem x single", "memory_vs_single_path", ".2f"),
                  ("literal/this", "literal_over_this", ".2f"), *COMPILED_COLUMNS])


SUITE = Suite("step", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES, bench_shape, format_table,
              lambda s: f"{s.model}, image batch {s.batch}, {s.classes} classes, lengths {list(s.lengths)}",
              "vs_single_path", "time / single-path step (x)", repeats=(20, 5, 2))

run = functools.partial(run_suite, SUITE)  # run(device=..., smoke=..., out=...) -> result dict
main = functools.partial(suite_main, SUITE, description=__doc__.split("\n\n")[0])  # main(argv) -> exit code
