"""--compile in the training stages (CLIP search and train, a timm classifier, a language model):
the same losses and learned tensors as the eager run to fp32 rounding, the whole prompted forward
captured in one graph (no graph break, so none inside a block), and no recompilation per step.

The backend here is a registered one that counts each graph Dynamo hands it and runs it through
aot_eager: Dynamo's capture and AOT autograd's forward/backward split are torch.compile's as a GPU
run has them; only inductor's code generation (of CLIP's and the LM's own layers, ~1 min a model on
a CPU) is left out, and the op's own lowering by inductor is tested in test_op_api.
"""
import json

import pytest
import torch
from torch._dynamo import lookup_backend, register_backend

from fastdpl.cli import main
from fastdpl.pipeline import stages, training
from fastdpl.pipeline.config import RunConfig, method_config
from fastdpl.pipeline.demo import demo_config
from fastdpl.pipeline.runtime import compile_counts
from test_lm_protocol import _args as lm_args
from test_lm_protocol import tiny  # noqa: F401 - a module-scoped fixture: the tiny LM and its task

GRAPHS = []  # one entry per graph compiled: the number of training steps taken before it


@register_backend
def fastdpl_counting(graph_module, example_inputs):
    GRAPHS.append(STEPS[0])
    return lookup_backend("aot_eager")(graph_module, example_inputs)


STEPS = [0]


@pytest.fixture
def counted(monkeypatch):
    """Fresh Dynamo caches, and the steps counted (every optimiser step of the loop, alpha's too)."""
    torch._dynamo.reset()
    GRAPHS.clear()
    STEPS[0] = 0
    for name in ("loss_step", "arch_step"):
        original = getattr(training, name)

        def counting(*args, _original=original, **kwargs):
            result = _original(*args, **kwargs)
            STEPS[0] += 1
            return result
        monkeypatch.setattr(training, name, counting)
    yield GRAPHS
    torch._dynamo.reset()


def _counted_run(run, *args):
    """(run's result, the graphs compiled during it), its steps counted from 0."""
    STEPS[0], first = 0, len(GRAPHS)
    return run(*args), GRAPHS[first:]


def _close(actual, expected, what):
    """fp32 rounding: a few ulps of the largest value, after a handful of optimiser steps."""
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().clamp_min(1e-30)
    error = ((actual.double() - expected.double()).abs().max() / scale).item()
    assert error < 1e-5, f"{what}: normalised error {error:.3g}"


def _assert_same_state(compiled: dict, eager: dict, groups=("prompts", "arch_logits")):
    for group in groups:
        assert compiled[group].keys() == eager[group].keys() and eager[group], group
        for key in eager[group]:
            _close(compiled[group][key], eager[group][key], f"{group}/{key}")


def _assert_compiled_once_per_shape(graphs, log_text: str, shapes: int):
    """``shapes`` graphs (the first shape static, the first other shape dynamic, no more however
    many shapes follow), all compiled within the first steps, none later; the log says so too."""
    assert len(graphs) == shapes, graphs
    assert max(graphs) <= 2, f"a graph was compiled after step {max(graphs)}: recompiling per step ({graphs})"
    assert f"compiled {len(graphs)} graphs, 0 graph breaks" in log_text, log_text


def _histories_match(compiled: list, eager: list):
    assert len(compiled) == len(eager) > 0
    for a, b in zip(compiled, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a, b)


