"""Settings of the language-model protocol (``fastdpl lm search|train|eval``).

Precedence as for CLIP: defaults < ``--config run.yaml`` < flags (``--search-steps 300``,
``--candidate-lengths 0,4,8``). Schedules count optimiser steps, as language-model fine-tuning
does: a linear warm-up over ``warmup_steps``, then cosine to zero; each optimiser step takes
``batch_size`` x ``accumulate`` sequences per process (``accumulate`` micro-batches of
``batch_size``, gradients summed with each micro-batch weighted by its completion tokens, so
that the step equals one batch of them all). A checkpoint is written every
``checkpoint_every`` steps and at the end; ``--resume`` continues exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from .config import COMPILE_RESUMABLE, COMPILE_SETTINGS, PRECISIONS, Schema, load_yaml
from .runtime import check_compile_backend

LM_STAGES = ("search", "train", "eval")
_ALL, _TRAINING = LM_STAGES, ("search", "train")
MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class LMConfig:
    # data
    train: str | None = None
    val: str | None = None
    test: str | None = None
    template: str = "{text}"  # classification: the prompt made of a row's text
    verbalizers: str | None = None  # classification: label=words,label=words, or a JSON file {label: words}
    max_length: int | None = None  # tokens per sequence; default: the model's max_position_embeddings
    seed: int = 1
    # model
    model: str | None = None
    pad_token: str | None = None  # for a tokenizer without one: "eos" or a token of its vocabulary
    model_dtype: str = "float32"
    shard: bool = False  # under torchrun: the frozen weights sharded with FSDP2 (fully_shard)
    impl: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False  # torch.compile the module the training stages call (runtime.compiled)
    compile_backend: str = "inductor"
    # search
    candidate_lengths: list = field(default_factory=lambda: [0, 4, 8, 16, 32, 64])
    search_steps: int = 500
    arch_lr: float = 3.5e-3
    arch_betas: list = field(default_factory=lambda: [0.5, 0.999])
    val_batch_size: int = 8
    # both training stages
    batch_size: int = 8
    accumulate: int = 1
    lr: float = 1e-2
    weight_decay: float = 0.0
    warmup_steps: int = 20
    grad_clip: float | None = 1.0
    checkpoint_every: int = 100
    # train
    train_steps: int = 500
    prompt_config: str | None = None  # a PromptConfig JSON, uniform:LENGTH, zero (the base model); default: search's
    # evaluation
    eval_batch_size: int = 16
    max_new_tokens: int | None = None  # exact match: default the longest test completion + 1
    # bookkeeping
    output: str = "runs/lm"
    resume: bool = False
    progress: bool = True

    def validate(self) -> "LMConfig":
        for name in ("search_steps", "train_steps", "batch_size", "accumulate", "val_batch_size", "eval_batch_size",
                     "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_length", "max_new_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or none, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if "{text}" not in self.template:
            raise ValueError(f"template must contain {{text}} (where a row's text goes), got {self.template!r}")
        for name, (_, _, _, allowed) in LM_SETTINGS.items():
            value = getattr(self, name)
            if allowed and isinstance(value, str) and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.compile:
            check_compile_backend(self.compile_backend)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# name: (group, stages that use it, one-line description, allowed values or None)
LM_SETTINGS = {
    "train": ("data", _TRAINING, "training data: a .jsonl (prompt/completion, or chat messages), a .csv "
              "(text,label: classification) or a `datasets` folder (save_to_disk)", None),
    "val": ("data", _ALL, "validation data, same formats (alpha's batches in the search; held-out loss)", None),
    "test": ("data", _ALL, "test data, same formats (loss, perplexity, accuracy or exact match)", None),
    "template": ("data", _ALL, "classification: the prompt of a row, with {text} for its text", None),
    "verbalizers": ("data", _ALL, "classification: each label's words, as label=words,label=words or a JSON "
                    "file {label: words}; the words are the completion scored and trained on", None),
    "max_length": ("data", _ALL, "longest sequence in tokens (default: the model's max_position_embeddings)", None),
    "seed": ("data", _ALL, "seed of the batch order and the prefixes' init", None),
    "model": ("model", _ALL, "a local Hugging Face causal-LM folder (config, weights, tokenizer), or tiny "
              "(the built-in tiny LM)", None),
    "pad_token": ("model", _ALL, "pad token for a tokenizer without one: eos, or a token it knows", None),
    "model_dtype": ("model", _ALL, "dtype of the frozen weights", MODEL_DTYPES),
    "shard": ("model", _ALL, "under torchrun, shard the frozen weights across the processes with FSDP2 "
              "(fully_shard per decoder layer; prefixes and alpha stay replicated): for a model that does not fit "
              "one GPU", ("true", "false")),
    "impl": ("model", _ALL, "attention engine (does not change results beyond rounding)",
             ("auto", "eager", "triton", "reference")),
    "device": ("model", _ALL, "device (auto: cuda when available)", None),
    "precision": ("model", _ALL, "fp32, or bf16 autocast", PRECISIONS),
    **COMPILE_SETTINGS,
    "candidate_lengths": ("search", ("search",), "prefix lengths every layer chooses from, as 0,4,8,...", None),
    "search_steps": ("search", ("search",), "optimiser steps of the search", None),
    "arch_lr": ("search", ("search",), "Adam learning rate of alpha (on validation batches)", None),
    "arch_betas": ("search", ("search",), "Adam betas of alpha, as B1,B2", None),
    "val_batch_size": ("search", ("search",), "sequences per alpha step, per process", None),
    "batch_size": ("training", _TRAINING, "sequences per micro-batch, per process", None),
    "accumulate": ("training", _TRAINING, "micro-batches per optimiser step (gradient accumulation)", None),
    "lr": ("training", _TRAINING, "AdamW learning rate of the prefixes (warm-up, then cosine)", None),
    "weight_decay": ("training", _TRAINING, "AdamW weight decay of the prefixes", None),
    "warmup_steps": ("training", _TRAINING, "steps of linear warm-up", None),
    "grad_clip": ("training", _TRAINING, "max gradient norm per step; none: no clipping", None),
    "checkpoint_every": ("training", _TRAINING, "steps between checkpoints (and log lines)", None),
    "train_steps": ("training", ("train",), "optimiser steps of the train stage", None),
    "prompt_config": ("training", ("train",), "configuration: a PromptConfig JSON, uniform:LENGTH (every layer), "
                      "zero (the base model); default: the search stage's", None),
    "eval_batch_size": ("evaluation", _ALL, "sequences per evaluation batch", None),
    "max_new_tokens": ("evaluation", _ALL, "exact match: tokens generated (default: longest completion + 1)", None),
    "output": ("bookkeeping", _ALL, "run folder (each stage writes its own subfolder)", None),
    "resume": ("bookkeeping", _ALL, "continue from the stage's checkpoint (a bare flag: true)", ("true", "false")),
    "progress": ("bookkeeping", _ALL, "progress bars (log lines print either way)", ("true", "false")),
}
assert set(LM_SETTINGS) == {f.name for f in dataclasses.fields(LMConfig)}, "every LM setting needs an entry"
LMConfig.SCHEMA = Schema(LMConfig, LM_SETTINGS, frozenset({"progress", "resume", "device", "impl", "output", "shard",
                                                           "eval_batch_size", "max_new_tokens", "test"}
                                                          | COMPILE_RESUMABLE))


def resolve_lm_config(args: argparse.Namespace, **overrides) -> LMConfig:
    """Defaults, then the YAML file (--config), then flags given, then ``overrides``."""
    values = load_yaml(args.config, LMConfig) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in dataclasses.fields(LMConfig) if hasattr(args, f.name)})
    values.update(overrides)
    return LMConfig(**values).validate()
