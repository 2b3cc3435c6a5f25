"""Shared figures: PCA recovers the dominant axis; figures decode and are not blank."""

from __future__ import annotations

import numpy as np

from dinocell.evaluate import plots


def test_pca_2d_recovers_dominant_axis() -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(-5, 5, 50)
    x = np.stack([t, 0.1 * rng.standard_normal(50), 0.01 * rng.standard_normal(50)], 1)
    p = plots.pca_2d(x)
    assert p.shape == (50, 2)
    assert abs(np.corrcoef(p[:, 0], t)[0, 1]) > 0.999
    assert np.allclose(plots.pca_2d(x[:1]), 0)


def _decode(path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_figures_render_to_non_blank_pngs(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.random((2, 32, 32))
    maps = rng.random((2, 3, 4, 4))
    grid = [[None, maps[0, 0], maps[0, 1]], [None, maps[1, 0], maps[1, 2]]]
    fig = plots.overlay_figure(np.repeat(images[:, None], 3, 1), grid, ["a", "b"], ["in", "h0", "h1"], title="t")
    plots.save_figure(fig, tmp_path / "att.png")
    img = _decode(tmp_path / "att.png")
    w_in, h_in = fig.get_size_inches() * fig.dpi
    assert img.shape[:2] == (round(h_in), round(w_in))
    assert img[..., :3].std() > 0.05

    fig = plots.matrix_figure(np.array([[1.0, 0.5], [0.5, 1.0]]), ["DNA", "ER"], "consistency")
    plots.save_figure(fig, tmp_path / "m.png")
    assert _decode(tmp_path / "m.png")[..., :3].std() > 0.05
    arr = plots.figure_to_array(fig)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3

    pts = rng.standard_normal((20, 2))
    fig = plots.pca_figure(pts, {"channel": ["DNA", "ER"] * 10, "label": [0, 1, 2, 3] * 5})
    plots.save_figure(fig, tmp_path / "p.png")
    assert _decode(tmp_path / "p.png")[..., :3].std() > 0.05
    assert not list(tmp_path.glob("*.tmp*"))
