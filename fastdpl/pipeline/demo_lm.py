"""``fastdpl demo lm``: DPL's prefix-length search offline, on the built-in tiny LM.

The tiny causal LM (fastdpl/assets/tiny_lm, pre-trained by scripts/make_tiny_lm.py on a
procedural toy language about a small world) meets a task it was never trained on
(fastdpl.text_synthetic: ``<object> =`` answered by the object's colour, a form the model only
saw followed by a number). The table: the base model; DPL (search, then
the argmax configuration trained fresh); a uniform prefix of the same total budget (the DPL
configuration's tokens spread evenly over the layers); and PEFT's prefix tuning at that uniform
length when peft is installed, trained on the same batches with the same schedule. Metrics on the
test split: exact match of greedy decoding and the completion loss. Then the alpha heatmap.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from ..atomic import write_text_atomic
from .lm_config import LMConfig

DEMO_LM_SETTINGS = dict(
    model="tiny", candidate_lengths=[0, 2, 8, 32], search_steps=300, train_steps=400, batch_size=32,
    val_batch_size=32, lr=0.1, arch_lr=3e-2, warmup_steps=10, checkpoint_every=50, eval_batch_size=64,
    device="cpu", seed=1, output="runs/demo-lm",
    resume=True)  # a second `fastdpl demo lm` picks up its finished checkpoints instead of refusing


def demo_lm_config(**overrides) -> LMConfig:
    return LMConfig(**{**DEMO_LM_SETTINGS, **overrides}).validate()


def run_demo_lm(cfg: LMConfig | None = None) -> dict:
    """Every method under cfg.output; returns {method: result} and prints the table."""
    from ..text_synthetic import write_downstream_task
    from .lm import run_eval, run_search, run_train

    cfg = cfg or demo_lm_config()
    out = Path(cfg.output)
    start = time.perf_counter()
    data = {k: str(v) for k, v in write_downstream_task(out / "data", seed=0).items()}
    stage = lambda **kw: dataclasses.replace(cfg, **data, **kw)  # noqa: E731
    table = {"base model": run_eval(stage(output=str(out / "base")), prefixes="none")}
    run_search(stage(output=str(out / "dpl")))
    table["DPL (searched)"] = run_train(stage(output=str(out / "dpl")))
    lengths = table["DPL (searched)"]["config"]["lengths"]["decoder"]
    uniform = max(1, round(sum(lengths) / len(lengths)))
    table[f"uniform prefix {uniform} per layer"] = run_train(stage(output=str(out / "uniform"),
                                                              prompt_config=f"uniform:{uniform}"))
    peft = peft_prefix_tuning(stage(output=str(out / "peft")), uniform)
    if peft is not None:
        table[f"PEFT prefix tuning {uniform}"] = peft
    lines = [f"tiny LM, the colour task ({len(lengths)} layers), test split ({time.perf_counter() - start:.0f} s):",
             "| method | prefix tokens per layer | total | exact match % | loss |", "| --- | --- | ---: | ---: | ---: |"]
    for method, result in table.items():
        per_layer = result.get("config", {}).get("lengths", {}).get("decoder") or [0] * len(lengths)
        lines.append(f"| {method} | {' '.join(map(str, per_layer))} | {sum(per_layer)} | "
                     f"{100 * result['exact_match']:.1f} | {result['loss']:.3f} |")
    if peft is None:
        lines.append("(PEFT prefix tuning: peft is not installed)")
    lines.append(f"alpha heatmap: {out / 'dpl' / 'search' / 'alpha_heatmap.png'}")
    print("\n" + "\n".join(lines))
    write_text_atomic(out / "table.md", "\n".join(lines) + "\n")
    return table


def peft_prefix_tuning(cfg: LMConfig, length: int) -> dict | None:
    """PEFT's PrefixTuningConfig (``num_virtual_tokens=length``, no projection) on the same
    batches (StepBatches of the same seed), optimiser and schedule as ``fastdpl lm train``,
    evaluated by the same metrics; None without peft. Results are kept as the stages keep
    theirs: a finished run's results.json is read back."""
    try:
        import peft
    except ImportError:
        return None
    from . import lm

    saved = Path(cfg.output) / "results.json"
    if saved.is_file() and cfg.resume:
        return json.loads(saved.read_text())
    job = lm.prepare(cfg)
    torch.manual_seed(cfg.seed)  # PEFT draws its prefix from the global generator
    model = peft.get_peft_model(job.model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=length))
    train = job.task("train", "the prefixes' batches")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    schedule = lm.step_schedule(optimizer, cfg, cfg.train_steps)
    loader = lm.training_loader(job, train, cfg.train_steps)
    model.train()
    for epoch in range(loader.batch_sampler.rounds):
        loader.batch_sampler.set_epoch(epoch)
        for inputs, labels in loader:
            loss = model(**inputs, labels=labels).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip or 1e9)
            optimizer.step()
            schedule.step()
    test = job.task("test", "the data the stage is evaluated on")
    layers = job.model.config.num_hidden_layers
    result = {"method": f"peft-prefix:{length}", "config": {"lengths": {"decoder": [length] * layers}},
              **lm.evaluate(job, _Generating(model), test, "test")}
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    write_text_atomic(saved, json.dumps(result, indent=1))
    return result


class _Generating(torch.nn.Module):
    """A PeftModel as ``lm.evaluate`` calls a FastDPLPrefix: forward(input_ids, attention_mask) and
    generate. Its generate is greedy decoding by whole forwards, no cache: PEFT's own generate
    disagrees with PEFT's own forward under transformers 5 (prefix tuning keeps its prefix in the
    key/value cache; on peft 0.21 / transformers 5.24 its greedy tokens are not its forward's
    argmax, even for an unpadded prompt), which would put a wrong 0 % in the demo's table."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        return self.model(**inputs)

    @torch.no_grad()
    def generate(self, *, input_ids, attention_mask, max_new_tokens: int, pad_token_id: int, **_):
        eos = self.model.config.eos_token_id
        ids, mask = input_ids, attention_mask
        done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
        for _ in range(max_new_tokens):
            # left padding: each row's real tokens at positions 0.. (as generate places them)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
            token = logits.argmax(-1).masked_fill(done, pad_token_id)
            ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            done |= token == eos
            if done.all():
                break
        return ids
