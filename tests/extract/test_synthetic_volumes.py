from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from dinocell.extract.synthetic_volumes import (
    SYNTH_CLASSES,
    ensure_default_synthetic,
    make_synthetic_volume,
    synthetic_edge_for,
    write_multiscale,
    write_synthetic_dataset,
)
from dinocell.extract.volumes import open_volume_array


def test_volume_is_deterministic_and_labelled():
    a = make_synthetic_volume((24, 24, 24), seed=5)
    b = make_synthetic_volume((24, 24, 24), seed=5)
    c = make_synthetic_volume((24, 24, 24), seed=6)
    assert a.raw.dtype == np.uint8 and a.raw.shape == (24, 24, 24)
    np.testing.assert_array_equal(a.raw, b.raw)
    assert not np.array_equal(a.raw, c.raw)
    assert set(a.labels) == set(SYNTH_CLASSES)
    for lab in a.labels.values():
        ids = np.unique(lab)
        assert ids[0] == 0 and len(ids) >= 2  # background plus at least one object
        np.testing.assert_array_equal(ids, np.arange(len(ids)))  # consecutive ids after relabelling


def test_classes_do_not_overlap_and_have_distinct_intensity():
    v = make_synthetic_volume((32, 32, 32), seed=1)
    fg = np.stack([v.labels[c] > 0 for c in SYNTH_CLASSES])
    assert fg.sum(0).max() == 1  # painted with an occupancy mask
    mito = v.raw[v.labels["mito"] > 0].mean()
    ves = v.raw[v.labels["vesicle"] > 0].mean()
    assert mito < 110 < ves  # dark mitochondria, bright vesicles


def test_bad_shape_is_rejected():
    with pytest.raises(ValueError, match="every side >= 8"):
        make_synthetic_volume((4, 32, 32))


@pytest.mark.parametrize("fmt", ["zarr3", "zarr2", "n5"])
def test_multiscale_roundtrip(tmp_path, fmt):
    data = (np.arange(16**3) % 251).astype(np.uint8).reshape(16, 16, 16)
    root = write_multiscale(tmp_path / "img", data, fmt, resolution=(4.0, 4.0, 4.0), n_levels=2)
    s0 = open_volume_array(str(root), target=np.array([4.0, 4.0, 4.0]))
    assert s0.level == "s0" and s0.shape == (16, 16, 16)
    np.testing.assert_array_equal(s0.read_box((0, 0, 0), (16, 16, 16)), data)
    s1 = open_volume_array(str(root), target=np.array([8.0, 8.0, 8.0]))
    assert s1.level == "s1" and s1.shape == (8, 8, 8)
    np.testing.assert_allclose(s1.scale, [8, 8, 8])
    # level 1 is the 2x block mean of level 0
    want = data.astype(float).reshape(8, 2, 8, 2, 8, 2).mean((1, 3, 5))
    np.testing.assert_allclose(s1.read_box((0, 0, 0), (8, 8, 8)), np.round(want), atol=1)


def test_write_dataset_manifest(tmp_path):
    m = write_synthetic_dataset(tmp_path, n_volumes=2, shape=(16, 16, 16), fmt="zarr2", label_fraction_box=0.5)
    data = yaml.safe_load(m.read_text())
    assert [v["name"] for v in data["volumes"]] == ["vol_000", "vol_001"]
    assert set(data["volumes"][0]["labels"]) == set(SYNTH_CLASSES)
    zattrs = json.loads((tmp_path / "vol_001.zarr" / "labels" / "mito" / ".zattrs").read_text())
    # odd volumes are labelled in a central box: its corner is carried as an OME translation
    tr = zattrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][1]["translation"]
    assert tr == [32.0, 32.0, 32.0]  # (16 - 8) // 2 voxels x 8 nm


def test_default_dataset_is_generated_once(tmp_path):
    m1 = ensure_default_synthetic(tmp_path, output_image_dim=16, n_volumes=1)
    stamp = m1.stat().st_mtime_ns
    m2 = ensure_default_synthetic(tmp_path, output_image_dim=16, n_volumes=1)
    assert m1 == m2 and m2.stat().st_mtime_ns == stamp
    assert synthetic_edge_for(16) == 24 and m1.parent.name == "synthetic_source_e24"
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic_source_e24"]  # no temp folder left


def test_default_dataset_appears_whole_and_a_finished_copy_wins(tmp_path, monkeypatch):
    import dinocell.extract.synthetic_volumes as S
    from dinocell.errors import DataError

    real = S.write_synthetic_dataset
    seen = []

    def killed(out, **kwargs):  # the process dies half way: the volumes written, no manifest yet
        seen.append(out)
        real(out, **kwargs)
        (out / "manifest.yaml").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "write_synthetic_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_default_synthetic(tmp_path, output_image_dim=16, n_volumes=1)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".synthetic_source_e24.")  # a hidden sibling
    assert list(tmp_path.iterdir()) == []  # no half-written dataset where readers look, no temp folder

    def slower(out, **kwargs):  # another process publishes its complete copy while this one writes
        real(out, **kwargs)
        real(tmp_path / "synthetic_source_e24", **kwargs)
        (tmp_path / "synthetic_source_e24" / "theirs").write_text("")

    monkeypatch.setattr(S, "write_synthetic_dataset", slower)
    m = ensure_default_synthetic(tmp_path, output_image_dim=16, n_volumes=1)
    assert m.is_file() and (m.parent / "theirs").is_file() and len(list(tmp_path.iterdir())) == 1
    monkeypatch.setattr(S, "write_synthetic_dataset", real)
    stray = tmp_path / "other"
    (stray / "synthetic_source_e24" / "junk").mkdir(parents=True)  # a folder not made by us: say so in one line
    with pytest.raises(DataError, match="exists but has no manifest.yaml"):
        ensure_default_synthetic(stray, output_image_dim=16, n_volumes=1)


def test_tiff_volumes_are_written_atomically(tmp_path, monkeypatch):
    import tifffile

    from dinocell.paths import DiskFullError

    m = write_synthetic_dataset(tmp_path, n_volumes=1, shape=(16, 16, 16), fmt="tiff")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert "vol_000_raw.tif" in before and m.name in before

    def full_disk(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tifffile, "imwrite", full_disk)
    with pytest.raises(DiskFullError, match="vol_000_raw.tif"):
        write_synthetic_dataset(tmp_path, n_volumes=1, shape=(16, 16, 16), seed=1, fmt="tiff")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old stack whole, no temp file
