"""``fastdpl check-data``: validate a dataset on disk and say what to fix."""
from __future__ import annotations

from collections import Counter

from PIL import Image

from .datasets import DatasetError, load_dataset
from .images import open_image


def check_dataset(name: str, root=None, shots: int | None = 16, open_images: bool = True, progress=False):
    """(summary lines, problems): layout and split files, every class present in every split the
    protocol uses (train for the shots, val for the alpha step, test for evaluation), every image
    decoded in full (a truncated file fails here, not in the middle of training)."""
    try:
        splits = load_dataset(name, root)
    except DatasetError as exc:
        return [], [str(exc)]
    lines, problems = [f"{splits.name}: {splits.num_classes} classes"], []
    for split in ("train", "val", "test"):
        samples = getattr(splits, split)
        counts = Counter(s.label for s in samples)
        lines.append(f"  {split}: {len(samples)} images" +
                     (f", {min(counts.values())}..{max(counts.values())} per class" if counts else ""))
        bad_labels = sorted({s.label for s in samples if not 0 <= s.label < splits.num_classes})
        if bad_labels:
            problems.append(f"{split}: labels {bad_labels[:10]} outside 0..{splits.num_classes - 1}")
        if split == "test" and not samples:
            problems.append("test split is empty: nothing to evaluate on")
        missing = [c for c in range(splits.num_classes) if not counts.get(c)]
        if missing and samples:
            names = ", ".join(f"{c} ({splits.classnames[c]!r})" for c in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            problems.append(f"{split}: classes {names}{more} have no images; every class needs {split} images")
        if split == "train" and samples and shots:
            short = [splits.classnames[c] for c in range(splits.num_classes) if counts.get(c, 0) < shots]
            if short:
                problems.append(f"train: {len(short)} classes have fewer than {shots} images "
                                f"(e.g. {short[:3]}): few-shot sampling will take all they have")
    if open_images:
        from tqdm import tqdm

        every = [s.image for split in ("train", "val", "test") for s in getattr(splits, split)
                 if not isinstance(s.image, Image.Image)]  # built-in data lives in memory
        for image in tqdm(sorted(set(map(str, every))), desc="decoding images",
                          disable=None if progress else True):  # None: no bar off a terminal
            try:
                open_image(image)  # decodes every pixel, as training will (verify() misses truncation)
            except DatasetError as exc:
                fix = ("restore it or fix the list" if str(exc).startswith("missing")
                       else "re-download it or remove it from the split file")
                problems.append(f"{exc}; {fix}")
    return lines, problems
