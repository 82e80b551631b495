"""What a stage records per epoch in its run folder, besides the checkpoint.

* ``log.txt``: the per-epoch lines as printed (printed whatever ``--progress`` says);
* ``metrics.jsonl``: one JSON object per epoch (loss, accuracy, lr, and for the search
  the mean entropy of softmax(alpha) per tower), rewritten from the checkpointed
  history, so a resumed run's file is exactly an uninterrupted run's;
* ``tensorboard/``: the same scalars as TensorBoard events, when tensorboard is installed.

Only the main rank writes.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from ..atomic import write_text_atomic


def bar(iterable, enabled: bool, **options):
    """A tqdm progress bar when ``enabled`` and standard error is a terminal. Elsewhere (``fastdpl
    demo > log``, a batch job) none: a bar's carriage-return frames would fill the log, and the
    per-epoch lines (RunLog.epoch) print either way."""
    return tqdm(iterable, disable=None if enabled else True, **options)


def alpha_entropy(arch_logits: dict) -> dict:
    """Mean over blocks of the entropy of softmax(alpha), per tower (nats; log C at the start)."""
    out = {}
    for tower, logits in arch_logits.items():
        logp = torch.log_softmax(logits.detach().double(), -1)
        out[tower] = float(-(logp.exp() * logp).sum(-1).mean())
    return out


def epoch_line(stage: str, entry: dict) -> str:
    if "step" in entry:  # a step-based schedule (language models): the checkpoint's step, token accuracy
        line = f"{stage} step {entry['step']}: loss {entry['loss']:.4f}, token acc {100 * entry['accuracy']:.1f}%"
    else:
        line = f"{stage} epoch {entry['epoch']}: loss {entry['loss']:.4f}, train acc {100 * entry['accuracy']:.1f}%"
    if "lr" in entry:
        line += f", lr {entry['lr']:.3g}"
    for tower, value in entry.get("alpha_entropy", {}).items():
        line += f", alpha entropy {tower} {value:.3f}"
    return line


class RunLog:
    def __init__(self, out: Path, stage: str, main: bool, start_epoch: int):
        self.out, self.stage, self.main = Path(out), stage, main
        self.writer = None
        if main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:  # purge_step: a resumed run drops the events of epochs it redoes
                self.writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=start_epoch + 1)

    def epoch(self, history: list[dict]) -> None:
        if not self.main:
            return
        entry = history[-1]
        self.line(epoch_line(self.stage, entry))
        metrics = [{k: v for k, v in h.items() if k != "alpha"} for h in history]
        write_text_atomic(self.out / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in metrics))
        if self.writer is not None:
            for key in ("loss", "accuracy", "lr"):
                if key in entry:
                    self.writer.add_scalar(f"{self.stage}/{key}", entry[key], entry["epoch"])
            for tower, value in entry.get("alpha_entropy", {}).items():
                self.writer.add_scalar(f"{self.stage}/alpha_entropy/{tower}", value, entry["epoch"])
            self.writer.flush()

    def line(self, text: str) -> None:
        """One line printed and appended to log.txt (main rank)."""
        if self.main:
            tqdm.write(text)
            with open(self.out / "log.txt", "a") as log:
                log.write(text + "\n")

    def compile(self, report: dict | None) -> None:
        """What torch.compile did in this stage (runtime.compile_report), when it ran: the graphs
        compiled (a first shape, then one with dynamic dimensions) and every graph break."""
        if report is None:
            return
        text = f"{self.stage}: torch.compile ({report['backend']}) compiled {report['graphs']} graphs, " \
               f"{report['graph_breaks']} graph breaks"
        if report["graph_breaks"]:
            text += ": " + "; ".join(report["break_reasons"])
        self.line(text)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
