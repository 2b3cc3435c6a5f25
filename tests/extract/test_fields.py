from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tensorstore as ts
from extract_stubs import MeanPatchModel

from dinocell.data.field import FieldRecord
from dinocell.errors import ConfigError, DataError
from dinocell.extract.fields import FieldExtractionOptions, _fit, extract_fields, field_views


class FakeSource:
    """Three channels (the last one brightfield), fields on two plates; field 'bad' fails to load."""

    channels = ["DNA", "ER", "Brightfield"]
    fluorescent = [True, True, False]

    def __init__(self, n: int = 5, bad: int | None = None, size: int = 8) -> None:
        self.records = [FieldRecord(plate=f"P{i % 2}", well=f"A0{i}", site=1,
                                    metadata={"Metadata_Label": f"c{i % 3}", "other": "x"}) for i in range(n)]
        self.bad = bad
        self.size = size
        self.loads = 0

    def image(self, i: int) -> np.ndarray:
        c = np.arange(3, dtype=np.float32)[:, None, None]
        return np.broadcast_to((i + 1) * 0.1 + 0.01 * c, (3, self.size, self.size)).copy()

    def load(self, rec: FieldRecord) -> np.ndarray:
        self.loads += 1
        i = int(rec.well[2:])
        if i == self.bad:
            raise DataError("corrupt TIFF")
        return self.image(i)


def test_field_views_use_fluorescent_mean():
    img = np.stack([np.full((4, 4), v, np.float32) for v in (1.0, 3.0, 100.0)])
    v = field_views(img, [True, True, False])
    assert v.shape == (4, 1, 4, 4)
    np.testing.assert_allclose(v[:, 0, 0, 0], [1.0, 3.0, 100.0, 2.0])  # mean image ignores brightfield
    assert field_views(img, [True] * 3, include_mean=False).shape == (3, 1, 4, 4)


def test_fit_crops_to_patch_multiple_and_resizes():
    img = np.arange(2 * 10 * 13, dtype=np.float32).reshape(2, 10, 13)
    out = _fit(img, 4, None)
    assert out.shape == (2, 8, 12)
    np.testing.assert_array_equal(out, img[:, 1:9, 0:12])
    assert _fit(img, 4, 16).shape == (2, 16, 16)
    with pytest.raises(DataError, match="smaller than the patch size"):
        _fit(img[:, :2, :2], 4, None)


def test_mean_and_concat_embeddings(tmp_path):
    src = FakeSource(n=3)
    path = extract_fields(tmp_path / "m", source=src, model=MeanPatchModel(),
                          options=FieldExtractionOptions(chunk_size=2), progress=False)
    df = pd.read_parquet(path)
    assert list(df["Metadata_FieldIndex"]) == [0, 1, 2]
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Label"} <= set(df.columns)
    assert "other" not in df.columns and [c for c in df.columns if c.startswith("emb_")] == ["emb_0", "emb_1"]
    for i in range(3):
        views = src.image(i)[:, 0, 0].tolist() + [src.image(i)[:2, 0, 0].mean()]
        assert df.loc[i, "emb_0"] == pytest.approx(np.mean(views), abs=1e-6)
        assert df.loc[i, "emb_1"] == pytest.approx(1.0)
    path = extract_fields(tmp_path / "c", source=FakeSource(n=3), model=MeanPatchModel(),
                          options=FieldExtractionOptions(combine="concat", include_mean_image=False),
                          progress=False)
    df = pd.read_parquet(path)
    emb = df[[f"emb_{d}" for d in range(6)]].to_numpy()
    np.testing.assert_allclose(emb[2], [0.3, 1, 0.31, 1, 0.32, 1], atol=1e-6)  # (view mean, 1) per channel


def test_resume_redoes_only_missing_parts(tmp_path):
    opts = FieldExtractionOptions(chunk_size=2)
    first = pd.read_parquet(extract_fields(tmp_path, source=FakeSource(), model=MeanPatchModel(),
                                           options=opts, progress=False))
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == [
        "part_000000.parquet", "part_000001.parquet", "part_000002.parquet"]
    (tmp_path / "parts" / "part_000001.parquet").unlink()
    (tmp_path / "embeddings.parquet").unlink()
    src = FakeSource()
    again = pd.read_parquet(extract_fields(tmp_path, source=src, model=MeanPatchModel(), options=opts,
                                           progress=False))
    assert src.loads == 2  # only fields 2 and 3 (part 1) were loaded again
    pd.testing.assert_frame_equal(first, again)


def test_changed_configuration_needs_new_dir_or_overwrite(tmp_path):
    extract_fields(tmp_path, source=FakeSource(), model=MeanPatchModel(), progress=False)
    with pytest.raises(ConfigError, match="different extraction"):
        extract_fields(tmp_path, source=FakeSource(), model=MeanPatchModel(),
                       options=FieldExtractionOptions(combine="concat"), progress=False)
    path = extract_fields(tmp_path, source=FakeSource(), model=MeanPatchModel(),
                          options=FieldExtractionOptions(combine="concat"), overwrite=True, progress=False)
    assert pd.read_parquet(path).shape[1] == 4 + 1 + 8  # metadata + label + 4 views x 2


def test_bad_field_is_skipped_and_recorded(tmp_path):
    path = extract_fields(tmp_path, source=FakeSource(n=4, bad=2), model=MeanPatchModel(), progress=False)
    assert list(pd.read_parquet(path)["Metadata_FieldIndex"]) == [0, 1, 3]
    run = json.loads((tmp_path / "fields_run.json").read_text())
    assert run["rows"] == 3 and run["skipped"] == ["P0/A02/1: corrupt TIFF"]


def test_patch_maps_per_plate(tmp_path):
    src = FakeSource(n=5, size=8)
    path = extract_fields(tmp_path, source=src, model=MeanPatchModel(),
                          options=FieldExtractionOptions(patch_maps=True, pool="mean", chunk_size=2),
                          progress=False)
    df = pd.read_parquet(path)
    p0 = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "patch_maps" / "P0.zarr")}}
                 ).result().read().result()
    assert p0.shape == (3, 2, 2, 2)  # fields 0, 2, 4 of plate P0; D=2; 8/4 x 8/4 patches
    row = df[df["Metadata_FieldIndex"] == 4].iloc[0]
    assert row["Metadata_PatchIndex"] == 2
    np.testing.assert_allclose(p0[2, 0], row["emb_0"], atol=1e-3)  # constant image: map == pooled value


def test_cli_on_synthetic_source(tmp_path, capsys):
    from dinocell.cli import main

    out = tmp_path / "emb"
    rc = main(["extract-fields", "--output-dir", str(out), "--chunk-size", "4", "--no-progress",
               "data.synthetic.n_fields=6", "data.synthetic.size=32"])
    assert rc == 0 and "embeddings.parquet" in capsys.readouterr().out
    df = pd.read_parquet(out / "embeddings.parquet")
    assert len(df) == 6 and sum(c.startswith("emb_") for c in df.columns) == 32
    assert df[[c for c in df.columns if c.startswith("emb_")]].notna().all().all()
