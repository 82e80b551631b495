"""Benchmark of one step of DPL's prefix-length search on a Hugging Face causal LM (fastdpl bench lm).

A step is the model's own causal-LM loss over every token of an unpadded batch (``labels`` = the
input ids) and its backward to the prompts' gradients (and alpha's in search). There is no
optimizer step: an Adam update of the prompts (~2M values at Llama-3.2-1B's shape) would cost every
provider the same few microseconds. The model is a LlamaForCausalLM with random weights (no
download), frozen. Providers, timed interleaved in one run:

* ``search``: FastDPLPrefix(model, mode="search") over {0, 4, 8, 16, 32, 64} (the fused op);
* ``single_path``: prefix tuning with the longest candidate (64) in every layer, as users run it:
  PEFT's ``PrefixTuningConfig`` (its prefix in the KV cache, the model's SDPA attention) when peft
  is installed, else ``prefix-sdpa``, an attention registered here that puts a learned prefix before
  the rotated keys and values and calls transformers' own SDPA attention with the prefix visible to
  every query and the real keys causal. The rows' ``peer`` field says which one ran;
* ``literal``: the supernet as the authors built CLIP's: each layer's whole attention module (q/k/v
  projections, rotary, output projection) run once per candidate with that candidate's prefix (the
  search's own prompts and alpha, read from its bank), the outputs mixed by softmax(alpha);
* ``search_compiled``: the search through ``torch.compile`` (what ``fastdpl lm --compile`` runs) on
  shapes that name a backend (``LMShape.compiled``: inductor on GPU and CPU shapes, aot_eager in
  smoke runs, which check the plumbing, not the speed); its ``first_call_s`` includes the compile.

Reported: median and IQR per step, peak CUDA memory (none on a CPU), and the ratios search /
single_path in time and memory (``vs_single_path``, ``memory_vs_single_path``) and literal / this
(``literal_over_this``, ``literal_memory_over_this``).
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.metadata
import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn

from fastdpl.adapters import hf_lm
from fastdpl.lm import LM_LENGTHS, FastDPLPrefix
from .suite import (
    COMPILED_COLUMNS, STEP_COLUMNS, Suite, add_ratios, add_step_arguments, provider_names, release, run_step_suite,
    run_suite, step_ratios, table, time_calls,
)
from .timing import add_common_arguments

PROVIDERS = ("search", "single_path", "literal", "search_compiled")
SINGLE_PATHS = ("auto", "peft", "sdpa")
PREFIX_SDPA = "fastdpl_bench_prefix_sdpa"
# attention module -> its prefix (2, H_kv, n, head_dim) for the next call; weak: the models own nothing here.
_PREFIX: "weakref.WeakKeyDictionary[nn.Module, torch.Tensor | None]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Llama:
    """A LlamaForCausalLM's dimensions."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    def config(self):
        import transformers

        return transformers.LlamaConfig(
            num_hidden_layers=self.layers, hidden_size=self.hidden, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, head_dim=self.head_dim, intermediate_size=self.intermediate,
            vocab_size=self.vocab, tie_word_embeddings=True, max_position_embeddings=131072,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


@dataclass(frozen=True)
class LMShape:
    name: str
    model: Llama
    batch: int
    seq: int
    lengths: tuple = LM_LENGTHS
    compiled: str | None = None  # the torch.compile backend of a search_compiled row; None: no such row


LLAMA_1B = Llama(16, 2048, 32, 8, 64, 8192, 128256)  # Llama-3.2-1B's shape (its llama3 rope scaling costs nothing)
LLAMA_CPU = Llama(4, 256, 8, 2, 32, 1024, 1024)
LLAMA_SMOKE = Llama(2, 64, 4, 2, 16, 128, 256)
GPU_SHAPES = [LMShape("llama-1b-n512", LLAMA_1B, 4, 512, compiled="inductor"),
              LMShape("llama-1b-n2048", LLAMA_1B, 4, 2048)]
CPU_SHAPES = [LMShape("llama-cpu-n256", LLAMA_CPU, 2, 256, compiled="inductor")]
SMOKE_SHAPES = [LMShape("llama-smoke", LLAMA_SMOKE, 2, 64, compiled="aot_eager")]


def build_model(llama: Llama, device, dtype=torch.float32) -> nn.Module:
    """A frozen LlamaForCausalLM with random weights seeded 0, built on ``device`` (a 1B model
    initialises in seconds on a GPU, not minutes on its host); the caller's RNG stays as it was.
    No KV cache: a training step has no use for one (PEFT passes its own, its prefix)."""
    import transformers

    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(llama.config())
    model.config.use_cache = False
    return model.to(dtype).eval().requires_grad_(False)


# ---- the prefix SDPA attention (single-path fallback and the literal's per-candidate attention) ----
def register_prefix_sdpa() -> None:
    """Register ``prefix_sdpa_attention`` with transformers' SDPA mask builder (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PREFIX_SDPA, prefix_sdpa_attention)
    AttentionMaskInterface.register(PREFIX_SDPA, sdpa_mask)


def prefix_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention over [prefix ; keys]: the module's prefix (after the rotary
    embedding, no position) visible to every query; no prefix: the model's plain SDPA attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = _PREFIX.get(module)
    if prefix is None or prefix.shape[2] == 0:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    prefix = prefix.to(query.dtype)
    batch = query.shape[0]
    key = torch.cat([prefix[0][None].expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix[1][None].expand(batch, -1, -1, -1), value], dim=2)
    mask = _mask_with_prefix(module, attention_mask, query.shape[2], key.shape[2], prefix.shape[2], query.device)
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _mask_with_prefix(module, mask, q_length, kv_length, n, device):
    """(B or 1, 1, N, N_k) bool whose first n columns (the prefix) are visible. SDPA's mask builder
    gives None for an unpadded batch (it would run is_causal): the real part is then causal with the
    queries last, or all visible for a bidirectional module."""
    if mask is None:
        real = torch.ones(q_length, kv_length - n, dtype=torch.bool, device=device)
        mask = (real.tril(kv_length - n - q_length) if module.is_causal else real)[None, None]
    elif mask.dtype != torch.bool:
        raise ValueError(f"prefix SDPA expects SDPA's boolean mask, got {mask.dtype}")
    return torch.cat([mask.new_ones(*mask.shape[:-1], n), mask], dim=-1)


class PrefixSDPA(nn.Module):
    """Prefix tuning with one length in every layer through ``prefix_sdpa_attention``: the
    single-path peer where PEFT is not installed. Prefixes N(0, 0.02^2) in fp32, cast per call."""

    def __init__(self, model: nn.Module, length: int, generator: torch.Generator | None = None):
        super().__init__()
        _, modules, kv_heads, head_dim = hf_lm.prefix_sites(model)
        generator = generator or torch.Generator().manual_seed(0)
        device = next(model.parameters()).device
        self.prefixes = nn.ParameterList(
            nn.Parameter(0.02 * torch.randn(2, kv_heads, length, head_dim, generator=generator).to(device))
            for _ in modules)
        object.__setattr__(self, "model", model)  # not a submodule: the state is the prefixes
        for module, prefix in zip(modules, self.prefixes):
            _PREFIX[module] = prefix
        register_prefix_sdpa()
        model.set_attn_implementation(PREFIX_SDPA)

    def forward(self, **batch):
        return self.model(**batch)


# ---- the literal supernet --------------------------------------------------------------------------
class LiteralSupernetAttention(nn.Module):
    """One layer of the literal supernet: the layer's attention module run once per candidate with
    that candidate's prefix, the outputs mixed by the candidates' weights. ``candidates(dtype)``
    gives (prompts (2, H_kv, sum lengths, D), lengths, weights), as PromptBank.block_prompts does."""

    def __init__(self, attention: nn.Module, candidates):
        super().__init__()
        self.attention = attention
        self.candidates = candidates

    def forward(self, hidden_states, *args, **kwargs):
        if kwargs.get("past_key_values", kwargs.get("cache")) is not None:  # each candidate's call would append to it
            raise ValueError("the literal supernet runs without a KV cache (use_cache=False)")
        prompts, lengths, weights = self.candidates(dtype=hidden_states.dtype)
        mixed, start = 0, 0
        for weight, n in zip(weights, lengths):
            _PREFIX[self.attention] = prompts[:, :, start:start + n]
            out, _ = self.attention(hidden_states, *args, **kwargs)
            mixed, start = mixed + weight * out, start + n
        _PREFIX.pop(self.attention, None)
        return mixed, None


def literal_supernet(model: nn.Module, search: FastDPLPrefix) -> nn.Module:
    """``model`` (a copy of the search's base model) with every attention module wrapped in a
    LiteralSupernetAttention reading the search's prompts and alpha for the same layer."""
    register_prefix_sdpa()
    model.set_attn_implementation(PREFIX_SDPA)
    for layer, (name, attention) in enumerate(hf_lm.attention_modules(model)):
        parent, _, child = name.rpartition(".")
        candidates = functools.partial(search.bank.block_prompts, hf_lm.STACK, layer)
        setattr(model.get_submodule(parent), child, LiteralSupernetAttention(attention, candidates))
    return model


# ---- the providers ---------------------------------------------------------------------------------
def peft_single_path(model: nn.Module, length: int):
    """(PeftModel, its trainable parameters): PEFT prefix tuning with ``length`` virtual tokens."""
    import peft

    wrapped = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    return wrapped, [p for p in wrapped.parameters() if p.requires_grad]


def single_path_peer(model: nn.Module, length: int, choice: str):
    """(forward, parameters, peer label) of the single path: PEFT ("peft"; "auto" when it imports
    and builds) or PrefixSDPA ("sdpa"; "auto" otherwise, the reason in the label)."""
    if choice not in SINGLE_PATHS:
        raise ValueError(f"single_path must be one of {SINGLE_PATHS}, got {choice!r}")
    reason = ""
    if choice != "sdpa":
        try:
            wrapped, params = peft_single_path(model, length)
            return wrapped, params, f"peft {importlib.metadata.version('peft')}"
        except Exception as exc:  # noqa: BLE001 - "auto" falls back, and says why
            if choice == "peft":
                raise
            reason = f" (peft: {type(exc).__name__})"
    fallback = PrefixSDPA(model, length)
    return fallback, list(fallback.parameters()), "prefix-sdpa" + reason


def _step(forward, params):
    """ids -> gradients of the causal-LM loss over every token with respect to ``params``."""
    def step(ids):
        loss = forward(input_ids=ids, labels=ids).loss
        return torch.autograd.grad(loss, params)
    return step


def providers(model: nn.Module, shape: LMShape, impl: str, names=PROVIDERS, single_path: str = "auto"):
    """({provider: (forward, parameters)}, {provider: peer label}) over copies of ``model``, each
    frozen: the single path and the literal get their own copy (their attention implementations
    differ), the search wraps ``model`` itself, and the literal reads the search's prompts and alpha."""
    found, peers = {}, {}
    if "single_path" in names:
        forward, params, peers["single_path"] = single_path_peer(copy.deepcopy(model), max(shape.lengths), single_path)
        found["single_path"] = (forward, params)
    literal_model = copy.deepcopy(model) if "literal" in names else None
    search = FastDPLPrefix(model, candidate_lengths=shape.lengths, impl=impl)
    search_params = search.prompt_parameters() + search.arch_parameters()
    if "search" in names:
        found["search"], peers["search"] = (search, search_params), f"fastdpl {impl}"
    if "search_compiled" in names and shape.compiled:
        found["search_compiled"] = (torch.compile(search, backend=shape.compiled), search_params)
        peers["search_compiled"] = f"compile {shape.compiled}"
    if literal_model is not None:
        found["literal"], peers["literal"] = (literal_supernet(literal_model, search), search_params), "per-candidate"
    return {n: found[n] for n in PROVIDERS if n in found}, peers


def token_batches(shape: LMShape, device, count: int = 2) -> list:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape.model.vocab, (shape.batch, shape.seq), generator=gen).to(device)
            for _ in range(count)]


