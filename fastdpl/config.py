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
    """Per-tower, per-block prompt lengths, e.g. ``{"image": (6, 0, 2, ...), "text": (...)}``."""

    lengths: Mapping[str, tuple]

    def __post_init__(self):
        if not isinstance(self.lengths, Mapping) or not self.lengths:
            raise ValueError("PromptConfig: lengths must map at least one tower name to per-block lengths")
        checked = {}
        for tower, lengths in self.lengths.items():
            if tower not in TOWERS:
                raise ValueError(f"PromptConfig: unknown tower {tower!r}; expected one of {TOWERS}")
            checked[tower] = _check_lengths(tower, lengths)
        object.__setattr__(self, "lengths", dict(sorted(checked.items(), key=lambda kv: TOWERS.index(kv[0]))))

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
        return cls({t: (length,) * depth + (0,) * (blocks[t] - depth) for t in towers})

    @classmethod
    def zero_shot(cls, num_blocks: int | Mapping[str, int], towers: Sequence[str] = TOWERS) -> "PromptConfig":
        """No prompts anywhere: the frozen CLIP itself."""
        return cls.uniform(0, 0, num_blocks, towers)

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
        return {"format": FORMAT, "lengths": {t: list(v) for t, v in self.lengths.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "PromptConfig":
        if not isinstance(data, Mapping) or "lengths" not in data:
            raise ValueError("PromptConfig: expected a mapping with a 'lengths' entry")
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"PromptConfig: unsupported format {data.get('format')!r}; expected {FORMAT!r}")
        return cls({t: tuple(v) for t, v in data["lengths"].items()})

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
