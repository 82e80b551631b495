"""The prompted-transformer core (fastdpl.core) on its own, and the training loop on batches that
are not images: a toy decoder with prefix (key/value) prompts, grouped-query attention, a
cross-attention beside the self-attention, and two models in one process."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdpl.config import PromptConfig
from fastdpl.core import PromptBank, PromptShape, Stack
from fastdpl.ops import mixture_prefix_attention
from fastdpl.pipeline import training
from fastdpl.pipeline.runtime import Dist
from helpers import normalised_error

VOCAB, WIDTH, HEADS, KV_HEADS, HEAD_DIM = 11, 16, 4, 2, 4


class ToyAttention(nn.Module):
    """A causal attention with grouped-query key/value heads (KV_HEADS of them for HEADS queries)."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(WIDTH, HEADS * HEAD_DIM)
        self.kv = nn.Linear(WIDTH, 2 * KV_HEADS * HEAD_DIM)
        self.o = nn.Linear(HEADS * HEAD_DIM, WIDTH)


class ToyDecoder(nn.Module):
    """Embedding, then per layer a self-attention and a cross-attention (attending to the same
    tokens, non-causal), each a module of its own, then a vocabulary head."""

    def __init__(self, layers=3, seed=0):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, WIDTH)
            self.self_attn = nn.ModuleList(ToyAttention() for _ in range(layers))
            self.cross_attn = nn.ModuleList(ToyAttention() for _ in range(layers))
            self.head = nn.Linear(WIDTH, VOCAB)
        for p in self.parameters():
            p.requires_grad_(False)


def stacks_of(model):
    shape = PromptShape.kv(KV_HEADS, HEAD_DIM)
    return [Stack("decoder", model.self_attn, shape, [f"self_attn.{i}" for i in range(len(model.self_attn))]),
            Stack("cross", model.cross_attn, shape, [f"cross_attn.{i}" for i in range(len(model.cross_attn))])]


