"""The built-in tiny language model: a procedural toy language, its pre-training and a downstream task.

The language-model demo needs a causal LM that runs offline on a laptop CPU. This module makes
one from scratch, reproducibly from a seed, as the tiny CLIP of ``fastdpl.synthetic`` does for
images: a word-level tokenizer over a closed vocabulary of about a hundred words, a 4-layer
grouped-query ``LlamaForCausalLM``, and the procedural text it is pre-trained on.
``scripts/make_tiny_lm.py`` runs it and writes the Hugging Face model folder that ships in
``fastdpl/assets/tiny_lm`` (``TINY_LM``).

The toy language (every token separated by one space, so decoding gives the text back):

* scenes: ``there is a big red ball , a small blue cup and a big green hat .`` (two to four
  objects, distinct, each with a size and a colour), followed by statements and questions about
  them: ``the cup is blue .``, ``the size of the hat is big .``, ``what colour is the ball ? red .``,
  ``is the cup big ? no .``, ``which thing is green ? the hat .``;
* number facts: counting (``count from two to six : two three four five six .``), the next and
  previous number, sums (``two plus three = five .``);
* word lists: ``the first word of ball cup hat is ball .``, ``the last ...``, and lists copied
  (``say ball cup hat : ball cup hat .``).

The downstream task is one the model never saw as such: a scene followed by an object and ``=``
(``there is a big red ball , a small blue cup . cup =``), completed by that object's size and
colour (``small blue``). In pre-training ``=`` only ever follows a sum and is followed by a
number; a scene is only ever followed by whole sentences. The base model answers with a number
or a sentence, so its exact match is near zero; the skill the task needs (find the object in the
scene, read its words) is there; whether a learned prefix in every layer (prefix tuning, the
model frozen) teaches it fast enough for a 2-minute demo is not settled: first trials (2026-12-03,
200 steps of a fixed prefix of 8, AdamW 3e-2) reached 4-14 % exact match on the test split,
against 0 % for the base model, and the asset is not built yet. ``write_downstream_task`` writes it as JSONL
``{"prompt", "completion"}`` splits; ``write_downstream_classification`` writes a second one, a
CSV ``text,label`` (is the named object big or small) with its verbalizers.
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

TINY_LM = Path(__file__).parent / "assets" / "tiny_lm"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
OBJECTS = ("ball", "cup", "box", "hat", "car", "tree", "bird", "fish", "book", "key", "lamp", "shoe")
COLOURS = ("red", "blue", "green", "yellow", "black", "white", "pink", "brown")
SIZES = ("big", "small")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
           "twelve")
WORDS = ("there", "is", "a", "the", "and", "of", "what", "colour", "size", "which", "thing", "yes", "no",
         "count", "from", "to", "plus", "next", "after", "before", "comes", "first", "last", "word", "say",
         ".", ",", "?", ":", "=")
VOCAB = SPECIALS + OBJECTS + COLOURS + SIZES + NUMBERS + WORDS

# The tiny LM's architecture: grouped-query attention (4 query heads over 2 key/value heads).
MODEL_CONFIG = dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=128, rope_theta=10000.0,
                    attention_dropout=0.0, tie_word_embeddings=True)

DOWNSTREAM_SIZES = {"train": 256, "val": 64, "test": 128}
TASK_MARK = "="  # the downstream prompt ends with "<object> ="; in pre-training "=" only follows a sum


class TinyLMError(FileNotFoundError):
    pass


def tiny_lm_folder() -> Path:
    """The shipped tiny LM's folder, or a clear error when it is missing."""
    if not (TINY_LM / "config.json").is_file() or not (TINY_LM / "tokenizer.json").is_file():
        raise TinyLMError(f"the built-in tiny language model is missing from {TINY_LM} "
                          "(run `python scripts/make_tiny_lm.py --seed 0 --out fastdpl/assets/tiny_lm` to build it)")
    return TINY_LM


