"""Images as tensors: CLIP preprocessing and a Dataset that never skips a bad file."""
from __future__ import annotations

import contextlib

import torch
from PIL import Image, UnidentifiedImageError
from torchvision import transforms as T

from .datasets import DatasetError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@contextlib.contextmanager
def seeded_transforms(seed: int):
    """torch's global CPU generator seeded with ``seed`` inside, restored after: torchvision's random
    transforms draw from it, so an image's augmentation depends on ``seed`` alone. Only the CPU
    generator: ``torch.manual_seed`` would also reseed every CUDA generator (which fork_rng(devices=[])
    does not restore) and, where CUDA is not initialised, queue that call with its stack trace, once
    per image: ~1 ms an image and a list that grows for the whole run."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield


def clip_transform(image_size: int, train: bool, crop_scale=(0.08, 1.0), flip: bool = True, stats=None):
    """CLIP's test preprocessing; for training CoOp's random resized crop and horizontal flip.
    ``stats``: (mean, std) of the normalisation (default CLIP's; a timm model's own for a classifier)."""
    normalize = T.Normalize(*(stats or (CLIP_MEAN, CLIP_STD)))
    if train:
        return T.Compose([T.RandomResizedCrop(image_size, scale=tuple(crop_scale),
                                              interpolation=T.InterpolationMode.BICUBIC),
                          T.RandomHorizontalFlip(0.5 if flip else 0.0), T.ToTensor(), normalize])
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size),
                      T.ToTensor(), normalize])


def open_image(image) -> Image.Image:
    """A path or an in-memory PIL image, as RGB; a missing or unreadable file is a DatasetError naming it."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        with Image.open(image) as img:
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DatasetError(f"missing image: {image}") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise DatasetError(f"unreadable image: {image} ({exc})") from exc

