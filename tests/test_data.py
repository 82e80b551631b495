"""Dataset layouts, few-shot sampling, base/new subsampling, check-data and the seeded loaders.

Layouts are built on the fly in tmp folders with tiny random PNGs: no downloads.
"""
import json
import math
import random

import pytest
import torch
from PIL import Image

from fastdpl.data import DatasetError, fewshot_splits, load_dataset, subsample_classes
from fastdpl.data.check import check_dataset
from fastdpl.data.fewshot import fewshot_indices
from fastdpl.data.images import open_image
from fastdpl.pipeline.loaders import EpochBatches, SeededImages
from fastdpl.pipeline.runtime import Dist


def _png(path, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


def make_split_json_dataset(root, folder="dtd", image_dir="images", split_file="split_zhou_DescribableTextures.json",
                            classes=("banded", "bubbly", "cracked", "dotted", "zig_zag"), per_class=(12, 3, 4)):
    """A CoOp split-file dataset: images/<class>/<i>.png and the split JSON listing them."""
    base = root / folder
    splits, n = {}, 0
    for split, count in zip(("train", "val", "test"), per_class):
        entries = []
        for label, name in enumerate(classes):
            for i in range(count):
                rel = f"{name}/{split}_{i}.png"
                _png(base / image_dir / rel, seed=n)
                n += 1
                entries.append([rel, label, name])
        splits[split] = entries
    (base / split_file).write_text(json.dumps(splits))
    return base


def test_split_json_layout(tmp_path):
    make_split_json_dataset(tmp_path)
    splits = load_dataset("DTD", tmp_path)
    assert splits.classnames == ["banded", "bubbly", "cracked", "dotted", "zig_zag"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (60, 15, 20)
    sample = splits.test[7]
    assert sample.image.endswith(f"{sample.classname}/test_{7 % 4}.png") and open_image(sample.image).size == (8, 8)


@pytest.mark.parametrize("name", ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                  "sun397", "eurosat", "ucf101"])
def test_every_split_json_dataset_reads_its_own_layout(tmp_path, name):
    from fastdpl.data.datasets import SPLIT_JSON

    layout = SPLIT_JSON[name]
    make_split_json_dataset(tmp_path, layout.folder, layout.image_dir, layout.split_file, ("a", "b"), (2, 1, 1))
    splits = load_dataset(name, tmp_path)
    assert splits.num_classes == 2 and len(splits.train) == 4


def test_missing_root_split_file_and_image_are_named(tmp_path):
    with pytest.raises(DatasetError, match="data root"):
        load_dataset("dtd", tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="needs a data root"):
        load_dataset("dtd")
    (tmp_path / "dtd" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="split_zhou_DescribableTextures.json"):
        load_dataset("dtd", tmp_path)
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'"):
        load_dataset("mnist", tmp_path)
    base = make_split_json_dataset(tmp_path)
    missing = base / "images" / "bubbly" / "train_0.png"
    missing.unlink()
    with pytest.raises(DatasetError, match="missing image: .*bubbly/train_0.png"):
        open_image(str(missing))


def test_unreadable_image_and_check_data(tmp_path):
    base = make_split_json_dataset(tmp_path)
    (base / "images" / "dotted" / "test_1.png").write_bytes(b"not a png")
    (base / "images" / "banded" / "val_2.png").unlink()
    with pytest.raises(DatasetError, match="unreadable image: .*dotted/test_1.png"):
        open_image(str(base / "images" / "dotted" / "test_1.png"))
    lines, problems = check_dataset("dtd", tmp_path, shots=16)
    text = "\n".join(problems)
    assert "dotted/test_1.png" in text and "unreadable" in text
    assert "banded/val_2.png" in text and "missing" in text
    assert "fewer than 16 images" in text  # 12 training images per class
    assert any("5 classes" in line for line in lines)
    lines, problems = check_dataset("dtd", tmp_path / "elsewhere")
    assert lines == [] and "data root" in problems[0]


def test_bad_split_json_is_named(tmp_path):
    base = make_split_json_dataset(tmp_path)
    (base / "split_zhou_DescribableTextures.json").write_text(json.dumps({"train": [["a.png", 0]], "val": [],
                                                                          "test": []}))
    with pytest.raises(DatasetError, match=r"train\[0\].*expected \[path, label, classname\]"):
        load_dataset("dtd", tmp_path)
    (base / "split_zhou_DescribableTextures.json").write_text("{broken")
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset("dtd", tmp_path)


def test_fewshot_sampling_counts_seed_and_cache(tmp_path):
    make_split_json_dataset(tmp_path)
    splits = load_dataset("dtd", tmp_path)
    for shots in (1, 5):
        a = fewshot_splits(splits, shots, seed=3, cache_dir=tmp_path / "cache")
        counts = [sum(s.label == c for s in a.train) for c in range(5)]
        assert counts == [shots] * 5
        assert [sum(s.label == c for s in a.val) for c in range(5)] == [min(shots, 3, 4)] * 5  # 3 val images/class
        assert a.test == splits.test
    assert (tmp_path / "cache" / "shot_5-seed_3.json").is_file()
    again = fewshot_splits(splits, 5, seed=3)
    other = fewshot_splits(splits, 5, seed=4)
    assert again.train == a.train and other.train != a.train
    # A cached draw is reused as is, even if the sampler would now draw differently.
    cache = tmp_path / "cache" / "shot_5-seed_3.json"
    data = json.loads(cache.read_text())
    data["train"] = sorted(data["train"])[::-1]
    cache.write_text(json.dumps(data))
    assert [s.image for s in fewshot_splits(splits, 5, 3, tmp_path / "cache").train] == \
        [splits.train[i].image for i in data["train"]]
    data["sizes"]["train"] = 999
    cache.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="delete the file"):
        fewshot_splits(splits, 5, 3, tmp_path / "cache")
    with pytest.raises(ValueError, match=r"^shots must be a positive int, got 0$"):
        fewshot_splits(splits, 0, 3)
    # More shots than a class has: all of them.
    assert len(fewshot_splits(splits, 50, 1).train) == 60


