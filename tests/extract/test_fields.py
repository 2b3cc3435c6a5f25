"""``extract-fields`` is ``dinocell embed``: resumable parts, skipped fields, patch maps, the CLI alias."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tensorstore as ts
from extract_stubs import MeanPatchModel

from dinocell.data.field import FieldRecord
from dinocell.errors import ConfigError, DataError
from dinocell.evaluate.embed import run_embed
from dinocell.models.loading import LoadedModel, Preprocess


class FakeSource:
    """Three channels (the last one brightfield), fields on two plates; field 'bad' fails to load."""

    channels = ["DNA", "ER", "Brightfield"]
    fluorescent = [True, True, False]
    name = "fake"

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


def stub() -> LoadedModel:
    return LoadedModel(MeanPatchModel(), Preprocess(patch_size=4, crop_size=8), None, "stub")


def test_views_and_brightfield_policy(tmp_path):
    src = FakeSource(n=3)
    run_embed(stub(), tmp_path / "m", source=src, view="channel_mean", chunk_size=2)
    df = pd.read_parquet(tmp_path / "m" / "fields.parquet")
    assert list(df["Metadata_FieldIndex"]) == [0, 1, 2]
    assert {"Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Label"} <= set(df.columns)
    assert "other" not in df.columns and [c for c in df.columns if c.startswith("Cells_dinocell_")] == ["Cells_dinocell_0", "Cells_dinocell_1"]
    for i in range(3):  # mean over DNA and ER only: brightfield never enters a mean
        assert df.loc[i, "Cells_dinocell_0"] == pytest.approx(src.image(i)[:2, 0, 0].mean(), abs=1e-6)
        assert df.loc[i, "Cells_dinocell_1"] == pytest.approx(1.0)
    run_embed(stub(), tmp_path / "c", source=FakeSource(n=3))
    emb = pd.read_parquet(tmp_path / "c" / "fields.parquet").filter(like="Cells_dinocell_").to_numpy()
    np.testing.assert_allclose(emb[2], [0.3, 1, 0.31, 1, 0.32, 1], atol=1e-6)  # concat: every channel, own slot


def test_resume_redoes_only_missing_parts(tmp_path):
    first = run_embed(stub(), tmp_path, source=FakeSource(), chunk_size=2)
    assert sorted(p.name for p in (tmp_path / "parts").glob("*.parquet")) == [
        "part_000000.parquet", "part_000001.parquet", "part_000002.parquet"]
    before = pd.read_parquet(first["paths"]["fields"])
    (tmp_path / "parts" / "part_000001.parquet").unlink()
    (tmp_path / "fields.parquet").unlink()
    src = FakeSource()
    again = run_embed(stub(), tmp_path, source=src, chunk_size=2)
    assert src.loads == 2  # only fields 2 and 3 (part 1) were loaded again
    pd.testing.assert_frame_equal(before, pd.read_parquet(again["paths"]["fields"]))


def test_changed_configuration_needs_new_dir_or_overwrite(tmp_path):
    run_embed(stub(), tmp_path, source=FakeSource())
    with pytest.raises(ConfigError, match="different embedding"):
        run_embed(stub(), tmp_path, source=FakeSource(), view="channel_mean")
    info = run_embed(stub(), tmp_path, source=FakeSource(), view="channel_mean", overwrite=True)
    assert info["features"] == 2


def test_bad_field_is_skipped_and_recorded(tmp_path):
    info = run_embed(stub(), tmp_path, source=FakeSource(n=4, bad=2))
    assert list(pd.read_parquet(info["paths"]["fields"])["Metadata_FieldIndex"]) == [0, 1, 3]
    run = json.loads((tmp_path / "embed_run.json").read_text())
    assert run["fields"] == 3 and run["skipped"] == ["P0/A02/1: corrupt TIFF"]


def test_patch_maps_per_plate(tmp_path):
    with pytest.raises(ConfigError, match="--geometry full"):
        run_embed(stub(), tmp_path, source=FakeSource(), patch_maps=True)
    info = run_embed(stub(), tmp_path, source=FakeSource(n=5, size=8), patch_maps=True, geometry="full",
                     pool="mean", view="channel_mean", chunk_size=2)
    df = pd.read_parquet(info["paths"]["fields"])
    p0 = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(tmp_path / "patch_maps" / "P0.zarr")}}
                 ).result().read().result()
    assert p0.shape == (3, 2, 2, 2)  # fields 0, 2, 4 of plate P0; D=2; 8/4 x 8/4 patches
    row = df[df["Metadata_FieldIndex"] == 4].iloc[0]
    assert row["Metadata_PatchIndex"] == 2
    np.testing.assert_allclose(p0[2, 0], row["Cells_dinocell_0"], atol=1e-3)  # constant image: map == pooled value


def test_extract_fields_alias_on_synthetic_source(tmp_path, capsys):
    from dinocell.cli import main
    from dinocell.config import ModelConfig
    from dinocell.models.backbone import build_backbone
    from dinocell.models.timm_export import save_timm

    model = save_timm(build_backbone(ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8), img_size=32),
                      tmp_path / "m", Preprocess(patch_size=8, crop_size=32))
    out = tmp_path / "emb"
    rc = main(["extract-fields", "--output-dir", str(out), "--backbone", str(model), "--chunk-size", "4",
               "--view", "channel_mean", "--no-progress", "data.synthetic.n_fields=6", "data.synthetic.size=32"])
    assert rc == 0 and "fields.parquet" in capsys.readouterr().out
    df = pd.read_parquet(out / "fields.parquet")
    assert len(df) == 6 and sum(c.startswith("Cells_dinocell_") for c in df.columns) == 32
    assert df[[c for c in df.columns if c.startswith("Cells_dinocell_")]].notna().all().all()
    assert main(["extract-fields", "--output-dir", str(tmp_path / "x")]) == 2  # a model is required