def test_the_clip_search_compiles_to_the_eager_result(tmp_path, counted):
    """DPL's search on the tiny CLIP, prompt and alpha steps on batches of 4 (one shape, one graph:
    a second shape's dynamic recompile is the language model's test), alpha and prompts as eager's."""
    quick = dict(shots=2, search_epochs=1, warmup_epochs=0, batch_size=4, val_batch_size=4, resume=False,
                 progress=False)
    runs = {}
    for name, options in (("eager", {}), ("compiled", {"compile": True, "compile_backend": "fastdpl_counting"})):
        runs[name] = _counted_run(stages.run_search, demo_config(**quick, **options, output=str(tmp_path / name)))
    (search, _), (c_search, graphs) = runs["eager"], runs["compiled"]
    _histories_match(c_search["history"], search["history"])
    assert c_search["config"] == search["config"]
    a, b = (torch.load(tmp_path / run / "search" / "prompts.pt", weights_only=False) for run in ("compiled", "eager"))
    _assert_same_state(a, b)
    assert max(v.abs().max().item() for v in b["arch_logits"].values()) > 1e-2  # alpha moved: not vacuous
    _assert_compiled_once_per_shape(graphs, (tmp_path / "compiled/search/log.txt").read_text(), shapes=1)
    assert "torch.compile" not in (tmp_path / "eager/search/log.txt").read_text()


def test_a_timm_classifier_trains_compiled_to_the_eager_result(tmp_path, counted):
    """The train stage of a fixed configuration (VPT-deep, 2 tokens in every block) with its head:
    one shape, one graph; prompts, head and test accuracy as eager's."""
    pytest.importorskip("timm")
    quick = dict(model="timm:tiny", dataset="builtin:digits", shots=2, seed=1, batch_size=4, train_epochs=1,
                 warmup_epochs=0, method="uniform:2:4", lr=0.5, head_lr=0.1, workers=0, device="cpu",
                 crop_scale=[0.6, 1.0], flip=False, eval_batch_size=256, progress=False)
    results, graphs = {}, None
    for name, options in (("eager", {}), ("compiled", {"compile": True, "compile_backend": "fastdpl_counting"})):
        results[name], graphs = _counted_run(stages.run_train, method_config(**quick, **options,
                                                                             output=str(tmp_path / name)))
    top1 = [run["results"][run["own"]]["top1"] for run in (results["compiled"], results["eager"])]
    assert top1[0] == pytest.approx(top1[1], abs=1e-9)
    a, b = (torch.load(tmp_path / run / "train" / "prompts.pt", weights_only=False) for run in ("compiled", "eager"))
    _assert_same_state(a["bank"], b["bank"], groups=("prompts",))
    _close(a["head"]["weight"], b["head"]["weight"], "head weight")
    _assert_compiled_once_per_shape(graphs, (tmp_path / "compiled/train/log.txt").read_text(), shapes=1)


def test_a_language_model_search_compiles_to_the_eager_result(tmp_path, tiny, counted):  # noqa: F811
    """Padded batches of several lengths (training and validation batches of the reversing task):
    one static graph, then one with dynamic lengths that serves every later length."""
    search = ["lm", "search", "--search-steps", "6", "--candidate-lengths", "0,2,4"]
    assert main([*search, *lm_args(tiny, tmp_path / "eager")]) == 0
    code, graphs = _counted_run(main, [*search, *lm_args(tiny, tmp_path / "compiled"), "--compile",
                                       "--compile-backend", "fastdpl_counting"])
    assert code == 0
    a, b = (torch.load(tmp_path / run / "search" / "prefixes.pt", weights_only=True) for run in ("compiled", "eager"))
    _assert_same_state(a, b)
    logged = [json.loads((tmp_path / run / "search" / "alpha_history.json").read_text())
              for run in ("compiled", "eager")]
    _histories_match(*logged)
    _assert_compiled_once_per_shape(graphs, (tmp_path / "compiled/search/log.txt").read_text(), shapes=2)


def test_compile_settings_are_checked_and_do_not_block_a_resume():
    with pytest.raises(ValueError, match=r"^compile_backend must be a torch.compile backend \(.*inductor.*\), "
                                         r"got 'tensorrt-ish'$"):
        RunConfig(compile=True, compile_backend="tensorrt-ish").validate()
    RunConfig(compile=False, compile_backend="tensorrt-ish").validate()  # unused without --compile
    from fastdpl.pipeline.config import changed_settings

    assert changed_settings(RunConfig().to_dict(), RunConfig(compile=True), "search") == []
    before = compile_counts()
    assert set(before) == {"graphs", "graph_breaks"} and all(v >= 0 for v in before.values())
