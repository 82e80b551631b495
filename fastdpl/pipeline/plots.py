"""PNG figures of the search: the final softmax(alpha) per tower and block, and its evolution over epochs."""
from __future__ import annotations

from pathlib import Path

from ..atomic import savefig_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_alpha_heatmap(dpl, path: Path) -> Path:
    """One panel per tower: rows are blocks, columns candidate lengths, colour softmax(alpha); argmax boxed."""
    import torch

    plt = _pyplot()
    towers = list(dpl.arch_logits)
    fig, axes = plt.subplots(1, len(towers), figsize=(4 * len(towers), 4.5), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        weights = torch.softmax(dpl.arch_logits[tower].detach().float().cpu(), -1).numpy()
        image = ax.imshow(weights, cmap="viridis", aspect="auto", vmin=0, vmax=max(weights.max(), 1e-6))
        for block, column in enumerate(weights.argmax(1)):
            ax.add_patch(plt.Rectangle((column - 0.5, block - 0.5), 1, 1, fill=False, edgecolor="red", lw=1.5))
        ax.set_xticks(range(len(dpl.candidate_lengths)), [str(n) for n in dpl.candidate_lengths])
        ax.set_yticks(range(weights.shape[0]))
        ax.set_xlabel("prompt length")
        ax.set_ylabel("block")
        ax.set_title(f"{tower} tower: softmax(alpha)")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_alpha_evolution(history: list, candidate_lengths, path: Path) -> Path:
    """Per tower, each block's expected prompt length sum_n n * softmax(alpha)_n over the epochs."""
    plt = _pyplot()
    if not history:
        raise ValueError("no epochs in the alpha history to plot")
    towers = list(history[0]["alpha"])
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(towers), figsize=(5 * len(towers), 4), squeeze=False)
    for ax, tower in zip(axes[0], towers):
        blocks = len(history[0]["alpha"][tower])
        for block in range(blocks):
            expected = [sum(n * w for n, w in zip(candidate_lengths, h["alpha"][tower][block])) for h in history]
            ax.plot(epochs, expected, label=f"block {block}", color=plt.cm.viridis(block / max(blocks - 1, 1)))
        ax.set_xlabel("epoch")
        ax.set_ylabel("expected prompt length")
        ax.set_title(f"{tower} tower")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    savefig_atomic(fig, path, dpi=110)
    plt.close(fig)
    return Path(path)