def make_calls(shape: LMShape, device, dtype, impl, names=PROVIDERS, single_path="auto"):
    """({provider: call(i)}: one step on token batch i (two rotate), {provider: peer label})."""
    found, peers = providers(build_model(shape.model, device, dtype), shape, impl, names, single_path)
    batches = token_batches(shape, device)
    return {name: functools.partial(lambda step, i: step(batches[i % len(batches)]), _step(*pair))
            for name, pair in found.items()}, peers


def bench_shape(shape: LMShape, device, dtype, impl, repeats, warmup, names=PROVIDERS, single_path="auto"):
    calls, peers = make_calls(shape, device, dtype, impl, names, single_path)
    rows = time_calls(shape.name, calls, device, repeats, warmup)
    for r in rows:
        r["peer"] = peers[r["provider"]]
    step_ratios(rows)
    add_ratios(rows, "search", "vs_search", only=lambda name: name == "search_compiled")
    del calls
    release(device)  # the next shape's three 1B models should not sit beside this one's
    return rows


def format_table(rows) -> str:
    return table(rows, [("shape", 15), ("provider", 15), ("peer", 17)], STEP_COLUMNS + COMPILED_COLUMNS)


def describe(shape: LMShape) -> str:
    m = shape.model
    return (f"LlamaForCausalLM {m.layers} layers, hidden {m.hidden}, {m.heads} heads / {m.kv_heads} kv heads, "
            f"head dim {m.head_dim}, vocab {m.vocab}; batch {shape.batch} x {shape.seq} tokens, "
            f"lengths {list(shape.lengths)}")


SUITE = Suite("lm", GPU_SHAPES, CPU_SHAPES, SMOKE_SHAPES, bench_shape, format_table, describe, "vs_single_path",
              "time / single-path step (x)", repeats=(10, 5, 2), gpu_dtype=torch.bfloat16)

run = functools.partial(run_suite, SUITE)  # run(device=..., smoke=..., out=...) -> result dict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpl bench lm", description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, default_out="bench-out/lm.json")
    add_step_arguments(parser, PROVIDERS)
    parser.add_argument("--single-path", default="auto", choices=SINGLE_PATHS,
                        help="the single-path peer: PEFT prefix tuning, fastdpl's prefix SDPA, or PEFT when it builds")
    args = parser.parse_args(argv)
    run_step_suite(SUITE, parser, args, names=provider_names(parser, args.providers, PROVIDERS),
                   single_path=args.single_path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
