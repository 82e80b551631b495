"""Text data of the language-model protocol: rows to token ids, with errors that name the row.

Files (the format follows the path, so nothing collides with the CLIP datasets' ``json:``):

* ``*.jsonl``: one JSON object per line, either ``{"prompt": ..., "completion": ...}`` or
  ``{"messages": [{"role": ..., "content": ...}, ...]}`` (chat: the last message is the
  assistant's completion, the ones before it the prompt, both through the tokenizer's chat
  template), or ``{"text": ..., "label": ...}`` (classification, as the CSV);
* ``*.csv``: columns ``text`` and ``label`` (classification); the prompt is ``template`` with
  the text, the completion the label's verbalizer words (one token or several);
* a folder written by ``datasets``' ``save_to_disk`` (one split): its rows as the JSONL's.

A generation row's completion ends with the tokenizer's end-of-sequence token, so that greedy
decoding learns to stop; a classification row's does not (its verbalizers are scored).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

GENERATION, CLASSIFICATION = "generation", "classification"


@dataclass(frozen=True)
class TextExample:
    prompt: tuple  # token ids the model reads
    completion: tuple  # token ids it is trained on and scored by
    target: str  # the completion as text (exact match) or the label (classification)
    where: str  # "file:line", for errors


@dataclass
class TextTask:
    kind: str  # GENERATION or CLASSIFICATION
    examples: list
    labels: tuple = ()  # classification: the labels, in verbalizer order
    verbalizers: dict | None = None  # classification: label -> completion token ids
    prompts: list | None = None  # classification: each example's prompt ids (without a completion)


class TextDataError(ValueError):
    pass


# ---- rows ---------------------------------------------------------------------------------------
def read_rows(path) -> list[tuple[str, dict]]:
    """[(where, row)] of a .jsonl, a .csv or a datasets folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return _dataset_rows(path)
    if path.suffix == ".jsonl":
        return _jsonl_rows(path)
    if path.suffix == ".csv":
        return _csv_rows(path)
    raise TextDataError(f"{path}: unknown text format (expected a .jsonl file, a .csv file or a folder written by "
                        "datasets' save_to_disk)")


def _jsonl_rows(path: Path) -> list:
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TextDataError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise TextDataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        rows.append((f"{path}:{number}", row))
    return rows


def _csv_rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label"} - set(reader.fieldnames or ())
        if missing:
            raise TextDataError(f"{path}: no column {', '.join(sorted(missing))} (a classification CSV has the "
                                f"columns text,label; this one has {reader.fieldnames})")
        return [(f"{path}:{number}", dict(row)) for number, row in enumerate(reader, 2)]


def _dataset_rows(path: Path) -> list:
    try:
        import datasets
    except ImportError:
        raise TextDataError(f"{path}: reading a datasets folder needs the `datasets` package "
                            "(pip install 'fastdpl[text]')") from None
    try:
        data = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise TextDataError(f"{path}: not a folder written by datasets' save_to_disk ({exc})") from None
    if isinstance(data, datasets.DatasetDict):
        raise TextDataError(f"{path} holds the splits {list(data)}: give one of them, e.g. {path / list(data)[0]}")
    return [(f"{path}[{i}]", dict(row)) for i, row in enumerate(data)]


def row_kind(where: str, row: dict) -> str:
    if "messages" in row:
        return GENERATION
    if "prompt" in row or "completion" in row:
        for name in ("prompt", "completion"):
            if name not in row:
                raise TextDataError(f"{where}: field {name!r} is missing (a generation row has prompt and "
                                    "completion)")
        return GENERATION
    if "text" in row and "label" in row:
        return CLASSIFICATION
    raise TextDataError(f"{where}: expected the fields prompt/completion, messages, or text/label; got "
                        f"{sorted(row)}")


def _text_field(where: str, row: dict, name: str) -> str:
    value = row[name]
    if not isinstance(value, str):
        raise TextDataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise TextDataError(f"{where}: field {name!r} is empty")
    return value


