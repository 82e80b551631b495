"""Loading CLIP backbones: open_clip names and tags, local files, the HF cache, and the built-in tiny CLIP.

``load_clip(name, pretrained)``:

* ``name`` a folder holding a Hugging Face transformers CLIP or SigLIP (``save_pretrained``:
  config.json and weights): loaded with transformers (``pip install 'fastdpl[hf]'``);
* ``name="tiny"``: the tiny CLIP shipped in ``fastdpl/assets`` (offline demo);
  ``pretrained`` may name another file written by ``save_tiny_clip`` (anything
  else, tags included, means the shipped checkpoint).
* an open_clip model name (``ViT-B-16``, ``hf-hub:org/repo``, ...) with
  - ``pretrained`` a path to a checkpoint file: loaded from that file;
  - ``pretrained`` an open_clip tag (``openai``, ``laion2b_s34b_b88k``, ...): taken
    from the Hugging Face cache when it is already on disk, downloaded otherwise;
  - ``pretrained`` ``None`` / ``"random"``: random weights (benchmarks, tests).

With no network and no local weights the error says how to point at a local file.

``load_tokenizer(setting, name, model)`` turns class texts into the model's token ids:
``"clip"`` is open_clip's bundled CLIP BPE (CLIP, the tiny CLIP, transformers' CLIP: the same
ids); a folder is a Hugging Face tokenizer (``save_pretrained``); ``"auto"`` picks the model's
own: a Hugging Face folder's tokenizer files, open_clip's tokenizer for open_clip models with
one of their own (SigLIP: from the Hugging Face cache, downloaded otherwise), CLIP's BPE else.
"""
from __future__ import annotations

from pathlib import Path

import torch

TINY_CHECKPOINT = Path(__file__).parent / "assets" / "tiny_clip.pt"
TINY_NAMES = ("tiny", "builtin:tiny")
RANDOM = (None, "", "none", "random")


class ModelLoadError(RuntimeError):
    """The backbone could not be loaded; the message says what to pass instead."""


def save_tiny_clip(model, path, **metadata) -> Path:
    """Write a tiny CLIP (fp16 weights, config, metadata) atomically; returns the path."""
    from .synthetic import MODEL_CONFIG

    from .atomic import save_atomic

    state = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return save_atomic({"format": "fastdpl-tiny-clip/1", "config": MODEL_CONFIG, "state_dict": state,
                        "metadata": metadata}, path)


def load_tiny_clip(path: str | Path | None = None):
    """The built-in tiny CLIP (fp32, eval mode)."""
    from .synthetic import build_tiny_clip

    path = Path(path) if path else TINY_CHECKPOINT
    if not path.is_file():
        raise ModelLoadError(f"tiny CLIP checkpoint not found: {path} "
                             "(run `python scripts/make_tiny_clip.py` to build it)")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != "fastdpl-tiny-clip/1":
        raise ModelLoadError(f"{path} is not a fastdpl tiny CLIP checkpoint")
    model = build_tiny_clip()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in saved["state_dict"].items()})
    return model.eval()


def _cached_weights(name: str, tag: str) -> str | None:
    """The checkpoint of (name, tag) in the local Hugging Face cache, if it is there."""
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME, get_pretrained_cfg

    repo = get_pretrained_cfg(name, tag).get("hf_hub", "").strip("/")
    if not repo:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - open_clip depends on huggingface_hub
        return None
    for filename in (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return found
    return None


def load_hf_clip(folder: Path, device="cpu"):
    """A Hugging Face transformers CLIP or SigLIP saved in ``folder`` (save_pretrained: config.json and
    weights)."""
    import json

    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(f"{folder} is a Hugging Face model folder: install transformers "
                             "(pip install 'fastdpl[hf]')") from exc
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    classes = {"clip": transformers.CLIPModel, "siglip": transformers.SiglipModel}
    if kind not in classes:
        raise ModelLoadError(f"{folder}: model_type {kind!r} is not supported (fastdpl loads "
                             f"{' and '.join(map(repr, classes))} folders)")
    return classes[kind].from_pretrained(folder).to(device).eval()


class HFTextTokenizer:
    """A Hugging Face tokenizer as fastdpl calls tokenizers: texts -> (N, context_length) token ids,
    padded to the full length (as SigLIP was trained; CLIP's pad token is its end-of-text)."""

    def __init__(self, tokenizer, context_length: int):
        self.tokenizer, self.context_length = tokenizer, context_length

    def __call__(self, texts):
        return self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                              return_tensors="pt")["input_ids"]


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                 "spiece.model", "tokenizer.model"))


