"""The trainable classifier the stages optimise, with the class texts split across ranks (any
method whose class texts do not depend on the image: DPL, deep prompts, CoOp).

Under torchrun every rank encodes the image batch it holds and only its share
of the class texts (balanced: rank r takes classes floor(rC/W) .. floor((r+1)C/W),
so no rank is left without one while C >= W); the text features are all-gathered
*with gradients* (torch.distributed.nn.functional.all_gather: its backward sums
every rank's gradient for a rank's share back onto that rank), so rank r's text
prompts receive d(sum of all ranks' losses)/d(its share). DistributedDataParallel
then averages the prompt and alpha gradients over ranks: the gradient of the
mean loss over the global batch, as on one process with the whole batch.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from .runtime import Dist, training_net


def class_shares(num_classes: int, world: int) -> list[tuple[int, int]]:
    """[lo, hi) class range of each rank: balanced, sizes differ by at most one."""
    return [(r * num_classes // world, (r + 1) * num_classes // world) for r in range(world)]


class ShardedTextClassifier(nn.Module):
    def __init__(self, dpl, ranks: Dist):
        super().__init__()
        if ranks.world > dpl.num_classes:
            raise ValueError(f"{ranks.world} ranks but only {dpl.num_classes} classes: every rank needs at "
                             "least one class text (use fewer processes)")
        self.dpl, self.ranks = dpl, ranks
        self.shares = class_shares(dpl.num_classes, ranks.world)
        self.share = max(hi - lo for lo, hi in self.shares)  # padded size for all_gather

    def text_features(self) -> torch.Tensor:
        if not self.ranks.enabled:
            return self.dpl.encode_text()
        from torch.distributed.nn.functional import all_gather

        lo, hi = self.shares[self.ranks.rank]
        local = self.dpl.encode_text(slice(lo, hi))
        local = F.pad(local, (0, 0, 0, self.share - local.shape[0]))  # all_gather needs equal shapes
        gathered = all_gather(local)
        return torch.cat([g[:hi - lo] for g, (lo, hi) in zip(gathered, self.shares)])

    def forward(self, images: torch.Tensor, return_features: bool = False):
        """Logits (B, C); with ``return_features`` also {"image": (B, E), "text": (C, E)} unnormalised."""
        image, text = self.dpl.encode_image(images), self.text_features()
        logits = self.dpl.logits(image, text)
        return (logits, {"image": image, "text": text}) if return_features else logits


def wrap(module, job) -> nn.Module:
    """The module a CLIP's training stage calls (runtime.training_net: compiled with --compile, DDP
    under torchrun) around the sharded classifier. A method whose class texts depend on the image
    (CoCoOp) is not sharded: each rank runs its own images' B x C texts, and DDP averages the gradients."""
    net = module if getattr(module, "image_conditioned", False) else ShardedTextClassifier(module, job.ranks)
    return training_net(net, job)
