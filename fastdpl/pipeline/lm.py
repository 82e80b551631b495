"""The language-model protocol: DPL's search of per-layer prefix lengths, the train stage of a
configuration, evaluation (``fastdpl lm search|train|eval``), on the one training loop.

Folder of a run (``--output``): ``search/`` (checkpoint.pt, prefixes.pt, config.json,
prompt_config.json, alpha_history.json, alpha_heatmap.png, results.json), ``train/``
(checkpoint.pt, prefixes.pt, config.json, results.json), ``eval/`` (results.json); each
training stage also writes run.yaml, log.txt, metrics.jsonl and TensorBoard events.

Metrics (evaluation.py's counterpart for text): the loss on the completion tokens (their
mean cross-entropy) and its perplexity exp(loss); for classification the accuracy of scoring
every label's verbalizer (the sum of its tokens' log-probabilities after the prompt, argmax);
for generation the exact match of greedy decoding (stripped text) with the completion.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..atomic import write_text_atomic
from ..config import PromptConfig
from ..data.text import CLASSIFICATION, TextDataError, TextTask, TokenExamples, collate, encode_task
from ..lm import FastDPLPrefix
from .lm_config import LMConfig
from .loaders import EpochBatches, StepBatches, cycle_batches
from .logs import alpha_entropy, bar
from .runtime import Dist, autocast, barrier, init_distributed, pick_device, seed_everything, training_net
from .training import NEXT_TOKEN, Training, fit, to_device

STACK = "decoder"


@dataclass
class LMJob:
    cfg: LMConfig
    ranks: Dist
    device: str
    model: nn.Module
    tokenizer: object
    max_length: int

    def out(self, stage: str) -> Path:
        path = Path(self.cfg.output) / stage
        if self.ranks.main:
            path.mkdir(parents=True, exist_ok=True)
        return path

    def task(self, split: str, required: str | None = None) -> TextTask | None:
        """The split's rows as token ids; None when not given, unless ``required`` says why it is."""
        path = getattr(self.cfg, split)
        if path is None:
            if required:
                raise ValueError(f"--{split} is required: {required}")
            return None
        return encode_task(path, self.tokenizer, max_length=self.max_length, template=self.cfg.template,
                           verbalizers=self.cfg.verbalizers)