# ---- tokens -------------------------------------------------------------------------------------
def parse_verbalizers(spec) -> dict:
    """{label: words} from ``label=words,label=words``, a JSON file ``{label: words}`` or a mapping."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        mapping = spec
    elif Path(str(spec)).suffix == ".json":
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"verbalizers: no such file {path}")
        mapping = json.loads(path.read_text())
    else:
        mapping = {}
        for item in str(spec).split(","):
            label, sep, words = item.partition("=")
            if not sep or not label.strip() or not words:
                raise TextDataError(f"verbalizers: expected label=words,label=words, got the item {item!r}")
            mapping[label.strip()] = words
    if not all(isinstance(k, str) and isinstance(v, str) and v for k, v in mapping.items()):
        raise TextDataError(f"verbalizers: every label needs non-empty words, got {mapping}")
    return mapping


def encode_task(path, tokenizer, *, max_length: int, template: str = "{text}", verbalizers=None) -> TextTask:
    """Every row of ``path`` as token ids, checked: fields, empty texts, lengths, labels."""
    rows = read_rows(path)
    if not rows:
        raise TextDataError(f"{path}: no rows")
    kinds = {row_kind(where, row) for where, row in rows}
    if len(kinds) > 1:
        raise TextDataError(f"{path}: mixes generation rows (prompt/completion or messages) with classification "
                            "rows (text/label); one file holds one task")
    if kinds == {GENERATION}:
        examples = [_generation_example(where, row, tokenizer) for where, row in rows]
        task = TextTask(GENERATION, examples)
    else:
        task = _classification_task(path, rows, tokenizer, template, parse_verbalizers(verbalizers))
    for example in task.examples:
        total = len(example.prompt) + len(example.completion)
        if total > max_length:
            raise TextDataError(f"{example.where}: {total} tokens ({len(example.prompt)} prompt + "
                                f"{len(example.completion)} completion) exceed the maximum {max_length} "
                                "(the model's max_position_embeddings, or --max-length)")
    return task


def _ids(tokenizer, text: str, special: bool) -> tuple:
    return tuple(tokenizer(text, add_special_tokens=special)["input_ids"])


def _generation_example(where: str, row: dict, tokenizer) -> TextExample:
    eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
    if "messages" in row:
        prompt, completion, target = _chat(where, row["messages"], tokenizer)
    else:
        target = _text_field(where, row, "completion")
        prompt = _ids(tokenizer, _text_field(where, row, "prompt"), True)
        completion = _ids(tokenizer, target, False)
    if not completion:
        raise TextDataError(f"{where}: the completion has no tokens")
    return TextExample(prompt, completion + eos, target, where)


def _chat(where: str, messages, tokenizer):
    """(prompt ids, completion ids, completion text) of a conversation whose last message is the
    assistant's: the template of all messages minus the template of those before it, with the
    generation prompt (the tokens a model sees before it answers)."""
    if not isinstance(messages, list) or len(messages) < 2 or not all(isinstance(m, dict) for m in messages):
        raise TextDataError(f"{where}: field 'messages' must be a list of at least two {{role, content}} objects")
    for i, message in enumerate(messages):
        for name in ("role", "content"):
            if not isinstance(message.get(name), str):
                raise TextDataError(f"{where}: messages[{i}] has no string field {name!r}")
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise TextDataError(f"{where}: the last message must be a non-empty assistant message (the completion)")
    if not getattr(tokenizer, "chat_template", None):
        raise TextDataError(f"{where}: chat messages need a tokenizer with a chat template; this one has none "
                            "(use prompt/completion rows)")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise TextDataError(f"{where}: the chat template does not render the conversation as its prompt followed "
                            "by the answer; use prompt/completion rows")
    return _ids(tokenizer, prompt, False), _ids(tokenizer, full[len(prompt):], False), messages[-1]["content"]


def _classification_task(path, rows, tokenizer, template: str, verbalizers: dict) -> TextTask:
    if not verbalizers:
        raise TextDataError(f"{path}: classification rows (text/label) need --verbalizers label=words,...")
    words = {label: _ids(tokenizer, text, False) for label, text in verbalizers.items()}
    for label, ids in words.items():
        if not ids:
            raise TextDataError(f"verbalizers: the words of label {label!r} have no tokens")
    examples, prompts = [], []
    for where, row in rows:
        label = str(row["label"]).strip()
        if label not in words:
            raise TextDataError(f"{where}: label {label!r} has no verbalizer (the verbalizers are for "
                                f"{sorted(words)})")
        prompt = _ids(tokenizer, template.replace("{text}", _text_field(where, row, "text")), True)
        examples.append(TextExample(prompt, words[label], label, where))
        prompts.append(prompt)
    return TextTask(CLASSIFICATION, examples, tuple(words), words, prompts)


# ---- batches ------------------------------------------------------------------------------------
class TokenExamples(torch.utils.data.Dataset):
    """Item ``(epoch, index)`` (the sampler's) or ``index``: one example's ids."""

    def __init__(self, examples):
        self.examples = list(examples)

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, item):
        return self.examples[item[1] if isinstance(item, tuple) else item]


def collate(examples, pad_id: int, completion: bool = True):
    """(inputs, labels) of right-padded sequences: ``inputs`` = {input_ids, attention_mask}; the
    labels are the ids on completion tokens and -100 elsewhere (prompt, padding), the positions
    a causal LM's loss counts. ``completion=False``: the prompts alone (labels all -100)."""
    sequences = [e.prompt + (e.completion if completion else ()) for e in examples]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (example, sequence) in enumerate(zip(examples, sequences)):
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
        if completion:
            labels[row, len(example.prompt):len(sequence)] = torch.tensor(example.completion)
    return {"input_ids": ids, "attention_mask": mask}, labels
