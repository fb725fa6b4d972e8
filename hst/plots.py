"""PNG figures: expert usage heatmaps (domain × expert per layer)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

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
