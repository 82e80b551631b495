"""Process-level plumbing: device, seeding and RNG state, torchrun / DistributedDataParallel, autocast,
torch.compile of the module a training stage calls."""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: str) -> Dist:
    """Join the torchrun job if there is one (env WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def pick_device(requested: str, ranks: Dist | None = None) -> str:
    if requested == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={requested!r} but CUDA is not available (use --device cpu)")
    return requested


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def autocast(device: str, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def barrier(ranks: Dist) -> None:
    if ranks.enabled:
        dist.barrier()


# ---- the module a training stage calls ---------------------------------------------------------------
def training_net(net: torch.nn.Module, job) -> torch.nn.Module:
    """What the training loop calls on the inputs: ``net`` through torch.compile with --compile,
    inside DistributedDataParallel under torchrun (DDP(compiled): DDP's hooks, ``no_sync`` and the
    alpha steps' hand-averaged gradients stay as without compile)."""
    return data_parallel(compiled(net, job.cfg), job.ranks, job.device)


def data_parallel(net: torch.nn.Module, ranks: Dist, device: str) -> torch.nn.Module:
    """DDP around ``net`` under torchrun (gradients averaged over ranks), else ``net`` itself."""
    if not ranks.enabled:
        return net
    device_ids = [torch.device(device).index] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(net, device_ids=device_ids, broadcast_buffers=False)


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # the documented ones; any registered Dynamo backend works


def check_compile_backend(name: str) -> str:
    """``name`` if torch.compile knows it (``torch._dynamo.list_backends``), else a ValueError naming
    --compile-backend and the known ones."""
    import torch._dynamo

    known = set(torch._dynamo.list_backends(exclude_tags=())) | set(COMPILE_BACKENDS)
    if name not in known:
        raise ValueError(f"compile_backend must be a torch.compile backend ({', '.join(sorted(known))}), got {name!r}")
    return name


def compiled(net: torch.nn.Module, cfg) -> torch.nn.Module:
    """``net`` through torch.compile with ``cfg.compile`` (its forward, and its backward by AOT
    autograd; the op is a registered custom op with a fake kernel, so nothing breaks the graph),
    else ``net`` itself. ``dynamic=None``: the first call specialises to its shapes; the first call
    with another shape (the alpha steps' validation batch, a longer padded batch) compiles once more
    with those dimensions dynamic, and later shapes reuse that graph."""
    if not getattr(cfg, "compile", False):
        return net
    return torch.compile(net, backend=check_compile_backend(cfg.compile_backend))


def compile_counts() -> dict:
    """Dynamo's process-wide tallies: graphs compiled and graph breaks (``torch._dynamo.utils.counters``)."""
    from torch._dynamo.utils import counters

    return {"graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def compile_report(before: dict | None, cfg) -> dict | None:
    """What torch.compile did since ``before`` (compile_counts(), taken with --compile), else None:
    the graphs it compiled and the graph breaks it met (the reasons, from Dynamo's counters)."""
    if before is None:
        return None
    from torch._dynamo.utils import counters

    now = compile_counts()
    return {"backend": cfg.compile_backend, **{k: now[k] - before[k] for k in now},
            "break_reasons": sorted(counters["graph_break"])}

