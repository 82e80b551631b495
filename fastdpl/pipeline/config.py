"""Run settings: defaults are the paper's (DESIGN.md section 1); a YAML file and the command line override them.

Precedence: defaults < ``--config run.yaml`` < command-line flags (every field is
a flag: ``--search-epochs 10``, ``--candidate-lengths 0,2,4``).
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from ..templates import NAMES as TEMPLATE_NAMES
from ..templates import check_format
from .runtime import check_compile_backend

PRECISIONS = ("fp32", "bf16")


@dataclass
class RunConfig:
    # data
    dataset: str = "builtin:digits"
    root: str | None = None
    shots: int | None = 16
    seed: int = 1
    subsample: str = "all"  # all | base | new: the classes a stage trains on (base-to-new protocol)
    split_cache: str | None = None  # where few-shot indices are cached (default: <output>/../splits)
    workers: int = 2
    crop_scale: list = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop scale range (training)
    flip: bool = True  # random horizontal flips (training); off for text, digits
    # model
    model: str = "ViT-B-16"
    pretrained: str | None = "openai"
    tokenizer: str = "auto"  # auto: the model's own (models.load_tokenizer); clip; a Hugging Face tokenizer folder
    template: str = "auto"  # auto: the authors' per stage (stage_template); default | ensemble | custom | "... {} ..."
    impl: str = "auto"
    device: str = "auto"
    precision: str = "fp32"
    compile: bool = False  # torch.compile the module the training stages call (runtime.compiled)
    compile_backend: str = "inductor"
    text_chunk_size: int | None = None
    # search stage
    candidate_lengths: list = field(default_factory=lambda: list(range(7)))
    search_towers: list = field(default_factory=lambda: ["image", "text"])
    search_epochs: int = 80
    arch_lr: float = 3.5e-3
    arch_betas: list = field(default_factory=lambda: [0.5, 0.999])
    arch_weight_decay: float = 0.0
    init: str = "normal"  # the search stage's prompts; the train stage always starts from N(0, 0.02^2)
    val_batch_size: int = 16  # the alpha steps' validation batch (the authors' TEST.BATCH_SIZE)
    val_batches: str = "cycle"  # cycle: reshuffled passes over the validation split; first: its first batch only
    # both stages
    batch_size: int = 4
    lr: float = 3.5e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    grad_clip: float | None = None  # max gradient norm per optimiser step (none in the paper)
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    # train stage
    method: str = "dpl"  # dpl | coop | cocoop | zero_shot | uniform:LENGTH:DEPTH (METHOD_PRESETS fill its defaults)
    train_epochs: int = 40
    prompt_config: str | None = None  # a PromptConfig JSON, or a preset: zero_shot | uniform:LENGTH:DEPTH
    n_ctx: int | None = None  # CoOp / CoCoOp: context vectors; none: ctx_init's tokens, else 16 / 4
    ctx_init: str | None = None  # CoOp / CoCoOp: words that initialise the context, e.g. "a photo of a"; none/"": random
    class_specific: bool = False  # CoOp: one context per class
    class_token_position: str = "end"  # CoOp / CoCoOp: end | middle | front
    distill_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_teacher: str = "ensemble"  # ensemble: all 60 templates; last: the last one only (the authors' code)
    # PromptSRC's self-regularisation (pipeline/regularizers.py); --regularizer promptsrc fills its values
    regularizer: str = "none"
    src_text_weight: float = 0.0
    src_image_weight: float = 0.0
    src_logit_weight: float = 0.0
    gpa_mean: float | None = None  # Gaussian prompt aggregation over the train stage's epochs (none: off)
    gpa_std: float | None = None
    schedule: str = "cosine"  # cosine: constant warm-up then cosine (Dassl's); vpt: linear warm-up, cosine to 0
    # timm ViT classifiers (--model timm:NAME)
    preset: str = "none"  # vpt: VPT-deep's reference settings for every setting not given
    head_lr: float | None = None  # the classifier head's learning rate; none: lr
    prompt_init: str = "normal"  # normal: N(0, 0.02^2); vpt: VPT's uniform Xavier bound
    prompt_dropout: float = 0.0  # VPT's dropout on the prompt tokens (train stage)
    # evaluation
    eval_batch_size: int = 100
    eval_datasets: list = field(default_factory=list)  # cross-dataset / domain shift, after the own test set
    # test-time prompt tuning (fastdpl tpt)
    tpt_views: int = 64  # the original and 63 augmented views
    tpt_keep: float = 0.1  # share of lowest-entropy views in the loss
    tpt_lr: float = 5e-3
    tpt_steps: int = 1
    tpt_tune: str = "auto"  # context | text_prompts | auto (text prompts when the loaded prompts have any)
    tpt_context: str = "a photo of a"
    tpt_augmix: str = "auto"  # auto: AugMix views for fine-grained sets, crops only for the ImageNet family
    tpt_group: int = 1  # test images tuned together as one batch of independent prompts
    tpt_meta_input: str = "normalized"  # CoCoOp's meta-network input at test time: normalized | raw (TPT's code)
    # the linear-probe baseline (fastdpl linear-probe)
    probe_steps: int = 8  # rounds of lpclip's search of C after its first sweep
    # bookkeeping
    output: str = "runs/default"
    resume: bool = False
    progress: bool = True

    def validate(self) -> "RunConfig":
        if not isinstance(self.probe_steps, int) or self.probe_steps < 0:
            raise ValueError(f"probe_steps must be an int >= 0, got {self.probe_steps!r}")
        for name in ("batch_size", "val_batch_size", "search_epochs", "train_epochs", "eval_batch_size", "tpt_views",
                     "tpt_steps", "tpt_group"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.shots is not None and (not isinstance(self.shots, int) or self.shots < 1):
            raise ValueError(f"shots must be a positive int or null (all images), got {self.shots!r}")
        if self.warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.distill_weight < 0:
            raise ValueError(f"distill_weight must be >= 0, got {self.distill_weight}")
        for name in ("src_text_weight", "src_image_weight", "src_logit_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if (self.gpa_mean is None) != (self.gpa_std is None):
            missing = "--gpa-std" if self.gpa_std is None else "--gpa-mean"
            raise ValueError(f"Gaussian prompt aggregation needs --gpa-mean and --gpa-std: give {missing} too"
                             + (" (PromptSRC publishes them for 20 and 50 epochs only)"
                                if self.regularizer == "promptsrc" else ""))
        if self.gpa_std is not None and self.gpa_std <= 0:
            raise ValueError(f"gpa_std must be > 0, got {self.gpa_std}")
        for name, (_, _, _, allowed) in SETTINGS.items():  # the string settings with a fixed set of values
            value = getattr(self, name)
            if allowed and _HINTS[name] is str and isinstance(value, str) and value not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.template not in ("auto", *TEMPLATE_NAMES):
            check_format(self.template, "template")
        check_method(self.method)
        if self.tpt_augmix not in ("auto", "true", "false", True, False):
            raise ValueError(f"tpt_augmix must be auto, true or false, got {self.tpt_augmix!r}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout!r}")
        if self.head_lr is not None and self.head_lr <= 0:
            raise ValueError(f"head_lr must be > 0 or none, got {self.head_lr!r}")
        if self.compile:
            check_compile_backend(self.compile_backend)
        check_family_settings(self)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_HINTS = typing.get_type_hints(RunConfig)
METHODS = ("dpl", "coop", "cocoop", "zero_shot", "linear", "uniform:LENGTH:DEPTH")
CLASSIFIER_METHODS = ("dpl", "linear")  # and uniform:LENGTH:DEPTH
CLASSIFIER_SETTINGS = ("preset", "head_lr", "prompt_init", "prompt_dropout")  # a classifier's own


def check_family_settings(cfg: RunConfig) -> None:
    """A ValueError naming a setting the model family cannot use: a CLIP's text side (templates,
    tokenizer, CoOp / CoCoOp, zero-shot, base-to-new, cross-dataset, distillation towards
    zero-shot CLIP, text towers) for a timm classifier, a classifier's own settings for a CLIP."""
    from ..models import is_classifier

    defaults = RunConfig.__dataclass_fields__
    changed = {name for name in defaults if getattr(cfg, name) != _default(name)}
    if not is_classifier(cfg.model):
        own = sorted(changed & set(CLASSIFIER_SETTINGS))
        if own or cfg.method == "linear":
            what = ", ".join(f"--{n.replace('_', '-')}" for n in own) or "--method linear"
            raise ValueError(f"{what}: settings of timm image classifiers (--model timm:NAME), not of a CLIP "
                             f"(--model {cfg.model})")
        return
    text_side = {"regularizer": "PromptSRC (its terms read class texts)", "src_text_weight": "PromptSRC's text term",
                 "src_image_weight": "PromptSRC's image term", "src_logit_weight": "PromptSRC's logit term",
                 "template": "class-name templates", "tokenizer": "a text tokenizer", "subsample": "base-to-new "
                 "(new classes need class texts)", "eval_datasets": "cross-dataset evaluation (other label sets "
                 "need class texts)", "distill_weight": "distillation towards zero-shot CLIP"}
    for name in sorted(changed & set(text_side)):
        raise ValueError(f"--{name.replace('_', '-')}: {text_side[name]} is CLIP-only; a timm classifier "
                         f"({cfg.model}) has a trained head and no text side")
    if not (cfg.method in CLASSIFIER_METHODS or cfg.method.startswith("uniform:")):
        raise ValueError(f"--method {cfg.method} is CLIP-only (it needs class texts): a timm classifier trains "
                         "dpl, linear (the head alone) or uniform:LENGTH:DEPTH (VPT-deep)")
    if set(cfg.search_towers) != {"image"}:
        raise ValueError(f"--search-towers {','.join(cfg.search_towers)}: a timm classifier has one tower, image")
    if cfg.init != "normal":
        raise ValueError("--init paper is the authors' CLIP search init; a timm classifier's prompts start from "
                         "--prompt-init (normal or vpt)")


