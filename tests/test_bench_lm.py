"""fastdpl bench lm: its providers compute what their names say (else the ratios compare different
work), its runner writes the ratios, and the LM step target reads them. Smoke shape, CPU."""

import pytest
import torch

pytest.importorskip("transformers", minversion="5.0")

from fastdpl.bench import lm, targets  # noqa: E402
from fastdpl.config import PromptConfig  # noqa: E402
from fastdpl.lm import FastDPLPrefix  # noqa: E402

SHAPE = lm.SMOKE_SHAPES[0]
# Two float64 computations of gradients stored in float32 parameters differ by the rounding of
# each to float32: a couple of ulps of the largest value.
FP32_STORED = 2.0 ** -22


def _model():
    return lm.build_model(SHAPE.model, "cpu", torch.float64)


def _ids():
    return lm.token_batches(SHAPE, "cpu", count=1)[0]


def _loss(forward, ids):
    """The causal-LM loss of the step, in float64: the model's own (labels=) casts the logits to
    float32, whose rounding would blur a float64 comparison."""
    logits = forward(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def _loss_and_grads(forward, params, ids):
    loss = _loss(forward, ids)
    return loss.detach(), torch.autograd.grad(loss, params)


def _randomise(search, seed=3):
    """Prompts and alpha of a visible size (the 0.02 initialisation hardly moves the loss)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in search.prompt_parameters() + search.arch_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_literal_supernet_equals_the_search_with_gradients():
    """Built on the same bank, the literal supernet (each attention module once per candidate)
    and the fused search give the same loss and the same prompt and alpha gradients (float64)."""
    found, _ = lm.providers(_model(), SHAPE, "eager", names=("search", "literal"))
    search = found["search"][0]
    _randomise(search)
    ids = _ids()
    loss, grads = _loss_and_grads(*found["search"], ids)
    literal_loss, literal_grads = _loss_and_grads(*found["literal"], ids)
    torch.testing.assert_close(literal_loss, loss, rtol=1e-12, atol=0)
    assert len(grads) == len(SHAPE.lengths[1:]) * SHAPE.model.layers + 1  # every prefix, and alpha
    for i, (a, b) in enumerate(zip(grads, literal_grads)):
        assert b.abs().max() > 0 and _relative(a, b) <= FP32_STORED, (i, _relative(a, b))


def test_search_with_alpha_on_length_zero_is_the_base_model():
    ids = _ids()
    base = _loss(_model(), ids)
    search = FastDPLPrefix(_model(), candidate_lengths=SHAPE.lengths, impl="eager")
    _randomise(search)
    with torch.no_grad():
        search.arch_parameters()[0][:, 0] = 1e4
    torch.testing.assert_close(_loss(search, ids), base, rtol=1e-12, atol=0)


def test_prefix_sdpa_single_path_is_fixed_mode_prefix_tuning():
    """The SDPA fallback with fastdpl's fixed-mode prompts (64 in every layer) gives its loss."""
    ids, n = _ids(), max(SHAPE.lengths)
    fixed = FastDPLPrefix(_model(), mode="fixed", impl="eager",
                          config=PromptConfig({"decoder": (n,) * SHAPE.model.layers}, stacks=("decoder",)))
    _randomise(fixed)
    forward, params, peer = lm.single_path_peer(_model(), n, "sdpa")
    assert peer == "prefix-sdpa" and len(params) == SHAPE.model.layers
    with torch.no_grad():
        for layer, p in enumerate(params):
            p.copy_(fixed.prompt(layer, n))
    torch.testing.assert_close(_loss(forward, ids), _loss(fixed, ids), rtol=1e-12, atol=0)


def test_peft_single_path_is_prefix_tuning_at_the_longest_length(tmp_path):
    """PEFT's prefix (in its cache, the tokens shifted by 64) imported into fastdpl gives PEFT's loss."""
    pytest.importorskip("peft")
    ids, n, m = _ids(), max(SHAPE.lengths), SHAPE.model
    forward, params, peer = lm.single_path_peer(_model(), n, "peft")
    assert peer.startswith("peft ")
    assert [tuple(p.shape) for p in params] == [(n, m.layers * 2 * m.kv_heads * m.head_dim)]  # PEFT's layout
    forward.save_pretrained(tmp_path)
    imported = FastDPLPrefix.from_peft(_model(), tmp_path, impl="eager")
    # from_peft rotates the keys in float32: float32 rounding, not float64's
    torch.testing.assert_close(_loss(imported, ids), _loss(forward, ids), rtol=1e-6, atol=0)


def test_bad_shape_and_provider_names_are_named(capsys):
    for argv, message in ((["--shapes", "nope"], "--shapes: unknown ['nope']"),
                          (["--providers", "search,peft"], "--providers: unknown ['peft']")):
        with pytest.raises(SystemExit) as exit_:
            lm.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_lm_step_target_reads_search_over_single_path():
    """The 1.10x target is checked on exactly the GPU shapes, in time and in memory."""
    assert targets.LM_STEP_SHAPES == tuple(s.name for s in lm.GPU_SHAPES)
    rows = [dict(shape="llama-1b-n512", provider="search", vs_single_path=1.05, memory_vs_single_path=1.2),
            dict(shape="llama-1b-n2048", provider="search", vs_single_path=1.02, memory_vs_single_path=1.0)]
    found = {t["target"]: t["met"] for t in targets.check(None, None, None, lm={"rows": rows})
             if t["target"].startswith("lm step")}
    assert found == {"lm step llama-1b-n512: search / single path": True,
                     "lm step llama-1b-n512: peak memory search / single path": False,
                     "lm step llama-1b-n2048: search / single path": True,
                     "lm step llama-1b-n2048: peak memory search / single path": True}
