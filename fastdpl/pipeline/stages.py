"""The DPL stages: zero-shot, search (supernet), train (subnet), evaluation.

Folder of a run (``--output``): ``search/`` (checkpoint.pt, alpha_history.json,
prompt_config.json, prompts.pt, alpha_heatmap.png, alpha_evolution.png), ``train/``
(checkpoint.pt, prompts.pt, results.json), ``zeroshot/`` and ``eval/``
(results.json); each stage also writes the settings it ran with (run.yaml).
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..atomic import save_atomic, write_text_atomic
from ..config import PromptConfig
from ..data import fewshot_splits, load_dataset, subsample_classes
from ..dtypes import at_least_float32
from ..models import load_clip
from ..profiling import nvtx_range
from ..prompt import FastDPLPrompt
from ..templates import CUSTOM_TEMPLATES, IMAGENET_TEMPLATES, resolve_template, tokenize_classes
from ..towers import image_parts, text_parts
from .classifier import wrap
from .config import RunConfig, changed_settings, save_yaml
from .loaders import cycle_batches, first_batch, make_loader
from .logs import RunLog, alpha_entropy
from .runtime import (
    Dist, autocast, barrier, init_distributed, pick_device, rng_state, seed_everything, set_rng_state,
)

@dataclass
class Job:
    cfg: RunConfig
    ranks: Dist
    device: str
    model: torch.nn.Module
    splits: object  # DatasetSplits after few-shot sampling and class subsampling
    image_size: int
    template: str = "default"  # the text input of this stage's prompt modules (stage_template)

    def out(self, stage: str) -> Path:
        path = Path(self.cfg.output) / stage
        if self.ranks.main:
            path.mkdir(parents=True, exist_ok=True)
        return path


def prepare(cfg: RunConfig, stage: str = "search") -> Job:
    """Device, processes, seeds, the backbone and the few-shot splits of a ``stage``."""
    device = pick_device(cfg.device)
    ranks = init_distributed(device)
    seed_everything(cfg.seed)
    model = load_clip(cfg.model, cfg.pretrained, device=device)
    cache = cfg.split_cache or str(Path(cfg.output).parent / "splits" / cfg.dataset.replace(":", "_").replace("/", "_"))
    splits = subsample_classes(fewshot_splits(load_dataset(cfg.dataset, cfg.root), cfg.shots, cfg.seed,
                                              cache_dir=cache if ranks.main else None), cfg.subsample)
    size = model.visual.image_size
    return Job(cfg, ranks, device, model, splits, size[0] if isinstance(size, (tuple, list)) else size,
               stage_template(cfg, stage))


def stage_template(cfg: RunConfig, stage: str) -> str:
    """The text input a stage uses: ``--template`` when given, else (``auto``) what the authors use
    there: "a photo of a {}." to search, the 60-template ensemble to train, the dataset's hand-written
    template for zero-shot CLIP (where it has one), and TPT's "a photo of a {}." for zero-shot TPT."""
    if cfg.template != "auto":
        return cfg.template
    if stage == "train":
        return "ensemble"
    if stage == "zeroshot":
        from ..data import canonical_name

        return "custom" if canonical_name(cfg.dataset) in CUSTOM_TEMPLATES else "default"
    return "default"


def build_dpl(job: Job, classnames, mode: str, config: PromptConfig | None = None,
              dataset: str | None = None) -> FastDPLPrompt:
    """The stage's prompt module over ``classnames`` of ``dataset`` (default: the run's), with the
    stage's text input. Only the search stage honours ``--init``: the authors' train stage always
    starts its prompts from N(0, 0.02^2)."""
    cfg = job.cfg
    common = dict(template=resolve_template(job.template, dataset or cfg.dataset), impl=cfg.impl,
                  text_chunk_size=cfg.text_chunk_size, generator=torch.Generator().manual_seed(cfg.seed))
    if mode == "search":
        return FastDPLPrompt(job.model, classnames, mode="search", candidate_lengths=cfg.candidate_lengths,
                             towers=cfg.search_towers, init=cfg.init, **common)
    return FastDPLPrompt(job.model, classnames, mode="fixed", config=config, **common)


def block_counts(model) -> dict:
    return {"image": len(image_parts(model).blocks), "text": len(text_parts(model).blocks)}


def lr_factor(epoch: int, cfg: RunConfig, epochs: int) -> float:
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


