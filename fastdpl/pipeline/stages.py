"""The stages: zero-shot, DPL's search (supernet), train (any --method: DPL's subnet, deep-prompt
baselines, CoOp, CoCoOp), eval, TPT. The epoch loop is training.fit; evaluation is evaluation.py.

Folder of a run (``--output``): ``search/`` (checkpoint.pt, alpha_history.json,
prompt_config.json, prompts.pt, alpha_heatmap.png, alpha_evolution.png), ``train/``
(checkpoint.pt, prompts.pt, results.json), ``zeroshot/`` and ``eval/``
(results.json); each stage also writes the settings it ran with (run.yaml).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import save_atomic, write_text_atomic
from ..config import PromptConfig
from ..data import fewshot_splits, load_dataset, subsample_classes
from ..methods import CONTEXT_METHODS, CoOpPrompt
from ..methods.context import STATE_FORMAT as CONTEXT_FORMAT
from ..models import is_classifier, load_clip, load_tokenizer
from ..prompt import FastDPLPrompt
from ..templates import CUSTOM_TEMPLATES, resolve_template
from ..adapters import adapt
from .classifier import wrap
from .config import RunConfig
from .evaluation import evaluate_and_write, tally
from .loaders import cycle_batches, first_batch, make_loader
from .logs import alpha_entropy
from .runtime import Dist, autocast, barrier, init_distributed, pick_device, seed_everything
from .regularizers import aggregation, train_regularization
from .training import Training, fit, prompt_schedule


@dataclass
class Job:
    cfg: RunConfig
    ranks: Dist
    device: str
    model: torch.nn.Module
    splits: object  # DatasetSplits after few-shot sampling and class subsampling
    image_size: int
    template: str = "default"  # the text input of this stage's prompt modules (stage_template)
    tokenizer: object = None  # texts -> token ids (models.load_tokenizer); None: CLIP's BPE
    stats: tuple | None = None  # the images' normalisation (mean, std); None: CLIP's

    def out(self, stage: str) -> Path:
        path = Path(self.cfg.output) / stage
        if self.ranks.main:
            path.mkdir(parents=True, exist_ok=True)
        return path


def prepare(cfg: RunConfig, stage: str = "search") -> Job:
    """Device, processes, seeds, the backbone and the few-shot splits of a ``stage``."""
    device = pick_device(cfg.device)
    ranks = init_distributed(device)
    seed_everything(cfg.seed)
    model = load_clip(cfg.model, cfg.pretrained, device=device)
    cache = cfg.split_cache or str(Path(cfg.output).parent / "splits" / cfg.dataset.replace(":", "_").replace("/", "_"))
    splits = subsample_classes(fewshot_splits(load_dataset(cfg.dataset, cfg.root), cfg.shots, cfg.seed,
                                              cache_dir=cache if ranks.main else None), cfg.subsample)
    return Job(cfg, ranks, device, model, splits, adapt(model).image_size[0], stage_template(cfg, stage),
               load_tokenizer(cfg.tokenizer, cfg.model, model))


def stage_template(cfg: RunConfig, stage: str) -> str:
    """The text input a stage uses: ``--template`` when given, else (``auto``) what the authors use
    there: "a photo of a {}." to search, the 60-template ensemble to train, the dataset's hand-written
    template for zero-shot CLIP (where it has one), and TPT's "a photo of a {}." for zero-shot TPT."""
    if cfg.template != "auto":
        return cfg.template
    if stage == "train":
        return "ensemble"
    if stage == "zeroshot":
        from ..data import canonical_name

        return "custom" if canonical_name(cfg.dataset) in CUSTOM_TEMPLATES else "default"
    return "default"


