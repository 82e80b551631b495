"""The built-in tiny language model (fastdpl/assets/tiny_lm) and its procedural text.

The asset loads offline as a plain Hugging Face folder, its tokenizer covers the downstream
task's texts, the task writers are deterministic by seed, and the downstream prompt format never
occurs in the pre-training text (the base model was not trained on the task).
"""
import csv
import json

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

from fastdpl import text_synthetic as ts  # noqa: E402


needs_asset = pytest.mark.skipif(not (ts.TINY_LM / "config.json").is_file(),
                                 reason="fastdpl/assets/tiny_lm is not built yet (scripts/make_tiny_lm.py)")


@pytest.fixture(scope="module")
def tokenizer():
    """The asset's tokenizer is build_tokenizer()'s, saved (checked with the asset)."""
    return ts.build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(ts.tiny_lm_folder(), local_files_only=True,
                                                             dtype=torch.float32).eval()


@needs_asset
def test_the_asset_is_a_small_grouped_query_llama_that_loads_offline(model, tokenizer):
    assert ts.TINY_LM.is_dir() and ts.tiny_lm_folder() == ts.TINY_LM
    assert type(model).__name__ == "LlamaForCausalLM"
    config = model.config
    assert config.num_key_value_heads < config.num_attention_heads  # grouped-query attention
    assert config.max_position_embeddings == 128 and config.vocab_size == len(ts.VOCAB)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert ts.folder_size(ts.TINY_LM) < 3e6
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (ts.TINY_LM / name).is_file(), name
    ids = tokenizer("there is a big red ball . ball =", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(ts.VOCAB)) and torch.isfinite(logits).all()
    # it knows its world (the demo's premise): the colour of every object, asked as in pre-training
    for thing, (_, colour) in ts.world(0).items():
        ids = tokenizer(f"what colour is the {thing} ?", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert ts.VOCAB[model(input_ids=ids).logits[0, -1].argmax()] == colour, thing


def test_the_tokenizer_has_its_special_tokens(tokenizer):
    for name, word in (("pad", ts.PAD), ("bos", ts.BOS), ("eos", ts.EOS), ("unk", ts.UNK)):
        assert getattr(tokenizer, f"{name}_token") == word
        assert getattr(tokenizer, f"{name}_token_id") == ts.VOCAB.index(word)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer("ball")["input_ids"] == [tokenizer.bos_token_id, ts.VOCAB.index("ball")]
    assert tokenizer("ball", add_special_tokens=False)["input_ids"] == [ts.VOCAB.index("ball")]
    assert tokenizer("dragon")["input_ids"][-1] == tokenizer.unk_token_id


def test_the_tokenizer_round_trips_the_task_and_the_corpus_without_unk(tokenizer):
    splits = ts.downstream_task(seed=0)
    texts = [r[k] for rows in splits.values() for r in rows for k in ("prompt", "completion")]
    texts += ts.pretraining_corpus(200, seed=0)
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids, text
        assert ids == ts.encode_words(text)
        assert tokenizer.decode(ids) == text


def test_the_task_writer_is_deterministic_by_seed(tmp_path):
    paths = ts.write_downstream_task(tmp_path / "a", seed=0)
    again = ts.write_downstream_task(tmp_path / "b", seed=0)
    other = ts.write_downstream_task(tmp_path / "c", seed=1)
    assert set(paths) == {"train", "val", "test"}
    prompts = {}
    for split, path in paths.items():
        text = path.read_text()
        assert text == again[split].read_text() and text != other[split].read_text()
        rows = [json.loads(line) for line in text.splitlines()]
        assert len(rows) == ts.DOWNSTREAM_SIZES[split]
        for row in rows:
            assert set(row) == {"prompt", "completion"}
            assert row["prompt"].strip() and row["completion"].strip()
        prompts[split] = {row["prompt"] for row in rows}
    assert not prompts["test"] & prompts["train"] and not prompts["val"] & prompts["train"]


def test_the_classification_writer_gives_csv_and_verbalizers(tmp_path):
    paths = ts.write_downstream_classification(tmp_path, seed=0)
    assert paths["train"].read_text() == ts.write_downstream_classification(tmp_path / "b", seed=0)["train"].read_text()
    verbalizers = json.loads(paths["verbalizers"].read_text())
    assert verbalizers == ts.CLASSIFICATION_VERBALIZERS
    with open(paths["test"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == ts.DOWNSTREAM_SIZES["test"] and {r["label"] for r in rows} == set(verbalizers)
    assert all(r["text"].strip() for r in rows)


def test_the_task_format_never_occurs_in_the_pretraining_text():
    corpus = ts.pretraining_corpus(20000, seed=0)
    for doc in (d.split() for d in corpus):
        for i, word in enumerate(doc):
            # "=" only ever follows a sum ("<number> plus <number> =") and precedes a number
            if word == ts.TASK_MARK:
                assert doc[i - 2] == "plus" and doc[i - 1] in ts.NUMBERS and doc[i + 1] in ts.NUMBERS
    # and no task prompt is in the text (they all end "<object> =")
    text = "\n".join(corpus)
    assert not any(r["prompt"] in text for rows in ts.downstream_task(seed=0).values() for r in rows)


def test_the_task_asks_the_world_the_corpus_states():
    """Every completion is its object's colour in world(seed), which the corpus states, and the
    context before the object never mentions it (it cannot give the answer away)."""
    facts = ts.world(0)
    assert set(facts) == set(ts.OBJECTS) and {c for _, c in facts.values()} == set(ts.COLOURS)
    corpus = " ".join(ts.pretraining_corpus(5000, seed=0))
    for thing, (size, colour) in facts.items():
        assert f"the colour of the {thing} is {colour} ." in corpus and f"the size of the {thing} is {size} ." in corpus
        for other in set(ts.COLOURS) - {colour}:
            assert f"the {thing} is {other} ." not in corpus
    for rows in ts.downstream_task(seed=0).values():
        for row in rows:
            *context, thing, mark = row["prompt"].split()
            assert mark == ts.TASK_MARK and row["completion"] == facts[thing][1] and thing not in context
    assert ts.world(1) != facts


def test_a_missing_asset_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(ts, "TINY_LM", tmp_path / "nothing")
    with pytest.raises(ts.TinyLMError, match="make_tiny_lm.py"):
        ts.tiny_lm_folder()


def test_save_refuses_a_non_empty_folder_and_writes_atomically(tmp_path):
    model = ts.build_tiny_lm(seed=0)
    out = tmp_path / "lm"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        ts.save_tiny_lm(model, ts.build_tokenizer(), out)
    assert (out / "something").read_text() == "x"
    ts.save_tiny_lm(model, ts.build_tokenizer(), out, force=True, seed=0)
    assert not (out / "something").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["lm"]  # no temporary folder left behind
