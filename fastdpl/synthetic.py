"""The built-in tiny CLIP: procedurally generated captioned images and its contrastive training.

``fastdpl demo`` needs a CLIP that runs offline on a laptop CPU. This module
makes one from scratch, reproducibly from a seed: it renders small captioned
images (numerals in assorted fonts sizes, colours, rotations and blur, and
coloured geometric shapes), and trains a 3-block open_clip CLIP on them with a
contrastive loss. ``scripts/make_tiny_clip.py`` runs it and writes the
checkpoint that ships in ``fastdpl/assets``.

The captions name what is drawn ("a photo of the number seven.", "a red
circle."), so the model has a zero-shot ability on real digits that is far from
perfect: a realistic starting point for prompt learning.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter, ImageFont

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = {"black": (20, 20, 20), "red": (200, 30, 30), "green": (30, 150, 40), "blue": (30, 60, 200),
           "purple": (120, 40, 160), "orange": (230, 120, 20)}
SHAPES = ["circle", "square", "triangle", "cross", "line"]
DIGIT_TEMPLATES = ["a photo of the number {}.", "a drawing of the number {}.", "the digit {}.",
                   "a {colour} number {}.", "a blurry photo of the number {}.", "a handwritten {}."]
SHAPE_TEMPLATES = ["a photo of a {colour} {}.", "a {colour} {}.", "a drawing of a {}."]
IMAGE_SIZE = 32
CONTEXT_LENGTH = 16
MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "patch_size": 8, "width": 96, "head_width": 32, "layers": 4},
    "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": 49408, "width": 48, "heads": 3, "layers": 4},
}


def build_tiny_clip(seed: int = 0):
    """The tiny CLIP's architecture (random weights from ``seed``)."""
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(seed)
        return open_clip.CLIP(embed_dim=MODEL_CONFIG["embed_dim"],
                              vision_cfg=CLIPVisionCfg(**MODEL_CONFIG["vision_cfg"]),
                              text_cfg=CLIPTextCfg(**MODEL_CONFIG["text_cfg"]))


def _draw_digit(rng: random.Random, digit: int, colour) -> Image.Image:
    size = 96
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=rng.randint(48, 84))
    # Stroke width stands in for pen thickness; position jitter for sloppy framing.
    draw.text((size / 2 + rng.uniform(-10, 10), size / 2 + rng.uniform(-10, 10)), str(digit), fill=colour,
              font=font, anchor="mm", stroke_width=rng.randint(0, 5), stroke_fill=colour)
    img = img.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, fillcolor=(255, 255, 255))
    if rng.random() < 0.5:  # low resolution scans: down to 8..16 px and back
        low = rng.randint(8, 16)
        img = img.resize((low, low), Image.BILINEAR).resize((size, size), Image.BILINEAR)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 2.5)))


def _draw_shape(rng: random.Random, shape: str, colour) -> Image.Image:
    size = 96
    img = Image.new("RGB", (size, size), tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    c, r = (size / 2 + rng.uniform(-12, 12), size / 2 + rng.uniform(-12, 12)), rng.uniform(18, 36)
    box = [c[0] - r, c[1] - r, c[0] + r, c[1] + r]
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "triangle":
        draw.polygon([(c[0], c[1] - r), (c[0] - r, c[1] + r), (c[0] + r, c[1] + r)], fill=colour)
    elif shape == "cross":
        w = r / 3
        draw.rectangle([c[0] - w, c[1] - r, c[0] + w, c[1] + r], fill=colour)
        draw.rectangle([c[0] - r, c[1] - w, c[0] + r, c[1] + w], fill=colour)
    else:
        angle = rng.uniform(0, math.pi)
        dx, dy = r * math.cos(angle), r * math.sin(angle)
        draw.line([(c[0] - dx, c[1] - dy), (c[0] + dx, c[1] + dy)], fill=colour, width=rng.randint(4, 10))
    return img


def captioned_image(rng: random.Random) -> tuple[Image.Image, str]:
    """One procedurally generated (image, caption) pair; 80% numerals, 20% shapes."""
    colour_name = rng.choice(list(COLOURS))
    if rng.random() < 0.8:
        digit = rng.randrange(10)
        colour_name = colour_name if rng.random() < 0.5 else "black"
        image = _draw_digit(rng, digit, COLOURS[colour_name])
        caption = rng.choice(DIGIT_TEMPLATES).format(DIGIT_WORDS[digit], colour=colour_name)
    else:
        shape = rng.choice(SHAPES)
        image = _draw_shape(rng, shape, COLOURS[colour_name])
        caption = rng.choice(SHAPE_TEMPLATES).format(shape, colour=colour_name)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC), caption


def make_corpus(count: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` images as a uint8 tensor (count, 3, 32, 32) and their captions."""
    rng = random.Random(seed)
    pairs = [captioned_image(rng) for _ in range(count)]
    images = torch.from_numpy(np.stack([np.asarray(img) for img, _ in pairs])).permute(0, 3, 1, 2).contiguous()
    return images, [caption for _, caption in pairs]


def _normalise(images_uint8: torch.Tensor) -> torch.Tensor:
    from .data.images import CLIP_MEAN, CLIP_STD

    x = images_uint8.float() / 255
    return (x - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def contrastive_loss(image_features, text_features, logit_scale, caption_ids):
    """CLIP's symmetric cross-entropy; identical captions in a batch all count as positives."""
    image_features = F.normalize(image_features, dim=-1)
    text_features = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image_features @ text_features.T
    same = (caption_ids[:, None] == caption_ids[None, :]).float()
    targets = same / same.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def train_tiny_clip(seed: int = 0, steps: int = 1500, batch: int = 256, corpus: int = 24000, progress=True):
    """Train the tiny CLIP from scratch on the procedural corpus; returns the model (eval mode)."""
    import open_clip
    from tqdm import tqdm

    images, captions = make_corpus(corpus, seed)
    tokens = open_clip.tokenize(captions, context_length=CONTEXT_LENGTH)
    _, caption_ids = torch.unique(tokens, dim=0, return_inverse=True)
    model = build_tiny_clip(seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc="tiny CLIP", disable=None if progress else True)  # None: no bar off a terminal
    for _ in bar:
        index = torch.randint(len(captions), (batch,), generator=generator)
        x = images[index]
        if torch.rand((), generator=generator) < 0.5:  # random shifts of up to 3 px
            shift = torch.randint(-3, 4, (2,), generator=generator).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
        loss = contrastive_loss(model.encode_image(_normalise(x)), model.encode_text(tokens[index]),
                                model.logit_scale, caption_ids[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()