def build_dpl(job: Job, classnames, mode: str, config: PromptConfig | None = None,
              dataset: str | None = None) -> FastDPLPrompt:
    """The stage's prompt module over ``classnames`` of ``dataset`` (default: the run's), with the
    stage's text input. Only the search stage honours ``--init``: the authors' train stage always
    starts its prompts from N(0, 0.02^2)."""
    cfg = job.cfg
    common = dict(template=resolve_template(job.template, dataset or cfg.dataset), impl=cfg.impl,
                  text_chunk_size=cfg.text_chunk_size, tokenizer=job.tokenizer,
                  generator=torch.Generator().manual_seed(cfg.seed))
    if mode == "search":
        return FastDPLPrompt(job.model, classnames, mode="search", candidate_lengths=cfg.candidate_lengths,
                             towers=cfg.search_towers, init=cfg.init, **common)
    return FastDPLPrompt(job.model, classnames, mode="fixed", config=config, **common)


def block_counts(model) -> dict:
    """Blocks per tower: a CLIP's two, a timm classifier's one (image)."""
    if is_classifier_model(model):
        return {"image": len(model.blocks)}
    adapter = adapt(model)
    return {"image": len(adapter.image.blocks), "text": len(adapter.text.blocks)}


def is_classifier_model(model) -> bool:
    return hasattr(model, "get_classifier") and hasattr(model, "blocks")


# ---- search -------------------------------------------------------------------------------------------
def alpha_snapshot(dpl: FastDPLPrompt) -> dict:
    return {t: torch.softmax(a.detach().float(), -1).tolist() for t, a in dpl.arch_logits.items()}


def run_search(cfg: RunConfig) -> dict:
    """Alternate Adam steps on alpha (validation batches) and SGD steps on prompts (training batches)."""
    family = model_family(cfg)
    job = family.prepare(cfg, "search")
    out = job.out("search")
    dpl = family.supernet(job)
    arch_opt = torch.optim.Adam(dpl.arch_parameters(), lr=cfg.arch_lr, betas=tuple(cfg.arch_betas),
                                weight_decay=cfg.arch_weight_decay)
    prompt_opt = family.optimizer(job, dpl)
    # The alpha steps' validation batches: test preprocessing (no augmentation), as the authors'
    # val loader; reshuffled passes ("cycle", fastdpl's) or the same first batch every step ("first").
    val = make_loader(job.splits.val, job.image_size, cfg.val_batch_size, cfg.seed + 1, job.ranks, train=False,
                      workers=cfg.workers, shuffle=cfg.val_batches == "cycle", stats=job.stats)
    training = Training(
        dpl, family.net(job, dpl), {"arch": arch_opt, "prompt": prompt_opt},
        prompt_schedule(prompt_opt, cfg, cfg.search_epochs), cfg.search_epochs,
        validation=lambda epoch: cycle_batches(val, epoch) if cfg.val_batches == "cycle" else first_batch(val),
        record=lambda: {"alpha_entropy": alpha_entropy(dpl.arch_logits), "alpha": alpha_snapshot(dpl)},
        after_epoch=lambda history: write_text_atomic(out / "alpha_history.json", json.dumps(history)))
    history = fit(job, out, "search", training)
    config = dpl.derive_config()
    result = {"stage": "search", "config": config.to_dict(), "history": history}
    if job.ranks.main:
        from .plots import plot_alpha_evolution, plot_alpha_heatmap

        config.save(out / "prompt_config.json")
        # the supernet, for `fastdpl eval --prompts`; "method" names it in eval results and reports
        save_atomic({**dpl.prompt_state_dict(), "method": "dpl-supernet", "template": job.template,
                     "settings": cfg.to_dict()}, out / "prompts.pt")
        plot_alpha_heatmap(dpl, out / "alpha_heatmap.png")
        plot_alpha_evolution(history, dpl.candidate_lengths, out / "alpha_evolution.png")
        print(f"derived configuration ({out / 'prompt_config.json'}):\n{config}")
    barrier(job.ranks)
    return result


