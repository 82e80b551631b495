"""The pipeline on timm ViT classifiers (``--model timm:NAME``): the tiny CLIP's image tower as a timm
model (exact against open_clip's tower), search / train / eval, the linear and uniform VPT-deep
baselines, the head's own learning rate, exact resume, torchrun, VTAB-1k lists, the VPT preset and
schedule, CLIP-only settings refused by name, and `fastdpl demo vit`."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from fastdpl.cli import main  # noqa: E402
from fastdpl.data import load_dataset  # noqa: E402
from fastdpl.data.datasets import DatasetError  # noqa: E402
from fastdpl.models import ModelLoadError, load_classifier, load_tiny_clip, vit_from_open_clip  # noqa: E402
from fastdpl.pipeline import demo_vit, stages, training  # noqa: E402
from fastdpl.pipeline.config import method_config  # noqa: E402
from helpers import stop_after_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(model="timm:tiny", dataset="builtin:digits", shots=2, seed=1, batch_size=4, val_batch_size=4,
             search_epochs=2, train_epochs=2, lr=0.5, head_lr=0.1, arch_lr=0.05, workers=0, device="cpu",
             crop_scale=[0.6, 1.0], flip=False, eval_batch_size=256, progress=False)


def quick(tmp_path, name="run", **overrides):
    return method_config(**{**QUICK, "output": str(tmp_path / name), **overrides})


def _cli_args(stage, out, *extra):
    """QUICK as the flags of ``stage`` (a stage takes only its own settings' flags)."""
    from fastdpl.pipeline.config import SETTINGS

    args = []
    for name, value in QUICK.items():
        if stage in SETTINGS[name][1]:
            args += [f"--{name.replace('_', '-')}", ",".join(map(str, value)) if isinstance(value, list) else str(value)]
    return [*args, "--output", str(out), *extra]


# ---- the tiny ViT: open_clip's tower as a timm model ----------------------------------------------
def _tower_features(visual, x):
    """open_clip's tower without its projection: ln_post of the class token."""
    proj, visual.proj = visual.proj, None
    try:
        return visual(x)
    finally:
        visual.proj = proj


@pytest.mark.parametrize("options", [{}, {"quick_gelu": True, "ls_init_value": 0.3, "width": 64, "layers": 2,
                                          "image_size": 24, "patch_size": 6}])
def test_an_open_clip_tower_converts_to_timm_with_the_same_features(options):
    import open_clip
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    if options:
        cfg = {k: v for k, v in options.items() if k != "quick_gelu"}
        torch.manual_seed(0)
        visual = _build_vision_tower(32, CLIPVisionCfg(head_width=16, **cfg), quick_gelu=options["quick_gelu"]).eval()
        with torch.no_grad():  # layer scales and biases away from their initial values
            for p in visual.parameters():
                p.add_(0.05 * torch.randn_like(p))
    else:
        visual = load_tiny_clip().visual
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    model = vit_from_open_clip(visual, num_classes=7).eval()
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(ours, _tower_features(visual, x), rtol=1e-5, atol=1e-6)
    assert model.get_classifier().out_features == 7
    assert model.pretrained_cfg["mean"] == pytest.approx(open_clip.OPENAI_DATASET_MEAN)
    with pytest.raises(ModelLoadError, match="class-token pooling"):
        vit_from_open_clip(_build_vision_tower(32, CLIPVisionCfg(width=32, layers=1, head_width=16, image_size=16,
                                                                 patch_size=8, attentional_pool=True)), 3)


def test_classifier_loading_errors_name_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match="'vit_nothing' is not a timm model"):
        load_classifier("timm:vit_nothing", None, 3)
    with pytest.raises(ModelLoadError, match="give a local checkpoint file .* fastdpl never downloads"):
        load_classifier("timm:vit_tiny_patch16_224", "augreg_in21k", 3)
    broken = tmp_path / "broken.pth"
    broken.write_text("not a checkpoint")
    with pytest.raises(ModelLoadError, match=r"broken\.pth: not a vit_tiny_patch16_224 checkpoint"):
        load_classifier("timm:vit_tiny_patch16_224", str(broken), 3)
    foreign = tmp_path / "foreign.pth"
    torch.save({"not": torch.zeros(1)}, foreign)  # timm's own loading would warn and keep random weights
    with pytest.raises(ModelLoadError, match=r"foreign\.pth does not fit vit_tiny_patch16_224: missing \["):
        load_classifier("timm:vit_tiny_patch16_224", str(foreign), 3)


