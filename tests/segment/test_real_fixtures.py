"""Real annotated fixtures: CellProfiler outlines filled into labels, the DSB 2018 nuclei, loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dinocell.errors import DataError
from dinocell.segment.fixtures import load_dsb2018, load_pediatric_site
from dinocell.segment.outlines import labels_from_outlines


def test_labels_from_outlines_synthetic_rings() -> None:
    from skimage.segmentation import find_boundaries

    truth = np.zeros((60, 80), dtype=np.int32)
    truth[5:25, 5:25] = 1
    truth[5:25, 25:45] = 2  # touches object 1
    truth[35:55, 50:75] = 3
    rgb = np.zeros((*truth.shape, 3), dtype=np.uint16)
    rgb[..., 1][find_boundaries(truth, mode="inner")] = 32896
    labels = labels_from_outlines(rgb)
    assert labels.dtype == np.int32 and labels.max() == 3
    for k in (1, 2, 3):  # every object comes back whole (interior + its own outline)
        got = np.unique(labels[truth == k])
        assert got.size == 1 and got[0] > 0
        assert (labels == got[0]).sum() == (truth == k).sum()
    assert labels_from_outlines(rgb[..., 1]).max() == 3  # gray works too
    assert labels_from_outlines(np.zeros((8, 8))).max() == 0


def test_pediatric_site_counts(pediatric_site: Path) -> None:
    images, nuclei, cells = load_pediatric_site(pediatric_site)
    assert set(images) == {"Brightfield", "ER", "AGP", "Mito", "DNA", "RNA"}
    assert all(v.shape == (1080, 1080) and v.dtype == np.uint16 for v in images.values())
    assert nuclei.shape == cells.shape == (1080, 1080) and nuclei.dtype == np.int32
    assert 33 <= nuclei.max() <= 41  # README: ~37 nuclei
    assert 27 <= cells.max() <= 45  # ~43 regions, of which ~12 are slivers < 20 px
    # nuclei lie inside cells (cells cut by the image edge have open outlines and are lost)
    assert (cells[nuclei > 0] > 0).mean() > 0.7
    import tifffile

    raw = tifffile.imread(pediatric_site / "outlines" / "CellsOutlines_BR00143976_C03_3.tiff")
    assert 40 <= labels_from_outlines(raw, min_size=1).max() <= 46  # every closed region, as the README counts


def test_pediatric_site_from_parent_folder(pediatric_site: Path) -> None:
    _, nuclei, _ = load_pediatric_site(pediatric_site.parent)
    assert nuclei.max() > 30


def test_dsb2018(dsb2018_nuclei: Path) -> None:
    image, labels = load_dsb2018(dsb2018_nuclei)
    assert image.shape == labels.shape == (512, 512) and labels.dtype == np.int32
    assert len(np.unique(labels)) - 1 == 125


def test_missing_fixture_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="fixture folder not found"):
        load_dsb2018(tmp_path / "nowhere")


def test_fixture_files_go_through_the_one_image_reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tifffile

    import dinocell.data.decode as D

    folder = tmp_path / "dsb2018_nuclei"
    folder.mkdir()
    image = (np.arange(32 * 32) % 4000).astype(np.uint16).reshape(32, 32)
    labels = np.zeros((32, 32), np.uint16)
    labels[4:12, 4:12], labels[20:28, 18:30] = 1, 2
    tifffile.imwrite(folder / "img2d.tif", image)
    tifffile.imwrite(folder / "mask2d.tif", labels)
    read: list[str] = []
    real = D.decode_image

    def spy(src, *args, **kwargs):
        read.append(Path(src).name)
        return real(src, *args, **kwargs)

    monkeypatch.setattr(D, "decode_image", spy)
    import dinocell.segment.fixtures as F

    monkeypatch.setattr(F, "decode_image", spy)  # the name fixtures imported
    got_image, got_labels = load_dsb2018(tmp_path)
    assert sorted(read) == ["img2d.tif", "mask2d.tif"]  # image and mask: one reader
    np.testing.assert_array_equal(got_labels, labels.astype(np.int32))
    assert got_labels.dtype == np.int32 and got_image.shape == (32, 32)
    (folder / "mask2d.tif").write_bytes(b"II*\x00 not a tiff")
    with pytest.raises(DataError, match=r"^cannot decode fixture file .*mask2d\.tif: ") as e:
        load_dsb2018(tmp_path)
    assert "\n" not in str(e.value)
    (folder / "mask2d.tif").unlink()
    with pytest.raises(DataError, match=r"^fixture file not found: .*mask2d\.tif$"):
        load_dsb2018(tmp_path)
