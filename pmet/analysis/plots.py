"""PNG figures (matplotlib, Agg backend): Figure 2 (component similarities) and Figure 4 (‖Δ‖ per layer)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

from ..fileio import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

COLORS = {"mhsa": "tab:orange", "ffn": "tab:blue"}
LABELS = {"mhsa": "MHSA: $h^{l-1}$ vs $a^l$", "ffn": "FFN: FFN input vs $m^l$"}


def _save(fig, path: Path, dpi: int) -> Path:
    """Write the figure atomically (temp file in the same folder, then rename)."""
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png", bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_components(summary: dict, path: str | os.PathLike, *, title: str = "", dpi: int = 110) -> Path:
    """Figure 2: mean cosine (left) and top-k Jaccard (right) per layer for MHSA and FFN, ±1 std shaded."""
    layers = summary["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, ylabel in ((axes[0], "cosine", "cosine similarity"),
                               (axes[1], "jaccard", f"Jaccard similarity (top-{summary.get('top_k', 50)})")):
        for comp in ("mhsa", "ffn"):
            mean = summary[comp][metric]
            std = summary[comp]["std"][metric]
            ax.plot(layers, mean, marker="o", markersize=3, color=COLORS[comp], label=LABELS[comp])
            ax.fill_between(layers, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)], color=COLORS[comp], alpha=0.15,
                            linewidth=0)
        ax.set_xlabel("layer l")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if metric == "jaccard":
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(title or f"Hidden-state change through MHSA and FFN (last token, {summary['n_facts']} facts)",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path), dpi)


def plot_deltas(lines: dict[str, tuple[list[int], list[float]]], path: str | os.PathLike, *, title: str = "",
                dpi: int = 110) -> Path:
    """Figure 4: ‖Δ‖_F per layer, one line per input (and per edited matrix kind)."""
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, (xs, ys) in lines.items():
        ax.plot(xs, ys, marker="o", markersize=4, label=name)
    ax.set_xlabel("layer l")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(r"$\|\Delta\|_F$")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "Norm of the incremental weight Δ per layer", fontsize=10)
    fig.tight_layout()
    return _save(fig, Path(path), dpi)
