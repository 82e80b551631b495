"""Batches that depend only on (seed, epoch), never on the process or on what ran before.

Every epoch's order is a permutation drawn from (seed, epoch), and every image's
random augmentation is drawn from (seed, epoch, index). So a resumed run sees
exactly the batches an uninterrupted run sees, and a torchrun job with W ranks
and per-rank batch b sees exactly the global batches of one process with batch
W*b: rank r takes rows [r*b, (r+1)*b) of each global batch.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.images import clip_transform, open_image, seeded_transforms
from .runtime import Dist


class SeededImages(Dataset):
    """(image tensor, label); item ``(epoch, index)`` augments with a generator seeded by (seed, epoch, index)."""

    def __init__(self, samples, image_size: int, train: bool, seed: int, crop_scale=(0.08, 1.0), flip=True,
                 stats=None):
        self.samples = list(samples)
        self.transform = clip_transform(image_size, train=train, crop_scale=crop_scale, flip=flip, stats=stats)
        self.train, self.seed = train, seed

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        epoch, index = item
        sample = self.samples[index]
        image = open_image(sample.image)
        if not self.train:
            return self.transform(image), sample.label
        with seeded_transforms(hash((self.seed, epoch, index)) % 2**63):
            return self.transform(image), sample.label


class EpochBatches(torch.utils.data.Sampler):
    """This rank's share of each global batch of one epoch, as lists of (epoch, index)."""

    def __init__(self, size: int, batch_size: int, seed: int, ranks: Dist, shuffle: bool, drop_last: bool):
        self.size, self.batch_size, self.seed, self.ranks = size, batch_size, seed, ranks
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.cycle = 0, 0

    def set_epoch(self, epoch: int, cycle: int = 0) -> None:
        self.epoch, self.cycle = epoch, cycle

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, self.cycle)) % 2**63)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        order, step = self._order(), self.batch_size * self.ranks.world
        for start in range(0, self.size, step):
            batch = order[start:start + step]
            if len(batch) < step and (self.drop_last or self.ranks.enabled):
                return  # ranks must take equal shares
            mine = batch[self.ranks.rank * self.batch_size:(self.ranks.rank + 1) * self.batch_size]
            yield [(self.epoch, i) for i in mine]

    def __len__(self):
        step = self.batch_size * self.ranks.world
        full = self.size // step
        return full if (self.drop_last or self.ranks.enabled or self.size % step == 0) else full + 1


def make_loader(samples, image_size: int, batch_size: int, seed: int, ranks: Dist, train: bool, workers: int,
                shuffle: bool | None = None, crop_scale=(0.08, 1.0), flip=True, stats=None):
    """A DataLoader over ``samples``; call ``loader.batch_sampler.set_epoch(e)`` before each epoch.
    ``stats``: the normalisation's (mean, std), default CLIP's."""
    if not samples:
        raise ValueError("no samples to load (is the split empty after few-shot sampling or subsampling?)")
    dataset = SeededImages(samples, image_size, train=train, seed=seed, crop_scale=crop_scale, flip=flip,
                           stats=stats)
    sampler = EpochBatches(len(dataset), batch_size, seed, ranks, shuffle=train if shuffle is None else shuffle,
                           drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=False)


def _require_batches(loader, what: str) -> None:
    if len(loader) == 0:
        sampler = loader.batch_sampler
        raise ValueError(f"{what}: {sampler.size} images make no full batch of {sampler.batch_size} per process "
                         f"on {sampler.ranks.world} processes; lower --val-batch-size or use fewer processes")


def cycle_batches(loader, epoch: int):
    """Batches of ``loader`` forever, reshuffled on each pass (validation batches for the alpha steps)."""
    _require_batches(loader, "validation split")
    cycle = 0
    while True:
        loader.batch_sampler.set_epoch(epoch, cycle)
        yield from loader
        cycle += 1


def first_batch(loader):
    """The loader's first batch, forever (the authors' alpha steps: ``next(iter(val_loader))`` of
    an unshuffled loader with test preprocessing, every step). Loaded once."""
    _require_batches(loader, "validation split")
    loader.batch_sampler.set_epoch(0)
    batch = next(iter(loader))
    while True:
        yield batch


class StepBatches(torch.utils.data.Sampler):
    """Step-based training batches: optimiser step s takes the global batch of rows [s*G, (s+1)*G)
    of an endless sequence of reshuffled passes (pass p: a permutation drawn from (seed, p)), G =
    batch_size x world; rank r takes rows [r*b, (r+1)*b). ``set_epoch(e)`` selects round e, the
    steps [e*round_steps, min((e+1)*round_steps, steps)) between two checkpoints: the batches of a
    step depend only on (seed, step), so a run resumed at a round sees an unbroken run's batches,
    and W ranks of batch b see one process's batches of W*b."""

    def __init__(self, size: int, batch_size: int, seed: int, ranks: Dist, steps: int, round_steps: int):
        if size < 1:
            raise ValueError("no examples to train on")
        self.size, self.batch_size, self.seed, self.ranks = size, batch_size, seed, ranks
        self.steps, self.round_steps, self.epoch = steps, round_steps, 0
        self._passes = {}

    @property
    def rounds(self) -> int:
        return -(-self.steps // self.round_steps)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def steps_done(self) -> int:
        """Optimiser steps at the end of the current round."""
        return min((self.epoch + 1) * self.round_steps, self.steps)

    def _row(self, position: int) -> int:
        p = position // self.size
        if p not in self._passes:
            # ints only in the hash: a str's hash differs from process to process
            generator = torch.Generator().manual_seed(hash((self.seed, p, -1)) % 2**63)
            # a batch spans at most two passes: keep this one and the one before
            self._passes = {q: v for q, v in self._passes.items() if q == p - 1}
            self._passes[p] = torch.randperm(self.size, generator=generator).tolist()
        return self._passes[p][position % self.size]

    def __iter__(self):
        width = self.batch_size * self.ranks.world
        first = self.ranks.rank * self.batch_size
        for step in range(self.epoch * self.round_steps, self.steps_done()):
            start = step * width + first
            yield [(self.epoch, self._row(i)) for i in range(start, start + self.batch_size)]

    def __len__(self):
        return self.steps_done() - self.epoch * self.round_steps
