"""CoOp and CoCoOp (fastdpl.methods) against open_clip's own forward and a literal per-image loop."""
import copy

import pytest
import torch
import torch.nn.functional as F

from fastdpl.literal import literal_context_logits
from fastdpl.methods import CoCoOpPrompt, CoOpPrompt
from helpers import CLASSNAMES, normalised_error, tiny_clip

TOL = 1e-5  # fp32, relative to the largest value


def _images(batch=3, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _randomize(module, seed=2, scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for group in module.parameter_groups().values():
            for p in group:
                p.copy_(scale * torch.randn(p.shape, generator=gen))


def _grads(logits, module):
    params = [p for group in module.parameter_groups().values() for p in group]
    labels = torch.arange(logits.shape[0]) % logits.shape[1]
    return torch.autograd.grad(F.cross_entropy(logits, labels), params)


def _assert_match(module, images):
    fast, ref = module(images), literal_context_logits(module, images)
    assert normalised_error(fast, ref) < TOL
    for g, r in zip(_grads(fast, module), _grads(ref, module)):
        assert r.abs().max() > 0 and normalised_error(g, r) < TOL


def test_coop_initialised_from_words_is_zero_shot_clip():
    import open_clip

    model, images = tiny_clip(seed=5), _images()
    model64 = copy.deepcopy(model).double()
    coop = CoOpPrompt(model, CLASSNAMES, ctx_init="a photo of a")
    assert coop.n_ctx == 4 and tuple(coop.ctx.shape) == (4, 48)
    texts = open_clip.tokenize([f"a photo of a {c.replace('_', ' ')}." for c in CLASSNAMES])

    def zero_shot(clip, pixels):
        return clip.logit_scale.exp() * F.normalize(clip.encode_image(pixels), dim=-1) @ \
            F.normalize(clip.encode_text(texts), dim=-1).T

    with torch.no_grad():
        reference = zero_shot(model64, images.double())
        # Exactly zero-shot CLIP in float64, and in fp32 no further from it than open_clip's own fp32.
        assert normalised_error(CoOpPrompt(model64, CLASSNAMES, ctx_init="a photo of a")(images.double()),
                                reference) < 1e-12
        assert normalised_error(coop(images), reference) <= 2 * normalised_error(zero_shot(model, images), reference)


@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("class_specific", [False, True], ids=["shared", "per_class"])
def test_coop_matches_the_literal_reference_with_gradients(position, class_specific):
    coop = CoOpPrompt(tiny_clip(seed=6), CLASSNAMES, n_ctx=5, class_specific=class_specific,
                      class_token_position=position, impl="eager", generator=torch.Generator().manual_seed(3))
    _assert_match(coop, _images())


@pytest.mark.parametrize("chunk", [None, 4], ids=["one_pass", "chunks_of_4"])
def test_cocoop_matches_the_literal_per_image_loop_with_gradients(chunk):
    cocoop = CoCoOpPrompt(tiny_clip(seed=7), CLASSNAMES, impl="eager", text_chunk_size=chunk,
                          generator=torch.Generator().manual_seed(4))
    _randomize(cocoop)
    _assert_match(cocoop, _images(batch=3, seed=8))


def test_cocoop_with_a_zero_meta_network_is_coop():
    model, images = tiny_clip(seed=8), _images()
    cocoop = CoCoOpPrompt(model, CLASSNAMES, n_ctx=3, ctx_init=None, generator=torch.Generator().manual_seed(1))
    coop = CoOpPrompt(model, CLASSNAMES, n_ctx=3)
    with torch.no_grad():
        cocoop.meta_net.linear2.weight.zero_()
        cocoop.meta_net.linear2.bias.zero_()
        coop.ctx.copy_(cocoop.ctx)
        assert normalised_error(cocoop(images), coop(images)) < 2e-6
        # (a constant shift of every dimension would vanish in ln_1: a random one does not)
        cocoop.meta_net.linear2.bias.copy_(torch.randn(48, generator=torch.Generator().manual_seed(0)))
        assert normalised_error(cocoop(images), coop(images)) > 1e-3  # the bias reaches the logits


def test_state_round_trip_rebuilds_and_refuses_mismatches():
    model = tiny_clip()
    for cls in (CoOpPrompt, CoCoOpPrompt):
        a = cls(model, CLASSNAMES, n_ctx=2, ctx_init=None, generator=torch.Generator().manual_seed(1))
        _randomize(a, seed=9)
        b = cls(model, CLASSNAMES, n_ctx=2, ctx_init=None, generator=torch.Generator().manual_seed(2))
        b.load_prompt_state_dict(a.prompt_state_dict())
        images = _images()
        with torch.no_grad():
            assert torch.equal(a(images), b(images))
        with pytest.raises(ValueError, match="settings mismatch"):
            cls(model, CLASSNAMES, n_ctx=3, ctx_init=None).load_prompt_state_dict(a.prompt_state_dict())
    per_class = CoOpPrompt(model, CLASSNAMES, n_ctx=2, class_specific=True)
    with pytest.raises(ValueError, match="class-specific contexts need the same classes"):
        CoOpPrompt(model, CLASSNAMES[:3], n_ctx=2, class_specific=True).load_prompt_state_dict(
            per_class.prompt_state_dict())
    with pytest.raises(ValueError, match="not a fastdpl context-prompt state"):
        per_class.load_prompt_state_dict({"format": "x"})


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_token_position="start"), "class_token_position must be one of"),
    (dict(n_ctx=0), "n_ctx must be a positive int"),
    (dict(ctx_init=3), "ctx_init must be words"),
    (dict(n_ctx=70), r"with 70 context tokens needs \d+ positions .* does not fit the text tower's 77 positions"),
    (dict(n_ctx=8, ctx_init="a photo of a"), r"n_ctx=8 and ctx_init='a photo of a' \(4 tokens\) disagree"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoOpPrompt(tiny_clip(), CLASSNAMES, **kwargs)


def test_cocoop_refuses_class_specific_contexts_and_class_only_text():
    with pytest.raises(ValueError, match="class_specific is not supported"):
        CoCoOpPrompt(tiny_clip(), CLASSNAMES, class_specific=True)
    with pytest.raises(ValueError, match="depend on the image"):
        CoCoOpPrompt(tiny_clip(), CLASSNAMES).encode_text()


def test_builders_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    CoCoOpPrompt(tiny_clip(), CLASSNAMES, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("kind", ["coop", "coop_per_class", "cocoop", "cocoop_raw"])
def test_tpt_on_learned_contexts_equals_the_literal_per_image_loop(kind):
    from fastdpl.literal import literal_tpt_predict
    from fastdpl.tpt import TestTimePromptTuner

    model = tiny_clip(seed=9)
    if kind.startswith("coop"):
        module = CoOpPrompt(model, CLASSNAMES, n_ctx=3, class_specific=kind == "coop_per_class",
                            generator=torch.Generator().manual_seed(1))
    else:
        module = CoCoOpPrompt(model, CLASSNAMES, generator=torch.Generator().manual_seed(2))
        _randomize(module, scale=0.2)
    tuner = TestTimePromptTuner(module, keep_fraction=0.5, lr=0.05, steps=2,
                                meta_input="raw" if kind.endswith("raw") else "normalized")
    views = torch.randn(2, 6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    fast = tuner.predict(views)
    for g in range(2):
        ref = literal_tpt_predict(tuner, views[g])
        assert normalised_error(fast[g], ref) < 1e-4
    with torch.no_grad():  # the step moved the prediction: the comparison is not vacuous
        untuned = module(views[:, 0])
    assert normalised_error(fast, untuned) > 1e-5
    with pytest.raises(ValueError, match="tunes its context"):
        TestTimePromptTuner(module, tune="text_prompts")


# ---- the pipeline: one training loop for every method ------------------------------------------------
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from fastdpl.pipeline import stages, training  # noqa: E402
from fastdpl.pipeline.config import method_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(dataset="builtin:digits", model="tiny", pretrained=None, shots=2, seed=1, workers=0, device="cpu",
             progress=False, crop_scale=[0.6, 1.0], flip=False, eval_batch_size=256, n_ctx=2,
             ctx_init=None)  # 2 random vectors for CoCoOp too (its "a photo of a" would set 4)


def _cfg(tmp_path, method, name="run", **overrides):
    return method_config(method=method, output=str(tmp_path / name), **{**SMALL, "batch_size": 4,
                                                                        "train_epochs": 2, **overrides})


def test_method_presets_fill_what_is_not_given_and_bad_methods_are_refused(tmp_path):
    coop = method_config(method="coop", shots=4)
    assert (coop.lr, coop.batch_size, coop.train_epochs, coop.n_ctx, coop.ctx_init) == (0.002, 32, 100, None, None)
    assert method_config(method="coop", shots=1).train_epochs == 50
    assert method_config(method="coop", shots=16).train_epochs == 200
    cocoop = method_config(method="cocoop", lr=0.1)
    assert (cocoop.lr, cocoop.batch_size, cocoop.train_epochs, cocoop.n_ctx, cocoop.ctx_init) == \
        (0.1, 1, 10, None, "a photo of a")  # n_ctx: the words' 4 tokens
    assert method_config().lr == 3.5e-3  # DPL keeps the paper's
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dry = subprocess.run([sys.executable, "-m", "fastdpl.cli", "train", "--method", "cocoop", "--batch-size", "8",
                          "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert "batch_size: 8" in dry.stdout and "lr: 0.002" in dry.stdout and "train_epochs: 10" in dry.stdout
    bad = subprocess.run([sys.executable, "-m", "fastdpl.cli", "train", "--method", "vpt"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "method must be one of dpl, coop, cocoop" in bad.stderr
    assert "Traceback" not in bad.stderr
    with pytest.raises(ValueError, match="--prompt-config is a DPL configuration"):
        stages.run_train(_cfg(tmp_path, "coop", prompt_config="uniform:1:1"))


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_train_eval_and_tpt_rebuild_the_method_from_its_own_folder(tmp_path, method):
    trained = stages.run_train(_cfg(tmp_path, method, train_epochs=1))
    assert trained["method"] == method and 0 <= trained["top1"] <= 1
    state = torch.load(tmp_path / "run" / "train" / "prompts.pt", weights_only=False)
    assert state["settings"]["method"] == method and state["method"] == method
    # eval and tpt take no method flags: the prompts file says what to rebuild
    plain = dict(SMALL, n_ctx=7)
    evaluated = stages.run_eval(method_config(output=str(tmp_path / "run"), **plain))
    assert evaluated["top1"] == trained["top1"] and evaluated["method"] == method
    tuned = stages.run_tpt(method_config(output=str(tmp_path / "run"), tpt_views=4, tpt_keep=0.5, tpt_group=4,
                                         **plain), prompts=str(tmp_path / "run" / "train" / "prompts.pt"))
    assert tuned["method"] == f"tpt+{method}" and tuned["results"]["builtin:digits"]["num_test"] > 100


class _Killed(Exception):
    pass


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_a_killed_run_resumes_exactly(tmp_path, monkeypatch, method):
    whole = stages.run_train(_cfg(tmp_path, method, "whole", train_epochs=3))
    real = training._save_checkpoint

    def kill_after_epoch_2(job, out, epoch, train, history):
        real(job, out, epoch, train, history)
        if epoch == 2:
            raise _Killed  # the process dies right after writing the epoch-2 checkpoint

    monkeypatch.setattr(training, "_save_checkpoint", kill_after_epoch_2)
    with pytest.raises(_Killed):
        stages.run_train(_cfg(tmp_path, method, "killed", train_epochs=3))
    monkeypatch.setattr(training, "_save_checkpoint", real)
    with pytest.raises(FileExistsError, match="pass --resume"):
        stages.run_train(_cfg(tmp_path, method, "killed", train_epochs=3))
    resumed = stages.run_train(_cfg(tmp_path, method, "killed", train_epochs=3, resume=True))
    a, b = (torch.load(tmp_path / run / "train" / "prompts.pt", weights_only=False)["tensors"]
            for run in ("whole", "killed"))
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: resume is not bitwise exact"
    assert resumed["top1"] == whole["top1"]
    history = [json.loads(line) for line in (tmp_path / "killed" / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2, 3]


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_two_gloo_processes_equal_one(tmp_path, method):
    """2 ranks with batch 2 each == 1 process with batch 4 (CoOp: class texts split across the ranks;
    CoCoOp: each rank its own images' texts, DDP averaging the gradients)."""
    flags = ["train", "--method", method, "--dataset", "builtin:digits", "--model", "tiny", "--shots", "2",
             "--train-epochs", "2", "--workers", "0", "--device", "cpu", "--progress", "false", "--crop-scale",
             "0.6,1.0", "--flip", "false", "--n-ctx", "2", "--ctx-init", "none", "--lr", "0.05",
             "--eval-batch-size", "256"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = {"one": [sys.executable, "-m", "fastdpl.cli", *flags, "--batch-size", "4"],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "fastdpl.cli", *flags, "--batch-size", "2"]}
    for name, command in runs.items():
        done = subprocess.run([*command, "--output", str(tmp_path / name)], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    one, two = (torch.load(tmp_path / run / "train" / "prompts.pt", weights_only=False) for run in ("one", "two"))
    settings = {k: v for k, v in one["method_settings"].items() if k != "method"}
    initial = (CoCoOpPrompt if method == "cocoop" else CoOpPrompt)(
        stages.load_clip("tiny"), CLASSNAMES, **settings, generator=torch.Generator().manual_seed(1)).ctx
    assert (one["tensors"]["ctx"] - initial).abs().max() > 1e-3  # the context moved: not vacuous
    for key in one["tensors"]:
        a, b = two["tensors"][key].double(), one["tensors"][key].double()
        assert ((a - b).norm() / b.norm()).item() < 2.0 ** -12, f"{key}: 2 processes differ from 1"


# ---- the edges met against CoOp's own code (issue 26) ----------------------------------------------
PUNCTUATED = ["crane (bird)", "st. bernard.", "cat", "great white shark", "o'neill's dog!"]


@pytest.mark.parametrize("position", ["end", "middle", "front"])
def test_class_names_ending_in_punctuation_get_coops_own_layout(position):
    """CoOp tokenizes "<context> <name>." as one text (")." is one BPE token) and splits the class
    tokens off by the name's own token count: the same logits and gradients as its construction."""
    coop = CoOpPrompt(tiny_clip(seed=6), PUNCTUATED, n_ctx=4, class_token_position=position, impl="eager",
                      generator=torch.Generator().manual_seed(3))
    _assert_match(coop, _images())
    cocoop = CoCoOpPrompt(tiny_clip(seed=6), PUNCTUATED, class_token_position=position, impl="eager")
    _assert_match(cocoop, _images())


def test_a_layout_coop_cannot_lay_out_exactly_is_refused_by_its_cause():
    # "x(.." is 3 tokens alone but 2 with the template's "." ("x", "(..."): CoOp's front/middle
    # split would move the end-of-text token
    with pytest.raises(ValueError, match=r"class name 'x\(\.\.': its 3 tokens alone outnumber the 2"):
        CoOpPrompt(tiny_clip(), ["cat", "x(.."], n_ctx=2, class_token_position="front")
    CoOpPrompt(tiny_clip(), ["cat", "x(.."], n_ctx=2)  # at the end the split never matters


@pytest.mark.parametrize("blank", ["", "  "])
def test_an_empty_ctx_init_is_a_random_start(blank):
    model = tiny_clip()
    for cls, n in ((CoOpPrompt, 16), (CoCoOpPrompt, 4)):
        empty = cls(model, CLASSNAMES, ctx_init=blank, generator=torch.Generator().manual_seed(4))
        none = cls(model, CLASSNAMES, ctx_init=None, generator=torch.Generator().manual_seed(4))
        assert empty.ctx_init is None and empty.n_ctx == n and torch.equal(empty.ctx, none.ctx)
        assert empty.ctx.std().item() == pytest.approx(0.02, rel=0.2)  # N(0, 0.02^2), not word embeddings


def test_the_cli_takes_an_empty_ctx_init(tmp_path):
    cfg = _cfg(tmp_path, "cocoop", ctx_init="", n_ctx=None, train_epochs=1)
    module = stages.build_context_method(stages.prepare(cfg, "train"), ["cat", "dog"], stages.context_settings(cfg))
    assert module.ctx_init is None and module.n_ctx == 4
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    dry = subprocess.run([sys.executable, "-m", "fastdpl.cli", "train", "--method", "coop", "--ctx-init", "",
                          "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert dry.returncode == 0 and "ctx_init: ''" in dry.stdout, dry.stderr


def test_an_explicit_n_ctx_with_a_word_start_is_honoured_only_when_it_agrees(tmp_path):
    model = tiny_clip()
    assert CoCoOpPrompt(model, CLASSNAMES).n_ctx == 4  # the words "a photo of a"
    assert CoCoOpPrompt(model, CLASSNAMES, n_ctx=4).n_ctx == 4
    with pytest.raises(ValueError, match=r"n_ctx=8 and ctx_init='a photo of a' \(4 tokens\) disagree: .* "
                                         r"pass ctx_init=None \(or ''\) for 8 random vectors"):
        CoCoOpPrompt(model, CLASSNAMES, n_ctx=8)
    assert CoCoOpPrompt(model, CLASSNAMES, n_ctx=8, ctx_init=None).ctx.shape[0] == 8
    assert CoOpPrompt(model, CLASSNAMES).n_ctx == 16 and CoOpPrompt(model, CLASSNAMES, ctx_init="a photo").n_ctx == 2
    # the pipeline: --n-ctx 8 beside CoCoOp's preset words is refused when the module is built
    given = {k: v for k, v in SMALL.items() if k != "ctx_init"}
    cfg = method_config(method="cocoop", output=str(tmp_path / "run"), **{**given, "n_ctx": 8})
    assert cfg.ctx_init == "a photo of a"
    with pytest.raises(ValueError, match="n_ctx=8 and ctx_init='a photo of a'"):
        stages.build_context_method(stages.prepare(cfg, "train"), CLASSNAMES, stages.context_settings(cfg))


def _builders():
    """{method: (backbone(), build(backbone, generator))}: the backbones are built outside the check
    (their own random init reads the global RNG; the fastdpl builder must not)."""
    from fastdpl.prompt import FastDPLPrompt

    builders = {
        "dpl": (tiny_clip, lambda m, g: FastDPLPrompt(m, CLASSNAMES, candidate_lengths=(0, 2), generator=g)),
        "coop": (tiny_clip, lambda m, g: CoOpPrompt(m, CLASSNAMES, n_ctx=3, generator=g)),
        "cocoop": (tiny_clip, lambda m, g: CoCoOpPrompt(m, CLASSNAMES, ctx_init=None, generator=g)),
    }
    try:
        from timm.models.vision_transformer import VisionTransformer

        from fastdpl.vit import FastDPLViT

        builders["vit"] = (lambda: VisionTransformer(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=2,
                                                     num_classes=3),
                           lambda m, g: FastDPLViT(m, generator=g, init="vpt"))
    except ImportError:
        pass
    try:
        import transformers

        from fastdpl.lm import FastDPLPrefix

        config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2)
        builders["prefix"] = (lambda: transformers.LlamaForCausalLM(config),
                              lambda m, g: FastDPLPrefix(m, candidate_lengths=(0, 2), generator=g))
    except ImportError:
        pass
    return builders


def _start(module):
    tensors = [p for name, p in module.named_parameters() if p.requires_grad and "head" not in name]
    return [t.detach().clone() for t in tensors]


@pytest.mark.parametrize("method", sorted(_builders()))
def test_random_starts_come_from_the_generator_never_the_global_seed(method):
    backbone, build = _builders()[method]
    starts = []
    for seed in (1, 2):
        model = backbone()
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        starts.append(_start(build(model, None)))
        assert torch.equal(torch.random.get_rng_state(), state), "the builder advanced the global RNG"
    assert all(torch.equal(a, b) for a, b in zip(*starts)), "torch.manual_seed changed the start"
    seeded = _start(build(backbone(), torch.Generator().manual_seed(7)))
    assert any(not torch.equal(a, b) for a, b in zip(starts[0], seeded)), "generator= had no effect"
