"""``fastdpl linear-probe``: the linear-probe CLIP baseline of CoOp (its ``lpclip/``), which the
authors' DPL repository ships beside their prompts.

The frozen CLIP's image features (``encode_image``: the tower and its projection, unnormalised,
as lpclip's ``clip_model.visual``) of the few-shot training and validation images and of the test
set, with the test preprocessing; an L2-regularised logistic regression (scikit-learn's lbfgs,
1000 iterations) on the training features, its inverse strength C chosen on the validation
features as lpclip chooses it: the best of 1e6, 1e4, ..., 1e-6, then ``--probe-steps`` (8) rounds
of a search in log10(C) between 0.1x and 10x that value, each keeping the better end (the left on
a tie) and halving the interval towards it; the classifier of the last round is tested.

Features are cached under ``<output>/linear_probe/features/`` in files named by a fingerprint of
what they depend on (model, weights, dataset, split, the images and labels), so a rerun or another
C search reuses them and a changed setting never reads stale ones. The result is a results.json
like every stage's (``fastdpl report`` reads it), with the chosen C and the search.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from ..atomic import save_atomic
from ..models import is_classifier
from .config import RunConfig
from .evaluation import evaluate_and_write, tally
from .loaders import make_loader
from .runtime import Dist, autocast
from .training import progress

INITIAL_C = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)  # lpclip's first search


def logistic_regression(C: float, features: np.ndarray, labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression

    # lpclip passes penalty="l2": scikit-learn's default, whose keyword 1.8 deprecates
    return LogisticRegression(solver="lbfgs", max_iter=1000, C=C).fit(features, labels)


def _accuracy(classifier, features, labels) -> float:
    return float(np.mean(classifier.predict(features) == labels))


def choose_c(train: tuple, val: tuple, steps: int = 8):
    """(C, classifier, search record): lpclip's choice of C on the validation features."""
    record = {"initial": {}, "steps": []}
    for c in INITIAL_C:
        record["initial"][repr(c)] = _accuracy(logistic_regression(c, *train), *val)
    accuracies = list(record["initial"].values())
    peak = INITIAL_C[int(np.argmax(accuracies))]
    chosen, classifier = peak, None
    left, right = 0.1 * peak, 10.0 * peak
    for _ in range(steps):
        fits = {side: logistic_regression(c, *train) for side, c in (("left", left), ("right", right))}
        scores = {side: _accuracy(fit, *val) for side, fit in fits.items()}
        record["steps"].append({"left": left, "right": right, **{f"val_{k}": v for k, v in scores.items()}})
        middle = 10 ** (0.5 * (math.log10(left) + math.log10(right)))
        if scores["left"] < scores["right"]:
            chosen, classifier, left = right, fits["right"], middle
        else:
            chosen, classifier, right = left, fits["left"], middle
    if classifier is None:  # no refining rounds: the initial search's best
        classifier = logistic_regression(chosen, *train)
    return chosen, classifier, record


def _fingerprint(job, split: str, samples) -> str:
    cfg = job.cfg
    images = [str(s.image) if isinstance(s.image, (str, Path)) else f"in-memory {i}" for i, s in enumerate(samples)]
    key = {"model": cfg.model, "pretrained": cfg.pretrained, "dataset": cfg.dataset, "shots": cfg.shots,
           "seed": cfg.seed, "split": split, "images": images, "labels": [s.label for s in samples],
           "precision": cfg.precision}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


@torch.no_grad()
def image_features(job, samples, split: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, E) float32, labels (N,)) of ``samples``, from the cache or computed once."""
    from ..adapters import adapt

    path = folder / f"{split}-{_fingerprint(job, split, samples)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["features"].numpy(), saved["labels"].numpy()
    model = adapt(job.model)
    loader = make_loader(samples, job.image_size, job.cfg.eval_batch_size, 0, Dist(), False, job.cfg.workers)
    features, labels = [], []
    for images, batch_labels in progress(loader, job, f"features {split}"):
        with autocast(job.device, job.cfg.precision):
            features.append(model.encode_image(images.to(job.device)).float().cpu())
        labels.append(batch_labels)
    saved = {"features": torch.cat(features), "labels": torch.cat(labels)}
    if job.ranks.main:
        save_atomic(saved, path)
    return saved["features"].numpy(), saved["labels"].numpy()


def _refuse_stale_results(saved: Path, cfg: RunConfig) -> None:
    """--resume keeps a finished probe only when it was made with these settings (there is no
    checkpoint to compare against, as the training stages have)."""
    from .config import changed_settings

    if saved.is_file() and cfg.resume:
        changed = changed_settings(json.loads(saved.read_text()).get("settings", {}), cfg, "linear_probe")
        if changed:
            raise ValueError(f"--resume: {saved} was made with other settings ({'; '.join(changed)}); choose another "
                             "--output")


class Probe:
    """The fitted classifier as evaluation sees a module: class names and (B, C) scores."""

    def __init__(self, classifier, classnames):
        self.classifier, self.classnames = classifier, list(classnames)

    def scores(self, features: np.ndarray) -> torch.Tensor:
        """Class probabilities, one column per class (a class absent from training scores -inf)."""
        out = torch.full((len(features), len(self.classnames)), -math.inf, dtype=torch.float64)
        out[:, torch.as_tensor(self.classifier.classes_)] = torch.from_numpy(self.classifier.predict_proba(features)).double()
        return out


def run_linear_probe(cfg: RunConfig) -> dict:
    """Features, C on the validation split, the test accuracy; results.json under <output>/linear_probe."""
    from .stages import prepare

    if is_classifier(cfg.model):
        raise ValueError(f"fastdpl linear-probe reads a CLIP's image features; for {cfg.model} train its head "
                         "alone with `fastdpl train --method linear`")
    if cfg.subsample != "all" or cfg.eval_datasets:
        raise ValueError("fastdpl linear-probe: a probe's head covers its training classes only (no --subsample "
                         "base/new, no --eval-datasets)")
    job = prepare(cfg, "linear_probe")
    out = job.out("linear_probe")
    _refuse_stale_results(out / "results.json", cfg)
    folder = out / "features"
    folder.mkdir(parents=True, exist_ok=True)
    train = image_features(job, job.splits.train, "train", folder)
    val = image_features(job, job.splits.val, "val", folder)
    c, classifier, record = choose_c(train, val, cfg.probe_steps)
    probe = Probe(classifier, job.splits.classnames)

    def evaluate(job, module, samples, dataset, desc):
        features, labels = image_features(job, samples, "test", folder)
        return tally(job, module.classnames, [(module.scores(features), torch.from_numpy(labels))], desc)

    def refuse(classnames, dataset):
        raise ValueError("a linear probe has no head for other classes")

    extra = {"C": c, "val_top1": _accuracy(classifier, *val), "c_search": record}
    return evaluate_and_write(job, probe, out, "linear_probe", "linear_probe", refuse, evaluate=evaluate, extra=extra)
