"""One training loop for every method and model: DPL's search (with its alpha steps on
validation batches), DPL's train stage, uniform deep prompts, CoOp and CoCoOp; any batch, any loss.

``fit`` runs the epochs of a ``Training`` (the method's module, the module called on the
inputs, the optimisers and the schedule): progress bars, per-epoch history and logs,
atomic checkpoints every epoch, and exact resume (``--resume``) refusing changed settings.
What differs between methods is only what the Training holds.

A batch is ``(inputs, targets)``: images and labels for a CLIP, a dict of token ids and masks
and the token labels for a language model; tensors, or dicts/tuples of them. The Training's
``objective`` turns a batch into predictions, a loss and the progress bar's tally
(``Classification``, cross-entropy on the logits, by default); its ``regularizers`` add terms
computed from a ``Step``: the batch, the prompted model's predictions and, when a regulariser
asks, its features (``net(inputs, return_features=True)``) and the frozen model's outputs on the
same inputs (``Training.frozen``), each computed at most once per step.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..atomic import save_atomic
from ..profiling import nvtx_range
from .config import changed_settings, save_yaml
from .loaders import make_loader
from .logs import RunLog, bar
from .runtime import Dist, autocast, barrier, compile_counts, compile_report, rng_state, set_rng_state


def lr_factor(epoch: int, cfg, epochs: int) -> float:
    """The learning rate of ``epoch`` over lr. ``cfg.schedule`` "cosine" (Dassl's, CoOp's and the
    authors'): a constant warm-up at warmup_lr for the first warmup_epochs, then cosine from lr
    over ``epochs``; "vpt" (VPT's WarmupCosineSchedule, stepped per epoch): linear from 0 over the
    warm-up epochs, then cosine to 0 over the remaining ``epochs - warmup_epochs``."""
    warmup = cfg.warmup_epochs
    if getattr(cfg, "schedule", "cosine") == "vpt":
        if epoch < warmup:
            return epoch / max(1, warmup)
        return max(0.0, 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / max(1, epochs - warmup))))
    if epoch < warmup:
        return cfg.warmup_lr / cfg.lr
    return 0.5 * (1 + math.cos(math.pi * (epoch - warmup) / epochs))


class Meter:
    """Running loss, accuracy and throughput for a progress bar.

    Sums stay on the device; the host reads them (a sync) only every ``refresh`` steps
    and at the end of the epoch, not after every step.
    """

    def __init__(self, refresh: int = 10, unit: str = "img"):
        self.loss = self.correct = 0.0
        self.seen = self.steps = 0
        self.refresh, self.unit = refresh, unit  # unit: what ``count`` counts (images, tokens)
        self.start = time.perf_counter()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One classification batch: (B, classes) logits against (B,) labels."""
        self.add(loss, (logits.argmax(1) == labels).sum(), len(labels))

    def add(self, loss: torch.Tensor, correct, count: int) -> None:
        """One batch of ``count`` items (images, tokens) of which ``correct`` were predicted right."""
        self.loss = self.loss + loss.detach().float() * count
        self.correct = self.correct + correct
        self.seen += int(count)
        self.steps += 1

    def summary(self) -> dict:
        """This process's running loss and accuracy (the progress bar's view)."""
        seen = max(self.seen, 1)
        return {"loss": float(self.loss) / seen, "accuracy": float(self.correct) / seen}

    def epoch_summary(self, ranks: Dist) -> dict:
        """Loss and accuracy over the global batch: every rank's sums, all-reduced (collective)."""
        if not ranks.enabled:
            return self.summary()
        device = self.loss.device if isinstance(self.loss, torch.Tensor) else "cpu"
        sums = torch.tensor([float(self.loss), float(self.correct), float(self.seen)], dtype=torch.float64,
                            device=device)
        torch.distributed.all_reduce(sums)
        seen = max(sums[2].item(), 1.0)
        return {"loss": sums[0].item() / seen, "accuracy": sums[1].item() / seen}

    def show(self, bar, ranks: Dist, loss: bool = True) -> None:
        """Loss (training only), accuracy and images/s (all ranks) on the bar, every ``refresh``
        steps; the values shown are always those of the batches seen so far."""
        if bar.disable or (self.steps - 1) % self.refresh:  # steps 1, 1 + refresh, ...
            return
        summary = self.summary()
        shown = {"loss": f"{summary['loss']:.3f}"} if loss else {}
        bar.set_postfix({**shown, "acc": f"{100 * summary['accuracy']:.1f}",
                         f"{self.unit}/s": f"{self.seen * ranks.world / (time.perf_counter() - self.start):.1f}"})


def train_loader(job, samples, seed: int):
    cfg = job.cfg
    return make_loader(samples, job.image_size, cfg.batch_size, seed, job.ranks, True, cfg.workers,
                       crop_scale=cfg.crop_scale, flip=cfg.flip, stats=job.stats)


def progress(iterable, job, desc: str, total=None):
    """The stage's progress bar (main rank, --progress, a terminal: logs.bar)."""
    return bar(iterable, job.cfg.progress and job.ranks.main, desc=desc, total=total, leave=False, dynamic_ncols=True)


def to_device(x, device: str):
    """Tensors, or dicts / tuples / lists of them, on ``device`` (non-blocking)."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, dict):
        return {k: to_device(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def batch_size(targets) -> int:
    """The number of sequences of a batch (the first dimension of its targets)."""
    first = next(iter(targets.values())) if isinstance(targets, dict) else targets
    return len(first)


class Classification:
    """The default objective: ``net(inputs)`` gives (B, classes) logits; cross-entropy against the
    (B,) labels, in float32 whatever the autocast; the tally counts correct top-1 predictions."""

    def predict(self, net, inputs, features: bool = False):
        """Predictions, or (predictions, {name: features}) with ``features``."""
        return net(inputs, return_features=True) if features else net(inputs)

    def loss(self, predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(predictions.float(), targets)

    def tally(self, predictions: torch.Tensor, targets: torch.Tensor):
        """(correct, count) of one batch, for the progress bar and the epoch's accuracy."""
        return (predictions.argmax(-1) == targets).sum(), len(targets)

    def count(self, targets) -> int:
        """What the loss averages over (a micro-batch's weight in an accumulated step)."""
        return batch_size(targets)

    varying_counts = False  # every rank's share of a batch has the same size


CLASSIFICATION = Classification()


class NextToken:
    """A causal LM's objective: ``net(**inputs).logits`` (B, L, V) against token labels (B, L) that
    are -100 where no loss is taken; cross-entropy of token t+1 from position t, in float32,
    averaged over the labelled tokens; the tally counts correctly predicted labelled tokens."""

    def predict(self, net, inputs, features: bool = False):
        if features:
            raise ValueError("the next-token objective has no features for a regulariser")
        return net(**inputs).logits

    @staticmethod
    def _shifted(predictions, targets):
        return predictions[:, :-1].float(), targets[:, 1:]

    def loss(self, predictions, targets):
        logits, labels = self._shifted(predictions, targets)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def tally(self, predictions, targets):
        logits, labels = self._shifted(predictions, targets)
        counted = labels != -100
        return ((logits.argmax(-1) == labels) & counted).sum(), int(counted.sum())

    def count(self, targets) -> int:
        return int((targets[:, 1:] != -100).sum())

    varying_counts = True  # ranks and micro-batches hold different numbers of labelled tokens


NEXT_TOKEN = NextToken()


@dataclass
class Regularizer:
    """A term added to a step's loss: ``term(step)``. ``features``: it reads the prompted model's
    features (step.features); ``frozen``: it reads the frozen model's outputs (step.frozen())."""

    name: str
    term: Callable
    features: bool = False
    frozen: bool = False


class Step:
    """What a regulariser sees of one step: the batch (on the device), the prompted model's
    predictions and (when asked) features, and the frozen model's outputs on the same inputs,
    computed on first use only and without gradients."""

    def __init__(self, inputs, targets, predictions, features=None, frozen: Callable | None = None):
        self.inputs, self.targets, self.predictions, self.features = inputs, targets, predictions, features
        self._frozen_model, self._frozen = frozen, None

    def frozen(self):
        if self._frozen_model is None:
            raise ValueError("a regulariser asked for the frozen model's outputs, but the Training has no frozen=")
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self._frozen_model(self.inputs)
        return self._frozen


def step_loss(net, inputs, targets, objective=CLASSIFICATION, regularizers=(), frozen=None):
    """(loss, predictions) of one batch: the objective's loss plus every regulariser's term."""
    wants_features = any(r.features for r in regularizers)
    predicted = objective.predict(net, inputs, features=wants_features)
    predictions, features = predicted if wants_features else (predicted, None)
    loss = objective.loss(predictions, targets)
    if regularizers:
        step = Step(inputs, targets, predictions, features, frozen)
        for regularizer in regularizers:
            loss = loss + regularizer.term(step)
    return loss, predictions


def split_batch(x, parts: int) -> list:
    """A batch (tensors, or dicts/tuples/lists of them) as ``parts`` micro-batches along dim 0."""
    if isinstance(x, torch.Tensor):
        return list(torch.tensor_split(x, parts))
    if isinstance(x, dict):
        pieces = {k: split_batch(v, parts) for k, v in x.items()}
        return [{k: v[i] for k, v in pieces.items()} for i in range(parts)]
    if isinstance(x, (tuple, list)):
        pieces = [split_batch(v, parts) for v in x]
        return [type(x)(p[i] for p in pieces) for i in range(parts)]
    raise TypeError(f"cannot split a batch of {type(x).__name__}")


def loss_weights(objective, pieces_targets: list, job) -> list:
    """Each piece's loss weight, so that the summed (and, under DDP, rank-averaged) gradient is the
    global batch's mean: count_i * world / (sum of counts over pieces and ranks). Exactly 1 for a
    single piece of an objective whose ranks hold equal counts (no collective then)."""
    if len(pieces_targets) == 1 and not getattr(objective, "varying_counts", False):
        return [1.0]
    counts = [objective.count(t) for t in pieces_targets]
    total = torch.tensor(float(sum(counts)), dtype=torch.float64)
    if job.ranks.enabled:
        device = job.device if job.device.startswith("cuda") else "cpu"
        total = total.to(device)
        torch.distributed.all_reduce(total)
    return [c * job.ranks.world / max(float(total), 1.0) for c in counts]


def loss_step(net, optimizer, inputs, targets, job, objective=CLASSIFICATION, regularizers=(), frozen=None,
              micro_batches: int = 1):
    """One optimiser step on the objective's loss plus the regularisers; returns (loss, predictions).

    With ``micro_batches`` > 1 the batch runs in that many pieces (gradient accumulation), piece i's
    loss weighted by count_i / sum_j count_j (``objective.count``: its sequences, or its labelled
    tokens), so that the step's gradient is the whole batch's; DDP all-reduces once, on the last."""
    inputs, targets = to_device(inputs, job.device), to_device(targets, job.device)
    optimizer.zero_grad(set_to_none=True)
    pieces = list(zip(split_batch(inputs, micro_batches), split_batch(targets, micro_batches)))
    weights = loss_weights(objective, [t for _, t in pieces], job)
    losses, outputs = [], []  # each piece's own loss (its mean), for the meter
    for i, ((piece_inputs, piece_targets), weight) in enumerate(zip(pieces, weights)):
        last = i == len(pieces) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with nvtx_range("fastdpl/pipeline/forward"), autocast(job.device, job.cfg.precision):
                loss, predictions = step_loss(net, piece_inputs, piece_targets, objective, regularizers, frozen)
            with nvtx_range("fastdpl/pipeline/backward"):
                (loss if weight == 1.0 else loss * weight).backward()
        losses.append(loss.detach())
        outputs.append(predictions.detach())
    loss = losses[0] if len(losses) == 1 else _mean_of_pieces(losses, weights)
    predictions = outputs[0] if len(outputs) == 1 else _concatenate(outputs)
    with nvtx_range("fastdpl/pipeline/optimizer"):
        if job.cfg.grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, job.cfg.grad_clip)
        optimizer.step()
    return loss, predictions


def _mean_of_pieces(losses: list, weights: list) -> torch.Tensor:
    """This rank's batch mean from its pieces' means (weights are proportional to their counts)."""
    return sum(l * w for l, w in zip(losses, weights)) / max(sum(weights), 1e-30)


def _concatenate(predictions: list) -> torch.Tensor:
    """Micro-batches' predictions as one batch (padded token logits have one width per batch)."""
    return torch.cat(predictions, 0)


def arch_step(net, optimizer, inputs, targets, job, objective=CLASSIFICATION) -> None:
    """One optimiser step on alpha alone (the objective's loss, no regulariser): gradients of
    alpha only, averaged over ranks by hand.

    ``loss.backward()`` would also compute every prompt gradient (and DDP would
    all-reduce them) only for the prompt step to discard them. ``autograd.grad``
    asks for alpha's gradients alone, so the prompt projections' backward never
    runs; DDP's hooks stay out of it (``no_sync``) and the few alpha values are
    averaged over ranks here, as DDP would have averaged them.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    inputs, targets = to_device(inputs, job.device), to_device(targets, job.device)
    no_sync = net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with no_sync:
        with nvtx_range("fastdpl/pipeline/forward"), autocast(job.device, job.cfg.precision):
            (weight,) = loss_weights(objective, [targets], job)
            loss = objective.loss(objective.predict(net, inputs), targets) * weight
        with nvtx_range("fastdpl/pipeline/backward"):
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    if job.ranks.enabled:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        grads = torch.split(flat / job.ranks.world, [g.numel() for g in grads])
    with nvtx_range("fastdpl/pipeline/optimizer"):
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)
        if job.cfg.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, job.cfg.grad_clip)
        optimizer.step()


# ---- the loop -----------------------------------------------------------------------------------------
@dataclass
class Training:
    """What one stage trains. ``module``: the method's module (its prompt_state_dict is what a
    checkpoint keeps); ``net``: what is called on the inputs (DDP or the class-sharded classifier
    around it); ``optimizers``: "prompt" steps on training batches, "arch" (DPL's search) on
    validation batches; ``scheduler``: the schedule of the prompt optimiser. A ``loader`` other
    than the default needs a ``batch_sampler`` with ``set_epoch`` (reshuffled per epoch, as the
    default's), so that a resumed run sees the batches an unbroken one would."""

    module: nn.Module
    net: nn.Module
    optimizers: dict
    scheduler: object
    epochs: int
    regularizers: tuple = ()  # Regularizer terms added to the prompt steps' loss (distillation, ...)
    frozen: Callable | None = None  # inputs -> the frozen model's outputs, for regularizers that ask
    objective: object = CLASSIFICATION  # batch -> predictions, loss, tally
    loader: object = None  # the training batches; default: the job's few-shot images (train_loader)
    validation: Callable | None = None  # epoch -> iterator of validation batches for the arch steps
    record: Callable | None = None  # () -> extra per-epoch history entries (e.g. alpha)
    schedule_per_step: bool = False  # scheduler.step() after every optimiser step, not every epoch
    micro_batches: int = 1  # gradient accumulation: pieces of each training batch (loss_step)
    unit: str = "img"  # what the objective's tally counts, for the progress bar's throughput
    after_epoch: Callable | None = None  # history -> None (e.g. write alpha_history.json)
    # after each epoch add(epoch); apply() at the end; state_dict() in checkpoints (PromptSRC's GPA)
    aggregation: object = None


def fit(job, out: Path, stage: str, training: Training) -> list:
    """Train for ``training.epochs`` from the checkpoint in ``out`` (with --resume) or from scratch;
    returns the per-epoch history."""
    cfg = job.cfg
    start, history = _start_epoch(job, out, training)
    train = training.loader if training.loader is not None else train_loader(job, training_samples(job, stage),
                                                                            cfg.seed)
    objective = training.objective
    if job.ranks.main and start == 0:  # a resumed run keeps the record of what made its checkpoint
        save_yaml(cfg, out / "run.yaml")
    log = RunLog(out, stage, job.ranks.main, start)
    compiles = compile_counts() if getattr(cfg, "compile", False) else None  # for the stage's compile line
    training.module.train()
    for epoch in range(start, training.epochs):
        train.batch_sampler.set_epoch(epoch)
        validation = training.validation(epoch) if training.validation else None
        meter, lr = Meter(unit=training.unit), None  # lr: the prompts' at the epoch's first step (per-step schedules)
        bar = progress(train, job, f"{stage} {epoch + 1}/{training.epochs}")
        for inputs, targets in bar:
            if validation is not None:
                with nvtx_range("fastdpl/pipeline/data"):
                    val_inputs, val_targets = next(validation)
                arch_step(training.net, training.optimizers["arch"], val_inputs, val_targets, job,
                          objective=objective)  # alpha
            if training.schedule_per_step and lr is None:
                lr = training.scheduler.get_last_lr()[0]
            loss, predictions = loss_step(training.net, training.optimizers["prompt"], inputs, targets, job,
                                          objective, training.regularizers, training.frozen, training.micro_batches)
            meter.add(loss, *objective.tally(predictions, to_device(targets, job.device)))
            meter.show(bar, job.ranks)
            if training.schedule_per_step:
                training.scheduler.step()
        if not training.schedule_per_step:
            lr = training.scheduler.get_last_lr()[0]  # the prompts' lr during this epoch
            training.scheduler.step()
        history.append({"epoch": epoch + 1, **meter.epoch_summary(job.ranks), "lr": lr,
                        **(training.record() if training.record else {})})
        if training.aggregation is not None:
            training.aggregation.add(epoch + 1)
        _save_checkpoint(job, out, epoch + 1, training, history)
        if training.after_epoch and job.ranks.main:
            training.after_epoch(history)
        log.epoch(history)
    log.compile(compile_report(compiles, cfg))
    log.close()
    if training.aggregation is not None:  # the run's result is the aggregate (resumed runs too)
        training.aggregation.apply()
    return history


def training_samples(job, stage: str) -> list:
    """The images a stage trains on: the training split, or for the train stage the train and
    validation lists together where the layout names them (VTAB-1k's train800val200)."""
    return job.splits.final_train if stage == "train" else job.splits.train


def prompt_schedule(optimizer, cfg, epochs: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg, epochs))


# ---- checkpoints --------------------------------------------------------------------------------------
def checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.pt"


def _start_epoch(job, out: Path, training: Training) -> tuple[int, list]:
    """Resume from out/checkpoint.pt with --resume; refuse to overwrite a run's checkpoint without it."""
    path = checkpoint_path(out)
    if not path.is_file():
        return 0, []
    if not job.cfg.resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or choose another --output")
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = changed_settings(state.get("settings", {}), job.cfg, out.name)
    if changed:
        raise ValueError(f"--resume: {path} was made with other settings ({'; '.join(changed)}); resume with "
                         f"the settings in {out / 'run.yaml'}, or choose another --output")
    training.module.load_prompt_state_dict(state["prompts"])
    for name, optimizer in training.optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    training.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if training.aggregation is not None:
        training.aggregation.load_state_dict(state["aggregation"])
    if job.ranks.main:
        print(f"resuming {path} at epoch {state['epoch']}")
    return state["epoch"], state.get("history", [])


def _save_checkpoint(job, out: Path, epoch: int, training: Training, history) -> None:
    if job.ranks.main:
        save_atomic({"epoch": epoch, "prompts": training.module.prompt_state_dict(),
                     "optimizers": {k: o.state_dict() for k, o in training.optimizers.items()},
                     "scheduler": training.scheduler.state_dict(), "rng": rng_state(), "history": history,
                     "settings": job.cfg.to_dict(),
                     **({"aggregation": training.aggregation.state_dict()} if training.aggregation else {})},
                    checkpoint_path(out))
    barrier(job.ranks)
