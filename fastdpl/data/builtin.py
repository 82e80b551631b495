"""Data that ships inside installed packages, for the offline demo and tests.

``builtin:digits`` is scikit-learn's bundled handwritten digits (1,797 real 8x8
grey-level scans, no download), as RGB PIL images in memory, split per class
with a fixed seed into 50% train, 20% val and 30% test.
"""
from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

from .datasets import DatasetError, DatasetSplits, Sample

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _digits() -> DatasetSplits:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - scikit-learn is a dependency
        raise DatasetError("builtin:digits needs scikit-learn (pip install scikit-learn)") from exc
    data = load_digits()
    images = [Image.fromarray((255 - img * (255 / 16)).astype(np.uint8), mode="L").convert("RGB")
              for img in data.images]  # dark strokes on white, like a scan
    rng = random.Random(0)
    splits = {"train": [], "val": [], "test": []}
    for label in range(10):
        indices = [i for i, t in enumerate(data.target) if t == label]
        rng.shuffle(indices)
        n_train, n_val = math.ceil(0.5 * len(indices)), math.ceil(0.2 * len(indices))
        for split, part in (("train", indices[:n_train]), ("val", indices[n_train:n_train + n_val]),
                            ("test", indices[n_train + n_val:])):
            splits[split] += [Sample(images[i], label, DIGIT_NAMES[label]) for i in part]
    return DatasetSplits("builtin:digits", list(DIGIT_NAMES), **splits)


BUILTIN = {"digits": _digits}


def load_builtin(name: str) -> DatasetSplits:
    if name not in BUILTIN:
        raise DatasetError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN)}")
    return BUILTIN[name]()
