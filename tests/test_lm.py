"""FastDPLPrefix on tiny random Hugging Face models of every family that dispatches through
transformers' attention registry: Llama (grouped-query), Qwen2 (q/k/v biases), Qwen3 (q/k norms,
head dim other than hidden / heads), Mistral (sliding window), GPT-2 (absolute positions) and
BERT and RoBERTa sequence classification (bidirectional: P-tuning v2's own setting).

The oracle is a literal supernet written here against each model's own ``eager_attention_forward``:
per layer and candidate, the candidate's prefix concatenated before the keys and values, the
model's own eager mask extended with visible prefix columns, one eager attention per candidate,
outputs mixed with softmax(alpha). It is registered as another attention implementation and reads
the same prompts, so both runs see the same parameters.
"""
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from fastdpl.adapters import UnsupportedModelError, hf_lm  # noqa: E402
from fastdpl.config import PromptConfig  # noqa: E402
from fastdpl.lm import FastDPLPrefix  # noqa: E402

VOCAB, LENGTHS = 61, (0, 2, 5)


def tiny(family: str, **overrides):
    """A tiny random model of ``family`` (no download), in eval mode, seeded."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=64)
    if family == "llama":
        config = transformers.LlamaConfig(num_key_value_heads=2, **common)
        model = transformers.LlamaForCausalLM(config)
    elif family == "qwen2":
        config = transformers.Qwen2Config(num_key_value_heads=2, **common)
        model = transformers.Qwen2ForCausalLM(config)
    elif family == "qwen3":
        config = transformers.Qwen3Config(num_key_value_heads=1, head_dim=12, **common)
        model = transformers.Qwen3ForCausalLM(config)
    elif family == "mistral":
        config = transformers.MistralConfig(num_key_value_heads=2, sliding_window=overrides.pop("window", 4096),
                                            **common)
        model = transformers.MistralForCausalLM(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "bert":
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                         attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        model = transformers.BertForSequenceClassification(config)
    elif family == "roberta":
        config = transformers.RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=70, num_labels=2,
                                            attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0)
        model = transformers.RobertaForSequenceClassification(config)
    else:
        raise ValueError(family)
    for name, value in overrides.items():
        setattr(model.config, name, value)
    return model.eval()


DECODERS = ["llama", "qwen2", "qwen3", "mistral", "gpt2"]
FAMILIES = DECODERS + ["bert", "roberta"]


def batch(lengths=(9, 6), total=9, left=True, seed=1):
    """Token ids and a 2D mask of sequences of ``lengths`` padded to ``total`` (left or right)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, total - n:] = 1
        else:
            mask[b, :n] = 1
    return ids, mask


