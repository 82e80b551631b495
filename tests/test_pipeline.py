"""The DPL pipeline on CPU: settings, stages, checkpoints and --resume, torchrun/DDP, report, model loading.

Runs use the built-in tiny CLIP and the built-in digits at 2-4 shots: seconds each.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastdpl.pipeline import evaluation, stages, training
from fastdpl.pipeline.config import RunConfig, add_config_arguments, resolve_config
from fastdpl.pipeline.demo import demo_config
from helpers import assert_matches

ROOT = Path(__file__).resolve().parents[1]


def quick(tmp_path, name="run", **overrides) -> RunConfig:
    settings = dict(shots=2, search_epochs=2, train_epochs=2, batch_size=4, output=str(tmp_path / name), resume=False,
                    progress=False, eval_batch_size=256)
    return demo_config(**{**settings, **overrides})


def _cli(*args, timeout=300, **popen):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastdpl.cli", *args], env=env, cwd=ROOT, **popen)


# ---- settings --------------------------------------------------------------------------------------------
def test_yaml_then_flags_override_defaults(tmp_path):
    import argparse

    (tmp_path / "run.yaml").write_text("dataset: dtd\nshots: 4\nlr: 0.01\ncandidate_lengths: [0, 2, 4]\n")
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    cfg = resolve_config(parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--lr", "0.5",
                                            "--candidate-lengths", "0,1", "--pretrained", "none"]))
    assert (cfg.dataset, cfg.shots, cfg.lr, cfg.candidate_lengths, cfg.pretrained) == ("dtd", 4, 0.5, [0, 1], None)
    assert cfg.search_epochs == 80 and cfg.arch_betas == [0.5, 0.999]  # paper defaults
    (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown settings \\['learning_rate'\\]"):
        resolve_config(parser.parse_args(["--config", str(tmp_path / "bad.yaml")]))
    with pytest.raises(ValueError, match=r"^precision must be one of fp32, bf16, got 'fp8'$"):
        RunConfig(precision="fp8").validate()
    with pytest.raises(ValueError, match=r"^batch_size must be a positive int, got 0$"):
        RunConfig(batch_size=0).validate()
    with pytest.raises(SystemExit):
        parser.parse_args(["--shots", "many"])


def test_bool_flags_without_a_value_mean_true():
    import argparse

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    assert resolve_config(parser.parse_args(["--resume"])).resume is True
    assert resolve_config(parser.parse_args(["--resume", "false"])).resume is False
    assert resolve_config(parser.parse_args(["--progress", "--resume"])).progress is True


def test_library_builders_leave_the_global_rng_alone():
    """load_clip("tiny") and the benchmark builders seed privately: a pipeline that seeded the
    global RNG keeps its stream."""
    from fastdpl.bench import block, step
    from fastdpl.models import load_clip

    torch.manual_seed(123)
    state = torch.get_rng_state()
    load_clip("tiny")
    step.build_model("tiny", "cpu")
    step.tiny_clip(3)
    block._block(block.SMOKE_SHAPES[0], "cpu", torch.float32)
    assert torch.equal(torch.get_rng_state(), state)


def test_lr_schedule_warmup_then_cosine():
    cfg = RunConfig(lr=0.1, warmup_lr=1e-5, warmup_epochs=1)
    assert training.lr_factor(0, cfg, 10) * cfg.lr == pytest.approx(1e-5)
    assert training.lr_factor(1, cfg, 10) == pytest.approx(1.0)
    assert training.lr_factor(6, cfg, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))


# ---- stages ----------------------------------------------------------------------------------------------
def test_arch_step_computes_only_alpha_gradients(tmp_path):
    """The alpha step leaves every prompt gradient unset (never computed, never all-reduced) and
    moves alpha exactly as Adam on the full backward's alpha gradients would."""
    from fastdpl.models import load_clip
    from fastdpl.pipeline.classifier import wrap
    from fastdpl.pipeline.runtime import Dist
    from fastdpl.prompt import FastDPLPrompt

    cfg = quick(tmp_path)
    job = stages.Job(cfg, Dist(), "cpu", load_clip("tiny"), None, 32)
    dpl = FastDPLPrompt(job.model, ["zero", "one", "two"], mode="search", candidate_lengths=(0, 1, 3),
                        impl="eager", generator=torch.Generator().manual_seed(1))
    net = wrap(dpl, job)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    # The full backward, for the expected alpha gradients and step.
    F.cross_entropy(net(images), labels).backward()
    expected = {name: p.grad.clone() for name, p in dpl.named_parameters() if p.grad is not None and "arch" in name}
    start = {name: p.detach().clone() for name, p in dpl.named_parameters() if "arch" in name}
    assert expected and set(expected) == set(start)
    arch_opt = torch.optim.Adam(dpl.arch_parameters(), lr=0.1)
    dpl.zero_grad(set_to_none=True)
    training.arch_step(net, arch_opt, images, labels, job)
    assert all(p.grad is None for p in dpl.prompt_parameters())
    # The same Adam step taken on copies of alpha with the full backward's gradients.
    copies = {name: torch.nn.Parameter(start[name].clone()) for name in start}
    for name, c in copies.items():
        c.grad = expected[name]
    torch.optim.Adam(list(copies.values()), lr=0.1).step()
    for name, p in dpl.named_parameters():
        if name in expected:
            torch.testing.assert_close(p.grad, expected[name], rtol=0, atol=0)
            torch.testing.assert_close(p.detach(), copies[name].detach(), rtol=0, atol=0)
            assert not torch.equal(p.detach(), start[name])