def _default(name: str):
    return _field_default(RunConfig.__dataclass_fields__[name])


def _field_default(f):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def check_method(method: str) -> str:
    if method in METHODS[:-1]:
        return method
    parts = str(method).split(":")
    if len(parts) == 3 and parts[0] == "uniform" and all(p.isdigit() for p in parts[1:]):
        return method
    raise ValueError(f"method must be one of {', '.join(METHODS)} (e.g. uniform:4:9), got {method!r}")


def _parse_value(name: str, text: str, hints: dict = _HINTS):
    """A command-line string as the field's type (``hints``: the config class's type hints);
    lists are comma-separated, 'none' is None."""
    hint = hints[name]
    if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if typing.get_args(hint) else hint
    if base is bool:
        if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise argparse.ArgumentTypeError(f"--{name}: expected true/false, got {text!r}")
        return text.lower() in ("true", "1", "yes")
    if base is list or typing.get_origin(hint) is list:
        items = [t for t in text.split(",") if t.strip()]
        return [_number(t.strip()) for t in items]
    try:
        return base(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: expected {base.__name__}, got {text!r}") from exc


def _number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


_EVAL = ("zeroshot", "search", "train", "eval", "tpt")  # every prompt stage
_ALL = _EVAL + ("linear_probe",)  # and the linear-probe baseline (data, model and bookkeeping settings)
_TRAINING = ("search", "train")
# --compile and --compile-backend: the same two settings for every model family (CLIP, timm, LM)
COMPILE_SETTINGS = {
    "compile": ("model", _TRAINING, "torch.compile the prompted model's forward and backward in the training steps "
                "(a bare flag: true); off: eager", ("true", "false")),
    "compile_backend": ("model", _TRAINING, "torch.compile backend with --compile: inductor (generated kernels: what "
                        "a GPU run wants), aot_eager (Dynamo and AOT autograd without code generation: checks the "
                        "capture in seconds), eager, or any registered Dynamo backend", None),
}
COMPILE_RESUMABLE = {"compile", "compile_backend"}  # they change results by rounding only
# name: (group, stages that use it, one-line description, allowed values or None)
SETTINGS = {
    "dataset": ("data", _ALL, "dataset name (`fastdpl datasets`), folder:PATH or json:PATH", None),
    "root": ("data", _ALL, "folder holding one folder per dataset", None),
    "shots": ("data", _ALL, "training images per class (validation: min(shots, 4)); none: all", None),
    "seed": ("data", _ALL, "seed of the few-shot draw, the prompts' init and every augmentation", None),
    "subsample": ("data", _EVAL, "classes to train and evaluate on (base-to-new protocol)", ("all", "base", "new")),
    "split_cache": ("data", _ALL, "folder for the cached few-shot draws (default: <output>/../splits)", None),
    "workers": ("data", _ALL, "DataLoader worker processes (does not change results)", None),
    "crop_scale": ("data", _TRAINING, "random resized crop scale range, as LOW,HIGH (training)", None),
    "flip": ("data", _TRAINING, "random horizontal flips (training)", ("true", "false")),
    "model": ("model", _ALL, "open_clip model name, a local Hugging Face CLIP/SigLIP folder, tiny (the "
              "built-in CLIP), or timm:NAME (a timm ViT classifier; timm:tiny: the tiny CLIP's image tower)", None),
    "pretrained": ("model", _ALL, "open_clip pretrained tag or file; for timm:NAME a checkpoint file; none: "
                   "random weights", None),
    "tokenizer": ("model", _EVAL, "class texts to token ids: auto (the model's own: a Hugging Face folder's "
                  "tokenizer files, open_clip's for SigLIP, else CLIP's BPE), clip, or a Hugging Face tokenizer "
                  "folder", None),
    "template": ("model", _EVAL, "text input: auto (the authors' per stage: search default, train ensemble, "
                 "zeroshot custom), default ('a photo of a {}.'), ensemble (mean of 60 templates' token "
                 "embeddings), custom (the dataset's own), or a format string with {}", None),
    "impl": ("model", _EVAL, "attention engine (does not change results beyond rounding)",
             ("auto", "eager", "triton", "reference")),
    "device": ("model", _ALL, "device (auto: cuda when available)", None),
    "precision": ("model", _ALL, "fp32, or bf16 autocast", PRECISIONS),
    "compile": COMPILE_SETTINGS["compile"],
    "compile_backend": COMPILE_SETTINGS["compile_backend"],
    "text_chunk_size": ("model", _EVAL, "encode the class texts in checkpointed chunks of this many classes", None),
    "candidate_lengths": ("search", ("search",), "prompt lengths every block chooses from, as 0,1,2,...", None),
    "search_towers": ("search", ("search",), "towers whose blocks are searched, as image,text", None),
    "search_epochs": ("search", ("search",), "epochs of the search stage", None),
    "arch_lr": ("search", ("search",), "Adam learning rate of alpha", None),
    "arch_betas": ("search", ("search",), "Adam betas of alpha, as B1,B2", None),
    "arch_weight_decay": ("search", ("search",), "weight decay of alpha", None),
    "init": ("search", ("search",), "search-stage prompt init: normal = N(0, 0.02^2) (fastdpl's; the authors' train "
             "stage always uses it), paper = the authors' search code (image N(0, 1), text U[0, 1))",
             ("normal", "paper")),
    "val_batch_size": ("search", ("search",), "images per validation batch of the alpha step, per process", None),
    "val_batches": ("search", ("search",), "alpha steps' validation batches: cycle (reshuffled passes, fastdpl's) "
                    "or first (the same first batch every step, the authors')", ("cycle", "first")),
    "batch_size": ("training", _TRAINING, "images per step per process", None),
    "lr": ("training", _TRAINING, "SGD learning rate of the prompts (cosine schedule)", None),
    "momentum": ("training", _TRAINING, "SGD momentum", None),
    "weight_decay": ("training", _TRAINING, "SGD weight decay", None),
    "grad_clip": ("training", _TRAINING, "max gradient norm per step; none: no clipping (the paper's)", None),
    "warmup_epochs": ("training", _TRAINING, "epochs at the constant warm-up learning rate", None),
    "warmup_lr": ("training", _TRAINING, "warm-up learning rate", None),
    "method": ("training", ("train",), "what the train stage learns: dpl (the searched configuration), coop, cocoop, "
               "zero_shot, linear (a timm classifier's head alone) or uniform:LENGTH:DEPTH; coop and cocoop bring their reference settings (lr, batch, "
               "epochs, context) for every setting not given", None),
    "train_epochs": ("training", ("train",), "epochs of the train stage", None),
    "prompt_config": ("training", ("train",), "configuration: a PromptConfig JSON, zero_shot, uniform:LENGTH:DEPTH, "
                      "or an authors' search output folder / alpha .npy (default: the search stage's)", None),
    "n_ctx": ("context", ("train",), "CoOp/CoCoOp: number of context vectors; none: one per token of --ctx-init's "
              "words, else 16 (CoOp) / 4 (CoCoOp); with words it must equal their token count", None),
    "ctx_init": ("context", ("train",), "CoOp/CoCoOp: words initialising the context, e.g. 'a photo of a'; none or '': "
                 "N(0, 0.02^2)", None),
    "class_specific": ("context", ("train",), "CoOp: one context per class", ("true", "false")),
    "class_token_position": ("context", ("train",), "CoOp/CoCoOp: where the class name goes",
                             ("end", "middle", "front")),
    "distill_weight": ("training", ("train",), "weight of the KL term towards zero-shot CLIP (0: off)", None),
    "distill_temperature": ("training", ("train",), "temperature of the distillation term", None),
    "distill_teacher": ("training", ("train",), "teacher's templates: ensemble (all 60, averaged) or last (the "
                        "authors' code keeps only the last)", ("ensemble", "last")),
    "schedule": ("training", _TRAINING, "learning-rate schedule per epoch: cosine (a constant warm-up at warmup_lr, "
                 "then cosine: Dassl's, the authors') or vpt (linear warm-up from 0, then cosine to 0: VPT's)",
                 ("cosine", "vpt")),
    "preset": ("classifier", _TRAINING, "timm classifiers: vpt sets VPT-deep's reference settings (prompt init, "
               "prompt dropout 0.1, schedule, epochs, batch, lr, weight decay) for every setting not given", ("none", "vpt")),
    "head_lr": ("classifier", _TRAINING, "timm classifiers: learning rate of the classifier head; none: --lr", None),
    "prompt_init": ("classifier", _TRAINING, "timm classifiers: prompt start, normal = N(0, 0.02^2) or vpt = "
                    "U(-b, b), b = sqrt(6 / (3 patch^2 + width)) (VPT's)", ("normal", "vpt")),
    "prompt_dropout": ("classifier", ("train",), "timm classifiers: VPT's dropout on the prompt tokens, a mask per "
                       "image (train stage)", None),
    "regularizer": ("training", ("train",), "promptsrc: PromptSRC's self-regularisation with its weights (text 25, "
                    "image 10, logits 1), its epochs (20) and its Gaussian aggregation (20 epochs: mean 15, std 1; "
                    "with --eval-datasets 6, 10; 50 epochs: 30, 30, or 45, 5 for Cars, Flowers, Aircraft, DTD, "
                    "EuroSAT) for every setting not given", ("none", "promptsrc")),
    "src_text_weight": ("training", ("train",), "PromptSRC: weight of L1(prompted, frozen) normalised text features "
                        "(frozen: the mean over the 60 ImageNet templates)", None),
    "src_image_weight": ("training", ("train",), "PromptSRC: weight of L1(prompted, frozen) normalised image features",
                         None),
    "src_logit_weight": ("training", ("train",), "PromptSRC: weight of KL(frozen zero-shot || prompted) logits, "
                         "summed over the batch's logits and divided by their number", None),
    "gpa_mean": ("training", ("train",), "Gaussian prompt aggregation: mean epoch of the weights (none: off)", None),
    "gpa_std": ("training", ("train",), "Gaussian prompt aggregation: standard deviation in epochs", None),
    "eval_batch_size": ("evaluation", _ALL, "images per evaluation batch", None),
    "eval_datasets": ("evaluation", _EVAL, "more test sets (cross-dataset, domain shift), as a,b,c", None),
    "tpt_views": ("tpt", ("tpt",), "views per test image (the original and augmented ones)", None),
    "tpt_keep": ("tpt", ("tpt",), "share of lowest-entropy views in the loss", None),
    "tpt_lr": ("tpt", ("tpt",), "AdamW learning rate of the test-time step", None),
    "tpt_steps": ("tpt", ("tpt",), "test-time steps per image", None),
    "tpt_tune": ("tpt", ("tpt",), "what is tuned", ("auto", "context", "text_prompts")),
    "tpt_context": ("tpt", ("tpt",), "words that initialise the learnable context", None),
    "tpt_augmix": ("tpt", ("tpt",), "AugMix views (auto: for the fine-grained sets)", ("auto", "true", "false")),
    "tpt_group": ("tpt", ("tpt",), "test images tuned together as independent prompts", None),
    "tpt_meta_input": ("tpt", ("tpt",), "TPT on CoCoOp: the meta-network reads the normalized image feature "
                       "(as CoCoOp) or the raw one (the TPT code)", ("normalized", "raw")),
    "probe_steps": ("linear probe", ("linear_probe",), "rounds of lpclip's search of C (the inverse L2 strength) on "
                    "the validation split, after its sweep over 1e6 ... 1e-6", None),
    "output": ("bookkeeping", _ALL, "run folder (each stage writes its own subfolder)", None),
    "resume": ("bookkeeping", _ALL, "continue from the run's checkpoint / keep its results (a bare flag: true)",
               ("true", "false")),
    "progress": ("bookkeeping", _ALL, "progress bars (per-epoch lines print either way)", ("true", "false")),
}
assert set(SETTINGS) == {f.name for f in fields(RunConfig)}, "every setting needs a SETTINGS entry"
# Settings that cannot change what a stage computes: they may differ when a run is resumed,
# and they never split an experiment in a report.
RESUMABLE_CHANGES = {"workers", "progress", "resume", "device", "impl", "text_chunk_size", "root", "split_cache",
                     "output", "eval_batch_size", "eval_datasets"} | COMPILE_RESUMABLE | \
    {name for name in SETTINGS if name.startswith("tpt_")}
# Each training stage's own settings (SETTINGS says which stages use a setting), ignored by the other.
STAGE_SETTINGS = {stage: {name for name, (_, stages, _, _) in SETTINGS.items() if stages == (stage,)}
                  for stage in ("search", "train")}


@dataclass(frozen=True)
class Schema:
    """A family of run settings: the config dataclass, its SETTINGS table (name: group, stages,
    description, allowed values) and the settings that may change when a run is resumed."""

    config: type
    settings: dict
    resumable: frozenset

    @property
    def hints(self) -> dict:
        return typing.get_type_hints(self.config)

    def ignored_on_resume(self, stage: str) -> set:
        """Settings that cannot change what ``stage`` computes: the resumable ones and the other
        training stages' own."""
        own = {name for name, (_, stages, _, _) in self.settings.items() if len(stages) == 1}
        return set(self.resumable) | {n for n in own if self.settings[n][1] != (stage,)}


CLIP_SCHEMA = Schema(RunConfig, SETTINGS, frozenset(RESUMABLE_CHANGES))


def add_config_arguments(parser: argparse.ArgumentParser, stage: str | None = None, schema: Schema | None = None) -> None:
    """The stage's own settings as flags (all settings for ``stage=None``), grouped, each with its
    description, allowed values and default. A YAML file may still hold any known setting."""
    schema = schema or CLIP_SCHEMA
    parser.add_argument("--config", help="YAML file of settings (the command line overrides it)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved settings as YAML and exit")
    defaults, hints = schema.config(), schema.hints
    groups = {}
    for f in fields(schema.config):
        group, stages, text, allowed = schema.settings[f.name]
        if stage is not None and stage not in stages:
            continue
        if group not in groups:
            groups[group] = parser.add_argument_group(f"{group} settings")
        flag = "--" + f.name.replace("_", "-")
        # A bool setting given without a value means true (``--resume`` = ``--resume true``).
        is_bool = hints[f.name] is bool
        choices = f" ({'|'.join(allowed)})" if allowed else ""
        groups[group].add_argument(flag, dest=f.name, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                   type=lambda text, name=f.name: _parse_value(name, text, hints),
                                   nargs="?" if is_bool else None, const=True if is_bool else None,
                                   help=f"{text}{choices}; default: {getattr(defaults, f.name)!r}")


def load_yaml(path: str | Path, config: type | None = None) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(config or RunConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown settings {unknown}; known: {sorted(known)}")
    return data


def coop_epochs(shots: int | None, dataset: str) -> int:
    """CoOp's epochs by shot count: 50 for 1 shot (and for ImageNet), 100 for 2 and 4, 200 above."""
    if str(dataset).lower() == "imagenet" or shots == 1:
        return 50
    return 100 if shots in (2, 4) else 200


# The reference settings of the CoOp-family methods (KaiyangZhou/CoOp's configs): the defaults of
# every setting the YAML file and the command line leave unset when --method names them.
METHOD_PRESETS = {
    "coop": lambda values: dict(lr=0.002, batch_size=32, ctx_init=None, class_specific=False,
                                class_token_position="end", warmup_epochs=1, warmup_lr=1e-5,
                                train_epochs=coop_epochs(values.get("shots", 16), values.get("dataset", ""))),
    "cocoop": lambda values: dict(lr=0.002, batch_size=1, train_epochs=10, ctx_init="a photo of a",
                                  class_token_position="end", warmup_epochs=1, warmup_lr=1e-5),
}


# A timm classifier's defaults where they differ from a CLIP's: VPT-deep's lengths (none, 1 as NOAH,
# 5 as VPT's default, 10), its one tower, and random weights unless a checkpoint file is given.
CLASSIFIER_DEFAULTS = dict(candidate_lengths=[0, 1, 5, 10], search_towers=["image"], pretrained=None)
# --preset vpt: VPT-deep's reference settings (KMnP/vpt configs/base-prompt.yaml and prompt/*.yaml,
# README's runs): SGD momentum 0.9, weight decay 0.01 and lr 0.1 (CUB's; VPT tunes both per task on
# the validation split), 100 epochs after 10 of linear warm-up, batch 64, prompt dropout 0.1, its init.
PRESETS = {"vpt": dict(prompt_init="vpt", prompt_dropout=0.1, schedule="vpt", warmup_epochs=10, train_epochs=100,
                       search_epochs=100, batch_size=64, val_batch_size=64, lr=0.1, weight_decay=0.01, momentum=0.9)}


def method_config(**given) -> RunConfig:
    """A RunConfig from the settings ``given``, with the model family's, the preset's and the
    method's reference settings for the rest (later ones win)."""
    from ..models import is_classifier

    values = {**RunConfig().to_dict(), **given}
    defaults = dict(CLASSIFIER_DEFAULTS) if is_classifier(values["model"]) else {}
    defaults.update(PRESETS.get(values["preset"], {}))
    preset = METHOD_PRESETS.get(values["method"])
    defaults.update(preset(values) if preset else {})
    if values["regularizer"] == "promptsrc":
        from .regularizers import promptsrc_defaults

        # its aggregation follows the epochs given (or the method's) and the dataset
        resolved = {**defaults, **given}
        defaults.update(promptsrc_defaults({k: resolved[k] for k in ("train_epochs", "dataset", "eval_datasets",
                                                                     "gpa_mean", "gpa_std") if k in resolved}))
    return RunConfig(**{**defaults, **given}).validate()


def resolve_config(args: argparse.Namespace, **overrides) -> RunConfig:
    """Defaults (with --method's reference settings), then the YAML file, then flags given on the
    command line, then ``overrides``."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)})
    values.update(overrides)
    return method_config(**values)


def save_yaml(config: RunConfig, path: Path) -> None:
    import yaml

    from ..atomic import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def changed_settings(saved: dict, current, stage: str) -> list[str]:
    """'name: old -> new' for every setting that differs and would change what ``stage`` computes
    (``current``: a RunConfig, or any config whose class has a ``SCHEMA``)."""
    schema = getattr(type(current), "SCHEMA", None)
    ignored = (schema.ignored_on_resume(stage) if schema is not None else
               RESUMABLE_CHANGES | set().union(*(s for k, s in STAGE_SETTINGS.items() if k != stage)))
    now = current.to_dict()
    # a setting newer than the checkpoint had its default value then
    defaults = {f.name: _field_default(f) for f in fields(type(current))}
    return [f"{name}: {saved.get(name, defaults[name])!r} -> {now[name]!r}" for name in now
            if name not in ignored and saved.get(name, defaults[name]) != now[name]]
