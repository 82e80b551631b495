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