# ---- train --------------------------------------------------------------------------------------------
def resolve_prompt_config(job: Job) -> tuple[PromptConfig, str]:
    """(config, method label) from --prompt-config: a JSON file, 'zero_shot', 'uniform:LENGTH:DEPTH', or
    the output folder (or an alpha .npy file) of a search run of the authors' code.

    Unset: the search stage's prompt_config.json in the same --output.
    """
    spec = job.cfg.prompt_config
    if job.cfg.method != "dpl":  # --method zero_shot / uniform:LENGTH:DEPTH name the configuration
        if spec is not None and spec != job.cfg.method:
            raise ValueError(f"--method {job.cfg.method} and --prompt-config {spec} disagree: give one of them")
        spec = job.cfg.method
    blocks = block_counts(job.model)
    if spec is None:
        spec = str(Path(job.cfg.output) / "search" / "prompt_config.json")
        if not Path(spec).is_file():
            raise FileNotFoundError(f"no --prompt-config given and no search result at {spec}: run "
                                    "`fastdpl search` first or pass a JSON file, 'zero_shot' or 'uniform:LEN:DEPTH'")
    if spec in ("zero_shot", "linear"):  # no prompts: zero-shot CLIP, a classifier's head alone
        return PromptConfig.zero_shot(blocks, towers=tuple(blocks)), spec
    if spec.startswith("uniform:"):
        parts = spec.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"prompt_config {spec!r}: expected uniform:LENGTH:DEPTH, e.g. uniform:4:9")
        return PromptConfig.uniform(int(parts[1]), int(parts[2]), blocks, towers=tuple(blocks)), spec
    if Path(spec).is_dir() or spec.endswith(".npy"):  # a search run of the authors' code
        return PromptConfig.from_authors_alpha(spec), "dpl"
    if not Path(spec).is_file():
        raise FileNotFoundError(f"prompt_config: no such file {spec}")
    return PromptConfig.load(spec), "dpl"


def context_settings(cfg: RunConfig) -> dict:
    """The settings that build a CoOp / CoCoOp module (saved with its state)."""
    return {"method": cfg.method, "n_ctx": cfg.n_ctx, "ctx_init": cfg.ctx_init,
            "class_specific": cfg.class_specific, "class_token_position": cfg.class_token_position}


def build_context_method(job: Job, classnames, settings: dict):
    """A CoOp or CoCoOp module from its settings (``settings["method"]``)."""
    options = {k: v for k, v in settings.items() if k != "method"}
    return CONTEXT_METHODS[settings["method"]](job.model, classnames, **options, impl=job.cfg.impl,
                                               text_chunk_size=job.cfg.text_chunk_size,
                                               generator=torch.Generator().manual_seed(job.cfg.seed))


def build_method(job: Job):
    """(module, method label) of the train stage's --method."""
    cfg = job.cfg
    if cfg.method in CONTEXT_METHODS:
        if cfg.prompt_config is not None:
            raise ValueError(f"--prompt-config is a DPL configuration; --method {cfg.method} learns a context")
        return build_context_method(job, job.splits.classnames, context_settings(cfg)), cfg.method
    config, label = resolve_prompt_config(job)
    return build_dpl(job, job.splits.classnames, "fixed", config), label


def module_like(job: Job, module, classnames, dataset: str):
    """A module of the same method and configuration as ``module`` around other class names."""
    if isinstance(module, CoOpPrompt):
        return build_context_method(job, classnames, module.settings())
    if module.mode == "search":
        return FastDPLPrompt(job.model, classnames, mode="search", candidate_lengths=module.candidate_lengths,
                             towers=list(module.prompted), template=resolve_template(job.template, dataset),
                             impl=job.cfg.impl, text_chunk_size=job.cfg.text_chunk_size, tokenizer=job.tokenizer)
    return build_dpl(job, classnames, "fixed", module.config, dataset=dataset)


def rebuilder(job: Job, module):
    """rebuild(classnames, dataset): the learned prompts of ``module`` around other class names (the
    new classes of base-to-new, another dataset)."""
    state = module.prompt_state_dict()

    def rebuild(classnames, dataset):
        other = module_like(job, module, classnames, dataset)
        other.load_prompt_state_dict(state)
        return other
    return rebuild