def test_search_writes_alpha_config_and_figures(tmp_path):
    cfg = quick(tmp_path, candidate_lengths=[0, 1, 3])
    result = stages.run_search(cfg)
    out = tmp_path / "run" / "search"
    for name in ("checkpoint.pt", "alpha_history.json", "prompt_config.json", "prompts.pt", "alpha_heatmap.png",
                 "alpha_evolution.png", "run.yaml"):
        assert (out / name).is_file(), name
    history = json.loads((out / "alpha_history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    state = torch.load(out / "prompts.pt", weights_only=False)
    for tower, logits in state["arch_logits"].items():
        # The derived configuration is the argmax of the final alpha, and alpha moved from its init.
        assert result["config"]["lengths"][tower] == [[0, 1, 3][i] for i in logits.argmax(1).tolist()]
        # float32 values through JSON and back: exact
        assert torch.equal(torch.tensor(history[-1]["alpha"][tower]), torch.softmax(logits.float(), -1))
        assert logits.abs().max() > 1e-2
    with pytest.raises(FileExistsError, match=r"checkpoint\.pt exists: pass --resume to continue that run"):
        stages.run_search(cfg)


def test_progress_bars_print_plain_lines_when_output_is_not_a_terminal(tmp_path, capsys, monkeypatch):
    """With --progress on and output to a file or pipe (`fastdpl demo > log`), no bar frames
    (carriage returns) reach the log: the per-epoch lines and the evaluation's result lines only;
    on a terminal the bars draw as before."""
    cfg = quick(tmp_path, progress=True, search_epochs=1, train_epochs=1, prompt_config="uniform:1:1")
    stages.run_train(cfg)
    captured = capsys.readouterr()
    assert "\r" not in captured.out + captured.err, (captured.out + captured.err)[-500:]
    assert "train epoch 1: loss" in captured.out
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = training.progress(range(3), stages.Job(cfg, stages.Dist(), "cpu", None, None, 32), "epoch")
    assert not bar.disable
    list(bar)
    assert "\r" in screen.getvalue()


def test_train_eval_and_base_to_new(tmp_path):
    cfg = quick(tmp_path, subsample="base", prompt_config="uniform:2:2", eval_datasets=["builtin:digits"])
    result = stages.run_train(cfg)
    assert set(result["results"]) == {"builtin:digits[base]", "builtin:digits[new]", "builtin:digits"}
    assert result["results"]["builtin:digits[base]"]["num_test"] + \
        result["results"]["builtin:digits[new]"]["num_test"] == result["results"]["builtin:digits"]["num_test"]
    assert set(result["results"]["builtin:digits[base]"]["per_class"]) == {"zero", "one", "two", "three", "four"}
    assert len(result["results"]["builtin:digits"]["per_class"]) == 10
    assert set(result["results"]["builtin:digits[new]"]["per_class"]) == {"five", "six", "seven", "eight", "nine"}
    assert result["hm"] == pytest.approx(2 * result["base"] * result["new"] / (result["base"] + result["new"]))
    assert result["results"]["builtin:digits[base]"]["top1"] == result["base"] == result["top1"]
    saved = json.loads((tmp_path / "run" / "train" / "results.json").read_text())
    assert saved["hm"] == pytest.approx(result["hm"])
    # Cross-dataset evaluation of the saved prompts recomputes the same numbers.
    again = stages.run_eval(quick(tmp_path, subsample="base", eval_datasets=["builtin:digits"]))
    assert (again["stage"], again["method"]) == ("eval", "uniform:2:2")  # groups across seeds in reports
    assert again["results"]["builtin:digits[new]"]["top1"] == result["results"]["builtin:digits[new]"]["top1"]
    per_class = result["results"]["builtin:digits[base]"]["per_class"]
    assert min(per_class.values()) >= 0 and max(per_class.values()) <= 1


def test_accuracy_per_class_against_a_direct_count(tmp_path):
    cfg = quick(tmp_path, shots=1)
    job = stages.prepare(cfg)
    dpl = stages.build_dpl(job, job.splits.classnames, "fixed", stages.PromptConfig.uniform(1, 4, 4))
    samples = job.splits.test[::7]
    result = evaluation.accuracy(job, dpl, samples)
    transform = __import__("fastdpl.data.images", fromlist=["x"]).clip_transform(32, train=False)
    from fastdpl.data import open_image

    with torch.no_grad():
        predictions = dpl(torch.stack([transform(open_image(s.image)) for s in samples])).argmax(1).tolist()
    hits = [p == s.label for p, s in zip(predictions, samples)]
    assert result["top1"] == pytest.approx(sum(hits) / len(hits))
    for label, name in enumerate(dpl.classnames):
        mine = [h for h, s in zip(hits, samples) if s.label == label]
        assert result["per_class"][name] == pytest.approx(sum(mine) / len(mine))


def test_distillation_teacher_skipped_at_weight_zero_and_exact_otherwise(tmp_path, monkeypatch):
    from fastdpl.pipeline import regularizers

    job = stages.prepare(quick(tmp_path))
    monkeypatch.setattr(regularizers, "frozen_image_features", lambda *a: pytest.fail("teacher ran at weight 0"))
    monkeypatch.setattr(regularizers, "template_text_features", lambda *a: pytest.fail("teacher ran at weight 0"))
    assert regularizers.train_regularization(job, job.splits.classnames) == {}  # no regulariser, no frozen model
    monkeypatch.undo()
    job.cfg.distill_weight, job.cfg.distill_temperature = 0.7, 2.0
    # All in float64 (the loss and an independent reference): they must agree to rounding.
    model = job.model.double()
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    student = torch.randn(3, 10, dtype=torch.float64)
    # Reference: the teacher's text feature averages every template's normalised feature
    # (all 60 of the authors' list, or only its last one, as the authors' code ends up using).
    import open_clip

    from fastdpl.templates import IMAGENET_TEMPLATES

    for teacher_setting, templates in (("ensemble", IMAGENET_TEMPLATES), ("last", ["itap of the {}."])):
        job.cfg.distill_teacher = teacher_setting
        terms = regularizers.train_regularization(job, job.splits.classnames)
        (regularizer,) = terms["regularizers"]
        assert regularizer.frozen and not regularizer.features
        loss = regularizer.term(training.Step(images, None, student, frozen=terms["frozen"]))
        with torch.no_grad():
            texts = [[t.format(c) for c in job.splits.classnames] for t in templates]
            text = torch.stack([F.normalize(model.encode_text(open_clip.tokenize(t, context_length=16)), dim=-1)
                                for t in texts]).mean(0)
            teacher = model.logit_scale.exp() * F.normalize(model.encode_image(images.double()), dim=-1) @ \
                F.normalize(text, dim=-1).T
        p = torch.softmax(teacher / 2, -1)
        kl = (p * (torch.log(p) - torch.log_softmax(student / 2, -1))).sum(1).mean()
        assert loss.dtype == torch.float64
        assert loss.item() == pytest.approx(0.7 * 4 * kl.item(), rel=1e-12)


def test_grad_clip_bounds_the_step(tmp_path):
    job = stages.prepare(quick(tmp_path, grad_clip=1e-3))
    dpl = stages.build_dpl(job, job.splits.classnames, "fixed", stages.PromptConfig.uniform(2, 4, 4))
    before = [p.detach().clone() for p in dpl.prompt_parameters()]
    optimizer = torch.optim.SGD(dpl.prompt_parameters(), lr=1.0)
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    training.loss_step(dpl, optimizer, images, labels, job)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(dpl.prompt_parameters(), before)])
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)  # lr 1: the step is the clipped gradient


