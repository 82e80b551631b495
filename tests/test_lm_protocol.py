"""The language-model protocol (fastdpl lm): text formats, the next-token objective, gradient
accumulation, step batches, the metrics, the stages through the command line, resume, torchrun.

The model is a tiny random Llama (grouped-query attention) with a word-level tokenizer, written
to a folder as save_pretrained writes it; the references are the model's own loss, an unpadded
per-example greedy loop and per-example verbalizer scoring written here.
"""
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdpl.cli import main
from fastdpl.data.text import TextDataError, collate, encode_task, parse_verbalizers
from fastdpl.lm import FastDPLPrefix
from fastdpl.pipeline import lm
from fastdpl.pipeline.lm_config import LMConfig
from fastdpl.pipeline.loaders import StepBatches
from fastdpl.pipeline.runtime import Dist
from fastdpl.pipeline.training import NEXT_TOKEN, loss_step
from helpers import stop_after_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WORDS = "a b c d e f g h => yes no good bad reverse : copy is big small the".split()
CHAT = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% if m['role'] == 'assistant' %}</s> "
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")


def write_model(folder: Path, pad: bool = True, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "user", "assistant"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **({"pad_token": "<pad>"} if pad else {}))
    fast.chat_template = CHAT
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0 if pad else None)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def reverse_rows(n: int, seed: int) -> list:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        seq = [rng.choice("abcdefgh") for _ in range(rng.randint(1, 4))]
        rows.append({"prompt": "reverse : " + " ".join(seq) + " =>", "completion": " ".join(reversed(seq))})
    return rows


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(folder, train, val, test) of the tiny model and a reverse-the-letters task."""
    root = tmp_path_factory.mktemp("tiny_lm")
    folder = write_model(root / "model")
    splits = [write_jsonl(root / f"{name}.jsonl", reverse_rows(n, seed))
              for name, n, seed in (("train", 24, 0), ("val", 8, 1), ("test", 10, 2))]
    return (folder, *splits)


@pytest.fixture(scope="module")
def loaded(tiny):
    tokenizer = lm.load_tokenizer(tiny[0], None)
    model = lm.load_causal_lm(tiny[0], "float32", "cpu", progress=False)
    return model, tokenizer


def job_for(loaded, **settings) -> lm.LMJob:
    model, tokenizer = loaded
    cfg = LMConfig(**{"model": "x", "progress": False, **settings}).validate()
    return lm.LMJob(cfg, Dist(), "cpu", model, tokenizer, 32)


# ---- text formats -------------------------------------------------------------------------------
def test_jsonl_rows_are_the_tokenizers_ids_and_labels_cover_the_completion_only(tiny, loaded):
    _, tokenizer = loaded
    task = encode_task(tiny[1], tokenizer, max_length=32)
    rows = [json.loads(line) for line in tiny[1].read_text().splitlines()]
    for example, row in zip(task.examples, rows):
        assert list(example.prompt) == tokenizer(row["prompt"])["input_ids"]
        assert list(example.completion) == tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [2]
    inputs, labels = collate(task.examples[:5], pad_id=0)
    for row, example in enumerate(task.examples[:5]):
        n, m = len(example.prompt), len(example.completion)
        assert inputs["input_ids"][row, :n + m].tolist() == list(example.prompt + example.completion)
        assert inputs["attention_mask"][row].tolist() == [1] * (n + m) + [0] * (labels.shape[1] - n - m)
        assert labels[row].tolist() == [-100] * n + list(example.completion) + [-100] * (labels.shape[1] - n - m)


def test_chat_messages_go_through_the_chat_template(tmp_path, loaded):
    _, tokenizer = loaded
    messages = [{"role": "user", "content": "copy a b"}, {"role": "assistant", "content": "a b"}]
    task = encode_task(write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}]), tokenizer, max_length=32)
    (example,) = task.examples
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True, tokenize=False)
    assert prompt == "user : copy a b assistant : "
    assert tokenizer.decode(example.prompt) == "user : copy a b assistant :"
    assert list(example.prompt + example.completion)[:-1] == tokenizer(full, add_special_tokens=False)["input_ids"]
    assert example.target == "a b"


def test_csv_classification_with_single_and_multi_token_verbalizers(tmp_path, loaded):
    _, tokenizer = loaded
    path = tmp_path / "cls.csv"
    path.write_text("text,label\nthe a is big,big\nthe b is small,small\n")
    task = encode_task(path, tokenizer, max_length=32, template="{text} =>", verbalizers="big=yes,small=no no")
    assert task.kind == "classification" and task.labels == ("big", "small")
    assert task.verbalizers == {"big": (WORDS.index("yes") + 6,), "small": (WORDS.index("no") + 6,) * 2}
    assert tokenizer.decode(task.examples[1].prompt, skip_special_tokens=True) == "the b is small =>"
    assert task.examples[1].completion == task.verbalizers["small"] and task.examples[1].where == f"{path}:3"


def test_a_datasets_folder_reads_as_the_jsonl(tmp_path, tiny, loaded):
    datasets = pytest.importorskip("datasets")
    rows = reverse_rows(6, 3)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "disk"))
    from_disk = encode_task(tmp_path / "disk", loaded[1], max_length=32)
    from_file = encode_task(write_jsonl(tmp_path / "same.jsonl", rows), loaded[1], max_length=32)
    assert [(e.prompt, e.completion) for e in from_disk.examples] == [(e.prompt, e.completion)
                                                                      for e in from_file.examples]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(TextDataError, match=r"holds the splits \['train'\]"):
        encode_task(tmp_path / "dict", loaded[1], max_length=32)


BAD_FILES = [
    ("a.jsonl", '{"prompt": "copy a =>"}\n', {}, r"a.jsonl:1: field 'completion' is missing"),
    ("a.jsonl", '{"prompt": "copy a =>", "completion": " "}\n', {}, r"a.jsonl:1: field 'completion' is empty"),
    ("a.jsonl", '{"prompt": "copy a =>", "completion": "a"}\n{"prompt": 3\n', {}, r"a.jsonl:2: not valid JSON"),
    ("a.jsonl", '{"question": "a"}\n', {}, r"a.jsonl:1: expected the fields prompt/completion"),
    ("a.jsonl", '{"prompt": "copy a =>", "completion": "' + "a " * 40 + '"}\n', {},
     r"a.jsonl:1: 44 tokens \(3 prompt \+ 41 completion\) exceed the maximum 32"),
    ("a.jsonl", '{"prompt": "a", "completion": "b"}\n{"text": "a", "label": "x"}\n', {}, "mixes generation rows"),
    ("a.jsonl", '{"messages": [{"role": "user", "content": "a"}]}\n', {}, "at least two"),
    ("a.csv", "text,label\nthe a is big,big\nthe b,medium\n", {"verbalizers": "big=yes,small=no"},
     r"a.csv:3: label 'medium' has no verbalizer"),
    ("a.csv", "text,label\nthe a is big,big\n", {}, "need --verbalizers"),
    ("a.csv", "sentence,label\nx,y\n", {"verbalizers": "y=yes"}, "no column text"),
    ("a.txt", "hello\n", {}, "unknown text format"),
]


@pytest.mark.parametrize("name,content,kwargs,match", BAD_FILES, ids=[f"{i}" for i in range(len(BAD_FILES))])
def test_bad_text_files_name_the_file_line_and_field(tmp_path, loaded, name, content, kwargs, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(TextDataError, match=match):
        encode_task(path, loaded[1], max_length=32, **kwargs)


def test_bad_verbalizers_are_named():
    assert parse_verbalizers("pos=good,neg=bad no") == {"pos": "good", "neg": "bad no"}
    for spec in ("pos", "=good", "pos="):
        with pytest.raises(TextDataError, match="verbalizers"):
            parse_verbalizers(spec)


def test_model_folders_are_checked_before_transformers_reads_them(tmp_path, tiny):
    import shutil

    with pytest.raises(FileNotFoundError, match="no such folder"):
        lm.model_folder(str(tmp_path / "nowhere"))
    for missing, match in (("config.json", "no config.json"), ("model.safetensors", "no weights"),
                           ("tokenizer.json", "no tokenizer files")):
        copy = shutil.copytree(tiny[0], tmp_path / missing)
        (copy / missing).unlink()
        with pytest.raises(ValueError, match=match):
            lm.model_folder(str(copy))


def test_a_tokenizer_without_a_pad_token_is_refused_unless_one_is_named(tmp_path):
    folder = write_model(tmp_path / "nopad", pad=False)
    with pytest.raises(ValueError, match="no pad token: pass --pad-token eos"):
        lm.load_tokenizer(folder, None)
    assert lm.load_tokenizer(folder, "eos").pad_token == "</s>"
    assert lm.load_tokenizer(folder, "the").pad_token == "the"
    with pytest.raises(ValueError, match="--pad-token zzz"):
        lm.load_tokenizer(folder, "zzz")


# ---- the objective and the step -----------------------------------------------------------------
def test_next_token_loss_is_the_models_own(tiny, loaded):
    model, tokenizer = loaded
    inputs, labels = collate(encode_task(tiny[1], tokenizer, max_length=32).examples[:6], pad_id=0)
    with torch.no_grad():
        own = model(**inputs, labels=labels).loss
        ours = NEXT_TOKEN.loss(model(**inputs).logits, labels)
    assert torch.allclose(ours, own, rtol=1e-6, atol=0)
    assert NEXT_TOKEN.count(labels) == int((labels != -100).sum())


def test_accumulated_micro_batches_give_the_whole_batchs_gradient(tiny, loaded):
    """Completions of different lengths: each piece weighted by its tokens, not 1/pieces."""
    model, tokenizer = loaded
    examples = encode_task(tiny[1], tokenizer, max_length=32).examples[:6]
    assert len({len(e.completion) for e in examples}) > 1
    inputs, labels = collate(examples, pad_id=0)
    job = job_for(loaded, grad_clip=None)
    grads = []
    for pieces in (1, 3):
        dpl = FastDPLPrefix(model, mode="search", candidate_lengths=(0, 2, 3))
        opt = torch.optim.SGD(dpl.prompt_parameters() + dpl.arch_parameters(), lr=0.0)
        loss, predictions = loss_step(dpl, opt, inputs, labels, job, NEXT_TOKEN, micro_batches=pieces)
        grads.append((loss, [p.grad.clone() for p in dpl.prompt_parameters() + dpl.arch_parameters()]))
        assert predictions.shape[:2] == labels.shape
        dpl.detach()
    (loss_one, one), (loss_three, three) = grads
    assert torch.allclose(loss_three, loss_one, rtol=1e-6)
    for a, b in zip(three, one):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-8 * b.abs().max())


def test_step_batches_depend_on_the_step_only_and_split_across_ranks():
    one = StepBatches(10, 4, seed=3, ranks=Dist(), steps=7, round_steps=3)
    assert one.rounds == 3
    whole = []
    for r in range(one.rounds):
        one.set_epoch(r)
        whole += [[i for _, i in batch] for batch in one]
    assert len(whole) == 7 and all(len(b) == 4 for b in whole)
    flat = [i for b in whole for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # whole passes
    ranks = [StepBatches(10, 2, seed=3, ranks=Dist(r, 2), steps=7, round_steps=3) for r in (0, 1)]
    for r in range(3):
        for sampler in ranks:
            sampler.set_epoch(r)
        shares = [list(s) for s in ranks]
        joined = [[i for _, i in a + b] for a, b in zip(*shares)]
        assert joined == whole[3 * r:3 * r + 3]
    # and in another process (whose str hashes differ): the same batches
    code = ("from fastdpl.pipeline.loaders import StepBatches; from fastdpl.pipeline.runtime import Dist; "
            "s = StepBatches(10, 4, seed=3, ranks=Dist(), steps=7, round_steps=3); print([i for _, i in next(iter(s))])")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    printed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert printed.stdout.strip() == str(whole[0]), printed.stderr[-2000:]


# ---- metrics ------------------------------------------------------------------------------------
def test_exact_match_equals_an_unpadded_greedy_loop(tiny, loaded):
    model, tokenizer = loaded
    job = job_for(loaded, eval_batch_size=4)
    task = encode_task(tiny[3], tokenizer, max_length=32)
    dpl = FastDPLPrefix(model, mode="search", candidate_lengths=(0, 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        dpl.arch_logits["decoder"].copy_(torch.tensor([[-3.0, 3.0], [3.0, -3.0]]))
    # the answers the model gives, one example at a time, by argmax after argmax
    steps = max(len(e.completion) for e in task.examples) + 1
    answers = []
    with torch.no_grad():
        for example in task.examples:
            ids = list(example.prompt)
            for _ in range(steps):
                token = int(dpl(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                ids.append(token)
            answers.append(tokenizer.decode(ids[len(example.prompt):], skip_special_tokens=True).strip())
    # a task whose targets are those answers for the even examples: exact match 1/2 exactly
    from dataclasses import replace

    task.examples = [replace(e, target=a if i % 2 == 0 else a + " x") for i, (e, a) in
                     enumerate(zip(task.examples, answers))]
    try:
        assert lm.exact_match(job, dpl, task, "test") == 5 / 10
    finally:
        dpl.detach()


def test_verbalizer_accuracy_equals_per_example_scoring(tmp_path, loaded):
    model, tokenizer = loaded
    path = tmp_path / "cls.csv"
    rng = random.Random(0)
    path.write_text("text,label\n" + "".join(f"the {rng.choice('abcdefgh')} is {s},{s}\n"
                                             for s in rng.choices(["big", "small"], k=9)))
    task = encode_task(path, tokenizer, max_length=32, template="{text} =>", verbalizers="big=yes good,small=no")
    job = job_for(loaded, eval_batch_size=4)
    dpl = FastDPLPrefix(model, mode="search", candidate_lengths=(0, 2))
    correct = 0
    with torch.no_grad():
        for e in task.examples:
            scores = {}
            for label, words in task.verbalizers.items():
                ids = torch.tensor([e.prompt + words])
                log_probs = torch.log_softmax(dpl(input_ids=ids).logits[0].double(), -1)
                scores[label] = sum(log_probs[len(e.prompt) - 1 + t, w] for t, w in enumerate(words))
            correct += max(scores, key=scores.get) == e.target
    try:
        assert lm.verbalizer_accuracy(job, dpl, task, "test") == correct / len(task.examples)
        metrics = lm.evaluate(job, dpl, task, "test")
        assert set(metrics) == {"loss", "perplexity", "accuracy", "examples"}
    finally:
        dpl.detach()


# ---- the stages through the command line --------------------------------------------------------
def _args(tiny, out, *extra):
    folder, train, val, test = tiny
    return ["--model", str(folder), "--train", str(train), "--val", str(val), "--test", str(test), "--batch-size", "4",
            "--val-batch-size", "4", "--checkpoint-every", "3", "--device", "cpu", "--progress", "false",
            "--output", str(out), *extra]


def test_search_train_eval_report_from_the_command_line(tmp_path, tiny, capsys):
    out = tmp_path / "run"
    assert main(["lm", "search", *_args(tiny, out), "--search-steps", "7", "--candidate-lengths", "0,2,4"]) == 0
    search = out / "search"
    for name in ("checkpoint.pt", "prefixes.pt", "prompt_config.json", "alpha_heatmap.png", "alpha_history.json",
                 "metrics.jsonl", "log.txt", "run.yaml", "results.json"):
        assert (search / name).is_file(), name
    history = json.loads((search / "alpha_history.json").read_text())
    assert [h["step"] for h in history] == [3, 6, 7]
    assert main(["lm", "train", *_args(tiny, out), "--train-steps", "4", "--accumulate", "2"]) == 0
    train = json.loads((out / "train" / "results.json").read_text())
    assert train["method"] == "dpl" and {"loss", "perplexity", "exact_match"} <= set(train)
    assert train["config"] == json.loads((search / "prompt_config.json").read_text())
    assert main(["lm", "eval", "--model", str(tiny[0]), "--test", str(tiny[3]), "--output", str(out),
                 "--progress", "false"]) == 0
    evaluated = json.loads(next((out / "eval").glob("results-prefixes*.json")).read_text())
    assert evaluated["loss"] == pytest.approx(train["loss"], rel=1e-6)  # the saved prefixes, reloaded
    assert main(["lm", "eval", "--model", str(tiny[0]), "--test", str(tiny[3]), "--output", str(out),
                 "--progress", "false", "--prefixes", "none"]) == 0
    assert main(["lm", "report", str(out), "--out", str(tmp_path / "summary")]) == 0
    table = (tmp_path / "summary.md").read_text()
    assert "exact_match" in table and "perplexity" in table and "| eval | base |" in table
    # an evaluation is never silently overwritten
    assert main(["lm", "eval", "--model", str(tiny[0]), "--test", str(tiny[3]), "--output", str(out),
                 "--progress", "false", "--prefixes", "none"]) == 2
    assert "exists" in capsys.readouterr().err


def test_an_interrupted_search_resumes_exactly(tmp_path, tiny, monkeypatch):
    search = ["lm", "search", "--search-steps", "7", "--candidate-lengths", "0,2,4", "--accumulate", "2"]
    assert main([*search, *_args(tiny, tmp_path / "whole")]) == 0
    restore = stop_after_checkpoint(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        main([*search, *_args(tiny, tmp_path / "cut")])
    restore()
    assert main([*search, *_args(tiny, tmp_path / "cut"), "--resume"]) == 0
    a, b = (torch.load(tmp_path / run / "search" / "prefixes.pt", weights_only=True) for run in ("whole", "cut"))
    for group in ("prompts", "arch_logits"):
        assert a[group].keys() == b[group].keys()
        for key in a[group]:
            assert torch.equal(a[group][key], b[group][key]), f"{group}/{key}"
    metrics = [(tmp_path / run / "search" / "metrics.jsonl").read_text() for run in ("whole", "cut")]
    assert metrics[0] == metrics[1]


@pytest.mark.parametrize("extra,match", [
    (["--val", "none"], "--val is required"),
    (["--model", "nowhere"], "--model nowhere: no such folder"),
    (["--batch-size", "0"], "batch_size must be a positive int"),
])
def test_bad_settings_give_one_clear_error(tmp_path, tiny, capsys, extra, match):
    assert main(["lm", "search", *_args(tiny, tmp_path / "bad"), *extra]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_torchrun_two_processes_match_one(tmp_path, tiny):
    """2 gloo ranks of batch 2 == 1 process of batch 4: the loss weighted by each rank's tokens;
    and so with the frozen weights sharded across the 2 (FSDP2)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    common = ["lm", "search", "--search-steps", "4", "--candidate-lengths", "0,2,4", "--lr", "0.05", "--arch-lr", "0.02"]
    runs = {"one": [sys.executable, "-m", "fastdpl.cli", *common, *_args(tiny, tmp_path / "one")],
            "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "fastdpl.cli", *common, *_args(tiny, tmp_path / "two", "--batch-size", "2",
                                                   "--val-batch-size", "2")]}
    runs["sharded"] = [*runs["two"][:8 + len(common)], *_args(tiny, tmp_path / "sharded", "--batch-size", "2",
                                                              "--val-batch-size", "2", "--shard")]
    for name, command in runs.items():
        done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        if name == "sharded":  # each process held half of the weights (rows split over 2, some odd)
            local, total = map(int, re.search(r"(\d+) of (\d+) per process", done.stdout).groups())
            assert total / 2 <= local < total / 2 + 200, done.stdout
    one, two, sharded = (torch.load(tmp_path / run / "search" / "prefixes.pt", weights_only=True)
                         for run in ("one", "two", "sharded"))
    for group in ("prompts", "arch_logits"):
        for key in one[group]:
            for name, other in (("two", two), ("sharded", sharded)):
                a, b = other[group][key].double(), one[group][key].double()
                assert ((a - b).norm() / b.norm()).item() < 2.0 ** -12, f"{name}: {group}/{key}"
    assert one["arch_logits"]["decoder"].abs().max() > 1e-2  # alpha moved: the comparison is not vacuous
    logged = [json.loads((tmp_path / run / "search" / "alpha_history.json").read_text()) for run in ("one", "two")]
    assert [h["loss"] for h in logged[1]] == pytest.approx([h["loss"] for h in logged[0]], rel=2.0 ** -12)


def test_bf16_autocast_and_bf16_weights_run_the_protocol(tmp_path, tiny):
    """--precision bf16 (autocast) with --model-dtype bfloat16: the search and its metrics run, and
    the loss stays within bf16's reach of the fp32 run's (same batches, same init)."""
    losses = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16", "--model-dtype", "bfloat16"])):
        out = tmp_path / name
        assert main(["lm", "search", *_args(tiny, out), "--search-steps", "2", "--candidate-lengths", "0,2",
                     *extra]) == 0
        losses[name] = json.loads((out / "search" / "results.json").read_text())["loss"]
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