def logits_of(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits


def randomise(dpl, seed=3, alpha_scale=1.0, prompt_scale=0.5):
    """Prompts and alpha of a visible size (the 0.02 initialisation hardly moves logits)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in dpl.prompt_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * prompt_scale)
        for a in dpl.arch_parameters():
            a.copy_(torch.randn(a.shape, generator=gen) * alpha_scale)


# ---- the literal supernet --------------------------------------------------------------------------
def literal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """One eager attention of the model's own per candidate over [prefix_c ; keys], mixed by the weights."""
    bank, _ = hf_lm.bound(module)
    prompts, lengths, weights = bank.prompts_for(module, dtype=query.dtype)
    eager = sys.modules[type(module).__module__].eager_attention_forward
    out, start = 0, 0
    for c, n in enumerate(lengths):
        pk = prompts[0][None, :, start:start + n].expand(query.shape[0], -1, -1, -1)
        pv = prompts[1][None, :, start:start + n].expand(query.shape[0], -1, -1, -1)
        mask = attention_mask
        if mask is not None:  # the prefix columns are visible to every query (additive 0)
            visible = mask.new_zeros(*mask.shape[:-1], n)
            mask = torch.cat([visible, mask], dim=-1)
        out_c, _ = eager(module, query, torch.cat([pk, key], 2), torch.cat([pv, value], 2), mask,
                         scaling=scaling, dropout=0.0)
        out = out + weights[c] * out_c
        start += n
    return out, None


@pytest.fixture(scope="module", autouse=True)
def _literal_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("fastdpl_literal", literal_attention)
    AttentionMaskInterface.register("fastdpl_literal", eager_mask)


def real_rows(mask):
    return mask.bool()


@pytest.mark.parametrize("family", FAMILIES)
def test_search_equals_the_literal_supernet_with_gradients(family):
    """Logits, prompt gradients and alpha gradients of the fused search equal the literal supernet
    (padded batch; loss on the real rows only)."""
    model = tiny(family)
    ids, mask = batch()
    dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
    randomise(dpl)

    def run():
        out = logits_of(model, ids, mask)
        if out.dim() == 3:
            out = out[real_rows(mask)]
        grads = torch.autograd.grad(out.square().mean(), dpl.prompt_parameters() + dpl.arch_parameters())
        return out.detach(), grads

    fused, fused_grads = run()
    model.set_attn_implementation("fastdpl_literal")
    literal, literal_grads = run()
    torch.testing.assert_close(fused, literal, rtol=1e-5, atol=1e-5)
    for a, b in zip(fused_grads, literal_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_alpha_on_length_zero_gives_the_base_model(family):
    model = tiny(family)
    ids, mask = batch(left=family not in ("bert", "roberta"))
    with torch.no_grad():
        base = logits_of(model, ids, mask)
    dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
    randomise(dpl)
    with torch.no_grad():
        for a in dpl.arch_parameters():
            a.copy_(torch.tensor([[1e4, 0.0, 0.0]]).expand_as(a))
        ours = logits_of(model, ids, mask)
        zero = FastDPLPrefix(tiny(family), mode="fixed", config=PromptConfig({"decoder": (0, 0, 0)},
                                                                           stacks=("decoder",)))
        fixed_zero = logits_of(zero.model, ids, mask)
    rows = real_rows(mask) if base.dim() == 3 else slice(None)
    torch.testing.assert_close(ours[rows], base[rows], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fixed_zero[rows], base[rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("left", [True, False], ids=["left", "right"])
def test_padded_batches_give_the_unpadded_rows(family, left):
    """Each real row of a padded batch equals that sequence run alone. The real tokens keep positions
    0..L-1 (the prefix keys carry none, so a query's absolute position matters even under rotary
    embeddings): a left-padded batch passes position ids counted from its first real token, as
    ``generate`` does."""
    model = tiny(family)
    dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
    randomise(dpl)
    ids, mask = batch(lengths=(9, 5), left=left)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        for b in range(2):
            alone = model(input_ids=ids[b][mask[b].bool()][None]).logits
            torch.testing.assert_close(padded[b][mask[b].bool()], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["search", "fixed"])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_cached_greedy_decoding_equals_the_uncached_forward(family, mode):
    """generate with the cache (prefixes out of it) gives the tokens of generate without a cache,
    for a left-padded batch, with searched (mixed) or fixed prefixes."""
    model = tiny(family)
    model.generation_config.pad_token_id = 0
    config = PromptConfig({"decoder": (5, 0, 2)}, stacks=("decoder",)) if mode == "fixed" else None
    dpl = FastDPLPrefix(model, mode=mode, candidate_lengths=LENGTHS, config=config)
    randomise(dpl, prompt_scale=1.0)
    ids, mask = batch(lengths=(7, 4), total=7, left=True)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cached = dpl.generate(**kwargs)
    uncached = dpl.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


def test_fixed_mode_uses_one_prefix_per_layer_and_state_round_trips(tmp_path):
    model = tiny("llama")
    config = PromptConfig({"decoder": (4, 0, 2)}, stacks=("decoder",))
    dpl = FastDPLPrefix(model, mode="fixed", config=config)
    assert [tuple(p.shape) for p in dpl.prompt_parameters()] == [(2, 2, 4, 8), (2, 2, 2, 8)]
    assert dpl.arch_parameters() == [] and dpl.derive_config() == config
    randomise(dpl)
    ids, mask = batch()
    with torch.no_grad():
        expected = logits_of(model, ids, mask)
    state = dpl.prompt_state_dict()
    torch.save(state, tmp_path / "prompts.pt")
    other = FastDPLPrefix(tiny("llama"), mode="fixed", config=config)
    other.load_prompt_state_dict(torch.load(tmp_path / "prompts.pt"))
    with torch.no_grad():
        torch.testing.assert_close(logits_of(other.model, ids, mask), expected)


def test_detach_restores_the_base_model():
    model = tiny("llama")
    ids, mask = batch()
    with torch.no_grad():
        base = logits_of(model, ids, mask)
    dpl = FastDPLPrefix(model)
    randomise(dpl)
    assert dpl.detach() is model and model.config._attn_implementation != "fastdpl"
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model, ids, mask), base)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny("llama")
    dpl = FastDPLPrefix(model, candidate_lengths=LENGTHS)
    randomise(dpl)
    ids, mask = batch()
    model.train()

    def grads():
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        return torch.autograd.grad(loss, dpl.prompt_parameters() + dpl.arch_parameters())

    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.is_gradient_checkpointing
    for a, b in zip(grads(), plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---- refused by name ------------------------------------------------------------------------------
def test_sliding_window_is_exact_within_the_window_and_refused_beyond():
    ids, mask = batch(lengths=(9, 9))
    short = FastDPLPrefix(tiny("mistral", window=16), candidate_lengths=LENGTHS)
    logits_of(short.model, ids, mask)  # the window covers the sequence: runs
    narrow = FastDPLPrefix(tiny("mistral", window=4), candidate_lengths=LENGTHS)
    with pytest.raises(NotImplementedError, match="sliding window shorter than the sequence"):
        logits_of(narrow.model, ids, mask)


def test_attention_dropout_in_training_is_refused():
    model = tiny("llama")
    for _, module in hf_lm.attention_modules(model):
        module.attention_dropout = 0.1  # as LlamaConfig(attention_dropout=0.1) builds it
    prefix = FastDPLPrefix(model)  # held: the model's attention binds it weakly
    model.train()
    with pytest.raises(NotImplementedError, match="no attention dropout"):
        logits_of(model, *batch())
    del prefix


def test_logit_softcapping_is_refused():
    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       attn_logit_softcapping=50.0)
    with pytest.raises(UnsupportedModelError, match="softcapping"):
        FastDPLPrefix(transformers.Gemma2ForCausalLM(config))


def test_a_model_outside_the_registry_is_refused():
    with pytest.raises(UnsupportedModelError, match="not a Hugging Face transformers model"):
        FastDPLPrefix(torch.nn.Linear(3, 3))


def test_a_transformers_model_outside_the_registry_is_refused():
    """A model class whose attention does not dispatch through AttentionInterface (transformers
    marks it _supports_attention_backend = False) is refused by name, before anything changes."""
    model = tiny("llama")
    model._supports_attention_backend = False
    with pytest.raises(UnsupportedModelError, match="does not dispatch its attention"):
        FastDPLPrefix(model)
    assert model.config._attn_implementation != hf_lm.NAME and all(p.requires_grad for p in model.parameters())


def test_unbound_module_under_fastdpl_attention_is_named():
    model = tiny("llama")
    dpl = FastDPLPrefix(model)
    hf_lm.unbind(dpl.bank.stacks["decoder"].blocks)
    with pytest.raises(RuntimeError, match="no fastdpl prompts are bound"):
        logits_of(model, *batch())


def test_binding_keeps_neither_the_model_nor_a_dropped_wrapper_alive():
    """The registry holds modules and banks weakly: a dropped model and wrapper are collected
    (a bank holds its modules, so a strong entry would keep its own key alive), and a model whose
    wrapper was dropped without detach() names what happened."""
    import gc
    import weakref

    model = tiny("llama")
    dpl = FastDPLPrefix(model)
    del dpl
    gc.collect()
    with pytest.raises(RuntimeError, match="garbage-collected"):
        logits_of(model, *batch())
    layer = weakref.ref(model.model.layers[0].self_attn)
    before = len(hf_lm._BOUND)
    del model
    gc.collect()
    assert layer() is None and len(hf_lm._BOUND) < before


def test_readme_language_model_block_runs():
    """The README's FastDPLPrefix block runs as written and searches something: alpha moved and
    the fixed subnet generates."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    marker = text.index("<!-- this block is run by tests/test_lm.py -->")
    code = re.search(r"```python\n(.*?)```", text[marker:], re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    dpl, subnet = namespace["dpl"], namespace["subnet"]
    assert max(a.abs().max().item() for a in dpl.arch_parameters()) > 5e-3
    assert subnet.derive_config() == namespace["config"] and namespace["tokens"].shape == (1, 13)


# ---- PEFT prefix tuning as the oracle -------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_from_peft_gives_peffts_own_logits_and_prompt_gradient_norm(family, tmp_path):
    """A PEFT prefix-tuning adapter imported with from_peft: PEFT's own logits (its prefix in the
    cache, tokens shifted to n..n+L-1) equal fastdpl's (keys R(-n) k_peft, tokens at 0..L-1), and so
    does the norm of the prompt gradient (the rotation is orthogonal)."""
    peft = pytest.importorskip("peft")
    import copy

    base = tiny(family)
    peft_model = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                  num_virtual_tokens=5))
    embedding = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        embedding.copy_(torch.randn(embedding.shape, generator=torch.Generator().manual_seed(4)))
    ids, mask = batch(lengths=(9, 6), left=False)
    expected = peft_model(input_ids=ids, attention_mask=mask).logits
    (expected_grad,) = torch.autograd.grad(expected[mask.bool()].square().mean(), embedding)
    peft_model.save_pretrained(tmp_path)

    dpl = FastDPLPrefix.from_peft(base, tmp_path)
    assert dpl.derive_config().lengths["decoder"] == (5, 5, 5)
    actual = logits_of(base, ids, mask)
    grads = torch.autograd.grad(actual[mask.bool()].square().mean(), dpl.prompt_parameters())
    torch.testing.assert_close(actual[mask.bool()], expected[mask.bool()], rtol=1e-5, atol=1e-5)
    norm = torch.stack([g.norm() for g in grads]).norm()
    torch.testing.assert_close(norm, expected_grad.norm(), rtol=1e-5, atol=0)


def test_from_peft_refuses_absolute_positions_and_other_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    import copy

    gpt2 = tiny("gpt2")
    peft.get_peft_model(copy.deepcopy(gpt2), peft.PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                      num_virtual_tokens=3)).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="no rotary embedding"):
        FastDPLPrefix.from_peft(gpt2, tmp_path)
    with pytest.raises(ValueError, match="prompt_embeddings has shape"):
        FastDPLPrefix.from_peft(tiny("llama"), tmp_path)
    with pytest.raises(ValueError, match="no adapter_config.json"):
        FastDPLPrefix.from_peft(tiny("llama"), tmp_path / "missing")


def test_a_uniform_configuration_exports_to_peft_and_back(tmp_path):
    """to_peft writes an adapter PEFT loads with its own from_pretrained and whose logits are
    fastdpl's; from_peft reads it back to the same prefixes. Non-uniform configurations and an
    occupied folder are refused."""
    peft = pytest.importorskip("peft")
    import copy

    base = tiny("llama")
    peft_base = copy.deepcopy(base)
    dpl = FastDPLPrefix(base, mode="fixed", config=PromptConfig({"decoder": (4, 4, 4)}, stacks=("decoder",)))
    randomise(dpl)
    ids, mask = batch(lengths=(9, 7), left=False)
    with torch.no_grad():
        ours = logits_of(base, ids, mask)
    dpl.to_peft(tmp_path / "adapter")
    loaded = peft.PeftModel.from_pretrained(peft_base, tmp_path / "adapter")
    with torch.no_grad():
        theirs = loaded(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(theirs[mask.bool()], ours[mask.bool()], rtol=1e-5, atol=1e-5)
    back = FastDPLPrefix.from_peft(tiny("llama"), tmp_path / "adapter")
    for a, b in zip(back.prompt_parameters(), dpl.prompt_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(FileExistsError, match="already holds an adapter"):
        dpl.to_peft(tmp_path / "adapter")
    mixed = FastDPLPrefix(tiny("llama"), mode="fixed", config=PromptConfig({"decoder": (4, 0, 2)},
                                                                          stacks=("decoder",)))
    with pytest.raises(ValueError, match="one length > 0 in every layer"):
        mixed.to_peft(tmp_path / "other")


@pytest.mark.parametrize("mode", ["search", "fixed"])
def test_save_and_load_a_run_folder(mode, tmp_path):
    config = PromptConfig({"decoder": (2, 0, 5)}, stacks=("decoder",)) if mode == "fixed" else None
    dpl = FastDPLPrefix(tiny("qwen3"), mode=mode, candidate_lengths=LENGTHS, config=config)
    randomise(dpl)
    ids, mask = batch()
    with torch.no_grad():
        expected = logits_of(dpl.model, ids, mask)
    dpl.save(tmp_path / "run")
    back = FastDPLPrefix.load(tiny("qwen3"), tmp_path / "run")
    assert back.mode == mode and back.derive_config() == dpl.derive_config()
    with torch.no_grad():
        torch.testing.assert_close(logits_of(back.model, ids, mask), expected)
    with pytest.raises(ValueError, match="not a folder written by FastDPLPrefix.save"):
        FastDPLPrefix.load(tiny("qwen3"), tmp_path)
    with pytest.raises(ValueError, match="stack 'decoder'"):
        FastDPLPrefix.load(other := tiny("llama"), tmp_path / "run")  # other head dims: named, nothing copied
    assert other.config._attn_implementation != "fastdpl"


def test_hf_trainer_retrains_a_fixed_configuration(tmp_path):
    """The train stage in the HF Trainer: it keeps the batch columns forward names, trains the
    prefixes only (the model stays frozen) and its state_dict is the prefixes."""
    model = tiny("llama")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    dpl = FastDPLPrefix(model, mode="fixed", config=PromptConfig({"decoder": (2, 0, 5)}, stacks=("decoder",)))
    ids, mask = batch(lengths=(9, 7, 9, 5), total=9, left=False)
    data = [dict(input_ids=ids[i], attention_mask=mask[i], labels=ids[i].masked_fill(mask[i] == 0, -100))
            for i in range(4)]
    before = [p.detach().clone() for p in dpl.prompt_parameters()]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True)
    transformers.Trainer(model=dpl, args=args, train_dataset=data).train()
    assert all(not torch.equal(a, b) for a, b in zip(before, dpl.prompt_parameters()))
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    assert set(dpl.state_dict()) == {f"bank.prompts.{k}" for k in dpl.bank.prompts}