def run_train(cfg: RunConfig) -> dict:
    """Train the --method's prompts (DPL's configuration, a deep-prompt baseline, CoOp, CoCoOp; for a
    timm classifier with its head, or the head alone), then evaluate them."""
    family = model_family(cfg)
    job = family.prepare(cfg, "train")
    out = job.out("train")
    module, method = family.trained(job)
    optimizer = family.optimizer(job, module)
    if optimizer is not None:
        fit(job, out, "train", Training(module, family.net(job, module), {"prompt": optimizer},
                                        prompt_schedule(optimizer, cfg, cfg.train_epochs), cfg.train_epochs,
                                        aggregation=aggregation(job, module), **family.regularizers(job)))
    if job.ranks.main:
        save_atomic({**module.prompt_state_dict(), "method": method, "template": job.template,
                     "settings": cfg.to_dict()}, out / "prompts.pt")
    return evaluate_and_write(job, module, out, "train", method, family.rebuilder(job, module))


def _default_prompts(job: Job) -> str:
    return str(Path(job.cfg.output) / "train" / "prompts.pt")


def read_prompts(job: Job, prompts: str | None) -> tuple[Path, dict]:
    """(path, state) of a saved prompts file (default: the train stage's)."""
    path = Path(prompts) if prompts else Path(_default_prompts(job))
    if not path.is_file():
        raise FileNotFoundError(f"no prompts at {path}: run `fastdpl train` first or pass --prompts FILE")
    return path, torch.load(path, map_location="cpu", weights_only=False)


def _load_prompted(job: Job, prompts: str | None):
    """(module, method label, path, training settings) of a saved prompts file, rebuilt around this
    run's classes from the file alone: its method, configuration and text input."""
    path, state = read_prompts(job, prompts)
    if job.cfg.template == "auto":  # the text input the prompts were trained with
        job.template = state.get("template") or _training_settings(state, path).get("template") or job.template
        job.template = job.template if job.template != "auto" else "default"
    classnames = job.splits.classnames
    if state.get("format") == CONTEXT_FORMAT:
        module = build_context_method(job, classnames, state["method_settings"])
    elif state.get("mode") == "fixed":
        module = build_dpl(job, classnames, "fixed", PromptConfig.from_dict(state["config"]))
    else:
        module = FastDPLPrompt(job.model, classnames, mode="search", candidate_lengths=state["candidate_lengths"],
                               towers=state["towers"], template=resolve_template(job.template, job.cfg.dataset),
                               impl=job.cfg.impl, tokenizer=job.tokenizer)
    module.load_prompt_state_dict(state)
    # the method label is the same for every seed; the training settings describe the experiment
    return module, state.get("method", "prompts"), str(path), _training_settings(state, path)


def _training_settings(state: dict, path: Path) -> dict:
    """The settings of the run that produced a prompts file: saved inside it, else its run.yaml."""
    if state.get("settings"):
        return state["settings"]
    record = path.parent / "run.yaml"
    if record.is_file():
        import yaml

        return yaml.safe_load(record.read_text()) or {}
    return {}


class ClipFamily:
    """What the stages build for a CLIP (DPL over both towers, deep prompts, CoOp, CoCoOp); the
    timm classifiers' counterpart is pipeline.vit.ViTFamily."""

    prepare = staticmethod(prepare)

    @staticmethod
    def supernet(job: Job):
        return build_dpl(job, job.splits.classnames, "search")

    @staticmethod
    def trained(job: Job):
        return build_method(job)

    @staticmethod
    def optimizer(job: Job, module):
        """SGD on the prompts (or context); None when there is nothing to train (zero_shot)."""
        params, cfg = module.parameter_groups()["prompt"], job.cfg
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay) \
            if params else None

    @staticmethod
    def net(job: Job, module):
        return wrap(module, job)

    @staticmethod
    def regularizers(job: Job) -> dict:
        """Distillation towards zero-shot CLIP and PromptSRC's terms (pipeline/regularizers.py)."""
        return train_regularization(job, job.splits.classnames)

    rebuilder = staticmethod(rebuilder)
    load_prompted = staticmethod(_load_prompted)


def model_family(cfg: RunConfig):
    """The stages' builders for ``--model``: a CLIP's, or a timm classifier's (timm:NAME)."""
    if is_classifier(cfg.model):
        from .vit import ViTFamily

        return ViTFamily
    return ClipFamily


