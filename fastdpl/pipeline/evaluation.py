"""Evaluation of a trained module: top-1 overall and per class on its own test set, base and
new classes (base-to-new), other datasets (cross-dataset, domain shift); one results file per
evaluation, never overwritten silently."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from ..data import load_dataset, subsample_classes
from .loaders import make_loader
from .runtime import Dist, autocast, barrier
from .training import Meter, progress


def tally(job, classnames, batches, desc: str) -> dict:
    """Top-1 overall and per class from (logits, labels) batches, with a progress bar."""
    correct = torch.zeros(len(classnames))
    total = torch.zeros(len(classnames))
    meter = Meter()
    bar = progress(batches, job, desc)
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
def accuracy(job, module, samples, dataset: str = "", desc="eval") -> dict:
    """Top-1 overall and per class on ``samples`` of ``dataset`` (test preprocessing)."""
    module.eval()
    loader = make_loader(samples, job.image_size, job.cfg.eval_batch_size, 0, Dist(), False, job.cfg.workers,
                         stats=job.stats)

    def batches():
        for images, labels in loader:
            with autocast(job.device, job.cfg.precision):
                yield module(images.to(job.device)), labels
    return tally(job, module.classnames, batches(), desc)


def harmonic_mean(base: float, new: float) -> float:
    return 0.0 if base + new == 0 else 2 * base * new / (base + new)


def results_path(out: Path, method: str, prompts: str | None, default_prompts: str | None = None) -> Path:
    """``results.json`` for the stage's own subject (zero-shot CLIP, the train stage's prompts);
    ``results-<method>.json`` for prompts named by --prompts, so each evaluation keeps its file."""
    if prompts is None or prompts == default_prompts:
        return out / "results.json"
    return out / f"results-{re.sub(r'[^A-Za-z0-9.]+', '_', method).strip('_')}.json"


def evaluate_and_write(job, module, out: Path, stage: str, method: str, rebuild, evaluate=None,
                       extra: dict | None = None, default_prompts: str | None = None) -> dict:
    """Own test set (base and new with --subsample base), then every --eval-datasets entry.

    ``rebuild(classnames, dataset)``: the same learned prompts around other class names (new
    classes, another dataset); ``evaluate(job, module, samples, dataset, desc) -> accuracy dict``
    (default: ``accuracy``; TPT passes its own)."""
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
    own = cfg.dataset if cfg.subsample == "all" else f"{cfg.dataset}[{cfg.subsample}]"
    result["own"] = own  # which entry of "results" is this run's own test set
    result["results"][own] = evaluate(job, module, job.splits.test, cfg.dataset, desc=f"test {own}")
    if cfg.subsample == "base":  # base-to-new: the prompts learned on base classes, applied to the new ones
        new = subsample_classes(load_dataset(cfg.dataset, cfg.root), "new")
        result["results"][f"{cfg.dataset}[new]"] = evaluate(job, rebuild(new.classnames, cfg.dataset), new.test,
                                                             cfg.dataset, desc=f"test {cfg.dataset}[new]")
        result["base"] = result["results"][own]["top1"]
        result["new"] = result["results"][f"{cfg.dataset}[new]"]["top1"]
        result["hm"] = harmonic_mean(result["base"], result["new"])
    for name in cfg.eval_datasets:  # cross-dataset and domain shift: all of that dataset's classes
        other = load_dataset(name, cfg.root)
        key = name if name not in result["results"] else f"{name} (cross)"
        result["results"][key] = evaluate(job, rebuild(other.classnames, name), other.test, name,
                                          desc=f"test {name}")
    result["top1"] = result["results"][own]["top1"]
    write_text_atomic(saved, json.dumps(result, indent=1))
    print(results_table(result))
    barrier(job.ranks)
    return result


def results_table(result: dict) -> str:
    lines = [f"| {result['stage']} ({result['method']}) | top-1 % | images |", "| --- | ---: | ---: |"]
    for name, r in result["results"].items():
        lines.append(f"| {name} | {100 * r['top1']:.2f} | {r['num_test']} |")
    if "hm" in result:
        lines.append(f"| harmonic mean (base, new) | {100 * result['hm']:.2f} | |")
    return "\n".join(lines)