def _hf_tokenizer(folder: Path, model):
    from transformers import AutoTokenizer

    from .adapters import adapt

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a folder of broken or foreign files: say which
        raise ModelLoadError(f"tokenizer: could not load a Hugging Face tokenizer from {folder}: "
                             f"{type(exc).__name__}: {exc}") from exc
    return HFTextTokenizer(tokenizer, adapt(model).context_length)


def load_tokenizer(setting: str = "auto", name: str = "", model=None):
    """A callable texts -> token ids for ``model`` (loaded from ``name``), or None for open_clip's
    bundled CLIP tokenizer (see the module docstring)."""
    if setting == "clip":
        return None
    folder = Path(str(setting)).expanduser()
    if setting != "auto":
        if not folder.is_dir() or not _has_tokenizer_files(folder):
            raise ModelLoadError(f"tokenizer {setting!r} is neither auto, clip nor a folder with Hugging Face "
                                 "tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        return _hf_tokenizer(folder, model)
    hf_folder = Path(name).expanduser()
    if (hf_folder / "config.json").is_file():
        if _has_tokenizer_files(hf_folder):
            return _hf_tokenizer(hf_folder, model)
        if type(model).__name__ == "CLIPModel":
            return None  # transformers' CLIP: CLIP's BPE, the ids open_clip's bundled tokenizer gives
        raise ModelLoadError(f"{hf_folder} has no tokenizer files: save the model's tokenizer there "
                             "(tokenizer.save_pretrained) or pass --tokenizer FOLDER")
    return _open_clip_tokenizer(name)


def _open_clip_tokenizer(name: str):
    """open_clip's own tokenizer for models that have one (SigLIP's SentencePiece...); None for CLIP's BPE."""
    import open_clip

    if name in TINY_NAMES or name not in open_clip.list_models():
        return None
    text_cfg = open_clip.get_model_config(name).get("text_cfg", {})
    if not text_cfg.get("hf_tokenizer_name"):
        return None
    try:
        return open_clip.get_tokenizer(name)
    except Exception as exc:  # offline with an empty cache, among others
        raise ModelLoadError(f"could not load {name}'s tokenizer {text_cfg['hf_tokenizer_name']!r}: "
                             f"{type(exc).__name__}: {exc}\nNo network? Save it on a connected machine "
                             "(AutoTokenizer.from_pretrained(...).save_pretrained(FOLDER)) and pass "
                             "--tokenizer FOLDER") from exc


def load_clip(name: str = "ViT-B-16", pretrained: str | None = "openai", device="cpu"):
    """A CLIP model in eval mode on ``device`` (see the module docstring for what is accepted)."""
    import open_clip

    if name in TINY_NAMES:
        # pretrained: a file written by save_tiny_clip, else the shipped checkpoint (tags mean nothing here)
        own = pretrained if pretrained and Path(str(pretrained)).expanduser().is_file() else None
        return load_tiny_clip(own).to(device)
    if (Path(name).expanduser() / "config.json").is_file():
        return load_hf_clip(Path(name).expanduser(), device)
    known = open_clip.list_models()
    if not name.startswith("hf-hub:") and name not in known:
        raise ModelLoadError(f"unknown model {name!r}: use 'tiny', an open_clip name such as "
                             f"{', '.join(known[:4])}, ..., or hf-hub:ORG/REPO")
    if pretrained in RANDOM:
        return open_clip.create_model(name, pretrained=None, device=device).eval()
    if Path(str(pretrained)).expanduser().is_file():
        return open_clip.create_model(name, pretrained=str(Path(pretrained).expanduser()), device=device).eval()
    if name.startswith("hf-hub:"):
        return _download(lambda: open_clip.create_model(name, device=device), name, pretrained)
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained not in tags:
        raise ModelLoadError(f"pretrained={pretrained!r} is neither a file nor a tag of {name}; tags: "
                             f"{', '.join(tags) or 'none'}")
    cached = _cached_weights(name, pretrained)
    if cached:
        from open_clip.pretrained import get_pretrained_cfg

        quick_gelu = get_pretrained_cfg(name, pretrained).get("quick_gelu", False)
        return open_clip.create_model(name, pretrained=cached, force_quick_gelu=quick_gelu, device=device).eval()
    return _download(lambda: open_clip.create_model(name, pretrained=pretrained, device=device), name, pretrained)


def _download(create, name, pretrained):
    try:
        return create().eval()
    except Exception as exc:  # network errors come in many types (OSError, HTTP, hub errors)
        raise ModelLoadError(
            f"could not load {name} weights {pretrained!r}: {type(exc).__name__}: {exc}\n"
            "No network? On a connected machine download the checkpoint (open_clip's "
            "create_model downloads it into the Hugging Face cache), then either copy the cache "
            "(HF_HOME) here or pass the file: --pretrained /path/to/open_clip_model.safetensors. "
            "For an offline try-out use --model tiny (built in).") from exc


# ---- timm image classifiers (FastDPLViT) -----------------------------------------------------------------
CLASSIFIER_PREFIX = "timm:"


def is_classifier(name) -> bool:
    """Whether ``--model`` names a timm image classifier (``timm:NAME``) rather than a CLIP."""
    return str(name).startswith(CLASSIFIER_PREFIX)


def vit_from_open_clip(visual, num_classes: int):
    """open_clip's ViT image tower as a timm ``VisionTransformer`` classifier with the same features
    (the class token after ln_post, before CLIP's projection) and a fresh ``num_classes`` head.

    The weights map one to one: conv1 -> patch_embed.proj, class_embedding -> cls_token,
    positional_embedding -> pos_embed, ln_pre -> norm_pre, each resblock's ln_1 / attn.in_proj /
    attn.out_proj / ln_2 / mlp.c_fc / mlp.c_proj / ls_1 / ls_2 -> norm1 / attn.qkv / attn.proj /
    norm2 / mlp.fc1 / mlp.fc2 / ls1 / ls2, ln_post -> norm. Towers with an attention-pool, another
    pooling or final_ln_after_pool are refused (timm has no such head)."""
    from timm.models.vision_transformer import VisionTransformer
    from torch import nn

    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok" \
            or getattr(visual, "final_ln_after_pool", False) or not hasattr(visual, "conv1"):
        raise ModelLoadError("only open_clip ViT towers with class-token pooling convert to a timm classifier")
    blocks = visual.transformer.resblocks
    width, first = visual.conv1.out_channels, blocks[0]
    gamma = getattr(first.ls_1, "gamma", None)
    model = VisionTransformer(
        img_size=visual.image_size, patch_size=visual.patch_size, num_classes=num_classes, global_pool="token",
        embed_dim=width, depth=len(blocks), num_heads=first.attn.num_heads,
        mlp_ratio=first.mlp.c_fc.out_features / width, qkv_bias=True, pre_norm=True, norm_layer=nn.LayerNorm,
        act_layer="quick_gelu" if type(first.mlp.gelu).__name__ == "QuickGELU" else "gelu",
        init_values=1.0 if gamma is not None else None)
    state = {"patch_embed.proj.weight": visual.conv1.weight, "cls_token": visual.class_embedding.reshape(1, 1, -1),
             "pos_embed": visual.positional_embedding.unsqueeze(0)}
    pairs = {"norm_pre": visual.ln_pre, "norm": visual.ln_post}
    for i, block in enumerate(blocks):
        state[f"blocks.{i}.attn.qkv.weight"] = block.attn.in_proj_weight
        state[f"blocks.{i}.attn.qkv.bias"] = block.attn.in_proj_bias
        pairs.update({f"blocks.{i}.norm1": block.ln_1, f"blocks.{i}.norm2": block.ln_2,
                      f"blocks.{i}.attn.proj": block.attn.out_proj, f"blocks.{i}.mlp.fc1": block.mlp.c_fc,
                      f"blocks.{i}.mlp.fc2": block.mlp.c_proj})
        if gamma is not None:
            state[f"blocks.{i}.ls1.gamma"], state[f"blocks.{i}.ls2.gamma"] = block.ls_1.gamma, block.ls_2.gamma
    for prefix, module in pairs.items():
        state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    head = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    missing = set(model.state_dict()) - set(state) - set(head)
    if missing:
        raise ModelLoadError(f"open_clip tower -> timm: no weights for {sorted(missing)[:4]}")
    model.load_state_dict({**state, **head})
    from .data.images import CLIP_MEAN, CLIP_STD

    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "mean": tuple(CLIP_MEAN),
                            "std": tuple(CLIP_STD), "input_size": (3, visual.image_size, visual.image_size)}
    return model