def _train_loader(job: Job, samples, seed: int):
    cfg = job.cfg
    return make_loader(samples, job.image_size, cfg.batch_size, seed, job.ranks, True, cfg.workers,
                       crop_scale=cfg.crop_scale, flip=cfg.flip)


def _progress(iterable, job: Job, desc: str, total=None):
    return tqdm(iterable, desc=desc, total=total, disable=not (job.cfg.progress and job.ranks.main),
                leave=False, dynamic_ncols=True)


def _loss_step(net, optimizer, images, labels, job: Job, extra_loss=None):
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


def _arch_step(net, optimizer, images, labels, job: Job) -> None:
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


# ---- checkpoints --------------------------------------------------------------------------------------
def _checkpoint_path(out: Path) -> Path:
    return out / "checkpoint.pt"


def _start_epoch(job: Job, out: Path, dpl, optimizers: dict, scheduler) -> tuple[int, list]:
    """Resume from out/checkpoint.pt with --resume; refuse to overwrite a run's checkpoint without it."""
    path = _checkpoint_path(out)
    if not path.is_file():
        return 0, []
    if not job.cfg.resume:
        raise FileExistsError(f"{path} exists: pass --resume to continue that run, or choose another --output")
    state = torch.load(path, map_location="cpu", weights_only=False)
    changed = changed_settings(state.get("settings", {}), job.cfg, out.name)
    if changed:
        raise ValueError(f"--resume: {path} was made with other settings ({'; '.join(changed)}); resume with "
                         f"the settings in {out / 'run.yaml'}, or choose another --output")
    dpl.load_prompt_state_dict(state["prompts"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    if job.ranks.main:
        print(f"resuming {path} at epoch {state['epoch']}")
    return state["epoch"], state.get("history", [])


def _save_checkpoint(job: Job, out: Path, epoch: int, dpl, optimizers: dict, scheduler, history) -> None:
    if job.ranks.main:
        save_atomic({"epoch": epoch, "prompts": dpl.prompt_state_dict(),
                     "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                     "scheduler": scheduler.state_dict(), "rng": rng_state(), "history": history,
                     "settings": job.cfg.to_dict()}, _checkpoint_path(out))
    barrier(job.ranks)


# ---- search -------------------------------------------------------------------------------------------
def alpha_snapshot(dpl: FastDPLPrompt) -> dict:
    return {t: torch.softmax(a.detach().float(), -1).tolist() for t, a in dpl.arch_logits.items()}


def run_search(cfg: RunConfig) -> dict:
    """Alternate Adam steps on alpha (validation batches) and SGD steps on prompts (training batches)."""
    job = prepare(cfg, "search")
    out = job.out("search")
    dpl = build_dpl(job, job.splits.classnames, "search")
    net = wrap(dpl, job.ranks, job.device)
    arch_opt = torch.optim.Adam(dpl.arch_parameters(), lr=cfg.arch_lr, betas=tuple(cfg.arch_betas),
                                weight_decay=cfg.arch_weight_decay)
    prompt_opt = torch.optim.SGD(dpl.prompt_parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                 weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(prompt_opt, lambda e: lr_factor(e, cfg, cfg.search_epochs))
    optimizers = {"arch": arch_opt, "prompt": prompt_opt}
    start, history = _start_epoch(job, out, dpl, optimizers, scheduler)
    train = _train_loader(job, job.splits.train, cfg.seed)
    # The alpha steps' validation batches: test preprocessing (no augmentation), as the authors'
    # val loader; reshuffled passes ("cycle", fastdpl's) or the same first batch every step ("first").
    val = make_loader(job.splits.val, job.image_size, cfg.val_batch_size, cfg.seed + 1, job.ranks, train=False,
                      workers=cfg.workers, shuffle=cfg.val_batches == "cycle")
    if job.ranks.main and start == 0:  # a resumed run keeps the record of what made its checkpoint
        save_yaml(cfg, out / "run.yaml")
    log = RunLog(out, "search", job.ranks.main, start)
    dpl.train()
    for epoch in range(start, cfg.search_epochs):
        train.batch_sampler.set_epoch(epoch)
        val_batches = cycle_batches(val, epoch) if cfg.val_batches == "cycle" else first_batch(val)
        meter = Meter()
        bar = _progress(train, job, f"search {epoch + 1}/{cfg.search_epochs}")
        for images, labels in bar:
            with nvtx_range("fastdpl/pipeline/data"):
                val_images, val_labels = next(val_batches)
            _arch_step(net, arch_opt, val_images, val_labels, job)       # alpha on validation
            loss, logits = _loss_step(net, prompt_opt, images, labels, job)  # prompts on training
            meter.update(loss, logits, labels.to(job.device))
            meter.show(bar, job.ranks)
        lr = scheduler.get_last_lr()[0]  # the prompts' lr during this epoch
        scheduler.step()
        history.append({"epoch": epoch + 1, **meter.epoch_summary(job.ranks), "lr": lr,
                        "alpha_entropy": alpha_entropy(dpl.arch_logits), "alpha": alpha_snapshot(dpl)})
        _save_checkpoint(job, out, epoch + 1, dpl, optimizers, scheduler, history)
        if job.ranks.main:
            write_text_atomic(out / "alpha_history.json", json.dumps(history))
        log.epoch(history)
    log.close()
    config = dpl.derive_config()
    result = {"stage": "search", "config": config.to_dict(), "history": history}
    if job.ranks.main:
        from .plots import plot_alpha_evolution, plot_alpha_heatmap

        config.save(out / "prompt_config.json")
        # the supernet, for `fastdpl eval --prompts`; "method" names it in eval results and reports
        save_atomic({**dpl.prompt_state_dict(), "method": "dpl-supernet", "template": job.template,
                    "settings": cfg.to_dict()},
                    out / "prompts.pt")
        plot_alpha_heatmap(dpl, out / "alpha_heatmap.png")
        plot_alpha_evolution(history, dpl.candidate_lengths, out / "alpha_evolution.png")
        print(f"derived configuration ({out / 'prompt_config.json'}):\n{config}")
    barrier(job.ranks)
    return result


# ---- train --------------------------------------------------------------------------------------------
def resolve_prompt_config(job: Job) -> tuple[PromptConfig, str]:
    """(config, method label) from --prompt-config: a JSON file, 'zero_shot', 'uniform:LENGTH:DEPTH', or
    the output folder (or an alpha .npy file) of a search run of the authors' code.

    Unset: the search stage's prompt_config.json in the same --output.
    """
    spec = job.cfg.prompt_config
    blocks = block_counts(job.model)
    if spec is None:
        spec = str(Path(job.cfg.output) / "search" / "prompt_config.json")
        if not Path(spec).is_file():
            raise FileNotFoundError(f"no --prompt-config given and no search result at {spec}: run "
                                    "`fastdpl search` first or pass a JSON file, 'zero_shot' or 'uniform:LEN:DEPTH'")
    if spec == "zero_shot":
        return PromptConfig.zero_shot(blocks), "zero_shot"
    if spec.startswith("uniform:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"prompt_config {spec!r}: expected uniform:LENGTH:DEPTH, e.g. uniform:4:9")
        return PromptConfig.uniform(int(parts[1]), int(parts[2]), blocks), spec
    if Path(spec).is_dir() or spec.endswith(".npy"):  # a search run of the authors' code
        return PromptConfig.from_authors_alpha(spec), "dpl"
    if not Path(spec).is_file():
        raise FileNotFoundError(f"prompt_config: no such file {spec}")
    return PromptConfig.load(spec), "dpl"


def teacher_templates(cfg: RunConfig) -> tuple[str, ...]:
    """The distillation teacher's templates: all of IMAGENET_TEMPLATES ("ensemble", fastdpl's), or only
    the last ("last": the authors' train stage, which appends one template's features after its loop)."""
    return IMAGENET_TEMPLATES if cfg.distill_teacher == "ensemble" else IMAGENET_TEMPLATES[-1:]


def zero_shot_teacher(job: Job, classnames):
    """Zero-shot CLIP logits as a function of the images; text features average the normalised
    features of the teacher's templates (CLIP's prompt ensembling)."""
    from ..towers import text_module

    model = job.model
    context = text_module(model).positional_embedding.shape[0]
    with torch.no_grad():
        per_template = [F.normalize(at_least_float32(model.encode_text(
            tokenize_classes(classnames, t, None, context).to(job.device))), dim=-1)
            for t in teacher_templates(job.cfg)]
        text = F.normalize(torch.stack(per_template).mean(0), dim=-1)

    def logits(images):
        with torch.no_grad():
            image = F.normalize(at_least_float32(model.encode_image(images)), dim=-1)
            return model.logit_scale.exp() * image @ text.T
    return logits


def distillation_loss(job: Job, classnames):
    """KL(teacher || student) at temperature T, weighted; None when the weight is 0 (teacher never runs)."""
    cfg = job.cfg
    if cfg.distill_weight == 0:
        return None
    teacher = zero_shot_teacher(job, classnames)
    T = cfg.distill_temperature

    def loss(student_logits, images):
        target = F.log_softmax(teacher(images) / T, dim=-1)
        kl = F.kl_div(F.log_softmax(student_logits / T, dim=-1), target, log_target=True, reduction="batchmean")
        return cfg.distill_weight * T * T * kl
    return loss


def run_train(cfg: RunConfig) -> dict:
    """Train fresh prompts of a fixed configuration (DPL's or a baseline's), then evaluate."""
    job = prepare(cfg, "train")
    out = job.out("train")
    config, method = resolve_prompt_config(job)
    dpl = build_dpl(job, job.splits.classnames, "fixed", config)
    params = dpl.prompt_parameters()
    if params:
        net = wrap(dpl, job.ranks, job.device)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(e, cfg, cfg.train_epochs))
        start, history = _start_epoch(job, out, dpl, {"prompt": optimizer}, scheduler)
        train = _train_loader(job, job.splits.train, cfg.seed)
        extra = distillation_loss(job, job.splits.classnames)
        if job.ranks.main and start == 0:
            save_yaml(cfg, out / "run.yaml")
        log = RunLog(out, "train", job.ranks.main, start)
        dpl.train()
        for epoch in range(start, cfg.train_epochs):
            train.batch_sampler.set_epoch(epoch)
            meter = Meter()
            bar = _progress(train, job, f"train {epoch + 1}/{cfg.train_epochs}")
            for images, labels in bar:
                loss, logits = _loss_step(net, optimizer, images, labels, job, extra)
                meter.update(loss, logits, labels.to(job.device))
                meter.show(bar, job.ranks)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            history.append({"epoch": epoch + 1, **meter.epoch_summary(job.ranks), "lr": lr})
            _save_checkpoint(job, out, epoch + 1, dpl, {"prompt": optimizer}, scheduler, history)
            log.epoch(history)
        log.close()
    if job.ranks.main:
        save_atomic({**dpl.prompt_state_dict(), "method": method, "template": job.template,
                     "settings": cfg.to_dict()}, out / "prompts.pt")
    return _evaluate_and_write(job, dpl, out, stage="train", method=method)


# ---- evaluation ---------------------------------------------------------------------------------------
def tally(job: Job, classnames, batches, desc: str) -> dict:
    """Top-1 overall and per class from (logits, labels) batches, with a progress bar."""
    correct = torch.zeros(len(classnames))
    total = torch.zeros(len(classnames))
    meter = Meter()
    bar = _progress(batches, job, desc)
    for logits, labels in bar:
        logits = logits.float().cpu()
        meter.update(torch.zeros(()), logits, labels)
        meter.show(bar, Dist(), loss=False)  # evaluation has no loss: never show a stale 0.000
        hits = (logits.argmax(1) == labels).float()
        correct.index_add_(0, labels, hits)
        total.index_add_(0, labels, torch.ones_like(hits))
    per_class = {classnames[i]: (correct[i] / total[i]).item() for i in range(len(classnames)) if total[i] > 0}
    return {"top1": (correct.sum() / total.sum()).item(), "num_test": int(total.sum()), "per_class": per_class}


@torch.no_grad()
def accuracy(job: Job, dpl: FastDPLPrompt, samples, dataset: str = "", desc="eval") -> dict:
    """Top-1 overall and per class on ``samples`` of ``dataset`` (CLIP test preprocessing)."""
    dpl.eval()
    loader = make_loader(samples, job.image_size, job.cfg.eval_batch_size, 0, Dist(), False, job.cfg.workers)

    def batches():
        for images, labels in loader:
            with autocast(job.device, job.cfg.precision):
                yield dpl(images.to(job.device)), labels
    return tally(job, dpl.classnames, batches(), desc)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def results_path(out: Path, method: str, prompts: str | None, default_prompts: str | None = None) -> Path:
    """``results.json`` for the stage's own subject (zero-shot CLIP, the train stage's prompts);
    ``results-<method>.json`` for prompts named by --prompts, so each evaluation keeps its file."""
    if prompts is None or prompts == default_prompts:
        return out / "results.json"
    return out / f"results-{re.sub(r'[^A-Za-z0-9.]+', '_', method).strip('_')}.json"


def _evaluate_and_write(job: Job, dpl: FastDPLPrompt, out: Path, stage: str, method: str, evaluate=None,
                        extra: dict | None = None, default_prompts: str | None = None) -> dict:
    """Own test set (base and new with --subsample base), then every --eval-datasets entry.

    ``evaluate(job, dpl, samples, dataset, desc) -> accuracy dict`` (default: ``accuracy``; TPT passes its own)."""
    evaluate = evaluate or accuracy
    cfg = job.cfg
    prompts = (extra or {}).get("prompts")
    saved = results_path(out, method, prompts, default_prompts)
    if saved.is_file():  # never overwrite an earlier result silently
        earlier = json.loads(saved.read_text())
        if not cfg.resume:
            raise FileExistsError(f"{saved} exists (an earlier {stage} result): pass --resume to keep it, "
                                  "or choose another --output")
        if (earlier.get("method"), earlier.get("prompts")) != (method, prompts):
            raise FileExistsError(f"{saved} holds another evaluation ({earlier.get('method')}, prompts "
                                  f"{earlier.get('prompts')}): choose another --output")
        if job.ranks.main:
            print(f"kept {saved} (--resume)\n{results_table(earlier)}")
        return earlier
    # Evaluated prompts describe themselves by the run that trained them (``trained``), not by
    # this command's flags: eval of 4-shot prompts is reported as 4-shot whatever --shots says here.
    trained = (extra or {}).get("trained") or {}
    described = {key: trained.get(key, getattr(cfg, key))
                 for key in ("dataset", "shots", "seed", "model", "pretrained", "subsample")}
    result = {"stage": stage, "method": method, **described, **(extra or {}), "settings": cfg.to_dict(),
              "results": {}}
    if not job.ranks.main:
        barrier(job.ranks)
        return result
    state = dpl.prompt_state_dict()
    own = cfg.dataset if cfg.subsample == "all" else f"{cfg.dataset}[{cfg.subsample}]"
    result["own"] = own  # which entry of "results" is this run's own test set
    result["results"][own] = evaluate(job, dpl, job.splits.test, cfg.dataset, desc=f"test {own}")
    if cfg.subsample == "base":  # base-to-new: the prompts learned on base classes, applied to the new ones
        new = subsample_classes(load_dataset(cfg.dataset, cfg.root), "new")
        result["results"][f"{cfg.dataset}[new]"] = _transfer(job, dpl, state, new, cfg.dataset,
                                                              f"test {cfg.dataset}[new]", evaluate)
        result["base"] = result["results"][own]["top1"]
        result["new"] = result["results"][f"{cfg.dataset}[new]"]["top1"]
        result["hm"] = harmonic_mean(result["base"], result["new"])
    for name in cfg.eval_datasets:  # cross-dataset and domain shift: all of that dataset's classes
        other = load_dataset(name, cfg.root)
        key = name if name not in result["results"] else f"{name} (cross)"
        result["results"][key] = _transfer(job, dpl, state, other, name, f"test {name}", evaluate)
    result["top1"] = result["results"][own]["top1"]
    write_text_atomic(saved, json.dumps(result, indent=1))
    print(results_table(result))
    barrier(job.ranks)
    return result


def _transfer(job: Job, dpl: FastDPLPrompt, state: dict, splits, dataset: str, desc: str, evaluate) -> dict:
    """The learned prompts applied to the test set and class names of ``splits`` (new classes,
    another dataset, a domain shift)."""
    other = build_dpl(job, splits.classnames, dpl.mode, dpl.config, dataset=dataset)
    other.load_prompt_state_dict(state)
    return evaluate(job, other, splits.test, dataset, desc=desc)


def results_table(result: dict) -> str:
    lines = [f"| {result['stage']} ({result['method']}) | top-1 % | images |", "| --- | ---: | ---: |"]
    for name, r in result["results"].items():
        lines.append(f"| {name} | {100 * r['top1']:.2f} | {r['num_test']} |")
    if "hm" in result:
        lines.append(f"| harmonic mean (base, new) | {100 * result['hm']:.2f} | |")
    return "\n".join(lines)


def _default_prompts(job: Job) -> str:
    return str(Path(job.cfg.output) / "train" / "prompts.pt")


def _load_prompted(job: Job, prompts: str | None):
    path = Path(prompts) if prompts else Path(_default_prompts(job))
    if not path.is_file():
        raise FileNotFoundError(f"no prompts at {path}: run `fastdpl train` first or pass --prompts FILE")
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = PromptConfig.from_dict(state["config"]) if state.get("config") else None
    if job.cfg.template == "auto":  # the text input the prompts were trained with
        job.template = state.get("template") or _training_settings(state, path).get("template") or job.template
        job.template = job.template if job.template != "auto" else "default"
    dpl = build_dpl(job, job.splits.classnames, state["mode"], config) if state["mode"] == "fixed" else \
        FastDPLPrompt(job.model, job.splits.classnames, mode="search", candidate_lengths=state["candidate_lengths"],
                      towers=state["towers"], template=resolve_template(job.template, job.cfg.dataset),
                      impl=job.cfg.impl)
    dpl.load_prompt_state_dict(state)
    # the method label is the same for every seed; the training settings describe the experiment
    return dpl, state.get("method", "prompts"), str(path), _training_settings(state, path)


def _training_settings(state: dict, path: Path) -> dict:
    """The settings of the run that produced a prompts file: saved inside it, else its run.yaml."""
    if state.get("settings"):
        return state["settings"]
    record = path.parent / "run.yaml"
    if record.is_file():
        import yaml

        return yaml.safe_load(record.read_text()) or {}
    return {}


def run_eval(cfg: RunConfig, prompts: str | None = None, stage: str = "eval") -> dict:
    """Evaluate saved prompts (default: the train stage's) on the test set and --eval-datasets."""
    job = prepare(cfg, "eval")
    dpl, method, path, trained = _load_prompted(job, prompts)
    return _evaluate_and_write(job, dpl, job.out(stage), stage=stage, method=method,
                               extra={"prompts": path, "trained": trained}, default_prompts=_default_prompts(job))


def run_zeroshot(cfg: RunConfig) -> dict:
    """CLIP with the class template and no prompts (the same code path with a zero-length configuration)."""
    job = prepare(cfg, "zeroshot")
    blocks = block_counts(job.model)
    dpl = build_dpl(job, job.splits.classnames, "fixed", PromptConfig.zero_shot(blocks))
    return _evaluate_and_write(job, dpl, job.out("zeroshot"), stage="zeroshot", method="zero_shot")


# ---- test-time prompt tuning -------------------------------------------------------------------------
IMAGENET_FAMILY = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


class _TPTImages(torch.utils.data.Dataset):
    def __init__(self, samples, views):
        self.samples, self.views = list(samples), views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return self.views(sample.image, seed=index), sample.label


def tpt_accuracy(job: Job, dpl: FastDPLPrompt, samples, dataset: str, desc="tpt") -> dict:
    """Top-1 of TPT predictions: every test image tuned on its own (groups of tpt_group at a time)."""
    from ..data import canonical_name
    from ..tpt import TestTimePromptTuner, TPTViews

    cfg = job.cfg
    augmix = cfg.tpt_augmix
    if augmix == "auto":
        augmix = canonical_name(dataset) not in IMAGENET_FAMILY  # TPT: AugMix for the fine-grained sets
    augmix = augmix in (True, "true")
    tuner = TestTimePromptTuner(dpl, tune=cfg.tpt_tune, context=cfg.tpt_context, keep_fraction=cfg.tpt_keep,
                                lr=cfg.tpt_lr, steps=cfg.tpt_steps)
    loader = torch.utils.data.DataLoader(_TPTImages(samples, TPTViews(job.image_size, cfg.tpt_views, augmix)),
                                         batch_size=cfg.tpt_group, num_workers=cfg.workers)

    def batches():
        for views, labels in loader:
            with autocast(job.device, cfg.precision):
                yield tuner.predict(views.to(job.device)), labels
    return tally(job, dpl.classnames, batches(), desc)


def run_tpt(cfg: RunConfig, prompts: str | None = None) -> dict:
    """TPT on the test sets: zero-shot CLIP with a learnable context, or saved fixed-mode DPL prompts."""
    job = prepare(cfg, "tpt")
    if prompts:
        dpl, method, path, trained = _load_prompted(job, prompts)
        if dpl.mode != "fixed":
            raise ValueError(f"tpt needs fixed-mode prompts (a train stage's prompts.pt), got {dpl.mode} mode")
    else:
        blocks = block_counts(job.model)
        dpl, method, path, trained = build_dpl(job, job.splits.classnames, "fixed", PromptConfig.zero_shot(blocks)), \
            "zero_shot", None, {}
    return _evaluate_and_write(job, dpl, job.out("tpt"), stage="tpt", method=f"tpt+{method}", evaluate=tpt_accuracy,
                               extra={"prompts": path, "trained": trained})