def clip_only(cfg: RunConfig, stage: str) -> None:
    if is_classifier(cfg.model):
        raise ValueError(f"fastdpl {stage} needs a CLIP's class texts; {cfg.model} is a classifier: train its head "
                         "alone with `fastdpl train --method linear` for the no-prompt baseline")


def run_eval(cfg: RunConfig, prompts: str | None = None, stage: str = "eval") -> dict:
    """Evaluate saved prompts (default: the train stage's) on the test set and --eval-datasets."""
    family = model_family(cfg)
    job = family.prepare(cfg, "eval")
    module, method, path, trained = family.load_prompted(job, prompts)
    return evaluate_and_write(job, module, job.out(stage), stage, method, family.rebuilder(job, module),
                              extra={"prompts": path, "trained": trained}, default_prompts=_default_prompts(job))


def run_zeroshot(cfg: RunConfig) -> dict:
    """CLIP with the class template and no prompts (the same code path with a zero-length configuration)."""
    clip_only(cfg, "zeroshot")
    job = prepare(cfg, "zeroshot")
    blocks = block_counts(job.model)
    dpl = build_dpl(job, job.splits.classnames, "fixed", PromptConfig.zero_shot(blocks))
    return evaluate_and_write(job, dpl, job.out("zeroshot"), "zeroshot", "zero_shot", rebuilder(job, dpl))


# ---- test-time prompt tuning -------------------------------------------------------------------------
IMAGENET_FAMILY = ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


class _TPTImages(torch.utils.data.Dataset):
    def __init__(self, samples, views):
        self.samples, self.views = list(samples), views

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return self.views(sample.image, seed=index), sample.label


def tpt_accuracy(job: Job, dpl: FastDPLPrompt, samples, dataset: str, desc="tpt") -> dict:
    """Top-1 of TPT predictions: every test image tuned on its own (groups of tpt_group at a time)."""
    from ..data import canonical_name
    from ..tpt import TestTimePromptTuner, TPTViews

    cfg = job.cfg
    augmix = cfg.tpt_augmix
    if augmix == "auto":
        augmix = canonical_name(dataset) not in IMAGENET_FAMILY  # TPT: AugMix for the fine-grained sets
    augmix = augmix in (True, "true")
    tuner = TestTimePromptTuner(dpl, tune=cfg.tpt_tune, context=cfg.tpt_context, keep_fraction=cfg.tpt_keep,
                                lr=cfg.tpt_lr, steps=cfg.tpt_steps, meta_input=cfg.tpt_meta_input)
    loader = torch.utils.data.DataLoader(_TPTImages(samples, TPTViews(job.image_size, cfg.tpt_views, augmix)),
                                         batch_size=cfg.tpt_group, num_workers=cfg.workers)

    def batches():
        for views, labels in loader:
            with autocast(job.device, cfg.precision):
                yield tuner.predict(views.to(job.device)), labels
    return tally(job, dpl.classnames, batches(), desc)


def run_tpt(cfg: RunConfig, prompts: str | None = None) -> dict:
    """TPT on the test sets: zero-shot CLIP with a learnable context, or saved prompts (a fixed DPL
    configuration's text prompts, a CoOp or CoCoOp context)."""
    clip_only(cfg, "tpt")
    job = prepare(cfg, "tpt")
    if prompts:
        dpl, method, path, trained = _load_prompted(job, prompts)
        if isinstance(dpl, FastDPLPrompt) and dpl.mode != "fixed":
            raise ValueError(f"tpt needs fixed-mode prompts (a train stage's prompts.pt), got {dpl.mode} mode")
    else:
        blocks = block_counts(job.model)
        dpl, method, path, trained = build_dpl(job, job.splits.classnames, "fixed", PromptConfig.zero_shot(blocks)), \
            "zero_shot", None, {}
    return evaluate_and_write(job, dpl, job.out("tpt"), "tpt", f"tpt+{method}", rebuilder(job, dpl),
                              evaluate=tpt_accuracy, extra={"prompts": path, "trained": trained})
