"""Build the tiny CLIP checkpoint that ships in fastdpl/assets (used by ``fastdpl demo``).

    python scripts/make_tiny_clip.py --seed 0 --out fastdpl/assets/tiny_clip.pt

Trains fastdpl.synthetic's 4-block CLIP from scratch on procedurally generated
captioned images (reproducible from the seed; about 10 minutes on 2 CPU cores),
stores the weights in fp16 (under 10 MB), and prints its zero-shot accuracy on
the built-in digits test split.
"""
import argparse

import torch

from fastdpl import FastDPLPrompt, PromptConfig
from fastdpl.data import load_dataset
from fastdpl.data.images import clip_transform, open_image
from fastdpl.models import load_clip, save_tiny_clip
from fastdpl.synthetic import train_tiny_clip


def zero_shot_accuracy(path) -> float:
    model = load_clip("tiny", pretrained=str(path))
    splits = load_dataset("builtin:digits")
    dpl = FastDPLPrompt(model, splits.classnames, mode="fixed", config=PromptConfig.zero_shot(4),
                        template="a photo of the number {}.").eval()
    transform = clip_transform(32, train=False)
    images = torch.stack([transform(open_image(s.image)) for s in splits.test])
    labels = torch.tensor([s.label for s in splits.test])
    with torch.no_grad():
        return (dpl(images).argmax(1) == labels).float().mean().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="fastdpl/assets/tiny_clip.pt")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = train_tiny_clip(seed=args.seed, steps=args.steps, batch=args.batch)
    path = save_tiny_clip(model, args.out, seed=args.seed, steps=args.steps, batch=args.batch)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    print(f"zero-shot accuracy on builtin:digits test: {100 * zero_shot_accuracy(path):.1f}%")


if __name__ == "__main__":
    main()