def test_fewshot_validation_disjoint_when_drawn_from_train():
    from fastdpl.data.datasets import DatasetSplits, Sample

    train = [Sample(f"{c}_{i}.png", c, str(c)) for c in range(3) for i in range(10)]
    splits = DatasetSplits("imagenet-like", ["0", "1", "2"], train=train, val=train, test=[])
    indices = fewshot_indices(splits, 6, seed=0)
    assert not set(indices["train"]) & set(indices["val"])
    assert len(indices["val"]) == 12


@pytest.mark.parametrize("num_classes", [1, 5, 10])
def test_base_new_subsampling(num_classes):
    from fastdpl.data.datasets import DatasetSplits, Sample

    names = [f"class{c}" for c in range(num_classes)]
    rng = random.Random(num_classes)
    test = [Sample(f"{i}.png", rng.randrange(num_classes), "") for i in range(100)]
    test = [s._replace(classname=names[s.label]) for s in test]
    splits = DatasetSplits("x", names, test=test)
    n_base = math.ceil(num_classes / 2)
    base, new = subsample_classes(splits, "base"), subsample_classes(splits, "new")
    assert base.classnames == names[:n_base] and new.classnames == names[n_base:]
    for part, offset in ((base, 0), (new, n_base)):
        assert all(part.classnames[s.label] == s.classname for s in part.test)
        assert sorted(s.image for s in part.test) == sorted(s.image for s in test
                                                             if offset <= s.label < offset + part.num_classes)
    assert subsample_classes(splits, "all") is splits
    with pytest.raises(ValueError, match=r"^subsample must be one of \('all', 'base', 'new'\), got 'middle'$"):
        subsample_classes(splits, "middle")


def _classnames_file(folder, wnids):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classnames.txt").write_text("".join(f"{w} name of {w}\n" for w in wnids))


def test_imagenet_and_its_200_class_variants_map_labels(tmp_path):
    wnids = [f"n{i:08d}" for i in range(6)]
    _classnames_file(tmp_path / "imagenet", wnids)
    for sub in ("train", "val"):
        for i, w in enumerate(wnids):
            for j in range(3):
                _png(tmp_path / "imagenet" / "images" / sub / w / f"{j}.JPEG", seed=i * 10 + j)
    imagenet = load_dataset("imagenet", tmp_path)
    assert imagenet.num_classes == 6 and len(imagenet.test) == 18 and imagenet.val == imagenet.train
    # ImageNet-A-like: only 3 of the 6 classes present -> classify among those 3, labels 0..2.
    folder = tmp_path / "imagenet-adversarial"
    _classnames_file(folder, wnids)
    present = [wnids[1], wnids[3], wnids[4]]
    for w in present:
        _png(folder / "imagenet-a" / w / "a.jpg")
    a = load_dataset("imagenet-a", tmp_path)
    assert a.classnames == [f"name of {w}" for w in present]
    assert a.imagenet_labels == [1, 3, 4]
    assert sorted(s.label for s in a.test) == [0, 1, 2]
    assert all(a.classnames[s.label] == s.classname and f"/{present[s.label]}/" in s.image for s in a.test)
    # ImageNetV2: folders 0..999 in label order.
    v2 = tmp_path / "imagenetv2"
    _classnames_file(v2, wnids)
    for i in range(6):
        _png(v2 / "imagenetv2-matched-frequency-format-val" / str(i) / "x.jpeg")
    assert [s.label for s in load_dataset("imagenet_v2", tmp_path).test] == list(range(6))


