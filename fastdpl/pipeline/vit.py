"""The stages for timm ViT image classifiers (``--model timm:NAME``): DPL's search and train stages
over VPT-deep prompt lengths, the head-only baseline (``--method linear``), uniform VPT-deep
(``--method uniform:LENGTH:DEPTH``), and eval of saved prompts.

A classifier runs through the same stages, loop, checkpoints, logs and data parallelism as a
CLIP (stages.py, training.fit); this module supplies only what differs: the backbone is a timm
classifier with a head for the dataset's classes, the module is a FastDPLViT whose head is
trained with the prompts (its own learning rate, ``--head-lr``), started from a head drawn from
``--seed``, and the images are normalised with the model's own statistics. A classifier has no
text side: settings that need one are refused by name (config.check_family_settings).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..data import fewshot_splits, load_dataset
from ..models import classifier_image_size, classifier_stats, load_classifier
from ..vit import FastDPLViT
from .config import RunConfig
from .runtime import init_distributed, pick_device, seed_everything, training_net

STATE_KEYS = ("bank", "head", "prompt_dropout")  # FastDPLViT.prompt_state_dict's own keys in a prompts file


def prepare(cfg: RunConfig, stage: str = "search"):
    """Device, processes, seeds, the few-shot splits and the classifier with a head for their classes."""
    from ..models import RANDOM
    from .stages import Job

    device = pick_device(cfg.device)
    ranks = init_distributed(device)
    seed_everything(cfg.seed)
    cache = cfg.split_cache or str(Path(cfg.output).parent / "splits" / cfg.dataset.replace(":", "_").replace("/", "_"))
    splits = fewshot_splits(load_dataset(cfg.dataset, cfg.root), cfg.shots, cfg.seed,
                            cache_dir=cache if ranks.main else None)
    model = load_classifier(cfg.model, cfg.pretrained, splits.num_classes, device)
    if ranks.main and cfg.pretrained in RANDOM and cfg.model != "timm:tiny":
        print(f"{cfg.model}: random weights (pass --pretrained FILE for a trained checkpoint)")
    return Job(cfg, ranks, device, model, splits, classifier_image_size(model), stats=classifier_stats(model))


def build(job, mode: str, config=None) -> FastDPLViT:
    """The stage's FastDPLViT: its prompts and alpha, then a fresh head, drawn from --seed."""
    cfg = job.cfg
    generator = torch.Generator().manual_seed(cfg.seed)
    dpl = FastDPLViT(job.model, mode=mode, candidate_lengths=cfg.candidate_lengths, config=config, impl=cfg.impl,
                     generator=generator, init=cfg.prompt_init,
                     prompt_dropout=cfg.prompt_dropout if mode == "fixed" else 0.0)
    dpl.reset_head(generator)
    dpl.classnames = list(job.splits.classnames)  # evaluation's per-class table
    return dpl


def optimizer(job, dpl: FastDPLViT) -> torch.optim.Optimizer:
    """SGD over two groups: the prompts at --lr and the head at --head-lr (default --lr); one
    schedule scales both."""
    cfg = job.cfg
    groups = [{"params": dpl.prompt_parameters(), "lr": cfg.lr},
              {"params": dpl.head_parameters(), "lr": cfg.head_lr or cfg.lr}]
    return torch.optim.SGD([g for g in groups if g["params"]], lr=cfg.lr, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay)


def net(job, dpl: FastDPLViT) -> nn.Module:
    """The module called in training (runtime.training_net): the FastDPLViT, compiled with --compile,
    in DDP under torchrun (every rank its own images; prompts, alpha and head gradients averaged)."""
    return training_net(dpl, job)


def trained(job):
    """(module, method label) of the train stage: DPL's searched configuration, the head alone
    (linear: no prompts) or uniform VPT-deep."""
    from .stages import resolve_prompt_config

    config, label = resolve_prompt_config(job)
    return build(job, "fixed", config), label


def load_prompted(job, prompts: str | None):
    """(module, method label, path, training settings) of a saved prompts file around this model."""
    from .stages import _training_settings, read_prompts

    path, state = read_prompts(job, prompts)
    if not isinstance(state, dict) or "bank" not in state or "head" not in state:
        raise ValueError(f"{path} holds no FastDPLViT prompts (a CLIP's prompts? evaluate them with --model of "
                         "that CLIP)")
    try:
        module = FastDPLViT.from_state(job.model, {k: state[k] for k in STATE_KEYS if k in state}, impl=job.cfg.impl)
    except (ValueError, RuntimeError) as exc:  # another architecture or class count
        raise ValueError(f"{path} does not fit {job.cfg.model} with {job.splits.num_classes} classes: {exc}") from exc
    module.classnames = list(job.splits.classnames)
    return module, state.get("method", "prompts"), str(path), _training_settings(state, path)


def rebuilder(job, module):
    def rebuild(classnames, dataset):  # never called: base-to-new and cross-dataset are refused for classifiers
        raise ValueError(f"{job.cfg.model} is a classifier with a head for its own {len(module.classnames)} classes")
    return rebuild


class ViTFamily:
    """The stages' builders for a timm classifier (stages.model_family)."""

    prepare = staticmethod(prepare)
    supernet = staticmethod(lambda job: build(job, "search"))
    trained = staticmethod(trained)
    optimizer = staticmethod(optimizer)
    net = staticmethod(net)
    regularizers = staticmethod(lambda job: {})  # distillation needs zero-shot CLIP (refused for classifiers)
    rebuilder = staticmethod(rebuilder)
    load_prompted = staticmethod(load_prompted)
