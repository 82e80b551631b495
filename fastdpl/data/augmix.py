"""AugMix views exactly as TPT draws them (azshue/TPT, ``data/datautils.py``, ``data/augmix_ops.py``).

One view of an image (a PIL image already randomly cropped and flipped):

    mix = m * pre(crop) + (1 - m) * sum_{i<3} w_i * pre(chain_i(crop)),
    w ~ Dirichlet(1, 1, 1),  m ~ Beta(1, 1),  chain_i = 1..3 ops drawn uniformly from OPS,

where ``pre`` is ToTensor + CLIP normalisation. Each op's strength comes from a level
drawn uniformly from [0.1, severity) and scaled as in AugMix: an integer parameter is
``int(level * max / 10)``, a float one ``level * max / 10``; rotations, shears and
translations take a random sign. TPT uses severity 1, which makes the ops mild:

    posterize: 4 bits           rotate: 0, ±1 or ±2 degrees   solarize: threshold 231..254
    shear x/y: ±[0.003, 0.03)   translate x/y: 0..±7 pixels at 224 (a third of the size, scaled)

plus autocontrast and equalize (no parameter). Draws come from a numpy Generator,
so a view is a function of the generator's seed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps

SEVERITY = 1  # TPT's


def _level(rng: np.random.Generator, severity: float) -> float:
    return rng.uniform(0.1, severity)


def _int_level(rng, severity, maximum) -> int:
    return int(_level(rng, severity) * maximum / 10)


def _float_level(rng, severity, maximum) -> float:
    return float(_level(rng, severity)) * maximum / 10


def _signed(rng, value):
    return -value if rng.uniform() > 0.5 else value


def _affine(matrix):
    return lambda img, p: img.transform(img.size, Image.AFFINE, matrix(p, img.size), resample=Image.BILINEAR)


@dataclass(frozen=True)
class AugOp:
    """One AugMix operation: ``draw(rng, severity, size) -> parameter`` and ``apply(image, parameter)``."""

    name: str
    draw: Callable
    apply: Callable

    def __call__(self, image: Image.Image, rng: np.random.Generator, severity: float) -> Image.Image:
        return self.apply(image, self.draw(rng, severity, image.size))


OPS = (
    AugOp("autocontrast", lambda rng, s, size: None, lambda img, p: ImageOps.autocontrast(img)),
    AugOp("equalize", lambda rng, s, size: None, lambda img, p: ImageOps.equalize(img)),
    AugOp("posterize", lambda rng, s, size: 4 - _int_level(rng, s, 4), lambda img, bits: ImageOps.posterize(img, bits)),
    AugOp("rotate", lambda rng, s, size: _signed(rng, _int_level(rng, s, 30)),
          lambda img, degrees: img.rotate(degrees, resample=Image.BILINEAR)),
    AugOp("solarize", lambda rng, s, size: 256 - _int_level(rng, s, 256),
          lambda img, threshold: ImageOps.solarize(img, threshold)),
    AugOp("shear_x", lambda rng, s, size: _signed(rng, _float_level(rng, s, 0.3)),
          _affine(lambda p, size: (1, p, 0, 0, 1, 0))),
    AugOp("shear_y", lambda rng, s, size: _signed(rng, _float_level(rng, s, 0.3)),
          _affine(lambda p, size: (1, 0, 0, p, 1, 0))),
    AugOp("translate_x", lambda rng, s, size: _signed(rng, _int_level(rng, s, size[0] / 3)),
          _affine(lambda p, size: (1, 0, p, 0, 1, 0))),
    AugOp("translate_y", lambda rng, s, size: _signed(rng, _int_level(rng, s, size[1] / 3)),
          _affine(lambda p, size: (1, 0, 0, 0, 1, p))),
)


def augmix(crop: Image.Image, preprocess: Callable, rng: np.random.Generator, severity: float = SEVERITY,
           ops=OPS) -> torch.Tensor:
    """The AugMix mix of ``crop`` (see the module docstring); ``preprocess`` maps a PIL image to a tensor."""
    w = rng.dirichlet([1.0, 1.0, 1.0]).astype(np.float32)
    m = np.float32(rng.beta(1.0, 1.0))
    original = preprocess(crop)
    mix = torch.zeros_like(original)
    for i in range(3):
        image = crop
        for _ in range(rng.integers(1, 4)):  # 1..3 ops per chain
            image = ops[rng.integers(len(ops))](image, rng, severity)
        mix += float(w[i]) * preprocess(image)
    return float(m) * original + (1 - float(m)) * mix
