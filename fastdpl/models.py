"""Loading CLIP backbones: open_clip names and tags, local files, the HF cache, and the built-in tiny CLIP.

``load_clip(name, pretrained)``:

* ``name`` a folder holding a Hugging Face transformers CLIP (``save_pretrained``:
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
    """A Hugging Face transformers CLIP saved in ``folder`` (save_pretrained: config.json and weights)."""
    import json

    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(f"{folder} is a Hugging Face model folder: install transformers "
                             "(pip install 'fastdpl[hf]')") from exc
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind != "clip":
        raise ModelLoadError(f"{folder}: model_type {kind!r} is not supported (fastdpl loads 'clip' folders)")
    return transformers.CLIPModel.from_pretrained(folder).to(device).eval()


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
