"""PromptConfig: how many prompt tokens each block of each tower gets.

The search stage ends in one (argmax of the architecture logits per block); the
train stage builds a fixed-length prompt model from one; the manual deep-prompt
baselines are presets. Saved as JSON, printed as a table.
"""
from __future__ import annotations

import json
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from .atomic import write_text_atomic
from typing import Mapping, Sequence

TOWERS = ("image", "text")
FORMAT = "fastdpl-prompt-config-v1"


def _check_lengths(tower: str, lengths) -> tuple[int, ...]:
    if isinstance(lengths, (str, bytes)) or not isinstance(lengths, Sequence):
        raise TypeError(f"PromptConfig: lengths of tower {tower!r} must be a sequence of ints, got {lengths!r}")
    out = []
    for block, n in enumerate(lengths):
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"PromptConfig: tower {tower!r} block {block}: length must be an int >= 0, got {n!r}")
        out.append(int(n))
    return tuple(out)


@dataclass(frozen=True)
class PromptConfig:
    """Per-stack, per-block prompt lengths, e.g. ``{"image": (6, 0, 2, ...), "text": (...)}``.

    ``stacks``: the stack names a configuration may use, in their order: a CLIP's towers by
    default; a language model's or a classifier's own (e.g. ``("decoder",)``) otherwise."""

    lengths: Mapping[str, tuple]
    stacks: tuple = TOWERS

    def __post_init__(self):
        stacks = tuple(self.stacks)
        if not stacks or not all(isinstance(s, str) and s.isidentifier() for s in stacks):
            raise ValueError(f"PromptConfig: stacks must be identifiers, got {self.stacks!r}")
        object.__setattr__(self, "stacks", stacks)
        if not isinstance(self.lengths, Mapping) or not self.lengths:
            raise ValueError("PromptConfig: lengths must map at least one tower name to per-block lengths")
        checked = {}
        for tower, lengths in self.lengths.items():
            if tower not in stacks:
                noun = "tower" if stacks == TOWERS else "stack"
                raise ValueError(f"PromptConfig: unknown {noun} {tower!r}; expected one of {stacks}")
            checked[tower] = _check_lengths(tower, lengths)
        object.__setattr__(self, "lengths", dict(sorted(checked.items(), key=lambda kv: stacks.index(kv[0]))))

    # ---- presets -----------------------------------------------------------------------------------
    @classmethod
    def uniform(cls, length: int, depth: int, num_blocks: int | Mapping[str, int] | None = None,
                towers: Sequence[str] = TOWERS) -> "PromptConfig":
        """The manual deep-prompt baseline: ``length`` tokens in the first ``depth`` blocks of each tower.

        ``num_blocks`` (an int or a per-tower mapping) is the tower depth; it defaults to ``depth``.
        """
        blocks = {t: (num_blocks[t] if isinstance(num_blocks, Mapping) else (num_blocks or depth)) for t in towers}
        for tower, total in blocks.items():
            if not 0 <= depth <= total:
                raise ValueError(f"PromptConfig.uniform: depth {depth} must be within 0..{total} blocks of {tower!r}")
        stacks = TOWERS if set(towers) <= set(TOWERS) else tuple(towers)  # a CLIP's, or another model's stacks
        return cls({t: (length,) * depth + (0,) * (blocks[t] - depth) for t in towers}, stacks=stacks)

    @classmethod
    def zero_shot(cls, num_blocks: int | Mapping[str, int], towers: Sequence[str] = TOWERS) -> "PromptConfig":
        """No prompts anywhere: the frozen CLIP itself."""
        return cls.uniform(0, 0, num_blocks, towers)

    @classmethod
    def from_alpha(cls, alphas: Mapping[str, object], candidate_lengths: Sequence[int] | None = None) -> "PromptConfig":
        """argmax per block of each tower's (blocks, candidates) architecture logits; candidate c has
        length ``candidate_lengths[c]`` (default c, as in the authors' code: column c is c tokens)."""
        import torch

        lengths = {}
        for tower, alpha in alphas.items():
            alpha = torch.as_tensor(alpha)
            if alpha.dim() != 2 or alpha.shape[1] == 0 or not torch.isfinite(alpha).all():
                raise ValueError(f"PromptConfig.from_alpha: alpha of tower {tower!r} must be a finite (blocks, "
                                 f"candidates) array, got shape {tuple(alpha.shape)}")
            choices = list(candidate_lengths) if candidate_lengths is not None else list(range(alpha.shape[1]))
            if len(choices) != alpha.shape[1]:
                raise ValueError(f"PromptConfig.from_alpha: tower {tower!r} has {alpha.shape[1]} candidates but "
                                 f"{len(choices)} candidate lengths were given")
            lengths[tower] = tuple(choices[i] for i in alpha.argmax(dim=1).tolist())
        return cls(lengths)

    @classmethod
    def from_authors_alpha(cls, path: str | os.PathLike, epoch: int | None = None,
                           swapped: bool = True) -> "PromptConfig":
        """The configuration of a search run of the authors' code (Differentiable-Prompt-Learn).

        ``path``: their output folder (the highest epoch's files, or ``epoch``) or either file of a
        pair ``alpha_e<E>_img.npy`` / ``alpha_e<E>_txt.npy``. Their ``save_alpha`` writes the *image*
        alpha to the ``_txt`` file and the *text* alpha to the ``_img`` file; with ``swapped=True``
        (default) they are read that way round. Pass ``swapped=False`` for files whose names say
        what they hold (a corrected copy of their code).
        """
        import numpy as np

        files = _authors_alpha_files(Path(path), epoch)
        sources = {"image": files["txt" if swapped else "img"], "text": files["img" if swapped else "txt"]}
        alphas = {}
        for tower, file in sources.items():
            try:
                alphas[tower] = np.load(file, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ValueError(f"{file}: not a NumPy array file ({exc})") from exc
            if alphas[tower].ndim != 2:
                raise ValueError(f"{file}: expected a (blocks, candidates) alpha array, "
                                 f"got shape {alphas[tower].shape}")
        return cls.from_alpha(alphas)

    # ---- queries -----------------------------------------------------------------------------------
    @property
    def towers(self) -> tuple[str, ...]:
        return tuple(self.lengths)

    def num_blocks(self, tower: str) -> int:
        return len(self.lengths[tower])

    def total_tokens(self, tower: str) -> int:
        return sum(self.lengths[tower])

    # ---- JSON --------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """JSON-ready; a CLIP's configuration is written as before (no "stacks" entry)."""
        stacks = {} if self.stacks == TOWERS else {"stacks": list(self.stacks)}
        return {"format": FORMAT, "lengths": {t: list(v) for t, v in self.lengths.items()}, **stacks}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PromptConfig":
        if not isinstance(data, Mapping) or "lengths" not in data:
            raise ValueError("PromptConfig: expected a mapping with a 'lengths' entry")
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"PromptConfig: unsupported format {data.get('format')!r}; expected {FORMAT!r}")
        return cls({t: tuple(v) for t, v in data["lengths"].items()}, stacks=tuple(data.get("stacks", TOWERS)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "PromptConfig":
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file, then rename)."""
        return write_text_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PromptConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"PromptConfig: no config file at {path}")
        return cls.from_json(path.read_text())

    def __str__(self) -> str:
        depth = max(len(v) for v in self.lengths.values())
        header = "block | " + " | ".join(f"{t:>5}" for t in self.towers)
        rows = [header, "-" * len(header)]
        for block in range(depth):
            cells = [f"{v[block]:>5}" if block < len(v) else f"{'':>5}" for v in self.lengths.values()]
            rows.append(f"{block:>5} | " + " | ".join(cells))
        rows.append("total | " + " | ".join(f"{self.total_tokens(t):>5}" for t in self.towers))
        return "\n".join(rows)


def _authors_alpha_files(path: Path, epoch: int | None) -> dict:
    """{"img": Path, "txt": Path} of one epoch of the authors' alpha files (see from_authors_alpha)."""
    import re

    pattern = re.compile(r"alpha_e(\d+)_(img|txt)\.npy$")
    if path.is_file():
        match = pattern.search(path.name)
        if not match:
            raise ValueError(f"{path}: expected an authors' alpha file named alpha_e<EPOCH>_img.npy or _txt.npy")
        folder, epoch = path.parent, int(match.group(1)) if epoch is None else epoch
    elif path.is_dir():
        folder = path
    else:
        raise FileNotFoundError(f"no authors' alpha files at {path} (give their output folder or an "
                                "alpha_e<EPOCH>_txt.npy file)")
    found = {}
    for file in folder.iterdir():
        match = pattern.search(file.name)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = file
    if not found:
        raise FileNotFoundError(f"{folder} holds no alpha_e<EPOCH>_img.npy / _txt.npy files")
    epoch = max(found) if epoch is None else epoch
    pair = found.get(epoch, {})
    for kind in ("img", "txt"):
        if kind not in pair:
            raise FileNotFoundError(f"{folder / f'alpha_e{epoch}_{kind}.npy'} is missing "
                                    f"(epochs found: {sorted(found)})")
    return pair