def test_bf16_autocast_search_runs(tmp_path):
    stages.run_search(quick(tmp_path, precision="bf16", search_epochs=1, shots=1, batch_size=5))
    state = torch.load(tmp_path / "run" / "search" / "prompts.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["arch_logits"].values())


def test_prompt_config_presets_and_errors(tmp_path):
    job = stages.prepare(quick(tmp_path))
    job.cfg.prompt_config = "uniform:3:2"
    config, method = stages.resolve_prompt_config(job)
    assert config.lengths["image"] == (3, 3, 0, 0) and method == "uniform:3:2"
    job.cfg.prompt_config = "uniform:3"
    with pytest.raises(ValueError, match="uniform:LENGTH:DEPTH"):
        stages.resolve_prompt_config(job)
    job.cfg.prompt_config = None
    with pytest.raises(FileNotFoundError, match="fastdpl search"):
        stages.resolve_prompt_config(job)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    from fastdpl.atomic import replace_atomically, write_text_atomic

    target = write_text_atomic(tmp_path / "results.json", "old")

    def half_then_crash(tmp):
        tmp.write_text("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(target, half_then_crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]
    assert write_text_atomic(target, "new").read_text() == "new"


# ---- checkpoints: kill and resume -------------------------------------------------------------------------
def _search_args(out, *extra):
    return ["search", "--dataset", "builtin:digits", "--model", "tiny", "--template", "a photo of the number {}.",
            "--shots", "4", "--batch-size", "4", "--search-epochs", "6", "--workers", "0", "--device", "cpu",
            "--crop-scale", "0.6,1.0", "--flip", "false", "--progress", "false", "--output", str(out), *extra]


def test_killed_search_resumes_to_the_same_alpha_and_accuracy(tmp_path):
    whole = _cli(*_search_args(tmp_path / "whole"))
    killed = _cli(*_search_args(tmp_path / "killed"))
    checkpoint = tmp_path / "killed" / "search" / "checkpoint.pt"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        if checkpoint.is_file() and torch.load(checkpoint, weights_only=False)["epoch"] >= 2:
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    stopped_at = torch.load(checkpoint, weights_only=False)["epoch"]
    assert 2 <= stopped_at < 6
    assert _cli(*_search_args(tmp_path / "killed", "--resume", "true")).wait(timeout=300) == 0
    assert whole.wait(timeout=300) == 0
    a = torch.load(tmp_path / "whole" / "search" / "prompts.pt", weights_only=False)
    b = torch.load(tmp_path / "killed" / "search" / "prompts.pt", weights_only=False)
    for group in ("arch_logits", "prompts"):
        for key in a[group]:
            assert torch.equal(b[group][key], a[group][key]), f"{group}/{key}: resume is not bitwise exact"
    history = [json.loads((tmp_path / run / "search" / "alpha_history.json").read_text())
               for run in ("whole", "killed")]
    assert [h["accuracy"] for h in history[0]] == pytest.approx([h["accuracy"] for h in history[1]])
    accuracies = [stages.run_eval(quick(tmp_path, output=str(tmp_path / run), shots=4),
                                  prompts=str(tmp_path / run / "search" / "prompts.pt"))["top1"]
                  for run in ("whole", "killed")]
    assert accuracies[0] == accuracies[1]


# ---- torchrun / DDP -------------------------------------------------------------------------------------
def test_torchrun_two_processes_match_one(tmp_path):
    """2 gloo ranks with per-rank batch 2 == 1 process with batch 4 (class texts split across the ranks)."""
    common = ["-m", "fastdpl.cli", *_search_args(tmp_path / "x")[:-2]]
    common[common.index("--search-epochs") + 1] = "2"
    common[common.index("--shots") + 1] = "2"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    single = [sys.executable, *common, "--output", str(tmp_path / "one")]
    single[single.index("--batch-size") + 1] = "4"
    single += ["--val-batch-size", "4"]
    double = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *common,
              "--output", str(tmp_path / "two")]
    double[double.index("--batch-size") + 1] = "2"
    double += ["--val-batch-size", "2"]
    for command in (single, double):
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one = torch.load(tmp_path / "one" / "search" / "prompts.pt", weights_only=False)
    two = torch.load(tmp_path / "two" / "search" / "prompts.pt", weights_only=False)
    # float32 runs whose gradient sums differ only in order (gloo's all-reduce): relative to each
    # tensor's norm, a few hundred float32 roundings (2**-24 each) over the run's steps.
    moved = 0
    for group in ("arch_logits", "prompts"):
        for key in one[group]:
            a, b = two[group][key].double(), one[group][key].double()
            relative = ((a - b).norm() / b.norm()).item()
            assert relative < 2.0 ** -12, f"{group}/{key}: 2 processes differ from 1 by {relative:.2e} (norm)"
            moved += 1
    assert moved > 2
    assert one["arch_logits"]["text"].abs().max() > 1e-2  # alpha did move: the comparison is not vacuous
    # The logged loss and accuracy are the global batch's, not rank 0's half of it.
    logged = [json.loads((tmp_path / run / "search" / "alpha_history.json").read_text()) for run in ("one", "two")]
    assert [h["accuracy"] for h in logged[1]] == [h["accuracy"] for h in logged[0]]
    assert [h["loss"] for h in logged[1]] == pytest.approx([h["loss"] for h in logged[0]], rel=2.0 ** -12)


# ---- report ----------------------------------------------------------------------------------------------
def test_report_mean_and_95_ci(tmp_path):
    from scipy.stats import t

    from fastdpl.pipeline.report import report

    values = {"dpl": [0.70, 0.74, 0.69], "zero_shot": [0.60]}
    for method, tops in values.items():
        for seed, top1 in enumerate(tops, 1):
            run = tmp_path / f"{method}-seed{seed}"
            run.mkdir()
            result = {"stage": "train", "method": method, "dataset": "dtd", "shots": 16, "seed": seed,
                      "top1": top1, "results": {}}
            if method == "dpl":
                result.update(base=top1, new=top1 - 0.1, hm=2 * top1 * (top1 - 0.1) / (2 * top1 - 0.1))
            (run / "results.json").write_text(json.dumps(result))
    md, csv_path = report([tmp_path], tmp_path / "summary")
    mean = 100 * sum(values["dpl"]) / 3
    sd = 100 * torch.tensor(values["dpl"], dtype=torch.float64).std().item()
    half = t.ppf(0.975, 2) * sd / math.sqrt(3)
    assert f"{mean:.2f} ± {half:.2f}" in md.read_text()
    assert "| train | zero_shot | - | - | dtd | 16 | all | dtd | 1 | 60.00 |" in md.read_text()
    rows = csv_path.read_text().splitlines()
    assert rows[0].startswith("stage,method,model,pretrained,dataset,shots,subsample,evaluated_on,runs,top1,top1_ci95")
    assert any(r.startswith("train,dpl,,,dtd,16,all,dtd,3,") for r in rows)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no results.json"):
        report([tmp_path / "empty"], tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        report([tmp_path / "nowhere"], tmp_path / "x")


def test_report_groups_by_experiment_refuses_duplicates_and_carries_every_result(tmp_path):
    from fastdpl.pipeline.report import aggregate, find_results

    def write(folder, seed, top1, model="ViT-B-16", lr=0.002, cross=None):
        run = tmp_path / folder
        run.mkdir(parents=True)
        results = {"dtd": {"top1": top1}, **({"imagenet_v2": {"top1": cross}} if cross is not None else {})}
        (run / "results.json").write_text(json.dumps(
            {"stage": "train", "method": "dpl", "dataset": "dtd", "shots": 16, "seed": seed, "model": model,
             "pretrained": "openai", "subsample": "all", "own": "dtd", "top1": top1, "results": results,
             "settings": {"lr": lr, "model": model, "workers": seed}}))  # workers never splits a group
        return run

    for seed in (1, 2):
        write(f"b16/seed{seed}", seed, 0.7 + seed / 100, cross=0.5)
        write(f"b32/seed{seed}", seed, 0.6, model="ViT-B-32")
        write(f"lr/seed{seed}", seed, 0.65, lr=0.01)
    rows = aggregate(find_results([tmp_path]))
    by = {(r["model"], r["differs"], r["evaluated_on"]): r for r in rows}
    assert len(rows) == 4 and all(r["runs"] == 2 for r in rows)
    assert by[("ViT-B-16", "lr=0.002", "imagenet_v2")]["top1"] == pytest.approx(50.0)  # cross-dataset row
    assert by[("ViT-B-16", "lr=0.002", "dtd")]["top1"] == pytest.approx(71.5)
    assert by[("ViT-B-16", "lr=0.01", "dtd")]["top1"] == pytest.approx(65.0)  # another lr: another group
    assert by[("ViT-B-32", "lr=0.002", "dtd")]["top1"] == pytest.approx(60.0)
    copied = tmp_path / "b16" / "copy-of-seed1"
    copied.mkdir()
    (copied / "results.json").write_text((tmp_path / "b16" / "seed1" / "results.json").read_text())
    with pytest.raises(ValueError, match=r"^report: .*b16/(copy-of-)?seed1/results\.json and .*b16/(copy-of-)?seed1/"
                                         r"results\.json are the same experiment with the same seed 1 "):
        aggregate(find_results([tmp_path]))


def test_eval_describes_prompts_by_the_run_that_trained_them(tmp_path):
    """Evaluating 4-shot prompts without --shots reports 4 shots (and the training seed)."""
    stages.run_train(quick(tmp_path, shots=4, seed=3, prompt_config="uniform:1:2", train_epochs=1))
    result = stages.run_eval(quick(tmp_path, shots=16, seed=1))
    assert (result["shots"], result["seed"]) == (4, 3)
    assert result["trained"]["prompt_config"] == "uniform:1:2" and result["settings"]["shots"] == 16


# ---- model loading ----------------------------------------------------------------------------------------
def test_model_loading_errors_say_what_to_do(monkeypatch):
    import open_clip

    from fastdpl import models

    tiny = models.load_clip("tiny")
    assert tiny.visual.image_size in (32, (32, 32))
    with pytest.raises(models.ModelLoadError, match="unknown model 'ViT-Q-99'"):
        models.load_clip("ViT-Q-99", "openai")
    with pytest.raises(models.ModelLoadError, match="neither a file nor a tag"):
        models.load_clip("ViT-B-16", "no_such_tag")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(models, "_cached_weights", lambda name, tag: None)
    monkeypatch.setattr(open_clip, "create_model", offline)
    with pytest.raises(models.ModelLoadError, match="--pretrained /path/to/"):
        models.load_clip("ViT-B-16", "openai")
    seen = {}
    monkeypatch.setattr(models, "_cached_weights", lambda name, tag: "/cache/open_clip_model.safetensors")
    monkeypatch.setattr(open_clip, "create_model", lambda name, **kw: seen.update(kw, name=name) or tiny)
    models.load_clip("ViT-B-16", "openai")
    assert seen["pretrained"] == "/cache/open_clip_model.safetensors" and seen["force_quick_gelu"] is True


def test_cli_reports_bad_settings_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastdpl.cli", "train", "--dataset", "dtd", "--root",
                           str(tmp_path / "missing"), "--model", "tiny", "--output", str(tmp_path / "o")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    assert done.returncode == 2 and "error: missing data root" in done.stderr and "Traceback" not in done.stderr


# ---- NVTX ------------------------------------------------------------------------------------------------
def test_pipeline_nvtx_ranges_in_pairs_when_enabled_and_absent_when_disabled(tmp_path, monkeypatch):
    from fastdpl import profiling

    events = []
    monkeypatch.setattr(profiling, "_push", lambda name: events.append(("push", name)))
    monkeypatch.setattr(profiling, "_pop", lambda: events.append(("pop", None)))
    monkeypatch.setattr(profiling, "_enabled", False)
    stages.run_search(quick(tmp_path, name="off", search_epochs=1, shots=1, batch_size=5))
    assert events == []
    monkeypatch.setattr(profiling, "_enabled", True)
    stages.run_search(quick(tmp_path, name="on", search_epochs=1, shots=1, batch_size=5))
    names = {name for kind, name in events if kind == "push"}
    assert {f"fastdpl/pipeline/{stage}" for stage in ("data", "forward", "backward", "optimizer")} <= names
    assert {"fastdpl/image/block0", "fastdpl/text/block3/attn"} <= names
    depth = 0
    for kind, _ in events:
        depth += 1 if kind == "push" else -1
        assert depth >= 0
    assert depth == 0


def _sharded_worker(rank, world, classes, store, out):
    """One gloo rank: its share of the class texts, gathered; saves features and prompt grads."""
    import torch.distributed as dist

    from fastdpl import FastDPLPrompt, PromptConfig
    from fastdpl.models import load_clip
    from fastdpl.pipeline.classifier import ShardedTextClassifier
    from fastdpl.pipeline.runtime import Dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        names = [f"class {i}" for i in range(classes)]
        dpl = FastDPLPrompt(load_clip("tiny").double(), names, mode="fixed", config=PromptConfig.uniform(2, 2, 4),
                            impl="eager", generator=torch.Generator().manual_seed(0))
        features = ShardedTextClassifier(dpl, Dist(rank, world)).text_features()
        features.square().sum().backward()
        torch.save({"features": features.detach(), "grads": [p.grad for p in dpl.prompt_parameters()]},
                   f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("classes,world", [(5, 4), (3, 2), (4, 3)])
def test_sharded_text_features_balance_classes_over_ranks(tmp_path, classes, world):
    """C < 2W (where ceil(C/W) shares left a rank with no class): every rank gets one or two
    classes, and the gathered features and the rank-averaged prompt gradients equal one process's."""
    import torch.multiprocessing as mp

    from fastdpl import FastDPLPrompt, PromptConfig
    from fastdpl.models import load_clip
    from fastdpl.pipeline.classifier import class_shares

    shares = class_shares(classes, world)
    assert [hi - lo for lo, hi in shares] and min(hi - lo for lo, hi in shares) >= 1
    assert shares[0][0] == 0 and shares[-1][1] == classes
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    mp.spawn(_sharded_worker, args=(world, classes, str(tmp_path / "store"), str(tmp_path)), nprocs=world)
    names = [f"class {i}" for i in range(classes)]
    dpl = FastDPLPrompt(load_clip("tiny").double(), names, mode="fixed", config=PromptConfig.uniform(2, 2, 4),
                        impl="eager", generator=torch.Generator().manual_seed(0))
    expected = dpl.encode_text()
    expected.square().sum().backward()
    # float64: a rank's share truncates its texts at its own longest end-of-text token, so
    # shapes (and float32 rounding) differ; in float64 only rounding at ~1e-15 may.
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for r in ranks:
        assert_matches(r["features"], expected.detach(), 1e-12, "gathered text features")
    checked = 0
    for i, p in enumerate(dpl.prompt_parameters()):
        if p.grad is None:  # image prompts: no part in the text features
            assert all(r["grads"][i] is None for r in ranks)
            continue
        # all_gather's backward sums every rank's gradient (each rank here has the same loss),
        # and DDP averages over ranks: the average is the gradient of one process's loss.
        averaged = sum(r["grads"][i].double() for r in ranks) / world
        assert_matches(averaged, p.grad.double(), 2.0 ** -22, f"prompt {i}: gradient averaged over ranks")
        checked += 1
    assert checked >= 2


def test_resume_refuses_changed_settings_and_results_are_never_overwritten(tmp_path):
    """Changed settings are refused by name (workers/progress may change); run.yaml keeps the
    record of what made the checkpoint; an earlier results.json is kept, never overwritten."""
    cfg = quick(tmp_path, shots=4, search_epochs=1)
    stages.run_search(cfg)
    record = (tmp_path / "run" / "search" / "run.yaml").read_text()
    changed = quick(tmp_path, shots=2, lr=0.5, search_epochs=1, resume=True)
    with pytest.raises(ValueError, match=r"^--resume: .*checkpoint\.pt was made with other settings "
                                         r"\(shots: 4 -> 2; lr: 0\.01 -> 0\.5\)"):
        stages.run_search(changed)
    assert (tmp_path / "run" / "search" / "run.yaml").read_text() == record
    # Settings that cannot change the result may differ; the finished run is picked up.
    stages.run_search(quick(tmp_path, shots=4, search_epochs=1, resume=True, workers=1, progress=True))
    assert (tmp_path / "run" / "search" / "run.yaml").read_text() == record

    zero = quick(tmp_path, output=str(tmp_path / "zs"), shots=4)
    first = stages.run_zeroshot(zero)
    results = tmp_path / "zs" / "zeroshot" / "results.json"
    before = results.read_text()
    with pytest.raises(FileExistsError, match=r"results\.json exists \(an earlier zeroshot result\): pass --resume"):
        stages.run_zeroshot(zero)
    assert stages.run_zeroshot(quick(tmp_path, output=str(tmp_path / "zs"), shots=4, resume=True)) == first
    assert results.read_text() == before


def test_stages_log_epochs_metrics_and_write_normal_files(tmp_path, capsys):
    """With --progress false the per-epoch lines still print; log.txt and metrics.jsonl hold them;
    files get the permissions an ordinary write would (not mkstemp's 0600)."""
    import stat

    stages.run_search(quick(tmp_path, shots=2, search_epochs=2, progress=False))
    printed = capsys.readouterr().out
    out = tmp_path / "run" / "search"
    lines = [line for line in printed.splitlines() if line.startswith("search epoch")]
    assert len(lines) == 2 and "alpha entropy image" in lines[0] and ", lr " in lines[0]
    assert (out / "log.txt").read_text().splitlines() == lines
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"loss", "accuracy", "lr", "alpha_entropy"} <= set(m) and "alpha" not in m
        candidates = len(quick(tmp_path).candidate_lengths)
        assert 0 < m["alpha_entropy"]["text"] <= math.log(candidates) + 1e-9  # at most uniform's entropy
    assert metrics[0]["lr"] == pytest.approx(quick(tmp_path).warmup_lr)  # the warm-up epoch
    expected_mode = 0o666 & ~_umask()
    for name in ("run.yaml", "checkpoint.pt", "metrics.jsonl", "alpha_history.json", "prompt_config.json"):
        assert stat.S_IMODE((out / name).stat().st_mode) == expected_mode, name
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return
    assert any((out / "tensorboard").iterdir())


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_cli_help_version_datasets_and_dry_run(tmp_path):
    """Each stage's --help shows its own settings, each described with its allowed values;
    --version; `fastdpl datasets`; --dry-run prints the resolved settings and runs nothing."""
    import contextlib
    import io
    import types

    from fastdpl.cli import main

    def cli(*args):  # in this process (the prompts a user sees are argparse's; no interpreter start-up)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exit_:
                code = exit_.code or 0
        return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())

    zeroshot, search = cli("zeroshot", "--help").stdout, cli("search", "--help").stdout
    assert "--arch-lr" in search and "Adam learning rate of alpha" in search
    assert "--arch-lr" not in zeroshot and "--tpt-views" not in zeroshot and "--train-epochs" not in zeroshot
    assert "fp32, or bf16 autocast (fp32|bf16); default: 'fp32'" in " ".join(search.split())
    assert "--tpt-views" in cli("tpt", "--help").stdout
    refused = cli("zeroshot", "--arch-lr", "0.1")
    assert refused.returncode == 2 and "unrecognized arguments: --arch-lr" in refused.stderr
    from fastdpl import __version__

    assert cli("--version").stdout.strip() == f"fastdpl {__version__}"
    listed = cli("datasets").stdout
    assert "dtd" in listed and "split_zhou_DescribableTextures.json" in listed and "imagenet_r" in listed
    dry = cli("train", "--dry-run", "--shots", "4", "--resume", "--output", str(tmp_path / "x"))
    assert dry.returncode == 0, dry.stderr
    import yaml

    settings = yaml.safe_load(dry.stdout)
    assert settings["shots"] == 4 and settings["resume"] is True and settings["train_epochs"] == 40
    assert not (tmp_path / "x").exists()


def test_progress_bars_show_the_batches_seen_and_no_loss_when_evaluating():
    """The bar's postfix is the running value of the batches seen so far (from the first batch
    on), and evaluation bars show no loss at all (there is none: never a stale 0.000)."""
    from fastdpl.pipeline.runtime import Dist

    class Bar:
        disable = False

        def set_postfix(self, values):
            self.shown = values

    logits = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    train, bar = training.Meter(), Bar()
    train.update(torch.tensor(0.5), logits, labels)
    train.show(bar, Dist())
    assert bar.shown["loss"] == "0.500" and bar.shown["acc"] == "66.7"
    evaluation, bar = training.Meter(), Bar()
    evaluation.update(torch.zeros(()), logits, labels)
    evaluation.show(bar, Dist(), loss=False)
    assert "loss" not in bar.shown and bar.shown["acc"] == "66.7"