# ---- the model folder ---------------------------------------------------------------------------
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def model_folder(name: str | None) -> Path:
    """The local folder of --model (tiny: the built-in tiny LM), checked before transformers reads it."""
    if name is None:
        raise ValueError("--model is required: a local Hugging Face causal-LM folder, or tiny")
    if name in ("tiny", "builtin:tiny"):
        from ..text_synthetic import tiny_lm_folder

        return tiny_lm_folder()
    folder = Path(name)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model {name}: no such folder (fastdpl lm reads local folders only, never "
                                "downloads: save the model with save_pretrained, or tiny)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"--model {folder}: no config.json (not a Hugging Face model folder)")
    if not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ValueError(f"--model {folder}: no weights (model*.safetensors or pytorch_model*.bin)")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ValueError(f"--model {folder}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                         "tokenizer into the model folder")
    return folder


def load_tokenizer(folder: Path, pad_token: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.pad_token_id is None:
        if pad_token is None:
            raise ValueError(f"the tokenizer of {folder} has no pad token: pass --pad-token eos (its end-of-sequence "
                             "token; padding is masked, so any token will do) or --pad-token TOKEN")
        token = tokenizer.eos_token if pad_token == "eos" else pad_token
        if token is None or tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
            raise ValueError(f"--pad-token {pad_token}: the tokenizer of {folder} has no such token")
        tokenizer.pad_token = token
    return tokenizer


def load_causal_lm(folder: Path, dtype: str, device: str, progress: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    if not progress:
        logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=getattr(torch, dtype))
    return model.to(device).eval()


def prepare(cfg: LMConfig) -> LMJob:
    device = pick_device(cfg.device)
    ranks = init_distributed(device)
    seed_everything(cfg.seed)
    folder = model_folder(cfg.model)
    tokenizer = load_tokenizer(folder, cfg.pad_token)
    model = load_causal_lm(folder, cfg.model_dtype, device, cfg.progress)
    if cfg.shard:
        shard_frozen(model, ranks)
    max_length = cfg.max_length or getattr(model.config, "max_position_embeddings", None)
    if not max_length:
        raise ValueError(f"--model {folder}: its config has no max_position_embeddings; pass --max-length")
    return LMJob(cfg, ranks, device, model, tokenizer, int(max_length))


# ---- batches ------------------------------------------------------------------------------------
def _pad_id(job: LMJob) -> int:
    return job.tokenizer.pad_token_id


def training_loader(job: LMJob, task: TextTask, steps: int):
    cfg = job.cfg
    sampler = StepBatches(len(task.examples), cfg.batch_size * cfg.accumulate, cfg.seed, job.ranks, steps,
                          cfg.checkpoint_every)
    return torch.utils.data.DataLoader(TokenExamples(task.examples), batch_sampler=sampler,
                                       collate_fn=lambda rows: collate(rows, _pad_id(job)))


def validation_loader(job: LMJob, task: TextTask):
    sampler = EpochBatches(len(task.examples), job.cfg.val_batch_size, job.cfg.seed + 1, job.ranks, shuffle=True,
                           drop_last=True)
    return torch.utils.data.DataLoader(TokenExamples(task.examples), batch_sampler=sampler,
                                       collate_fn=lambda rows: collate(rows, _pad_id(job)))


def step_schedule(optimizer, cfg: LMConfig, steps: int):
    """Linear warm-up over warmup_steps, then cosine to 0 at ``steps`` (a factor per optimiser step)."""
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(steps - cfg.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def shard_frozen(model: nn.Module, ranks: Dist) -> None:
    """FSDP2 over the frozen weights: each decoder layer (the model's ``_no_split_modules``
    classes) and then the rest are ``fully_shard``-ed across the processes, so each holds 1/W of
    them and gathers a layer's only while it runs. The prefixes and alpha are not the model's
    parameters: they stay replicated, and DDP averages their gradients (``runtime.training_net``)."""
    from torch.distributed.fsdp import fully_shard

    if not ranks.enabled:
        raise ValueError("--shard needs several processes: run under torchrun --nproc_per_node N")
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"--shard: {type(model).__name__} names no decoder-layer class (_no_split_modules)")
    total = sum(p.numel() for p in model.parameters())
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    if ranks.main:
        print(f"frozen weights sharded with FSDP2 over {ranks.world} processes: {local} of {total} per process")


def prefix_training(job: LMJob, dpl: FastDPLPrefix, optimizers: dict, task: TextTask, steps: int, **extra) -> Training:
    loader = training_loader(job, task, steps)
    record = extra.pop("record", None)
    return Training(dpl, training_net(dpl, job), optimizers, step_schedule(optimizers["prompt"], job.cfg, steps),
                    loader.batch_sampler.rounds, objective=NEXT_TOKEN, loader=loader, schedule_per_step=True,
                    micro_batches=job.cfg.accumulate, unit="tok",
                    record=lambda: {"step": loader.batch_sampler.steps_done(), **(record() if record else {})},
                    **extra)


def prompt_optimizer(dpl: FastDPLPrefix, cfg: LMConfig):
    return torch.optim.AdamW(dpl.prompt_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


# ---- stages -------------------------------------------------------------------------------------
def run_search(cfg: LMConfig) -> dict:
    """Adam steps on alpha (validation batches) alternate with AdamW steps on every candidate's
    prefixes (training batches); the argmax of alpha per layer is the configuration."""
    job = prepare(cfg)
    out = job.out("search")
    train, val = job.task("train", "the prefixes' batches"), job.task("val", "alpha's batches in the search")
    dpl = FastDPLPrefix(job.model, mode="search", candidate_lengths=cfg.candidate_lengths, impl=cfg.impl,
                        generator=torch.Generator().manual_seed(cfg.seed))
    try:
        arch = torch.optim.Adam(dpl.arch_parameters(), lr=cfg.arch_lr, betas=tuple(cfg.arch_betas))
        val_loader = validation_loader(job, val)
        snapshot = lambda: {"alpha_entropy": alpha_entropy(dpl.arch_logits),  # noqa: E731
                            "alpha": {STACK: torch.softmax(dpl.arch_logits[STACK].detach().float(), -1).tolist()}}
        training = prefix_training(
            job, dpl, {"arch": arch, "prompt": prompt_optimizer(dpl, cfg)}, train, cfg.search_steps,
            validation=lambda epoch: cycle_batches(val_loader, epoch), record=snapshot,
            after_epoch=lambda history: write_text_atomic(out / "alpha_history.json", json.dumps(history)))
        history = fit(job, out, "search", training)
        config = dpl.derive_config()
        result = {**_result_header(job, "search", "dpl-supernet"), "own": Path(cfg.val).name, "config": config.to_dict(),
                  "steps": cfg.search_steps, **evaluate(job, dpl, val, "val")}
        if job.ranks.main:
            from .plots import plot_alpha_heatmap

            dpl.save(out)
            config.save(out / "prompt_config.json")
            plot_alpha_heatmap(dpl, out / "alpha_heatmap.png")
            write_text_atomic(out / "results.json", json.dumps({**result, "history": history}, indent=1))
            print(f"derived configuration ({out / 'prompt_config.json'}):\n{config}")
        barrier(job.ranks)
        return result
    finally:
        dpl.detach()


def resolve_prompt_config(job: LMJob, layers: int) -> tuple[PromptConfig, str]:
    """(configuration, method name) of --prompt-config: zero, uniform:N, a JSON file, or the search's."""
    spec = job.cfg.prompt_config
    if spec in ("zero", "zero_shot", "base"):
        return PromptConfig({STACK: (0,) * layers}, stacks=(STACK,)), "base"
    if spec and spec.startswith("uniform:"):
        length = spec.split(":", 1)[1]
        if not length.isdigit():
            raise ValueError(f"--prompt-config {spec}: expected uniform:LENGTH, e.g. uniform:16")
        return PromptConfig({STACK: (int(length),) * layers}, stacks=(STACK,)), f"uniform:{int(length)}"
    path = Path(spec) if spec else Path(job.cfg.output) / "search" / "prompt_config.json"
    if not path.is_file():
        hint = "" if spec else " (the search stage's: run `fastdpl lm search` first, or pass --prompt-config)"
        raise FileNotFoundError(f"--prompt-config: no such file {path}{hint}")
    return PromptConfig.load(path), "dpl"


def run_train(cfg: LMConfig) -> dict:
    """Fresh prefixes of a fixed configuration trained on the training batches, then evaluated."""
    job = prepare(cfg)
    out = job.out("train")
    from ..adapters import hf_lm

    layers = len(hf_lm.prefix_sites(job.model)[1])
    config, method = resolve_prompt_config(job, layers)
    dpl = FastDPLPrefix(job.model, mode="fixed", config=config, impl=cfg.impl,
                        generator=torch.Generator().manual_seed(cfg.seed))
    try:
        history = []
        if dpl.prompt_parameters():  # the base model (every length 0) has nothing to train
            train = job.task("train", "the prefixes' batches")
            history = fit(job, out, "train", prefix_training(job, dpl, {"prompt": prompt_optimizer(dpl, cfg)}, train,
                                                             cfg.train_steps))
        return _evaluate_and_write(job, dpl, out, "train", method, config, history)
    finally:
        dpl.detach()


def run_eval(cfg: LMConfig, prefixes: str | None = None) -> dict:
    """Saved prefixes (a folder FastDPLPrefix.save wrote; default: the train stage's; none: the
    base model) on the test data."""
    job = prepare(cfg)
    out = job.out("eval")
    folder = Path(prefixes) if prefixes not in (None, "none") else Path(cfg.output) / "train"
    if prefixes == "none":
        from ..adapters import hf_lm

        config = PromptConfig({STACK: (0,) * len(hf_lm.prefix_sites(job.model)[1])}, stacks=(STACK,))
        dpl, method = FastDPLPrefix(job.model, mode="fixed", config=config, impl=cfg.impl), "base"
    else:
        dpl, method = FastDPLPrefix.load(job.model, folder, impl=cfg.impl), f"prefixes:{folder}"
    try:
        return _evaluate_and_write(job, dpl, out, "eval", method, dpl.derive_config(), [])
    finally:
        dpl.detach()


def _result_header(job: LMJob, stage: str, method: str) -> dict:
    cfg = job.cfg
    return {"protocol": "lm", "stage": stage, "method": method, "model": cfg.model, "pretrained": None,
            "dataset": Path(cfg.train).name if cfg.train else None, "shots": None, "subsample": "all",
            "seed": cfg.seed, "settings": cfg.to_dict()}


def results_file(out: Path, stage: str, method: str, test: str) -> Path:
    """The train stage's ``results.json``; ``results-<prefixes>-<test>.json`` for each evaluation,
    so that evaluations of other prefixes or test files keep their own files."""
    if stage == "train":
        return out / "results.json"
    return out / f"results-{re.sub(r'[^A-Za-z0-9.]+', '_', method).strip('_')}-{Path(test).stem}.json"


def _evaluate_and_write(job, dpl, out: Path, stage: str, method: str, config: PromptConfig, history) -> dict:
    test = job.task("test", "the data the stage is evaluated on")
    saved = results_file(out, stage, method, job.cfg.test)
    if saved.is_file():  # never overwrite an earlier result silently
        if not job.cfg.resume:
            raise FileExistsError(f"{saved} exists (an earlier {stage} result): pass --resume to keep it, or choose "
                                  "another --output")
        print(f"keeping {saved} (--resume)")
        return {k: v for k, v in json.loads(saved.read_text()).items() if k != "history"}
    result = {**_result_header(job, stage, method), "config": config.to_dict(), "own": Path(job.cfg.test).name,
              **evaluate(job, dpl, test, "test")}
    if job.ranks.main:
        if stage == "train":
            dpl.save(out)
        write_text_atomic(saved, json.dumps({**result, "history": history}, indent=1))
        print(results_line(result))
    barrier(job.ranks)
    return result


def results_line(result: dict) -> str:
    shown = [f"loss {result['loss']:.4f}", f"perplexity {result['perplexity']:.3g}"]
    for name in ("accuracy", "exact_match"):
        if name in result:
            shown.append(f"{name.replace('_', ' ')} {100 * result[name]:.2f}%")
    return f"{result['stage']} ({result['method']}) on {result.get('own') or 'val'}: " + ", ".join(shown)


# ---- evaluation ---------------------------------------------------------------------------------
def _batches(job: LMJob, items: list, desc: str):
    size = job.cfg.eval_batch_size
    chunks = [items[i:i + size] for i in range(0, len(items), size)]
    return bar(chunks, job.cfg.progress and job.ranks.main, desc=desc, leave=False)


@torch.no_grad()
def evaluate(job: LMJob, dpl: FastDPLPrefix, task: TextTask, name: str) -> dict:
    """Loss and perplexity on the completions; accuracy (classification) or exact match."""
    was_training = dpl.training
    dpl.eval()
    try:
        loss = completion_loss(job, dpl, task, name)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "examples": len(task.examples)}
        if task.kind == CLASSIFICATION:
            metrics["accuracy"] = verbalizer_accuracy(job, dpl, task, name)
        else:
            metrics["exact_match"] = exact_match(job, dpl, task, name)
        return metrics
    finally:
        dpl.train(was_training)


def _token_log_probs(job, dpl, examples):
    """(B, L-1) log p(token t+1 | tokens <= t) on the completion tokens, 0 elsewhere; and the mask."""
    inputs, labels = to_device(collate(examples, _pad_id(job)), job.device)
    with autocast(job.device, job.cfg.precision):
        logits = dpl(**inputs).logits
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    counted = labels != -100
    picked = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    return picked * counted, counted


def completion_loss(job, dpl, task: TextTask, name: str) -> float:
    total, count = 0.0, 0
    for chunk in _batches(job, task.examples, f"{name} loss"):
        log_probs, counted = _token_log_probs(job, dpl, chunk)
        total -= float(log_probs.sum())
        count += int(counted.sum())
    return total / max(count, 1)


def verbalizer_accuracy(job, dpl, task: TextTask, name: str) -> float:
    """Share of examples whose label's verbalizer has the highest summed log-probability."""
    from ..data.text import TextExample

    correct = 0
    for chunk in _batches(job, task.examples, f"{name} accuracy"):
        scores = []
        for label in task.labels:
            candidates = [TextExample(e.prompt, task.verbalizers[label], label, e.where) for e in chunk]
            scores.append(_token_log_probs(job, dpl, candidates)[0].sum(-1))
        predicted = torch.stack(scores, -1).argmax(-1).tolist()
        correct += sum(task.labels[p] == e.target for p, e in zip(predicted, chunk))
    return correct / len(task.examples)


def exact_match(job, dpl, task: TextTask, name: str) -> float:
    """Greedy decoding of each prompt (left-padded batches) against the completion, stripped."""
    longest = max(len(e.completion) for e in task.examples)
    new_tokens = job.cfg.max_new_tokens or longest + 1
    tokenizer, hits = job.tokenizer, 0
    for chunk in _batches(job, task.examples, f"{name} exact match"):
        width = max(len(e.prompt) for e in chunk)
        ids = torch.full((len(chunk), width), _pad_id(job), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(chunk):
            ids[row, width - len(e.prompt):] = torch.tensor(e.prompt)
            mask[row, width - len(e.prompt):] = 1
        with autocast(job.device, job.cfg.precision):
            generated = dpl.generate(input_ids=ids.to(job.device), attention_mask=mask.to(job.device),
                                     max_new_tokens=new_tokens, do_sample=False, pad_token_id=_pad_id(job))
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        hits += sum(text.strip() == e.target.strip() for text, e in zip(texts, chunk))
    return hits / len(task.examples)


__all__ = ["LMJob", "TextDataError", "evaluate", "prepare", "run_eval", "run_search", "run_train"]
