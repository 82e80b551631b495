"""Few-shot sampling (k images per class, seeded, cached) and base/new class subsampling."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from ..atomic import write_text_atomic
from .datasets import DatasetError, DatasetSplits, Sample

SUBSAMPLES = ("all", "base", "new")


def _per_class(samples, num_classes):
    groups = [[] for _ in range(num_classes)]
    for index, sample in enumerate(samples):
        groups[sample.label].append(index)
    return groups


def _sample_indices(splits: DatasetSplits, split: str, per_class: int, rng: random.Random, exclude=frozenset()):
    """Up to ``per_class`` indices per class of ``split`` (all of them where a class has fewer), sorted."""
    chosen = []
    for label, indices in enumerate(_per_class(getattr(splits, split), splits.num_classes)):
        pool = [i for i in indices if i not in exclude]
        if not pool:
            taken = " that the training shots did not already take" if indices else ""
            raise DatasetError(f"{splits.name}: class {label} ({splits.classnames[label]!r}) has no {split} "
                               f"images{taken}; add some to the {split} split (`fastdpl check-data` lists every "
                               "such class)")
        chosen += rng.sample(pool, min(per_class, len(pool)))
    return sorted(chosen)


def fewshot_indices(splits: DatasetSplits, shots: int, seed: int) -> dict:
    """{"train": [...], "val": [...]} indices: ``shots`` per class for training, min(shots, 4) for validation."""
    if not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots must be a positive int, got {shots!r}")
    rng = random.Random(seed)
    train = _sample_indices(splits, "train", shots, rng)
    # ImageNet draws its validation shots from the training images: keep them disjoint.
    same_pool = splits.val is splits.train or (splits.val and splits.val == splits.train)
    val = _sample_indices(splits, "val", min(shots, 4), rng, exclude=frozenset(train) if same_pool else frozenset())
    return {"train": train, "val": val}


def fewshot_splits(splits: DatasetSplits, shots: int | None, seed: int, cache_dir: str | Path | None = None
                   ) -> DatasetSplits:
    """The k-shot training and validation sets (test unchanged). ``shots=None`` keeps every image.

    With ``cache_dir`` the chosen indices are saved as ``shot_<k>-seed_<s>.json`` and
    reused, so runs on the same data agree even if the sampling code changes.
    """
    if shots is None:
        return splits
    if splits.trainval is not None:
        raise DatasetError(f"{splits.name}: its lists are already the few-shot sets (VTAB-1k's 800 + 200 images): "
                           "pass --shots none")
    cache = Path(cache_dir) / f"shot_{shots}-seed_{seed}.json" if cache_dir else None
    sizes = {"train": len(splits.train), "val": len(splits.val)}
    if cache is not None and cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("sizes") != sizes:
            raise DatasetError(f"{cache} was made for splits of sizes {cached.get('sizes')}, the data now has "
                               f"{sizes}: delete the file to resample")
        indices = cached
    else:
        indices = fewshot_indices(splits, shots, seed)
        if cache is not None:
            write_text_atomic(cache, json.dumps({**indices, "sizes": sizes, "shots": shots, "seed": seed}))
    return DatasetSplits(splits.name, splits.classnames, train=[splits.train[i] for i in indices["train"]],
                         val=[splits.val[i] for i in indices["val"]], test=splits.test)


def subsample_classes(splits: DatasetSplits, which: str) -> DatasetSplits:
    """Base-to-new: labels sorted, the first ceil(n/2) are base, the rest new (relabelled from 0)."""
    if which not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {SUBSAMPLES}, got {which!r}")
    if which == "all":
        return splits
    n_base = math.ceil(splits.num_classes / 2)
    keep = range(n_base) if which == "base" else range(n_base, splits.num_classes)
    relabel = {old: new for new, old in enumerate(keep)}

    def select(samples):
        return [Sample(s.image, relabel[s.label], s.classname) for s in samples if s.label in relabel]

    return DatasetSplits(f"{splits.name}[{which}]", [splits.classnames[i] for i in keep],
                         train=select(splits.train), val=select(splits.val), test=select(splits.test))
