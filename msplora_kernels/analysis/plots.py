"""Figures of the analysis (matplotlib, written as PNG): labelled axes, titles, colorbars."""
from __future__ import annotations

from pathlib import Path

import torch

from .._extras import require


def _plt():
    matplotlib = require("matplotlib", "the analysis figures")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return Path(path)


def effective_rank_plot(metrics: dict, path) -> Path:
    """M_eff-k against k, averaged per level (paper eq. 8)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in metrics["levels"]:
        curve = row["mean_effective_rank_space"]
        if curve:
            groups = row["groups"] if row["groups"] is not None else "per layer"
            ax.plot(range(1, len(curve) + 1), curve, marker="o",
                    label=f"level {row['level']} (rank {row['rank']}, groups {groups})")
    ax.set_xlabel("k (number of singular values)")
    ax.set_ylabel("M_eff-k = sum of top-k / sum of all")
    ax.set_ylim(0, 1.05)
    ax.set_title("Effective rank space per level")
    ax.legend(fontsize=8)
    return _save(fig, path)


def kl_heatmaps(metrics: dict, path) -> Path:
    """Per target: MSPLoRA's layer-specific KL matrix, and with a LoRA baseline its matrix and the difference."""
    plt = _plt()
    targets = sorted(metrics["layer_kl"])
    cols = ["layer_kl"] + (["lora_layer_kl", "kl_difference"] if "kl_difference" in metrics else [])
    titles = {"layer_kl": "MSPLoRA layer-specific", "lora_layer_kl": "LoRA", "kl_difference": "MSPLoRA - LoRA"}
    fig, axes = plt.subplots(len(targets), len(cols), figsize=(4.2 * len(cols), 3.6 * len(targets)), squeeze=False)
    for r, target in enumerate(targets):
        for c, key in enumerate(cols):
            ax = axes[r][c]
            entry = metrics[key].get(target)
            if entry is None:
                ax.axis("off")
                continue
            mat = torch.tensor(entry["kl_difference" if key == "kl_difference" else "kl"])
            if key == "kl_difference":
                lim = float(mat.abs().max()) or 1.0
                im = ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim)
            else:
                im = ax.imshow(mat, cmap="viridis")
            ax.set_xlabel("layer j")
            ax.set_ylabel("layer i")
            ax.set_xticks(range(len(entry["layers"])), entry["layers"], fontsize=7)
            ax.set_yticks(range(len(entry["layers"])), entry["layers"], fontsize=7)
            ax.set_title(f"{target}: {titles[key]} KL(p_i || p_j)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="KL divergence")
    return _save(fig, path)


def spectra_over_time(recorder, path) -> Path:
    """One heatmap per level: singular-value magnitude (mean over the level's factors) against step."""
    plt = _plt()
    levels = recorder.levels()
    fig, axes = plt.subplots(1, len(levels), figsize=(4.5 * len(levels), 3.6), squeeze=False)
    for ax, level in zip(axes[0], levels):
        mat = recorder.level_matrix(level)
        im = ax.imshow(mat, aspect="auto", cmap="magma", origin="upper",
                       extent=[recorder.steps[0], recorder.steps[-1], mat.shape[0] + 0.5, 0.5])
        ax.set_xlabel("training step")
        ax.set_ylabel("singular value index")
        ax.set_title(f"level {level}: top-{recorder.top_k} singular values")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="magnitude")
    return _save(fig, path)
