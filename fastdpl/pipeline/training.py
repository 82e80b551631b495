"""One training loop for every method: DPL's search (with its alpha steps on validation
batches), DPL's train stage, uniform deep prompts, CoOp and CoCoOp.

``fit`` runs the epochs of a ``Training`` (the method's module, the module called on the
images, the optimisers and the schedule): progress bars, per-epoch history and logs,
atomic checkpoints every epoch, and exact resume (``--resume``) refusing changed settings.
What differs between methods is only what the Training holds.
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
from tqdm import tqdm

from ..atomic import save_atomic
from ..profiling import nvtx_range
from .config import changed_settings, save_yaml
from .loaders import make_loader
from .logs import RunLog
from .runtime import Dist, autocast, barrier, rng_state, set_rng_state


def lr_factor(epoch: int, cfg, epochs: int) -> float:
    """Constant warm-up (warmup_lr) for the first warmup_epochs, then cosine from lr over ``epochs`` (Dassl)."""
    if epoch < cfg.warmup_epochs:
        return cfg.warmup_lr / cfg.lr
    return 0.5 * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / epochs))


class Meter:
    """Running loss, accuracy and throughput for a progress bar.

    Sums stay on the device; the host reads them (a sync) only every ``refresh`` steps
    and at the end of the epoch, not after every step.
    """

    def __init__(self, refresh: int = 10):
        self.loss = self.correct = 0.0
        self.seen = self.steps = 0
        self.refresh = refresh
        self.start = time.perf_counter()

    def update(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss = self.loss + loss.detach().float() * len(labels)
        self.correct = self.correct + (logits.argmax(1) == labels).sum()
        self.seen += len(labels)
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
                         "img/s": f"{self.seen * ranks.world / (time.perf_counter() - self.start):.1f}"})


def train_loader(job, samples, seed: int):
    cfg = job.cfg
    return make_loader(samples, job.image_size, cfg.batch_size, seed, job.ranks, True, cfg.workers,
                       crop_scale=cfg.crop_scale, flip=cfg.flip)


def progress(iterable, job, desc: str, total=None):
    return tqdm(iterable, desc=desc, total=total, disable=not (job.cfg.progress and job.ranks.main),
                leave=False, dynamic_ncols=True)


def loss_step(net, optimizer, images, labels, job, extra_loss=None):
    """One optimiser step on cross-entropy (+ extra_loss(logits, images)); returns (loss, logits)."""
    images, labels = images.to(job.device, non_blocking=True), labels.to(job.device, non_blocking=True)
    with nvtx_range("fastdpl/pipeline/forward"), autocast(job.device, job.cfg.precision):
        logits = net(images)
        loss = F.cross_entropy(logits.float(), labels)
        if extra_loss is not None:
            loss = loss + extra_loss(logits.float(), images)
    with nvtx_range("fastdpl/pipeline/backward"):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    with nvtx_range("fastdpl/pipeline/optimizer"):
        if job.cfg.grad_clip is not None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, job.cfg.grad_clip)
        optimizer.step()
    return loss.detach(), logits.detach()


def arch_step(net, optimizer, images, labels, job) -> None:
    """One optimiser step on alpha alone: gradients of alpha only, averaged over ranks by hand.

    ``loss.backward()`` would also compute every prompt gradient (and DDP would
    all-reduce them) only for the prompt step to discard them. ``autograd.grad``
    asks for alpha's gradients alone, so the prompt projections' backward never
    runs; DDP's hooks stay out of it (``no_sync``) and the few alpha values are
    averaged over ranks here, as DDP would have averaged them.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    images, labels = images.to(job.device, non_blocking=True), labels.to(job.device, non_blocking=True)
    no_sync = net.no_sync() if isinstance(net, torch.nn.parallel.DistributedDataParallel) else contextlib.nullcontext()
    with no_sync:
        with nvtx_range("fastdpl/pipeline/forward"), autocast(job.device, job.cfg.precision):
            loss = F.cross_entropy(net(images).float(), labels)
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
    checkpoint keeps); ``net``: what is called on images (DDP or the class-sharded classifier
    around it); ``optimizers``: "prompt" steps on training batches, "arch" (DPL's search) on
    validation batches; ``scheduler``: the schedule of the prompt optimiser."""

    module: nn.Module
    net: nn.Module
    optimizers: dict
    scheduler: object
    epochs: int
    extra_loss: Callable | None = None  # (logits, images) -> an added loss term (distillation)
    validation: Callable | None = None  # epoch -> iterator of validation batches for the arch steps
    record: Callable | None = None  # () -> extra per-epoch history entries (e.g. alpha)
    after_epoch: Callable | None = None  # history -> None (e.g. write alpha_history.json)


def fit(job, out: Path, stage: str, training: Training) -> list:
    """Train for ``training.epochs`` from the checkpoint in ``out`` (with --resume) or from scratch;
    returns the per-epoch history."""
    cfg = job.cfg
    start, history = _start_epoch(job, out, training)
    train = train_loader(job, job.splits.train, cfg.seed)
    if job.ranks.main and start == 0:  # a resumed run keeps the record of what made its checkpoint
        save_yaml(cfg, out / "run.yaml")
    log = RunLog(out, stage, job.ranks.main, start)
    training.module.train()
    for epoch in range(start, training.epochs):
        train.batch_sampler.set_epoch(epoch)
        validation = training.validation(epoch) if training.validation else None
        meter = Meter()
        bar = progress(train, job, f"{stage} {epoch + 1}/{training.epochs}")
        for images, labels in bar:
            if validation is not None:
                with nvtx_range("fastdpl/pipeline/data"):
                    val_images, val_labels = next(validation)
                arch_step(training.net, training.optimizers["arch"], val_images, val_labels, job)  # alpha
            loss, logits = loss_step(training.net, training.optimizers["prompt"], images, labels, job,
                                     training.extra_loss)
            meter.update(loss, logits, labels.to(job.device))
            meter.show(bar, job.ranks)
        lr = training.scheduler.get_last_lr()[0]  # the prompts' lr during this epoch
        training.scheduler.step()
        history.append({"epoch": epoch + 1, **meter.epoch_summary(job.ranks), "lr": lr,
                        **(training.record() if training.record else {})})
        _save_checkpoint(job, out, epoch + 1, training, history)
        if training.after_epoch and job.ranks.main:
            training.after_epoch(history)
        log.epoch(history)
    log.close()
    return history


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
    if job.ranks.main:
        print(f"resuming {path} at epoch {state['epoch']}")
    return state["epoch"], state.get("history", [])


def _save_checkpoint(job, out: Path, epoch: int, training: Training, history) -> None:
    if job.ranks.main:
        save_atomic({"epoch": epoch, "prompts": training.module.prompt_state_dict(),
                     "optimizers": {k: o.state_dict() for k, o in training.optimizers.items()},
                     "scheduler": training.scheduler.state_dict(), "rng": rng_state(), "history": history,
                     "settings": job.cfg.to_dict()}, checkpoint_path(out))
    barrier(job.ranks)
