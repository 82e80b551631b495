"""Few-shot benchmark datasets in the CoOp layout (DESIGN.md section 5), and a user's own.

Every dataset lives in its own folder under a root and is read into
``DatasetSplits(train, val, test, classnames)``, where each split is a list of
``Sample(image, label, classname)``; ``image`` is a path (or, for built-in
in-memory data, a PIL image). Nothing is skipped silently: a missing root,
split file, class list or image is a ``DatasetError`` that names the file.

Layouts (folder under the root: what it must hold):

* CoOp split files ``split_zhou_<Name>.json`` with ``train``/``val``/``test``
  lists of ``[relative_image_path, label, classname]``: Caltech101,
  OxfordPets, StanfordCars, Flowers102, Food101, SUN397, DTD, EuroSAT, UCF101.
* FGVCAircraft: ``images/``, ``variants.txt``, ``images_variant_{train,val,test}.txt``.
* ImageNet: ``images/train/<wnid>/``, ``images/val/<wnid>/``, ``classnames.txt``
  (``<wnid> <class name>`` per line); val is the test set, validation shots
  come from the training images.
* ImageNetV2 (folders ``0``..``999``), ImageNet-Sketch (``images/<wnid>``),
  ImageNet-A and -R (200 ``<wnid>`` folders: the classifier covers those 200
  classes, labels mapped to 0..199): test only, with ``classnames.txt``.
* Your own: ``folder:PATH`` (one sub-folder of images per class, or
  ``train/ val/ test/`` each holding one per class) or ``json:PATH`` (a split
  file in the CoOp format, image paths relative to the file's folder).
* VTAB-1k: ``vtab:PATH``, a task folder with the lists ``train800.txt``,
  ``val200.txt``, ``train800val200.txt`` and ``test.txt`` (``relative/image/path label``
  per line, as VPT and NOAH ship them) and optionally ``classnames.txt`` (one name per
  line, in label order; else "class 0", "class 1", ...). train800 trains the search's
  prompts, val200 its alpha, and the train stage trains on train800val200 (VTAB's final
  runs); the test list is the test set.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


class DatasetError(ValueError):
    """The dataset on disk is not what the layout needs; the message names the file and the fix."""


class Sample(NamedTuple):
    image: Any  # a path, or an in-memory PIL image
    label: int
    classname: str


@dataclass
class DatasetSplits:
    name: str
    classnames: list
    train: list = field(default_factory=list)
    val: list = field(default_factory=list)
    test: list = field(default_factory=list)
    trainval: list | None = None  # what the train stage trains on when a layout names it (VTAB-1k)

    @property
    def final_train(self) -> list:
        """The train stage's training samples: the train and validation lists together where the
        layout has one (VTAB-1k's train800val200), else the training split."""
        return self.trainval if self.trainval is not None else self.train

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


@dataclass(frozen=True)
class SplitJsonLayout:
    folder: str
    image_dir: str
    split_file: str


SPLIT_JSON = {
    "caltech101": SplitJsonLayout("caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json"),
    "oxford_pets": SplitJsonLayout("oxford_pets", "images", "split_zhou_OxfordPets.json"),
    "stanford_cars": SplitJsonLayout("stanford_cars", "", "split_zhou_StanfordCars.json"),
    "oxford_flowers": SplitJsonLayout("oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json"),
    "food101": SplitJsonLayout("food-101", "images", "split_zhou_Food101.json"),
    "sun397": SplitJsonLayout("sun397", "SUN397", "split_zhou_SUN397.json"),
    "dtd": SplitJsonLayout("dtd", "images", "split_zhou_DescribableTextures.json"),
    "eurosat": SplitJsonLayout("eurosat", "2750", "split_zhou_EuroSAT.json"),
    "ucf101": SplitJsonLayout("ucf101", "UCF-101-midframes", "split_zhou_UCF101.json"),
}
# ImageNet and its variants: folder, how the test images are laid out.
IMAGENET_VARIANTS = {
    "imagenet_v2": ("imagenetv2", "imagenetv2-matched-frequency-format-val", "index"),
    "imagenet_sketch": ("imagenet-sketch", "images", "wnid"),
    "imagenet_a": ("imagenet-adversarial", "imagenet-a", "wnid"),
    "imagenet_r": ("imagenet-rendition", "imagenet-r", "wnid"),
}
ALIASES = {"caltech": "caltech101", "pets": "oxford_pets", "oxfordpets": "oxford_pets", "cars": "stanford_cars",
           "stanfordcars": "stanford_cars", "flowers": "oxford_flowers", "flowers102": "oxford_flowers",
           "fgvc_aircraft": "fgvc_aircraft", "aircraft": "fgvc_aircraft", "fgvcaircraft": "fgvc_aircraft",
           "imagenetv2": "imagenet_v2", "imagenet-v2": "imagenet_v2", "imagenet-sketch": "imagenet_sketch",
           "imagenet-a": "imagenet_a", "imagenet-r": "imagenet_r"}
DATASETS = tuple(SPLIT_JSON) + ("fgvc_aircraft", "imagenet") + tuple(IMAGENET_VARIANTS)


def dataset_table() -> str:
    """Every --dataset value and what it needs under --root (from the readers' own layouts)."""
    rows = [(name, f"{layout.folder}/", f"{layout.split_file}, the images it lists under {layout.image_dir or '.'}/")
            for name, layout in SPLIT_JSON.items()]
    rows.append(("fgvc_aircraft", "fgvc_aircraft/", "images/, variants.txt, images_variant_{train,val,test}.txt"))
    rows.append(("imagenet", "imagenet/", "images/train/<wnid>/, images/val/<wnid>/, classnames.txt"))
    for name, (folder, images, layout) in IMAGENET_VARIANTS.items():
        inner = "0..999/" if layout == "index" else "<wnid>/"
        rows.append((name, f"{folder}/", f"{images}/{inner}, classnames.txt"))
    rows += [("builtin:digits", "(none)", "scikit-learn's handwritten digits, shipped: runs offline"),
             ("folder:PATH", "(PATH)", "one sub-folder of images per class, or train/ val/ test/ folders of them"),
             ("json:PATH", "(PATH)", "a CoOp split file; image paths relative to its folder"),
             ("vtab:PATH", "(PATH)", "a VTAB-1k task: train800.txt, val200.txt, train800val200.txt, test.txt")]
    width = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{'--dataset':<{width[0]}}  {'folder under --root':<{width[1]}}  needs", "-" * (sum(width) + 40)]
    lines += [f"{a:<{width[0]}}  {b:<{width[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def canonical_name(name: str) -> str:
    key = name.strip().lower().replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in DATASETS and not key.startswith(("folder:", "json:", "builtin:", "vtab:")):
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or folder:PATH / json:PATH / "
                           "vtab:PATH")
    return key


def _require(path: Path, what: str, fix: str) -> Path:
    if not path.exists():
        raise DatasetError(f"missing {what}: {path} ({fix})")
    return path


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc


def read_split_json(split_file: Path, image_dir: Path, name: str) -> DatasetSplits:
    """A CoOp split file: {"train"|"val"|"test": [[relative_path, label, classname], ...]}."""
    data = _read_json(split_file)
    splits = {}
    names: dict[int, str] = {}
    for split in ("train", "val", "test"):
        entries = data.get(split)
        if not isinstance(entries, list):
            raise DatasetError(f"{split_file}: no '{split}' list (expected [[path, label, classname], ...])")
        samples = []
        for i, entry in enumerate(entries):
            if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
                raise DatasetError(f"{split_file}: {split}[{i}] is {entry!r}, expected [path, label, classname]")
            rel, label, classname = entry
            names.setdefault(int(label), classname)
            samples.append(Sample(str(image_dir / rel), int(label), classname))
        splits[split] = samples
    if sorted(names) != list(range(len(names))):
        raise DatasetError(f"{split_file}: labels must be 0..{len(names) - 1}, found {sorted(names)[:10]}...")
    return DatasetSplits(name, [names[i] for i in range(len(names))], **splits)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_class_folders(folder: Path, classnames=None, name="folder") -> tuple[list, list]:
    """One sub-folder of images per class (sorted names); returns (samples, classnames)."""
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not class_dirs:
        raise DatasetError(f"{folder} has no class sub-folders (expected one folder of images per class)")
    names = classnames or [d.name.replace("_", " ") for d in class_dirs]
    samples = [Sample(str(path), label, names[label])
               for label, d in enumerate(class_dirs) for path in _images_in(d)]
    return samples, names


def read_imagenet_classnames(path: Path) -> dict[str, str]:
    """classnames.txt: '<wnid> <class name>' per line, in label order."""
    _require(path, "ImageNet class list", "copy classnames.txt from CoOp's ImageNet instructions there")
    out = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        wnid, _, classname = line.strip().partition(" ")
        if not classname:
            raise DatasetError(f"{path}:{number}: expected '<wnid> <class name>', got {line!r}")
        out[wnid] = classname
    return out


def _read_imagenet(root: Path) -> DatasetSplits:
    folder = _require(root / "imagenet", "dataset folder", "create imagenet/ under the data root")
    wnids = read_imagenet_classnames(folder / "classnames.txt")
    names = list(wnids.values())
    splits = {}
    for split, sub in (("train", "train"), ("test", "val")):
        images = _require(folder / "images" / sub, f"ImageNet {sub} images", f"extract the {sub} set to images/{sub}")
        splits[split] = [Sample(str(p), label, names[label]) for label, wnid in enumerate(wnids)
                         for p in _images_in(_require(images / wnid, "class folder", "one folder per wnid"))]
    # ImageNet has no separate validation split: validation shots come from the training images.
    return DatasetSplits("imagenet", names, train=splits["train"], val=list(splits["train"]), test=splits["test"])


def _read_imagenet_variant(root: Path, key: str) -> DatasetSplits:
    folder_name, image_dir, layout = IMAGENET_VARIANTS[key]
    folder = _require(root / folder_name, "dataset folder", f"create {folder_name}/ under the data root")
    wnids = read_imagenet_classnames(folder / "classnames.txt")
    images = _require(folder / image_dir, "image folder", f"extract the dataset to {folder_name}/{image_dir}")
    all_names = list(wnids.values())
    if layout == "index":  # ImageNetV2: folders 0..999 in ImageNet label order
        test = [Sample(str(p), i, all_names[i]) for i in range(len(all_names))
                for p in _images_in(_require(images / str(i), "class folder", "folders 0..999"))]
        return DatasetSplits(key, all_names, test=test)
    present = [w for w in wnids if (images / w).is_dir()]
    if not present:
        raise DatasetError(f"{images} holds no <wnid> class folders")
    # ImageNet-A/-R cover 200 classes: classify among those only, labels 0..len-1 in ImageNet order.
    names = [wnids[w] for w in present]
    test = [Sample(str(p), label, names[label]) for label, w in enumerate(present) for p in _images_in(images / w)]
    splits = DatasetSplits(key, names, test=test)
    splits.imagenet_labels = [list(wnids).index(w) for w in present]
    return splits


def _read_fgvc_aircraft(root: Path) -> DatasetSplits:
    folder = _require(root / "fgvc_aircraft", "dataset folder", "move fgvc-aircraft-2013b/data there")
    variants = [v.strip() for v in _require(folder / "variants.txt", "class list", "keep data/variants.txt")
                .read_text().splitlines() if v.strip()]
    index = {v: i for i, v in enumerate(variants)}
    splits = {}
    for split in ("train", "val", "test"):
        listing = _require(folder / f"images_variant_{split}.txt", f"{split} list", "keep the data/*.txt files")
        samples = []
        for number, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            image_id, _, variant = line.strip().partition(" ")
            if variant not in index:
                raise DatasetError(f"{listing}:{number}: variant {variant!r} is not in variants.txt")
            samples.append(Sample(str(folder / "images" / f"{image_id}.jpg"), index[variant], variant))
        splits[split] = samples
    return DatasetSplits("fgvc_aircraft", variants, **splits)


VTAB_LISTS = {"train": "train800.txt", "val": "val200.txt", "trainval": "train800val200.txt", "test": "test.txt"}


def _read_image_list(path: Path, folder: Path) -> list:
    """(relative path, label) per line of a VTAB list file; errors name the file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 2 or not parts[-1].lstrip("-").isdigit() or int(parts[-1]) < 0:
            raise DatasetError(f"{path}, line {number}: expected 'relative/image/path label', got {line!r}")
        rows.append((folder / " ".join(parts[:-1]), int(parts[-1])))
    if not rows:
        raise DatasetError(f"{path} lists no images")
    return rows


def read_vtab(folder: Path) -> DatasetSplits:
    """A VTAB-1k task folder (the module docstring's vtab:PATH)."""
    folder = _require(folder, "VTAB-1k task folder", "give vtab:PATH, the folder holding train800.txt and the others")
    lists = {split: _read_image_list(_require(folder / file, "VTAB-1k list", f"put {file} in {folder}"), folder)
             for split, file in VTAB_LISTS.items()}
    num_classes = 1 + max(label for rows in lists.values() for _, label in rows)
    names_file = folder / "classnames.txt"
    if names_file.is_file():
        classnames = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if len(classnames) < num_classes:
            raise DatasetError(f"{names_file} names {len(classnames)} classes but the lists use labels up to "
                               f"{num_classes - 1}")
    else:
        classnames = [f"class {i}" for i in range(num_classes)]
    samples = {split: [Sample(path, label, classnames[label]) for path, label in rows] for split, rows in lists.items()}
    return DatasetSplits(f"vtab:{folder}", classnames, **samples)


def _read_user_folder(path: Path, seed: int = 1) -> DatasetSplits:
    path = _require(path, "image folder", "give folder:PATH with one sub-folder of images per class")
    if (path / "train").is_dir() and (path / "test").is_dir():
        train, names = read_class_folders(path / "train")
        test, _ = read_class_folders(path / "test", names)
        val = read_class_folders(path / "val", names)[0] if (path / "val").is_dir() else []
        return DatasetSplits(f"folder:{path}", names, train=train, val=val, test=test)
    samples, names = read_class_folders(path)
    # No split given: per class, a seeded 50% / 20% / 30% train / val / test split.
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for label in range(len(names)):
        items = [s for s in samples if s.label == label]
        rng.shuffle(items)
        n_train, n_val = math.ceil(0.5 * len(items)), math.ceil(0.2 * len(items))
        splits["train"] += items[:n_train]
        splits["val"] += items[n_train:n_train + n_val]
        splits["test"] += items[n_train + n_val:]
    return DatasetSplits(f"folder:{path}", names, **splits)


def load_dataset(name: str, root: str | Path | None = None) -> DatasetSplits:
    """Read a dataset's splits; ``root`` is the folder holding one folder per dataset."""
    key = canonical_name(name)
    if key.startswith("builtin:"):
        from .builtin import load_builtin

        return load_builtin(key.split(":", 1)[1])
    if key.startswith("folder:"):
        return _read_user_folder(Path(name.split(":", 1)[1]).expanduser())
    if key.startswith("json:"):
        split_file = _require(Path(name.split(":", 1)[1]).expanduser(), "split file", "give json:PATH")
        return read_split_json(split_file, split_file.parent, f"json:{split_file}")
    if key.startswith("vtab:"):
        return read_vtab(Path(name.split(":", 1)[1]).expanduser())
    if root is None:
        raise DatasetError(f"dataset {name!r} needs a data root (--root DIR holding one folder per dataset)")
    root = _require(Path(root).expanduser(), "data root", "point --root at the folder holding the datasets")
    if key in SPLIT_JSON:
        layout = SPLIT_JSON[key]
        folder = _require(root / layout.folder, "dataset folder", f"create {layout.folder}/ under the data root")
        split_file = _require(folder / layout.split_file, "split file",
                              f"download {layout.split_file} (CoOp's DATASETS.md) into {folder}")
        image_dir = _require(folder / layout.image_dir, "image folder", f"extract the images to {folder}")
        return read_split_json(split_file, image_dir, key)
    if key == "fgvc_aircraft":
        return _read_fgvc_aircraft(root)
    if key == "imagenet":
        return _read_imagenet(root)
    return _read_imagenet_variant(root, key)