def test_fgvc_aircraft_layout(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for split in ("train", "val", "test"):
        lines = []
        for i, v in enumerate(variants):
            _png(folder / "images" / f"{split}{i}.jpg")
            lines.append(f"{split}{i} {v}")
        (folder / f"images_variant_{split}.txt").write_text("\n".join(lines))
    splits = load_dataset("fgvc_aircraft", tmp_path)
    assert splits.classnames == variants and [s.label for s in splits.test] == [0, 1, 2]
    (folder / "images_variant_val.txt").write_text("val0 Boeing 999")
    with pytest.raises(DatasetError, match="images_variant_val.txt:1: variant 'Boeing 999'"):
        load_dataset("fgvc_aircraft", tmp_path)


def test_users_own_folder_and_json(tmp_path):
    for c in ("cat", "golden_retriever"):
        for i in range(10):
            _png(tmp_path / "mine" / c / f"{i}.png", seed=i)
    splits = load_dataset(f"folder:{tmp_path / 'mine'}")
    assert splits.classnames == ["cat", "golden retriever"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 4, 6)
    images = {s.image for s in splits.train + splits.val + splits.test}
    assert len(images) == 20  # a partition
    base = make_split_json_dataset(tmp_path, "own", "", "split.json", ("x", "y"), (2, 1, 1))
    own = load_dataset(f"json:{base / 'split.json'}")
    assert own.classnames == ["x", "y"] and open_image(own.train[0].image).size == (8, 8)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        (tmp_path / "empty").mkdir()
        load_dataset(f"folder:{tmp_path / 'empty'}")


def test_builtin_digits_are_real_and_split():
    digits = load_dataset("builtin:digits")
    assert digits.num_classes == 10
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert open_image(digits.test[0].image).size == (8, 8)


def test_seeded_augmentation_and_rank_shares(tmp_path):
    make_split_json_dataset(tmp_path)
    samples = load_dataset("dtd", tmp_path).train
    data = SeededImages(samples, 16, train=True, seed=5)
    x1, _ = data[(2, 7)]
    torch.manual_seed(123)  # the global RNG must not matter
    x2, _ = data[(2, 7)]
    x3, _ = data[(3, 7)]
    assert torch.equal(x1, x2) and not torch.equal(x1, x3)
    one = EpochBatches(len(samples), 8, seed=1, ranks=Dist(), shuffle=True, drop_last=False)
    two = [EpochBatches(len(samples), 4, seed=1, ranks=Dist(r, 2), shuffle=True, drop_last=False) for r in (0, 1)]
    for sampler in [one, *two]:
        sampler.set_epoch(4)
    for whole, first, second in zip(one, *two):
        assert whole == first + second
    assert len(two[0]) == 60 // 8 and len(one) == math.ceil(60 / 8)


def test_check_data_decodes_every_image_and_checks_every_split(tmp_path):
    """A truncated JPEG (which PIL's verify() passes) and a class without validation images are
    both reported, naming the file, or the class and split; few-shot sampling names them too."""
    import io

    base = make_split_json_dataset(tmp_path)
    split_file = base / "split_zhou_DescribableTextures.json"
    data = json.loads(split_file.read_text())
    # A real JPEG cut in half: the header is fine, the pixels are not all there.
    buffer = io.BytesIO()
    Image.fromarray(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy()).save(buffer, "JPEG")
    truncated = base / "images" / "cracked" / "train_0.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(truncated) as img:
        img.verify()  # what check-data used to do: passes
    data["train"][0] = ["cracked/train_0.jpg", data["train"][0][1], data["train"][0][2]]
    data["train"][0][1:] = [2, "cracked"]
    data["val"] = [row for row in data["val"] if row[2] != "bubbly"]
    split_file.write_text(json.dumps(data))
    _, problems = check_dataset("dtd", tmp_path, shots=4)
    text = "\n".join(problems)
    assert "unreadable image: " in text and "cracked/train_0.jpg" in text
    assert "val: classes 1 ('bubbly') have no images" in text
    with pytest.raises(DatasetError, match=r"^dtd: class 1 \('bubbly'\) has no val images; add some"):
        fewshot_splits(load_dataset("dtd", tmp_path), 4, 1)


def test_worker_data_errors_reach_the_user_as_one_line(tmp_path):
    """An unreadable image met by a DataLoader worker: one message naming the file, no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    for label in ("one", "two", "three"):
        for i in range(4):
            _png(tmp_path / "data" / label / f"{i}.png", seed=i)
    (tmp_path / "data" / "two" / "2.png").write_bytes(b"\\x89PNG but not really")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-m", "fastdpl.cli", "search", "--dataset", f"folder:{tmp_path / 'data'}", "--model", "tiny",
         "--shots", "4", "--batch-size", "4", "--search-epochs", "1", "--workers", "2", "--device", "cpu",
         "--progress", "false", "--output", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, cwd=root, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("fastdpl search: error: unreadable image: ") and "two/2.png" in lines[0]
