"""Figures shared by training diagnostics and evaluation: attention overlays, PCA scatter, heatmaps.

A leaf module (numpy + matplotlib's Agg backend, no torch): :mod:`dinocell.track.callbacks` draws its
training figures with it and :mod:`dinocell.evaluate` its evaluation figures, so neither package has
to import the other for plotting.  Figures are built without pyplot (no global state, thread-safe).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pca_2d(x: np.ndarray) -> np.ndarray:
    """Project rows of ``x`` (N, D) onto their first two principal components (N, 2), via SVD.

    The sign of each component is fixed (largest |loading| positive) so figures do not flip between
    steps.  Fewer than 2 samples or dimensions give zero-padded output.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    out = np.zeros((n, 2))
    if n < 2:
        return out
    xc = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(2, vt.shape[0])
    comps = vt[:k]
    signs = np.sign(comps[np.arange(k), np.abs(comps).argmax(1)])
    signs[signs == 0] = 1
    out[:, :k] = xc @ (comps * signs[:, None]).T
    return out


# --------------------------------------------------------------------------------------------------
# Figures (matplotlib, Agg)
# --------------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    """A Figure not attached to pyplot (no global state, thread-safe, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _upsample(m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling of a patch map to the image size (patch boundaries stay visible)."""
    ry, rx = shape[0] // m.shape[0], shape[1] // m.shape[1]
    return np.kron(m, np.ones((max(ry, 1), max(rx, 1))))[: shape[0], : shape[1]]


def _norm01(m: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(m)), float(np.max(m))
    return (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)


def overlay_figure(
    images: np.ndarray,
    maps: Sequence[Sequence[np.ndarray | None]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str | None = None,
    cell: float = 1.5,
) -> Figure:
    """Grid of attention overlays: ``images[r][k]`` (H, W) in [0, 1] under ``maps[r][k]`` (h, w).

    A ``None`` map shows the plain input.  Each map is min-max normalised on its own (the shape of the
    attention matters here, not its scale) and upsampled by nearest neighbour, so patch boundaries
    stay visible.
    """
    rows, cols = len(maps), len(maps[0]) if len(maps) else 0
    fig = new_figure(cell * cols + 0.4, cell * rows + (0.5 if title else 0.1))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            img = np.asarray(images[i][j], dtype=np.float32)
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            m = maps[i][j]
            if m is not None:
                ax.imshow(_norm01(_upsample(np.asarray(m, dtype=np.float64), img.shape)), cmap="inferno",
                          alpha=0.55, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and j < len(col_labels):
                ax.set_title(col_labels[j], fontsize=8)
        if i < len(row_labels):
            axes[i, 0].set_ylabel(row_labels[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def _palette(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(max(n, 1))]


def pca_figure(
    points: np.ndarray,
    colourings: dict[str, Sequence[Any]],
    title: str | None = None,
) -> Figure:
    """2-D scatter of ``points`` (N, 2), one panel per colouring (e.g. channel, label, plate)."""
    panels = list(colourings.items())
    fig = new_figure(3.6 * len(panels), 3.4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, values) in zip(axes, panels, strict=True):
        vals = [str(v) for v in values]
        cats = list(dict.fromkeys(vals))  # order of first appearance (channel order) ...
        if all(c.lstrip("-").isdigit() for c in cats):
            cats.sort(key=int)  # ... except numeric labels
        colours = _palette(len(cats))
        for c, cat in enumerate(cats):
            sel = np.array([v == cat for v in vals])
            ax.scatter(points[sel, 0], points[sel, 1], s=12, color=colours[c], label=cat, alpha=0.8,
                       edgecolors="none")
        ax.set_title(f"by {name}", fontsize=9)
        ax.set_xlabel("PC 1", fontsize=8)
        ax.set_ylabel("PC 2", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(cats) <= 12:
            ax.legend(fontsize=6, markerscale=0.8, loc="best", frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def matrix_figure(matrix: np.ndarray, labels: Sequence[str], title: str, vmin: float = -1.0,
                  vmax: float = 1.0, fmt: str = "{:.2f}", xlabel: str | None = None,
                  ylabel: str | None = None) -> Figure:
    """A C×C heatmap (e.g. channel-consistency cosines) with each value written in its cell."""
    m = np.asarray(matrix, dtype=np.float64)
    n = m.shape[0]
    size = max(3.0, 0.55 * n + 1.6)
    fig = new_figure(size + 0.6, size)
    ax = fig.subplots()
    im = ax.imshow(m, cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    span = vmax - vmin if vmax > vmin else 1.0
    for i in range(n):
        for j in range(m.shape[1]):
            v = m[i, j]
            if math.isnan(v):
                continue
            dark = (v - vmin) / span < 0.6
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=8)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> None:
    """Write ``fig`` as PNG atomically (temp name, then rename)."""
    from dinocell.paths import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png"))


def figure_to_array(fig: Figure) -> np.ndarray:
    """The rendered figure as an (H, W, 3) uint8 array (for TensorBoard ``add_image``)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


__all__ = [
    "figure_to_array",
    "matrix_figure",
    "new_figure",
    "overlay_figure",
    "pca_2d",
    "pca_figure",
    "save_figure",
]