def _attend(module, x, bank, causal, impl):
    """The module's attention with its own prompts from the bank (looked up by the module itself)."""
    b, n, _ = x.shape
    q = module.q(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
    k, v = module.kv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
    group = HEADS // KV_HEADS  # query head h reads key/value head h // group (transformers' repeat_kv)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    found = bank.prompts_for(module) if bank is not None else None
    if found is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        prompts, lengths, weights = found
        pk, pv = (p.repeat_interleave(group, 0) for p in prompts)  # (2, H_kv, P, D) -> (H, P, D) each
        out = mixture_prefix_attention(q, k, v, pk, pv, lengths, weights, causal=causal, impl=impl)
    return module.o(out.transpose(1, 2).flatten(2))


class PromptedToy(nn.Module):
    """The toy decoder with a bank's prompts: logits (B, L, V); features: the last hidden states."""

    def __init__(self, model, bank, impl="eager"):
        super().__init__()
        self.model, self.bank, self.impl = model, bank, impl

    def forward(self, inputs, return_features=False):
        x = self.model.embed(inputs["ids"])
        for self_attn, cross_attn in zip(self.model.self_attn, self.model.cross_attn):
            x = x + _attend(self_attn, x, self.bank, True, self.impl)
            x = x + _attend(cross_attn, x, self.bank, False, self.impl)
        logits = self.model.head(x)
        return (logits, {"hidden": x}) if return_features else logits


def literal_toy(model, bank, inputs):
    """The same forward written literally: per candidate its own attention over [k; pk_c]."""
    x = model.embed(inputs["ids"])
    group = HEADS // KV_HEADS
    for layer, (self_attn, cross_attn) in enumerate(zip(model.self_attn, model.cross_attn)):
        for stack, module, causal in (("decoder", self_attn, True), ("cross", cross_attn, False)):
            b, n, _ = x.shape
            q = module.q(x).view(b, n, HEADS, HEAD_DIM).transpose(1, 2)
            k, v = module.kv(x).view(b, n, 2, KV_HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            lengths = bank.lengths[stack][layer]
            weights = torch.softmax(bank.arch_logits[stack][layer], 0) if bank.mode == "search" else [1.0]
            out = 0
            for w, length in zip(weights, lengths):
                if length == 0:
                    pk = pv = k[:, :, :0]
                else:
                    kv = bank.prompt(stack, layer, length).repeat_interleave(group, 1)
                    pk, pv = kv[0].expand(b, -1, -1, -1), kv[1].expand(b, -1, -1, -1)
                scores = q @ torch.cat([k, pk], 2).transpose(-1, -2) / math.sqrt(HEAD_DIM)
                if causal:
                    mask = torch.ones(n, n + length, dtype=torch.bool).tril()
                    mask[:, n:] = True
                    scores = scores.masked_fill(~mask, float("-inf"))
                out = out + w * scores.softmax(-1) @ torch.cat([v, pv], 2)
            x = x + module.o(out.transpose(1, 2).flatten(2))
    return model.head(x)


def _tokens(batch=3, length=7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels = torch.randint(0, VOCAB, (batch, length), generator=gen)
    labels[0, :2] = -100  # ignored positions (a prompt part of a completion task)
    return {"ids": ids}, labels


def _randomize(bank, seed=5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in bank.arch_parameters() + bank.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen))


# ---- the bank -----------------------------------------------------------------------------------------

def test_kv_prompts_have_kv_heads_and_a_search_matches_the_literal_supernet():
    model = ToyDecoder()
    bank = PromptBank(stacks_of(model), candidate_lengths=(0, 2, 5))
    assert bank.prompt("decoder", 1, 5).shape == (2, KV_HEADS, 5, HEAD_DIM)  # keys, values per kv head
    assert bank.arch_logits["cross"].shape == (3, 3)
    _randomize(bank)
    inputs, _ = _tokens()
    params = bank.arch_parameters() + bank.prompt_parameters()
    fast = PromptedToy(model, bank)(inputs)
    ref = literal_toy(model, bank, inputs)
    assert normalised_error(fast, ref) < 1e-5
    for g, r in zip(torch.autograd.grad(fast.square().sum(), params), torch.autograd.grad(ref.square().sum(), params)):
        assert r.abs().max() > 0
        assert normalised_error(g, r) < 1e-4


def test_prompts_are_keyed_by_module_not_by_layer_index():
    """The self- and the cross-attention of one layer, and the same layer of two models, are
    different sites with their own prompts."""
    first, second = ToyDecoder(seed=0), ToyDecoder(seed=1)
    config = PromptConfig({"decoder": (1, 0, 2), "cross": (3, 3, 0)}, stacks=("decoder", "cross"))
    a = PromptBank(stacks_of(first), mode="fixed", config=config)
    b = PromptBank(stacks_of(second), mode="fixed", config=config, generator=torch.Generator().manual_seed(1))
    assert a.site(first.self_attn[1]) == ("decoder", 1) and a.site(first.cross_attn[1]) == ("cross", 1)
    assert a.prompts_for(first.self_attn[0])[0].shape == (2, KV_HEADS, 1, HEAD_DIM)
    assert a.prompts_for(first.cross_attn[0])[0].shape == (2, KV_HEADS, 3, HEAD_DIM)
    assert a.prompts_for(first.self_attn[1]) is None  # length 0: a plain block
    with pytest.raises(KeyError, match="not a block of this bank"):
        a.site(second.self_attn[0])
    assert not torch.equal(a.prompts_for(first.cross_attn[0])[0], b.prompts_for(second.cross_attn[0])[0])
    inputs, _ = _tokens()
    for model, bank in ((first, a), (second, b)):  # each model runs with its own bank
        assert normalised_error(PromptedToy(model, bank)(inputs), literal_toy(model, bank, inputs)) < 1e-5


def test_token_prompts_and_derive_config():
    blocks = [nn.Linear(8, 8) for _ in range(4)]
    bank = PromptBank([Stack("encoder", blocks, PromptShape.tokens(8))], candidate_lengths=(0, 1, 4))
    assert bank.prompt("encoder", 3, 4).shape == (4, 8)
    rows, lengths, weights = bank.block_prompts("encoder", 2, torch.float64)
    assert rows.shape == (5, 8) and rows.dtype == torch.float64 and lengths == (0, 1, 4)
    assert torch.allclose(weights.sum(), torch.tensor(1.0))
    with torch.no_grad():
        bank.arch_logits["encoder"].copy_(torch.tensor([[0., 1, 0], [3, 0, 0], [0, 0, 2], [0, 5, 0]]))
    config = bank.derive_config()
    assert config.lengths == {"encoder": (1, 0, 4, 1)} and config.stacks == ("encoder",)
    assert PromptConfig.from_dict(config.to_dict()) == config  # a non-CLIP config keeps its stack names
    fixed = PromptBank([Stack("encoder", blocks, PromptShape.tokens(8))], mode="fixed", config=config)
    assert [p.shape for p in fixed.prompt_parameters()] == [(1, 8), (4, 8), (1, 8)]
    assert fixed.arch_parameters() == [] and set(fixed.parameter_groups()) == {"prompt"}


def test_state_rebuilds_the_bank_from_its_own_settings_and_names_mismatches(tmp_path):
    model = ToyDecoder()
    bank = PromptBank(stacks_of(model), candidate_lengths=(0, 3), searched=["cross"])
    _randomize(bank)
    path = tmp_path / "bank.pt"
    torch.save(bank.state(), path)
    rebuilt = PromptBank.from_state(torch.load(path, weights_only=False), stacks_of(model))
    assert list(rebuilt.lengths) == ["cross"] and rebuilt.candidate_lengths == (0, 3)
    for key, value in bank.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    state = bank.state()
    other_lengths = PromptBank(stacks_of(model), candidate_lengths=(0, 4), searched=["cross"])
    with pytest.raises(ValueError, match="candidate_lengths mismatch"):
        other_lengths.load_state(state)
    deeper = ToyDecoder(layers=4)
    with pytest.raises(ValueError, match="stack 'decoder': saved blocks 3"):
        PromptBank(stacks_of(deeper), candidate_lengths=(0, 3), searched=["cross"]).load_state(state)
    wider = [Stack("decoder", model.self_attn, PromptShape.kv(KV_HEADS, 8), [f"self_attn.{i}" for i in range(3)]),
             stacks_of(model)[1]]
    with pytest.raises(ValueError, match="stack 'decoder': saved prompt"):
        PromptBank(wider, candidate_lengths=(0, 3), searched=["cross"]).load_state(state)
    with pytest.raises(ValueError, match="not a fastdpl prompt-bank state"):
        bank.load_state({"format": "something else"})


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="supernet"), "mode must be one of"),
    (dict(candidate_lengths=(0, 2, 2)), "candidate_lengths must be distinct"),
    (dict(searched=["encoder"]), "searched: unknown stacks"),
    (dict(mode="fixed"), "needs config=PromptConfig"),
    (dict(mode="fixed", config=PromptConfig({"decoder": (1, 2)}, stacks=("decoder", "cross"))),
     "stack 'decoder' has 2 block lengths but the model's decoder stack has 3"),
    (dict(mode="fixed", config=PromptConfig({"image": (1, 2, 3)})), "this model has no 'image' stack"),
])
def test_bad_bank_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptBank(stacks_of(ToyDecoder()), **kwargs)


