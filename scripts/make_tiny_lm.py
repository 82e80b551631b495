"""Build the tiny causal LM that ships in fastdpl/assets/tiny_lm (the language-model demo's default).

    python scripts/make_tiny_lm.py --seed 0 --out fastdpl/assets/tiny_lm

Pre-trains fastdpl.text_synthetic's 4-layer grouped-query Llama from scratch on procedurally
generated text about the toy world (reproducible from the seed; about 5 minutes on 2 CPU cores),
writes it with its word-level tokenizer as a Hugging Face folder (atomically: a temporary folder,
then one rename; an existing non-empty folder is refused unless --force), and checks what the
demo relies on: the model knows its world (it answers "what colour is the <object> ?" for every
object), the base model's exact match on the downstream task's test split is near zero (it never
saw the task), and prefix tuning (FastDPLPrefix, a fixed prefix in every layer, the model
frozen) lifts it clearly (by 30 points after --prefix-steps). It exits with status 1 when a check fails.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from fastdpl.text_synthetic import (OBJECTS, build_tokenizer, downstream_task, folder_size, save_tiny_lm,
                                    train_tiny_lm, world)


def encode(rows, tokenizer):
    """(prompt ids with <s>, completion ids + </s>) per row."""
    eos = tokenizer.eos_token_id
    return [(tokenizer(r["prompt"])["input_ids"], tokenizer(r["completion"], add_special_tokens=False)["input_ids"]
             + [eos]) for r in rows]


def training_batch(pairs, pad_id):
    """Right-padded prompt + completion rows; labels on the completion tokens only."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids = torch.full((len(pairs), width), pad_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, c) in enumerate(pairs):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, :len(p) + len(c)] = 1
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return ids, mask, labels


@torch.no_grad()
def knows_its_world(model, tokenizer, facts) -> float:
    """The share of objects whose colour the model answers to "what colour is the <object> ?"."""
    hits = 0
    for thing, (_, colour) in facts.items():
        ids = tokenizer(f"what colour is the {thing} ?", return_tensors="pt")["input_ids"]
        hits += tokenizer.decode(model(input_ids=ids).logits[0, -1].argmax()) == colour
    return hits / len(facts)


@torch.no_grad()
def exact_match(model, tokenizer, rows, batch=64, max_new_tokens=6) -> float:
    """Greedy completions of left-padded prompts, decoded up to </s>, equal to the completion."""
    hits = 0
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        prompts = [tokenizer(r["prompt"])["input_ids"] for r in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        for row, new in zip(chunk, out[:, width:].tolist()):
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            hits += tokenizer.decode(new, skip_special_tokens=True).strip() == row["completion"]
    return hits / len(rows)


def prefix_tune(model, tokenizer, splits, *, length=8, steps=500, lr=0.1, batch=32, seed=0):
    """Train a fixed prefix of ``length`` in every layer on the train split; returns the wrapper."""
    from fastdpl.config import PromptConfig
    from fastdpl.lm import FastDPLPrefix

    layers = model.config.num_hidden_layers
    config = PromptConfig({"decoder": (length,) * layers}, stacks=("decoder",))
    dpl = FastDPLPrefix(model, mode="fixed", config=config, generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(dpl.parameters(), lr=lr, weight_decay=0.0)
    pairs = encode(splits["train"], tokenizer)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(len(pairs), (batch,), generator=generator).tolist()
        ids, mask, labels = training_batch([pairs[i] for i in index], tokenizer.pad_token_id)
        loss = dpl(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 100 == 0:
            print(f"  prefix step {step + 1}: loss {loss.item():.3f}", flush=True)
    return dpl


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--out", default="fastdpl/assets/tiny_lm")
    parser.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    parser.add_argument("--prefix-steps", type=int, default=500, help="prefix-tuning check (0: skip it)")
    parser.add_argument("--prefix-lr", type=float, default=0.1)
    parser.add_argument("--prefix-length", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        sys.exit(f"{out} exists and is not empty (pass --force to replace it)")
    torch.manual_seed(args.seed)
    start = time.time()
    model, loss = train_tiny_lm(seed=args.seed, steps=args.steps, batch=args.batch, lr=args.lr)
    print(f"pre-training: {args.steps} steps of {args.batch} documents in {time.time() - start:.0f} s, "
          f"final loss {loss:.3f}")
    facts = world(args.seed)
    path = save_tiny_lm(model, build_tokenizer(), out, force=args.force, seed=args.seed, steps=args.steps,
                        batch=args.batch, lr=args.lr, final_loss=round(loss, 4),
                        world={thing: list(facts[thing]) for thing in OBJECTS})
    print(f"wrote {path} ({folder_size(path) / 1e6:.2f} MB)")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    failed = []
    knows = knows_its_world(model, tokenizer, facts)
    print(f"the model answers the colour of {100 * knows:.0f}% of its world's objects")
    failed += ["the model does not know its world"] if knows < 0.9 else []
    splits = downstream_task(seed=args.seed)
    base = exact_match(model, tokenizer, splits["test"])
    print(f"base model exact match on the downstream test split: {100 * base:.1f}%")
    failed += ["the base model already does the task"] if base > 0.05 else []
    if args.prefix_steps:
        start = time.time()
        dpl = prefix_tune(model, tokenizer, splits, length=args.prefix_length, steps=args.prefix_steps,
                          lr=args.prefix_lr, seed=args.seed)
        tuned = exact_match(dpl, tokenizer, splits["test"])
        print(f"prefix tuning (length {args.prefix_length} in every layer, {args.prefix_steps} steps, AdamW lr "
              f"{args.prefix_lr}, batch 32, {time.time() - start:.0f} s): test exact match {100 * tuned:.1f}%")
        failed += ["prefix tuning does not learn the task"] if tuned < base + 0.3 else []
    if failed:
        sys.exit("check failed: " + "; ".join(failed))


if __name__ == "__main__":
    main()
