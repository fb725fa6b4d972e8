"""PNG figures: expert usage heatmaps (domain × expert per layer)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from hst.io import atomic_path  # noqa: E402


def usage_heatmap(layers: list[dict], path: str | Path, title: str) -> None:
    """One panel per layer: rows are domains (and 'all'), columns experts, colour = usage share."""
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.4), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        names = list(layer["domains"]) + ["all"]
        table = [layer["domains"][d]["usage"] for d in names[:-1]] + [layer["usage"]]
        im = ax.imshow(table, cmap="viridis", vmin=0, vmax=max(max(r) for r in table), aspect="auto")
        ax.set_title(f"layer {layer['layer']}  Eff_K {layer['eff_k']:.2f}", fontsize=9)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set_xticks(range(len(table[0])), range(len(table[0])), fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def forgetting_matrix(history: list[dict], path: str | Path, title: str) -> None:
    """Rows = checkpoints (pretrain, cycles), columns = domains in the order they were first evaluated;
    colour = relative BPB change against the domain's first row (red = worse), with the BPB written in
    each cell; blank before a domain was first evaluated."""
    domains = list(dict.fromkeys(d for row in history for d in row["bpb"]))
    base = {d: next(row["bpb"][d] for row in history if d in row["bpb"]) for d in domains}
    rel = np.array([[(row["bpb"][d] - base[d]) / base[d] if d in row["bpb"] else np.nan for d in domains]
                    for row in history])
    lim = max(0.05, float(np.nanmax(np.abs(rel))))
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2, 0.5 * len(history) + 1.6))
    im = ax.imshow(np.ma.masked_invalid(rel), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for i, row in enumerate(history):
        for j, d in enumerate(domains):
            if d in row["bpb"]:
                ax.text(j, i, f"{row['bpb'][d]:.2f}", ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(domains)), domains, fontsize=8, rotation=30)
    ax.set_yticks(range(len(history)), [r["name"] for r in history], fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046, label="BPB change vs. first evaluation")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