def load_classifier(name: str, pretrained: str | None, num_classes: int, device="cpu"):
    """A timm image classifier with a ``num_classes`` head, in eval mode on ``device``.

    ``name`` is ``timm:ARCH`` (any timm model name, with or without a pretrained tag) or
    ``timm:tiny`` (the built-in tiny CLIP's image tower, converted: ``vit_from_open_clip``).
    ``pretrained``: none / random (random weights), or a local checkpoint file, loaded strictly
    (``load_classifier_weights``; its classifier is dropped when its class count differs); never
    a download."""
    arch = str(name)[len(CLASSIFIER_PREFIX):]
    if arch in TINY_NAMES:
        own = pretrained if pretrained and Path(str(pretrained)).expanduser().is_file() else None
        return vit_from_open_clip(load_tiny_clip(own).visual, num_classes).to(device).eval()
    try:
        import timm
    except ImportError:  # pragma: no cover - timm comes with open_clip
        raise ModelLoadError(f"--model {name} needs timm (pip install timm)") from None
    if not timm.is_model(timm.models.get_arch_name(arch)):
        raise ModelLoadError(f"--model {name}: {arch!r} is not a timm model (timm.list_models('vit_*') lists them); "
                             "or use timm:tiny (built in)")
    try:
        model = timm.create_model(arch, num_classes=num_classes)
    except Exception as exc:  # a name timm knows but cannot build (a missing optional dependency, ...)
        raise ModelLoadError(f"could not build {arch}: {type(exc).__name__}: {exc}") from exc
    if pretrained not in RANDOM:
        load_classifier_weights(model, arch, pretrained)
    return model.to(device).eval()