# ---- the toy language -----------------------------------------------------------------------------
def random_scene(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """``count`` distinct objects, each (size, colour, object)."""
    return [(rng.choice(SIZES), rng.choice(COLOURS), thing) for thing in rng.sample(OBJECTS, count)]


def describe(scene) -> str:
    """``the ball is big and red . the cup is small and blue .``: one sentence per object."""
    return " ".join(f"the {thing} is {size} and {colour} ." for size, colour, thing in scene)


def _scene_statement(rng: random.Random, scene) -> str:
    size, colour, thing = rng.choice(scene)
    kind = rng.randrange(6)
    if kind == 0:
        return f"what colour is the {thing} ? {colour} ."
    if kind == 1:
        return f"what size is the {thing} ? {size} ."
    if kind == 2:
        asked = rng.choice(SIZES)
        return f"is the {thing} {asked} ? {'yes' if asked == size else 'no'} ."
    if kind == 3:
        asked = rng.choice([c for _, c, _ in scene] + list(COLOURS[:2]))
        return f"is the {thing} {asked} ? {'yes' if asked == colour else 'no'} ."
    colours = [c for _, c, _ in scene]
    if kind == 4 and colours.count(colour) == 1:
        return f"which thing is {colour} ? the {thing} ."
    return f"the {thing} is {size} and {colour} ."


def scene_document(rng: random.Random) -> str:
    scene = random_scene(rng, rng.randint(2, 4))
    return " ".join([describe(scene)] + [_scene_statement(rng, scene) for _ in range(rng.randint(2, 4))])


def number_document(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(4)
        if kind == 0:
            start = rng.randrange(0, 10)
            stop = rng.randrange(start + 1, min(start + 6, 12) + 1)
            sentences.append(f"count from {NUMBERS[start]} to {NUMBERS[stop]} : "
                             + " ".join(NUMBERS[start:stop + 1]) + " .")
        elif kind == 1:
            n = rng.randrange(0, 12)
            sentences.append(f"{NUMBERS[n + 1]} comes after {NUMBERS[n]} .")
        elif kind == 2:
            n = rng.randrange(1, 13)
            sentences.append(f"{NUMBERS[n - 1]} comes before {NUMBERS[n]} .")
        else:
            a = rng.randrange(0, 7)
            b = rng.randrange(0, 13 - a)
            sentences.append(f"{NUMBERS[a]} plus {NUMBERS[b]} = {NUMBERS[a + b]} .")
    return " ".join(sentences)


def list_document(rng: random.Random) -> str:
    words = rng.sample(OBJECTS + COLOURS, rng.randint(2, 5))
    listed = " ".join(words)
    kind = rng.randrange(3)
    if kind == 0:
        return f"the first word of {listed} is {words[0]} ."
    if kind == 1:
        return f"the last word of {listed} is {words[-1]} ."
    return f"say {listed} : {listed} ."


def pretraining_document(rng: random.Random) -> str:
    """One document of the toy language: a scene with statements (70%), numbers (15%) or lists (15%)."""
    u = rng.random()
    if u < 0.7:
        return scene_document(rng)
    if u < 0.85:
        return number_document(rng)
    return list_document(rng)


def pretraining_corpus(count: int, seed: int = 0) -> list[str]:
    """``count`` pre-training documents, reproducibly from ``seed``."""
    rng = random.Random(f"pretraining-{seed}")
    return [pretraining_document(rng) for _ in range(count)]


# ---- the downstream tasks -------------------------------------------------------------------------
def downstream_example(rng: random.Random) -> dict:
    """``{"prompt": "<scene> <object> =", "completion": "<size> <colour>"}``."""
    scene = random_scene(rng, rng.randint(2, 4))
    size, colour, thing = rng.choice(scene)
    return {"prompt": f"{describe(scene)} {thing} {TASK_MARK}", "completion": f"{size} {colour}"}


def classification_example(rng: random.Random) -> dict:
    """``{"text": "<scene> <object>", "label": "big" | "small"}`` (the template adds the question)."""
    scene = random_scene(rng, rng.randint(2, 4))
    size, _, thing = rng.choice(scene)
    return {"text": f"{describe(scene)} {thing}", "label": size}


CLASSIFICATION_TEMPLATE = "{text} big ?"
CLASSIFICATION_VERBALIZERS = {"big": "yes", "small": "no"}


def _splits(make, seed: int, sizes: dict, key: str) -> dict:
    """Examples per split, distinct across splits (no test prompt is also a training prompt)."""
    rng = random.Random(f"{make.__name__}-{seed}")
    seen, splits = set(), {}
    for split, count in sizes.items():
        rows = []
        while len(rows) < count:
            row = make(rng)
            if row[key] not in seen:
                seen.add(row[key])
                rows.append(row)
        splits[split] = rows
    return splits


def downstream_task(seed: int = 0, sizes: dict | None = None) -> dict:
    """{split: [{"prompt", "completion"}]} of the downstream generation task."""
    return _splits(downstream_example, seed, sizes or DOWNSTREAM_SIZES, "prompt")


def _write_atomic(path: Path, text: str) -> Path:
    from .atomic import write_text_atomic

    return write_text_atomic(path, text)


def write_downstream_task(folder, seed: int = 0, sizes: dict | None = None) -> dict:
    """``folder/{train,val,test}.jsonl`` of the generation task; returns {split: path}."""
    folder = Path(folder)
    paths = {}
    for split, rows in downstream_task(seed, sizes).items():
        text = "".join(json.dumps(row) + "\n" for row in rows)
        paths[split] = _write_atomic(folder / f"{split}.jsonl", text)
    return paths


def write_downstream_classification(folder, seed: int = 0, sizes: dict | None = None) -> dict:
    """``folder/{train,val,test}.csv`` (columns text,label) and ``folder/verbalizers.json``
    ({label: words}); the prompt template is ``CLASSIFICATION_TEMPLATE``. Returns {split: path}
    with the verbalizers under "verbalizers"."""
    import io

    folder = Path(folder)
    paths = {}
    for split, rows in _splits(classification_example, seed, sizes or DOWNSTREAM_SIZES, "text").items():
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["text", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        paths[split] = _write_atomic(folder / f"{split}.csv", buffer.getvalue())
    paths["verbalizers"] = _write_atomic(folder / "verbalizers.json",
                                         json.dumps(CLASSIFICATION_VERBALIZERS, indent=1) + "\n")
    return paths


# ---- tokenizer and model --------------------------------------------------------------------------
def build_tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``VOCAB``: ``<s>`` before every text encoded with
    special tokens, pad/eos/unk set; decoding joins the words with spaces (the text back)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                           special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD, clean_up_tokenization_spaces=False,
                                   model_max_length=MODEL_CONFIG["max_position_embeddings"])


def encode_words(text: str) -> list[int]:
    """The ids of a space-separated text of the toy language (what the tokenizer gives, without <s>)."""
    index = {word: i for i, word in enumerate(VOCAB)}
    return [index[word] for word in text.split()]


def build_tiny_lm(seed: int = 0):
    """The tiny LM's architecture, random weights from ``seed`` (the global RNG is left as it was)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(VOCAB), pad_token_id=VOCAB.index(PAD), bos_token_id=VOCAB.index(BOS),
                         eos_token_id=VOCAB.index(EOS), **MODEL_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def documents_to_batch(documents: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of ``<s> doc </s>`` rows, right-padded; labels -100 on padding."""
    rows = [[VOCAB.index(BOS)] + doc + [VOCAB.index(EOS)] for doc in documents]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), VOCAB.index(PAD), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask, ids.masked_fill(mask == 0, -100)


def train_tiny_lm(seed: int = 0, steps: int = 3000, batch: int = 64, lr: float = 3e-3, corpus: int = 60000,
                  progress: bool = True, callback=None):
    """Pre-train the tiny LM from scratch on ``corpus`` procedural documents (next-token loss);
    returns (model in eval mode, mean loss of the last 100 steps)."""
    documents = [encode_words(doc) for doc in pretraining_corpus(corpus, seed)]
    model = build_tiny_lm(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        index = torch.randint(len(documents), (batch,), generator=generator).tolist()
        ids, mask, labels = documents_to_batch([documents[i] for i in index])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if progress and (step + 1) % 250 == 0:
            print(f"  pre-training step {step + 1}/{steps}: loss {sum(losses[-250:]) / 250:.3f}", flush=True)
        if callback is not None:
            callback(step + 1, model)
    return model.eval(), sum(losses[-100:]) / len(losses[-100:])


def save_tiny_lm(model, tokenizer, out, *, force: bool = False, **metadata) -> Path:
    """Write the model (fp32 safetensors) and tokenizer as a Hugging Face folder, atomically: into a
    temporary folder beside ``out``, then renamed. An existing non-empty ``out`` is refused
    unless ``force``."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise FileExistsError(f"{out} exists and is not empty (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "fastdpl_tiny_lm.json").write_text(json.dumps(metadata, indent=1, sort_keys=True) + "\n")
        mode = 0o777 & ~_umask()
        os.chmod(tmp, mode)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def folder_size(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


__all__ = ["TINY_LM", "VOCAB", "MODEL_CONFIG", "tiny_lm_folder", "pretraining_corpus", "downstream_task",
           "write_downstream_task", "write_downstream_classification", "build_tokenizer", "build_tiny_lm",
           "train_tiny_lm", "save_tiny_lm", "math"]
