"""The built-in tiny language model: a procedural toy language, its pre-training and a downstream task.

The language-model demo needs a causal LM that runs offline on a laptop CPU. This module makes
one from scratch, reproducibly from a seed, as the tiny CLIP of ``fastdpl.synthetic`` does for
images: a word-level tokenizer over a closed vocabulary of about a hundred words, a 4-layer
grouped-query ``LlamaForCausalLM``, and the procedural text it is pre-trained on.
``scripts/make_tiny_lm.py`` runs it and writes the Hugging Face model folder that ships in
``fastdpl/assets/tiny_lm`` (``TINY_LM``).

The toy language describes a small world (``world(seed)``): 24 objects, each with a fixed
size and colour. Pre-training documents are two to six sentences (every token separated by one
space, so decoding gives the text back), each a fact about the world in one of eight forms
(``the ball is red .``, ``the colour of the ball is red .``, ``what colour is the ball ? red .``,
``the size of the ball is big .``, ``is the ball blue ? no .``, ...), a number fact
(counting, next and previous, ``two plus three = five .``) or a word-list sentence (``the first
word of ball cup hat is ball .``). The model learns the world by heart: that is its knowledge.

The downstream task asks for that knowledge in a form the model never saw: an object word
followed by ``=`` (after a sentence or two that do not mention it), completed by the object's
colour: ``the cup is small . two comes after one . ball =`` → ``red``. In pre-training ``=``
only ever follows a sum and precedes a number, so the base model answers with a number (0 %
exact match). A learned prefix (the model frozen) has to turn the new form into an answer; the
splits hold distinct prompts (no test prompt is a training prompt). Built from seed 0
(scripts/make_tiny_lm.py's check, 2026-12-03): the model answers the colour question for all 24
objects, the base model gets 0 % on the task, and a prefix of 8 in every layer trained with AdamW
at lr 0.1 reaches 37 % after 300 steps and 76 % after 500 (batch 32). With objects held out
of training instead (tried: 14 / 4 / 6 objects per split), prefix tuning memorised the training
objects' colours (99 % on them) and reached only 18-27 % on the unseen ones, so the splits share
the objects. ``write_downstream_task`` writes it as JSONL
``{"prompt", "completion"}`` splits; ``write_downstream_classification`` writes a second one, a
CSV ``text,label`` (is the named object big or small) with its verbalizers.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import torch

TINY_LM = Path(__file__).parent / "assets" / "tiny_lm"

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
OBJECTS = ("ball", "cup", "box", "hat", "car", "tree", "bird", "fish", "book", "key", "lamp", "shoe", "bag",
           "bed", "boat", "cake", "chair", "clock", "coat", "door", "drum", "kite", "ring", "sock")
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


# ---- the toy world and its language ---------------------------------------------------------------
def world(seed: int = 0) -> dict[str, tuple[str, str]]:
    """{object: (size, colour)}: every colour on three objects, every size on twelve, shuffled by seed."""
    rng = random.Random(f"world-{seed}")
    objects = list(OBJECTS)
    rng.shuffle(objects)
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(objects))]
    sizes = [SIZES[(i // len(COLOURS)) % 2] for i in range(len(objects))]
    return {thing: (size, colour) for thing, size, colour in zip(objects, sizes, colours)}


def fact(rng: random.Random, facts: dict, thing: str) -> str:
    """One sentence about ``thing`` in one of eight forms."""
    size, colour = facts[thing]
    kind = rng.randrange(8)
    if kind == 7:
        asked = rng.choice(COLOURS)
        return f"is the {thing} {asked} ? {'yes' if asked == colour else 'no'} ."
    return (f"the {thing} is {colour} .", f"the colour of the {thing} is {colour} .",
            f"what colour is the {thing} ? {colour} .", f"the {thing} is {size} .",
            f"the size of the {thing} is {size} .", f"what size is the {thing} ? {size} .",
            f"the {thing} is {size} and {colour} .")[kind]


def number_sentence(rng: random.Random) -> str:
    kind = rng.randrange(4)
    if kind == 0:
        start = rng.randrange(0, 10)
        stop = rng.randrange(start + 1, min(start + 6, 12) + 1)
        return f"count from {NUMBERS[start]} to {NUMBERS[stop]} : " + " ".join(NUMBERS[start:stop + 1]) + " ."
    if kind == 1:
        n = rng.randrange(0, 12)
        return f"{NUMBERS[n + 1]} comes after {NUMBERS[n]} ."
    if kind == 2:
        n = rng.randrange(1, 13)
        return f"{NUMBERS[n - 1]} comes before {NUMBERS[n]} ."
    a = rng.randrange(0, 7)
    b = rng.randrange(0, 13 - a)
    return f"{NUMBERS[a]} plus {NUMBERS[b]} = {NUMBERS[a + b]} ."


def list_sentence(rng: random.Random) -> str:
    words = rng.sample(OBJECTS + COLOURS, rng.randint(2, 5))
    listed = " ".join(words)
    kind = rng.randrange(3)
    if kind == 0:
        return f"the first word of {listed} is {words[0]} ."
    if kind == 1:
        return f"the last word of {listed} is {words[-1]} ."
    return f"say {listed} : {listed} ."


def sentence(rng: random.Random, facts: dict) -> str:
    """A fact about the world (75 %), a number fact (15 %) or a word-list sentence (10 %)."""
    u = rng.random()
    if u < 0.75:
        return fact(rng, facts, rng.choice(OBJECTS))
    return number_sentence(rng) if u < 0.9 else list_sentence(rng)


def pretraining_document(rng: random.Random, facts: dict) -> str:
    return " ".join(sentence(rng, facts) for _ in range(rng.randint(2, 6)))


def pretraining_corpus(count: int, seed: int = 0) -> list[str]:
    """``count`` pre-training documents about ``world(seed)``, reproducibly from ``seed``."""
    facts = world(seed)
    rng = random.Random(f"pretraining-{seed}")
    return [pretraining_document(rng, facts) for _ in range(count)]


# ---- the downstream tasks -------------------------------------------------------------------------
def _context(rng: random.Random, facts: dict, thing: str) -> str:
    """Zero to two sentences that do not mention ``thing`` (so they cannot give its answer away)."""
    sentences = []
    for _ in range(rng.randint(0, 2)):
        text = sentence(rng, facts)
        while thing in text.split():
            text = sentence(rng, facts)
        sentences.append(text)
    return " ".join(sentences)


def downstream_example(rng: random.Random, facts: dict, objects) -> dict:
    """``{"prompt": "<context> <object> =", "completion": "<colour>"}``."""
    thing = rng.choice(objects)
    return {"prompt": f"{_context(rng, facts, thing)} {thing} {TASK_MARK}".lstrip(), "completion": facts[thing][1]}


def classification_example(rng: random.Random, facts: dict, objects) -> dict:
    """``{"text": "<context> <object>", "label": "big" | "small"}`` (the template adds the question)."""
    thing = rng.choice(objects)
    return {"text": f"{_context(rng, facts, thing)} {thing}".lstrip(), "label": facts[thing][0]}


CLASSIFICATION_TEMPLATE = "{text} size ?"
CLASSIFICATION_VERBALIZERS = {"big": "big", "small": "small"}


def _splits(make, seed: int, sizes: dict, key: str) -> dict:
    """Examples per split, distinct across splits (no test prompt is also a training prompt)."""
    facts = world(seed)
    rng = random.Random(f"{make.__name__}-{seed}")
    seen, splits = set(), {}
    for split, count in sizes.items():
        rows = []
        while len(rows) < count:
            row = make(rng, facts, OBJECTS)
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


def train_tiny_lm(seed: int = 0, steps: int = 2000, batch: int = 64, lr: float = 3e-3, corpus: int = 60000,
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
           "train_tiny_lm", "save_tiny_lm", "world"]