def load_classifier_weights(model, arch: str, pretrained) -> None:
    """A local checkpoint into a timm classifier, strictly: timm's own reader (safetensors, torch
    files, nested 'state_dict' / 'model' keys) and the architecture's own checkpoint filter
    (position-embedding resampling, other layouts); the classifier is kept only when its shape
    fits the classes. Any other missing or unexpected weight is an error naming them (timm's own
    pretrained loading would warn and go on with random weights)."""
    import sys

    from timm.models import load_state_dict

    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"--pretrained {pretrained!r}: for a timm model give a local checkpoint file "
                             "(.safetensors, .pth, .bin) or none (random weights); fastdpl never downloads. "
                             "On a connected machine: timm.create_model(NAME, pretrained=True), then pass the "
                             "file from the Hugging Face cache")
    try:
        state = load_state_dict(str(path))
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        state = filter_fn(state, model) if filter_fn else state
    except Exception as exc:  # not a checkpoint, or one the filter cannot read
        raise ModelLoadError(f"--pretrained {path}: not a {arch} checkpoint ({type(exc).__name__}: {exc})") from exc
    head = (model.pretrained_cfg or {}).get("classifier", "head")
    own = model.state_dict()
    state = {k: v for k, v in state.items()
             if not (k.startswith(head + ".") and k in own and tuple(v.shape) != tuple(own[k].shape))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch outside the head
        raise ModelLoadError(f"--pretrained {path} does not fit {arch}: {exc}") from exc
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise ModelLoadError(f"--pretrained {path} does not fit {arch}: missing {missing[:4]}, "
                             f"unexpected {list(unexpected)[:4]} ({len(missing)} and {len(unexpected)} in all)")


def classifier_stats(model) -> tuple:
    """(mean, std) a timm classifier's images are normalised with (its pretrained config's)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_DEFAULT_MEAN)), tuple(cfg.get("std", IMAGENET_DEFAULT_STD))


def classifier_image_size(model) -> int:
    """The square input size a timm ViT classifier was built for."""
    size = model.patch_embed.img_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    if size[0] != size[1]:
        raise ModelLoadError(f"{type(model).__name__} expects {size[0]}x{size[1]} images; fastdpl's loaders make "
                             "square ones")
    return int(size[0])
