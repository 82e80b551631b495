"""Precision helpers shared by the pipeline and TPT."""
import torch


def at_least_float32(t: torch.Tensor) -> torch.Tensor:
    """16-bit tensors in float32 (softmax, entropies and logits want it); float32 and float64 as
    they are, so a float64 run stays float64 end to end."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
