"""``dinocell preview``: look at the data the way the model will, before spending GPU hours.

Two grids are written:

* ``preview_scaling.png`` (fields) or ``preview_stain.png`` (RGB tiles): every channel before and
  after the per-channel percentile scaling (or Reinhard stain normalisation for RGB histology
  tiles) — a wrong percentile or an empty channel is obvious at a glance;
* ``preview_views.png``: what the network is trained on — global crop 1 (mean of the fluorescent
  channels), global crop 2 (one channel), the local crops (mean or one channel), with the iBOT masked
  patches shaded on the global crops — from :class:`~dinocell.data.views.MultiViewAugmentation` and
  :func:`~dinocell.data.masking.collate_multiview` with the run's config.

Input: a data source (``--dir``: folder, load_data file, ``s3://`` prefix or ``synthetic``) or a CSV
of tile paths (``--csv FILE --tile-col COL``, paths relative to the CSV).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinocell.config import Config
from dinocell.errors import DataError, UserError
from dinocell.evaluate.plots import new_figure, save_figure

MAX_VIEW_ROWS = 4


def _stretch(x: np.ndarray) -> np.ndarray:
    """Linear min-max display of a raw plane (what an unscaled image looks like, outliers included)."""
    x = x.astype(np.float32)
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def before_after_figure(pairs: Sequence[tuple[np.ndarray, np.ndarray]], names: Sequence[str],
                        row_labels: Sequence[str], before: str, after: str, rgb: bool = False) -> Any:
    """One row per image: for each channel ``before | after`` (or the RGB tile before | after)."""
    cols = 2 if rgb else 2 * len(names)
    cell = 1.35
    fig = new_figure(cell * cols + 0.4, cell * len(pairs) + 0.6)
    axes = fig.subplots(len(pairs), cols, squeeze=False)
    for r, (raw, done) in enumerate(pairs):
        if rgb:
            panels = [(np.moveaxis(_stretch(raw) if raw.dtype != np.float32 else raw, 0, -1), f"{before}"),
                      (np.moveaxis(done, 0, -1), f"{after}")]
        else:
            panels = []
            for c, n in enumerate(names):
                panels.append((_stretch(raw[c]), f"{n} {before}\n[{int(raw[c].min())}, {int(raw[c].max())}]"))
                panels.append((done[c], f"{n} {after}"))
        for j, (img, title) in enumerate(panels):
            ax = axes[r, j]
            ax.imshow(np.clip(img, 0, 1), cmap=None if rgb else "gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 or not rgb:
                ax.set_title(title, fontsize=6)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=7)
    fig.tight_layout()
    return fig


def views_figure(batch: dict[str, Any], n_samples: int, names: Sequence[str], patch_size: int,
                 row_labels: Sequence[str]) -> Any:
    """Rows = samples; columns = global 1, global 2, local crops; masked patches shaded red."""
    g = batch["global_crops"]
    loc = batch["local_crops"]
    n_local = loc.shape[0] // max(n_samples, 1) if loc.numel() else 0
    masks = batch["masks"]
    cols = 2 + n_local
    fig = new_figure(1.4 * cols + 0.4, 1.55 * n_samples + 0.5)
    axes = fig.subplots(n_samples, cols, squeeze=False)

    def name(ch: int) -> str:
        return "mean" if ch < 0 else names[ch]

    for b in range(n_samples):
        for k in range(2):
            i = k * n_samples + b
            ax = axes[b, k]
            img = g[i, 0].numpy()
            ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            m = masks[i].reshape(img.shape[0] // patch_size, img.shape[1] // patch_size).numpy()
            if m.any():
                over = np.zeros((*img.shape, 4), dtype=np.float32)
                over[..., 0] = 1.0
                over[..., 3] = 0.45 * np.kron(m, np.ones((patch_size, patch_size)))
                ax.imshow(over, interpolation="nearest")
            ax.set_title(f"global {k + 1}: {name(int(batch['global_channels'][i]))}"
                         + (f"\n{int(m.sum())} masked" if m.any() else "\n "), fontsize=6)
        for j in range(n_local):
            i = j * n_samples + b
            ax = axes[b, 2 + j]
            ax.imshow(loc[i, 0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"local {j + 1}: {name(int(batch['local_channels'][i]))}\n ", fontsize=6)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
        axes[b, 0].set_ylabel(row_labels[b], fontsize=7)
    fig.suptitle("what the model sees (red: iBOT-masked patches)", fontsize=8)
    fig.tight_layout()
    return fig


def _views_batch(fields: Sequence[torch.Tensor], fluorescent: Sequence[bool], cfg: Config, seed: int) -> dict[str, Any]:
    from dinocell.data.masking import collate_multiview
    from dinocell.data.views import MultiViewAugmentation

    aug = MultiViewAugmentation(cfg.data.views, fluorescent)
    samples = [aug(f, generator=torch.Generator().manual_seed(seed + i)) for i, f in enumerate(fields)]
    return collate_multiview(samples, cfg.data.mask, cfg.model.patch_size, rng=seed)


def tile_paths(csv: str | os.PathLike[str], column: str) -> list[str]:
    """Image paths from a CSV column (relative paths are relative to the CSV's folder)."""
    import pandas as pd

    p = Path(csv)
    if not p.is_file():
        raise DataError(f"CSV not found: {p}")
    df = pd.read_csv(p)
    if column not in df.columns:
        raise DataError(f"CSV {p} has no column '{column}'; columns: {', '.join(map(str, df.columns))}")
    return [str(q if Path(q).is_absolute() else p.parent / q) for q in df[column].dropna().astype(str)]


def preview(
    cfg: Config,
    out_dir: str | os.PathLike[str],
    source: str | None = None,
    csv: str | None = None,
    tile_col: str | None = None,
    n: int = 12,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the preview grids; returns ``{"files": [...], "n": ..., "skipped": [...]}``."""
    from dinocell.evaluate.heldout import spread_indices

    if (source is None) == (csv is None):
        raise UserError("give either --dir (a data source) or --csv with --tile-col")
    if n < 1:
        raise UserError("--n must be >= 1")
    out = Path(out_dir)
    files: list[str] = []
    skipped: list[str] = []
    pairs: list[tuple[np.ndarray, np.ndarray]] = []
    labels: list[str] = []
    if csv is not None:
        from dinocell.data.decode import scale_field
        from dinocell.evaluate.run import read_multichannel
        from dinocell.stain import StainNormalizer

        if not tile_col:
            raise UserError("--csv needs --tile-col (the column holding the tile paths)")
        paths = tile_paths(csv, tile_col)
        if not paths:
            raise DataError(f"CSV {csv} lists no tiles in column '{tile_col}'")
        rgb = None
        for i in spread_indices(len(paths), n):
            try:
                raw = read_multichannel(paths[int(i)])
            except DataError as e:
                skipped.append(str(e))
                continue
            is_rgb = raw.shape[0] == 3 and raw.dtype == np.uint8
            rgb = is_rgb if rgb is None else rgb
            if is_rgb != rgb:
                skipped.append(f"{paths[int(i)]}: mixes RGB and non-RGB tiles")
                continue
            if rgb:
                stain = StainNormalizer(dataclasses.replace(cfg.data.stain, use_stain_norm=True))
                done = np.asarray(stain(raw.astype(np.float32) / 255.0), dtype=np.float32)
            else:
                done = scale_field(raw, cfg.data.scaling)
            pairs.append((raw, done))
            labels.append(Path(paths[int(i)]).name[:24])
        if not pairs:
            raise DataError(f"no readable tile in {csv}" + (f" (first problem: {skipped[0]})" if skipped else ""))
        n_ch = pairs[0][1].shape[0]
        names = ["R", "G", "B"] if rgb else [f"ch{c}" for c in range(n_ch)]
        fluorescent = [True] * n_ch
        kind = "stain" if rgb else "scaling"
        fig = before_after_figure(pairs, names, labels, "raw", "stain-normalised" if rgb else "scaled", rgb=bool(rgb))
    else:
        from dinocell.data.sources import open_source

        src = open_source(cfg.data, source)
        for i in spread_indices(len(src.records), n):
            rec = src.records[int(i)]
            try:
                raw = src.load_raw(rec)
                done = src.load(rec)
            except DataError as e:
                skipped.append(f"{rec.key}: {e}")
                continue
            pairs.append((raw, done))
            labels.append(rec.key)
        if not pairs:
            raise DataError(f"no readable field in {source}" + (f" (first problem: {skipped[0]})" if skipped else ""))
        names, fluorescent, kind = list(src.channels), list(src.fluorescent), "scaling"
        fig = before_after_figure(pairs, names, labels, "raw", "scaled")
    path = out / f"preview_{kind}.png"
    save_figure(fig, path)
    files.append(str(path))

    k = min(len(pairs), MAX_VIEW_ROWS)
    fields = [torch.from_numpy(np.ascontiguousarray(d, dtype=np.float32)) for _, d in pairs[:k]]
    batch = _views_batch(fields, fluorescent, cfg, seed)
    fig = views_figure(batch, k, names, cfg.model.patch_size, labels[:k])
    path = out / "preview_views.png"
    save_figure(fig, path)
    files.append(str(path))
    return {"files": files, "n": len(pairs), "skipped": skipped}


__all__ = ["before_after_figure", "preview", "tile_paths", "views_figure"]