def test_a_local_checkpoint_loads_strictly_with_a_fresh_head_for_the_classes(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    path = tmp_path / "vit.pth"
    torch.save({"state_dict": source.state_dict()}, path)  # nested, as training scripts save
    model = load_classifier("timm:vit_tiny_patch16_224", str(path), 3)
    for name, value in source.state_dict().items():
        if not name.startswith("head."):
            assert torch.equal(model.state_dict()[name], value), name
    assert model.get_classifier().out_features == 3
    same = load_classifier("timm:vit_tiny_patch16_224", str(path), 10)  # the class count fits: head kept
    assert torch.equal(same.get_classifier().weight, source.get_classifier().weight)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("blocks.11.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ModelLoadError, match=r"missing \['blocks\.11\."):
        load_classifier("timm:vit_tiny_patch16_224", str(tmp_path / "partial.pth"), 3)


# ---- the stages ------------------------------------------------------------------------------------
def test_search_train_eval_on_a_classifier(tmp_path, capsys):
    cfg = quick(tmp_path)
    searched = stages.run_search(cfg)
    lengths = searched["config"]["lengths"]["image"]
    assert len(lengths) == 4 and set(lengths) <= {0, 1, 5, 10}
    out = tmp_path / "run"
    assert (out / "search" / "alpha_heatmap.png").stat().st_size > 1000
    assert json.loads((out / "search" / "prompt_config.json").read_text())["lengths"]["image"] == lengths
    trained = stages.run_train(cfg)
    own = trained["results"]["builtin:digits"]
    assert trained["method"] == "dpl" and len(own["per_class"]) == 10 and own["num_test"] > 100
    state = torch.load(out / "train" / "prompts.pt", weights_only=False)
    assert state["bank"]["settings"]["config"]["lengths"]["image"] == lengths
    assert state["head"]["weight"].shape == (10, 96)
    # eval rebuilds the trained prompts and head from the file alone: the same accuracy
    again = stages.run_eval(quick(tmp_path))
    assert again["top1"] == trained["top1"] and again["results"] == trained["results"]
    # the frozen backbone did not move: only the head differs from a fresh load
    fresh = load_classifier("timm:tiny", None, 10).state_dict()
    model = load_classifier("timm:tiny", None, 10)
    from fastdpl.vit import FastDPLViT

    FastDPLViT.from_state(model, {k: state[k] for k in ("bank", "head", "prompt_dropout")})
    for name, value in model.state_dict().items():
        assert torch.equal(value, fresh[name]) != name.startswith("head."), name


def test_linear_trains_the_head_alone_and_uniform_is_vpt_deep(tmp_path):
    linear = stages.run_train(quick(tmp_path, "linear", method="linear"))
    state = torch.load(tmp_path / "linear" / "train" / "prompts.pt", weights_only=False)
    assert linear["method"] == "linear" and state["bank"]["prompts"] == {}
    assert state["bank"]["settings"]["config"]["lengths"]["image"] == [0, 0, 0, 0]
    from fastdpl.config import PromptConfig
    from fastdpl.pipeline import vit

    job = vit.prepare(quick(tmp_path, "x", method="linear"), "train")
    start = vit.build(job, "fixed", PromptConfig.zero_shot({"image": 4}, towers=("image",))).head_parameters()
    assert not torch.equal(start[0].detach(), state["head"]["weight"])  # the head did train from its seeded start
    stages.run_train(quick(tmp_path, "uniform", method="uniform:5:2"))
    state = torch.load(tmp_path / "uniform" / "train" / "prompts.pt", weights_only=False)
    assert state["bank"]["settings"]["config"]["lengths"]["image"] == [5, 5, 0, 0]
    assert sorted(tuple(t.shape) for t in state["bank"]["prompts"].values()) == [(5, 96), (5, 96)]


def test_the_head_has_its_own_learning_rate(tmp_path):
    from fastdpl.pipeline import vit

    job = vit.prepare(quick(tmp_path, head_lr=0.03, lr=0.7), "search")
    dpl = vit.build(job, "search")
    groups = vit.optimizer(job, dpl).param_groups
    assert [g["lr"] for g in groups] == [0.7, 0.03]
    assert groups[0]["params"] == dpl.prompt_parameters() and groups[1]["params"] == dpl.head_parameters()
    same = vit.optimizer(vit.prepare(quick(tmp_path, head_lr=None, lr=0.7), "search"), dpl).param_groups
    assert [g["lr"] for g in same] == [0.7, 0.7]


def test_an_interrupted_train_resumes_exactly_with_prompt_dropout(tmp_path, monkeypatch):
    """Per-image prompt dropout draws from the global RNG: the checkpoint's RNG state makes resume exact."""
    settings = dict(method="uniform:5:4", train_epochs=3, prompt_dropout=0.2, prompt_init="vpt", schedule="vpt")
    stages.run_train(quick(tmp_path, "whole", **settings))
    restore = stop_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        stages.run_train(quick(tmp_path, "cut", **settings))
    restore()
    stages.run_train(quick(tmp_path, "cut", resume=True, **settings))
    a, b = (torch.load(tmp_path / run / "train" / "prompts.pt", weights_only=False) for run in ("whole", "cut"))
    for key in a["bank"]["prompts"]:
        assert torch.equal(a["bank"]["prompts"][key], b["bank"]["prompts"][key]), key
    for key in a["head"]:
        assert torch.equal(a["head"][key], b["head"][key]), key
    metrics = [(tmp_path / run / "train" / "metrics.jsonl").read_text() for run in ("whole", "cut")]
    assert metrics[0] == metrics[1]


def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo ranks of per-rank batch 2 == 1 process of batch 4 (DDP around the FastDPLViT)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {"one": ([sys.executable], "4"),
            "two": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"], "2")}
    for name, (launcher, batch) in runs.items():
        args = _cli_args("search", tmp_path / name, "--batch-size", batch, "--val-batch-size", batch, "--search-epochs", "1")
        done = subprocess.run([*launcher, "-m", "fastdpl.cli", "search", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / run / "search" / "prompts.pt", weights_only=False) for run in runs)
    tensors = [("prompts", k) for k in one["bank"]["prompts"]] + [("arch_logits", k) for k in one["bank"]["arch_logits"]]
    for group, key in tensors:
        a, b = two["bank"][group][key].double(), one["bank"][group][key].double()
        assert ((a - b).norm() / b.norm()).item() < 2.0 ** -12, f"{group}/{key}"
    for key in one["head"]:
        a, b = two["head"][key].double(), one["head"][key].double()
        assert ((a - b).norm() / b.norm()).item() < 2.0 ** -12, f"head/{key}"
    assert one["bank"]["arch_logits"]["image"].abs().max() > 1e-3  # alpha moved: not vacuous


# ---- VTAB-1k lists --------------------------------------------------------------------------------
def _vtab(folder: Path, sizes=(("train800", 6), ("val200", 4), ("test", 5)), classes=3, names=True):
    (folder / "images").mkdir(parents=True)
    rows = {}
    for split, count in sizes:
        rows[split] = []
        for i in range(count):
            path = f"images/{split}_{i}.png"
            Image.new("RGB", (20, 20), (40 * i % 255, 90, 30 * (i % 3))).save(folder / path)
            rows[split].append(f"{path} {i % classes}")
        (folder / f"{split}.txt").write_text("\n".join(rows[split]) + "\n")
    (folder / "train800val200.txt").write_text("\n".join(rows["train800"] + rows["val200"]) + "\n")
    if names:
        (folder / "classnames.txt").write_text("\n".join(f"kind {i}" for i in range(classes)) + "\n")
    return folder


def test_vtab_lists_are_read_as_splits_and_the_train_stage_trains_on_train800val200(tmp_path, monkeypatch):
    task = _vtab(tmp_path / "task")
    splits = load_dataset(f"vtab:{task}")
    assert (len(splits.train), len(splits.val), len(splits.trainval), len(splits.test)) == (6, 4, 10, 5)
    assert splits.classnames == ["kind 0", "kind 1", "kind 2"] and splits.final_train == splits.trainval
    assert splits.train[1].image == task / "images/train800_1.png" and splits.train[1].label == 1
    seen = []
    loader = training.train_loader

    def recording(job, samples, seed):
        seen.append(len(samples))
        return loader(job, samples, seed)

    monkeypatch.setattr(training, "train_loader", recording)
    cfg = dict(dataset=f"vtab:{task}", shots=None, search_epochs=1, train_epochs=1)
    stages.run_search(quick(tmp_path, "vtab", **cfg))
    stages.run_train(quick(tmp_path, "vtab", **cfg))
    assert seen == [6, 10]  # search: train800; train: train800val200
    plain = load_dataset(f"vtab:{_vtab(tmp_path / 'unnamed', names=False)}")
    assert plain.classnames == ["class 0", "class 1", "class 2"]


def test_vtab_errors_name_the_file_and_line(tmp_path):
    task = _vtab(tmp_path / "task")
    (task / "val200.txt").write_text("images/a.png 1\nimages/b.png two\n")
    with pytest.raises(DatasetError, match=r"val200\.txt, line 2: expected 'relative/image/path label'"):
        load_dataset(f"vtab:{task}")
    (task / "val200.txt").unlink()
    with pytest.raises(DatasetError, match=r"missing VTAB-1k list: .*val200\.txt"):
        load_dataset(f"vtab:{task}")
    task = _vtab(tmp_path / "fine")
    with pytest.raises(DatasetError, match="pass --shots none"):
        stages.run_search(quick(tmp_path, dataset=f"vtab:{task}", shots=4))


# ---- settings: the VPT preset, its schedule, refusals ---------------------------------------------
def test_classifier_defaults_and_the_vpt_preset():
    cfg = method_config(model="timm:tiny")
    assert cfg.candidate_lengths == [0, 1, 5, 10] and cfg.search_towers == ["image"] and cfg.pretrained is None
    vpt = method_config(model="timm:tiny", preset="vpt", lr=0.25)
    assert (vpt.prompt_init, vpt.prompt_dropout, vpt.schedule, vpt.warmup_epochs, vpt.train_epochs,
            vpt.batch_size, vpt.weight_decay, vpt.momentum) == ("vpt", 0.1, "vpt", 10, 100, 64, 0.01, 0.9)
    assert vpt.lr == 0.25  # a setting given wins over the preset
    assert method_config(model="tiny").candidate_lengths == list(range(7))


def test_the_vpt_schedule_is_linear_warm_up_then_cosine_to_zero():
    cfg = method_config(model="timm:tiny", preset="vpt")
    factors = [training.lr_factor(e, cfg, 100) for e in range(100)]
    assert factors[:10] == pytest.approx([e / 10 for e in range(10)])
    assert factors[10] == 1.0 and factors[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert factors[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    dassl = method_config(model="timm:tiny", warmup_epochs=1, warmup_lr=1e-5, lr=0.1)
    assert training.lr_factor(0, dassl, 10) == pytest.approx(1e-4) and training.lr_factor(1, dassl, 10) == 1.0


@pytest.mark.parametrize("command,extra,match", [
    ("train", ["--method", "coop"], "--method coop is CLIP-only"),
    ("train", ["--template", "a photo of a {}."], "--template: class-name templates is CLIP-only"),
    ("search", ["--subsample", "base"], "--subsample: base-to-new"),
    ("train", ["--eval-datasets", "builtin:digits"], "--eval-datasets: cross-dataset"),
    ("train", ["--distill-weight", "1"], "--distill-weight: distillation towards zero-shot CLIP"),
    ("search", ["--search-towers", "image,text"], "a timm classifier has one tower, image"),
    ("zeroshot", [], "fastdpl zeroshot needs a CLIP's class texts"),
    ("tpt", [], "fastdpl tpt needs a CLIP's class texts"),
    ("search", ["--model", "timm:vit_nothing"], "is not a timm model"),
    ("search", ["--model", "timm:vit_tiny_patch16_224", "--pretrained", "openai"],
     "for a timm model give a local checkpoint file"),
    ("train", ["--model", "tiny", "--head-lr", "none", "--method", "linear"],
     "--method linear: settings of timm image classifiers"),
    ("search", ["--model", "tiny", "--preset", "vpt"], "--preset, --prompt-dropout, --prompt-init: settings of timm"),
    ("train", ["--prompt-dropout", "1.5"], r"prompt_dropout must be in \[0, 1\)"),
])
def test_bad_settings_give_one_clear_error(tmp_path, capsys, command, extra, match):
    assert main([command, *_cli_args(command, tmp_path / "bad"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastdpl {command}: error: ") and "Traceback" not in err
    import re

    assert re.search(match, err), err


def test_eval_refuses_a_clips_prompts_by_name(tmp_path, capsys):
    from fastdpl.pipeline.demo import demo_config

    clip = demo_config(output=str(tmp_path / "clip"), shots=2, train_epochs=1, batch_size=4, method="uniform:1:1",
                       progress=False, eval_batch_size=256)
    stages.run_train(clip)
    prompts = tmp_path / "clip" / "train" / "prompts.pt"
    assert main(["eval", *_cli_args("eval", tmp_path / "vit"), "--prompts", str(prompts)]) == 2
    assert "holds no FastDPLViT prompts" in capsys.readouterr().err


# ---- the demo -------------------------------------------------------------------------------------
SHORT = dict(search_epochs=6, train_epochs=8, progress=False)


def test_demo_vit_table_and_heatmap(tmp_path, capsys):
    table = demo_vit.run_demo_vit(demo_vit.demo_vit_config(output=str(tmp_path / "demo"), **SHORT))
    printed = capsys.readouterr().out
    assert list(table) == ["linear probe (head only)", "VPT-deep, 5 tokens per block", "DPL (searched)"]
    assert table["linear probe (head only)"][0] == [0, 0, 0, 0] and table["VPT-deep, 5 tokens per block"][0] == [5] * 4
    assert set(table["DPL (searched)"][0]) <= {0, 1, 5, 10}
    for name, (_, top1) in table.items():
        assert top1 > 0.3, (name, top1)  # far above chance (10 %) on the held-out digits
        assert f"| {name} |" in printed
    out = tmp_path / "demo"
    assert (out / "dpl" / "search" / "alpha_heatmap.png").stat().st_size > 1000
    assert "| linear probe (head only) | 0 0 0 0 | 0 |" in (out / "table.md").read_text()
    # a second run picks up its finished stages: the same table, no retraining
    assert demo_vit.run_demo_vit(demo_vit.demo_vit_config(output=str(out), **SHORT)) == table


def test_the_cli_runs_the_vit_demo_in_its_own_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_vit, "DEMO_VIT_SETTINGS", {**demo_vit.DEMO_VIT_SETTINGS, "search_epochs": 1,
                                                        "train_epochs": 1, "shots": 2})
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "vit", "--no-progress"]) == 0
    assert (tmp_path / "runs" / "demo-vit" / "table.md").is_file() and not (tmp_path / "runs" / "demo").exists()


def test_a_checkpoint_older_than_a_setting_resumes_when_it_has_its_default():
    """A checkpoint saved before a setting existed ran with that setting's default value."""
    from fastdpl.pipeline.config import changed_settings

    cfg = method_config(model="timm:tiny")
    saved = {k: v for k, v in cfg.to_dict().items() if k not in ("schedule", "head_lr")}
    assert changed_settings(saved, cfg, "train") == []
    assert changed_settings(saved, method_config(model="timm:tiny", schedule="vpt"), "train") == \
        ["schedule: 'cosine' -> 'vpt'"]