def test_bad_prompt_shapes_and_stacks_are_named():
    with pytest.raises(ValueError, match="kv_heads must be a positive int"):
        PromptShape.kv(0, 4)
    with pytest.raises(ValueError, match="kind must be one of"):
        PromptShape("prefix")
    with pytest.raises(ValueError, match="has no blocks"):
        Stack("decoder", [], PromptShape.tokens(4))
    with pytest.raises(ValueError, match="name must be an identifier"):
        Stack("two words", [nn.Linear(2, 2)], PromptShape.tokens(2))
    with pytest.raises(ValueError, match="unknown stack 'decoder'"):
        PromptConfig({"decoder": (1,)}, stacks=("encoder",))


# ---- the training loop on token batches -------------------------------------------------------------------

class TokenObjective:
    """Next-token style cross-entropy over the positions whose label is not -100."""

    def predict(self, net, inputs, features=False):
        return net(inputs, return_features=True) if features else net(inputs)

    def loss(self, predictions, targets):
        return F.cross_entropy(predictions.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    def tally(self, predictions, targets):
        valid = targets != -100
        return ((predictions.argmax(-1) == targets) & valid).sum(), int(valid.sum())


class TokenBatches:
    """A fixed list of token batches, reshuffled per epoch (what fit expects of a loader)."""

    def __init__(self, count=3, seed=0):
        self.batches = [_tokens(seed=seed + i) for i in range(count)]
        self.batch_sampler = self

    def set_epoch(self, epoch):
        self.order = torch.randperm(len(self.batches), generator=torch.Generator().manual_seed(epoch)).tolist()

    def __iter__(self):
        return iter([self.batches[i] for i in self.order])

    def __len__(self):
        return len(self.batches)


def _token_training(tmp_path, epochs, frozen_calls, schedule_epochs=3):
    from fastdpl.pipeline.demo import demo_config
    from fastdpl.pipeline.stages import Job

    model = ToyDecoder()
    bank = PromptBank(stacks_of(model), candidate_lengths=(0, 2, 4), generator=torch.Generator().manual_seed(7))
    net = PromptedToy(model, bank)
    frozen_net = PromptedToy(model, None)

    def frozen(inputs):
        frozen_calls.append(1)
        return frozen_net(inputs, return_features=True)[1]["hidden"]

    # A regulariser reading the prompted and the frozen model's hidden states (PromptSRC-style agreement).
    agreement = training.Regularizer("agreement", lambda step: 0.1 * (step.features["hidden"] - step.frozen()).abs().mean(),
                                     features=True, frozen=True)
    cfg = demo_config(output=str(tmp_path), progress=False, lr=0.05, warmup_epochs=0, resume=True)
    job = Job(cfg, Dist(), "cpu", model, None, 0)
    arch = torch.optim.Adam(bank.arch_parameters(), lr=0.05, betas=(0.5, 0.999))
    prompt = torch.optim.SGD(bank.prompt_parameters(), lr=0.05, momentum=0.9)
    validation = TokenBatches(2, seed=100)
    validation.set_epoch(0)
    tmp_path.mkdir(parents=True, exist_ok=True)
    schedule = training.prompt_schedule(prompt, cfg, schedule_epochs)
    run = training.Training(bank, net, {"arch": arch, "prompt": prompt}, schedule,
                            epochs, regularizers=(agreement,), frozen=frozen, objective=TokenObjective(),
                            loader=TokenBatches(), validation=lambda epoch: iter(list(validation) * 10))
    return run, job, bank


def test_one_step_of_the_loop_is_the_objective_plus_the_regulariser(tmp_path):
    calls = []
    run, job, bank = _token_training(tmp_path, 1, calls)
    inputs, targets = _tokens()
    params = bank.prompt_parameters()
    loss, _ = training.step_loss(run.net, inputs, targets, run.objective, run.regularizers, run.frozen)
    assert len(calls) == 1  # the frozen model ran once for the step
    with torch.no_grad():
        hidden_frozen = PromptedToy(run.net.model, None)(inputs, return_features=True)[1]["hidden"]
    logits, feats = run.net(inputs, return_features=True)
    reference = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100) + \
        0.1 * (feats["hidden"] - hidden_frozen).abs().mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for g, r in zip(torch.autograd.grad(loss, params), torch.autograd.grad(reference, params)):
        assert normalised_error(g, r) < 1e-5


def test_token_training_resumes_exactly(tmp_path):
    """Three epochs at once equal one epoch, then a resumed run for the rest (alpha and prompts
    bit for bit); the frozen model runs once per prompt step and never for the alpha steps."""
    calls = []
    whole, job, bank = _token_training(tmp_path / "whole", 3, calls)
    history = training.fit(job, tmp_path / "whole", "search", whole)
    assert len(calls) == 3 * 3 and [h["epoch"] for h in history] == [1, 2, 3]
    assert 0 <= history[-1]["accuracy"] <= 1 and math.isfinite(history[-1]["loss"])
    first, job1, _ = _token_training(tmp_path / "split", 1, [])
    training.fit(job1, tmp_path / "split", "search", first)
    rest, job2, resumed = _token_training(tmp_path / "split", 3, [])
    training.fit(job2, tmp_path / "split", "search", rest)
    for key, value in bank.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    start = PromptBank(stacks_of(ToyDecoder()), candidate_lengths=(0, 2, 4), generator=torch.Generator().manual_seed(7))
    assert not torch.equal(start.arch_logits["decoder"], bank.arch_logits["decoder"])  # alpha moved
