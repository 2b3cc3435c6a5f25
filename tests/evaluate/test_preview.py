"""``preview``: grids decode, have the expected layout and are not blank."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinocell.config import load_config
from dinocell.errors import DataError, UserError
from dinocell.evaluate.preview import preview

CFG = ["data.synthetic.n_fields=8", "data.synthetic.size=48", "data.views.global_crop_size=32",
       "data.views.local_crop_size=16", "data.views.n_local_crops=3", "model.patch_size=8"]


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_preview_synthetic_fields(tmp_path: Path) -> None:
    info = preview(load_config(None, CFG), tmp_path, source="synthetic", n=3)
    assert info["n"] == 3 and [Path(f).name for f in info["files"]] == ["preview_scaling.png", "preview_views.png"]
    scaling = _png(tmp_path / "preview_scaling.png")
    # 3 rows x (5 channels x raw/scaled) at 1.35 inch, 100 dpi
    assert scaling.shape[:2] == (round(100 * (1.35 * 3 + 0.6)), round(100 * (1.35 * 10 + 0.4)))
    assert scaling[..., :3].std() > 0.05
    views = _png(tmp_path / "preview_views.png")
    # 3 samples x (2 global + 3 local crops)
    assert views.shape[:2] == (round(100 * (1.55 * 3 + 0.5)), round(100 * (1.4 * 5 + 0.4)))
    assert views[..., :3].std() > 0.05
    # masked patches are drawn in red: some pixels have a strong red excess
    rgb = views[..., :3]
    assert ((rgb[..., 0] - rgb[..., 1]) > 0.3).sum() > 100


def test_preview_rgb_tiles_from_csv(tmp_path: Path) -> None:
    import cv2

    rng = np.random.default_rng(0)
    names = []
    for i in range(4):
        tile = rng.integers(0, 255, size=(40, 40, 3)).astype(np.uint8)
        tile[..., 0] = 200  # strong colour cast
        cv2.imwrite(str(tmp_path / f"t{i}.png"), tile)
        names.append(f"t{i}.png")
    pd.DataFrame({"tile": names, "other": range(4)}).to_csv(tmp_path / "tiles.csv", index=False)
    info = preview(load_config(None, CFG), tmp_path / "out", csv=str(tmp_path / "tiles.csv"), tile_col="tile", n=2)
    assert [Path(f).name for f in info["files"]] == ["preview_stain.png", "preview_views.png"]
    stain = _png(tmp_path / "out" / "preview_stain.png")
    assert stain.shape[:2] == (round(100 * (1.35 * 2 + 0.6)), round(100 * (1.35 * 2 + 0.4)))
    assert stain[..., :3].std() > 0.05
    with pytest.raises(DataError, match="no column 'path'"):
        preview(load_config(None, CFG), tmp_path / "out", csv=str(tmp_path / "tiles.csv"), tile_col="path")


def test_preview_argument_errors(tmp_path: Path) -> None:
    cfg = load_config(None, CFG)
    with pytest.raises(UserError, match="either --dir"):
        preview(cfg, tmp_path)
    with pytest.raises(UserError, match="--tile-col"):
        preview(cfg, tmp_path, csv="x.csv")
    with pytest.raises(DataError, match="path not found"):
        preview(cfg, tmp_path, source=str(tmp_path / "nope"))
