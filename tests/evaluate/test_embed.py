"""The one 2-D embedder: channel policy, tiling policy, profiles, resumable parts, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dinocell.config import load_config
from dinocell.errors import DataError, UserError
from dinocell.evaluate import embed as E
from dinocell.evaluate import profile_table as T
from dinocell.evaluate.tiling import field_tiles
from dinocell.models.loading import LoadedModel, Preprocess

SYNTH = ["data.synthetic.n_fields=8", "data.synthetic.size=32", "data.synthetic.sites_per_well=2",
         "data.synthetic.wells_per_plate=4"]


def test_field_tiles_never_resize_and_keep_non_square() -> None:
    views = torch.arange(2 * 40 * 72, dtype=torch.float32).reshape(2, 1, 40, 72)
    tiles = field_tiles(views, "tiles", 32, 8)
    assert tiles.shape == (2, 2 * 3, 1, 32, 32)  # rows at 0, 8; columns at 0, 20, 40
    assert torch.equal(tiles[0, 5], views[0, :, 8:40, 40:72])
    full = field_tiles(views, "full", 32, 8)
    assert full.shape == (2, 1, 1, 40, 72)
    small = field_tiles(views[..., :20, :], "tiles", 32, 8)  # side shorter than a tile: used whole
    assert small.shape == (2, 3, 1, 16, 32)


def test_channel_plan_keeps_brightfield_out_of_means() -> None:
    fluo = [True, True, False]
    assert E.channel_plan("concat", fluo) == ([0, 1, 2], False)
    assert E.channel_plan("channel_mean", fluo) == ([0, 1], False)
    assert E.channel_plan("mean_image", fluo) == ([], True)
    with pytest.raises(DataError, match="no.*fluorescent|has none"):
        E.channel_plan("mean_image", [False])
    field = torch.stack([torch.full((4, 4), v) for v in (1.0, 3.0, 100.0)])
    v = E.field_views(field, [2], fluo, mean_image=True)
    assert v[:, 0, 0, 0].tolist() == [100.0, 2.0]  # brightfield alone; mean image = DNA/ER only
    per_view = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    assert E.combine_views(per_view, "concat").tolist() == [0, 1, 2, 3, 4, 5]
    assert E.combine_views(per_view, "channel_mean").tolist() == [2, 3]
    with pytest.raises(UserError, match="unknown view"):
        E.combine_views(per_view, "max")


def test_profile_rows_are_what_pycytominer_reads_and_wells_are_medians() -> None:
    from dinocell.evaluate.profiling import aggregate_wells

    fields = T.profiles_frame(
        [{"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "1", "Metadata_Label": "x",
          "Metadata_FieldIndex": 0},
         {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "2", "Metadata_Label": "x",
          "Metadata_FieldIndex": 1},
         {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "3", "Metadata_Label": "x",
          "Metadata_FieldIndex": 2},
         {"Metadata_Plate": "P", "Metadata_Well": "B01", "Metadata_Site": "1", "Metadata_Label": "control",
          "Metadata_FieldIndex": 3}],
        np.array([[1.0, 2.0], [3.0, 6.0], [10.0, 100.0], [5.0, 5.0]]))
    assert list(fields.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_pert_type",
                                    "Metadata_Label", "Metadata_FieldIndex", "Cells_dinocell_0",
                                    "Cells_dinocell_1"]
    assert fields["Metadata_pert_type"].tolist() == ["trt", "trt", "trt", "negcon"]
    assert fields["Metadata_FieldIndex"].dtype == np.int64
    import pycytominer.cyto_utils as cu

    assert cu.infer_cp_features(fields) == ["Cells_dinocell_0", "Cells_dinocell_1"]
    wells = aggregate_wells(fields)  # the one well aggregation: pycytominer's median
    assert wells[["Cells_dinocell_0", "Cells_dinocell_1"]].to_numpy().tolist() == [[3.0, 6.0], [5.0, 5.0]]
    assert wells["Metadata_Count"].tolist() == [3, 1] and wells["Metadata_Label"].tolist() == ["x", "control"]
    assert not hasattr(T, "aggregate_wells")


def test_write_profiles_fp16_atomic(tmp_path: Path) -> None:
    df = T.profiles_frame([{"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "1"}],
                          np.array([[0.1, 2.5]]))
    out = T.write_profiles(df, tmp_path / "p.parquet", dtype="fp16")
    back = pd.read_parquet(out)
    assert back["Cells_dinocell_0"].dtype == np.float16 and back["Cells_dinocell_1"].tolist() == [2.5]
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]
    with pytest.raises(UserError, match="dtype"):
        T.write_profiles(df, tmp_path / "q.parquet", dtype="int8")


def test_profiles_record_the_code_in_parquet_metadata_and_read_back_unchanged(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from dinocell.provenance import provenance

    metas = [{"Metadata_Plate": "P", "Metadata_Well": w, "Metadata_Site": "1", "Metadata_FieldIndex": i}
             for i, w in enumerate(("A01", "B02"))]
    df = T.profiles_frame(metas, np.array([[0.1, 2.5], [-1.0, 3.0]]))
    out = T.write_profiles(df, tmp_path / "p.parquet")
    assert T.profile_provenance(out) == provenance()  # {"dinocell_version", "git_commit"} under b"dinocell"
    meta = pq.read_schema(out).metadata
    assert b"pandas" in meta  # pandas' own key kept: the frame reads back as pandas wrote it before
    back = pd.read_parquet(out)
    pd.testing.assert_frame_equal(back, df.astype({"Cells_dinocell_0": np.float32, "Cells_dinocell_1": np.float32}))
    plain = tmp_path / "plain.parquet"  # a file written the old way: same columns and dtypes, no record
    df.astype({"Cells_dinocell_0": np.float32, "Cells_dinocell_1": np.float32}).to_parquet(plain, index=False)
    assert pq.read_schema(plain).remove_metadata().equals(pq.read_schema(out).remove_metadata())
    assert T.profile_provenance(plain) is None


def test_run_embed_from_export(export_path: Path, tmp_path: Path) -> None:
    from dinocell.models.loading import load_model

    info = E.run_embed(export_path, tmp_path / "prof", data="synthetic", overrides=SYNTH, dtype="fp32")
    fields = pd.read_parquet(tmp_path / "prof" / "fields.parquet")
    wells = pd.read_parquet(tmp_path / "prof" / "wells.parquet")
    assert info["fields"] == 8 and len(fields) == 8 and info["tile"] == 32 and info["geometry"] == "tiles"
    assert info["features"] == 5 * 32 and fields.filter(like="Cells_dinocell_").shape[1] == 160
    assert info["git_commit"] and info["dinocell_version"]  # profiles say which code made them
    for name in ("fields.parquet", "wells.parquet"):  # ... inside the Parquet files too
        assert T.profile_provenance(tmp_path / "prof" / name) == {k: info[k] for k in ("dinocell_version", "git_commit")}
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Label", "Metadata_Control",
                "Metadata_FieldIndex"):
        assert col in fields.columns
    assert len(wells) == fields.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups == 4
    assert (wells["Metadata_Count"] == 2).all()
    g = fields.groupby(["Metadata_Plate", "Metadata_Well"])["Cells_dinocell_7"].median().to_numpy()
    assert np.allclose(wells["Cells_dinocell_7"].to_numpy(), g, atol=1e-6)  # the well profile: median of its fields
    assert "Metadata_pert_type" in wells.columns
    # mean_image view: D features, equal to encoding the fluorescent mean image directly
    E.run_embed(export_path, tmp_path / "mean", data="synthetic", overrides=SYNTH, view="mean_image")
    mean = pd.read_parquet(tmp_path / "mean" / "fields.parquet")
    m = load_model(export_path)
    cfg = E.data_config(m, "synthetic", SYNTH)
    from dinocell.data.sources import open_source

    src = open_source(cfg.data)
    x = torch.from_numpy(np.asarray(src.load(src.records[0]), np.float32))
    with torch.no_grad():
        want = m.backbone(x[np.flatnonzero(src.fluorescent)].mean(0)[None, None])[0]
    got = mean.filter(like="Cells_dinocell_").to_numpy()[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_tiles_are_mean_pooled_and_full_geometry_sees_the_whole_field(export_path: Path, tmp_path: Path) -> None:
    from dinocell.models.loading import load_model

    m = load_model(export_path)
    over = [o.replace("size=32", "size=64") for o in SYNTH]
    tiles = E.run_embed(m, tmp_path / "t", data="synthetic", overrides=over, view="mean_image")
    full = E.run_embed(m, tmp_path / "f", data="synthetic", overrides=over, view="mean_image", geometry="full")
    assert tiles["tile"] == 32 and full["geometry"] == "full"
    t = pd.read_parquet(tmp_path / "t" / "fields.parquet").filter(like="Cells_dinocell_").to_numpy()
    f = pd.read_parquet(tmp_path / "f" / "fields.parquet").filter(like="Cells_dinocell_").to_numpy()
    assert t.shape == f.shape == (8, 32) and not np.allclose(t, f, atol=1e-3)
    from dinocell.data.sources import open_source

    src = open_source(E.data_config(m, "synthetic", over).data)
    x = torch.from_numpy(np.asarray(src.load(src.records[0]), np.float32))
    img = x[np.flatnonzero(src.fluorescent)].mean(0)
    quads = torch.stack([img[i:i + 32, j:j + 32] for i in (0, 32) for j in (0, 32)])[:, None]
    with torch.no_grad():
        np.testing.assert_allclose(t[0], m.backbone(quads).mean(0).numpy(), atol=1e-5)
        np.testing.assert_allclose(f[0], m.backbone(img[None, None])[0].numpy(), atol=1e-5)


def test_data_config_uses_held_out_seed_and_model_scaling() -> None:
    cfg = load_config(None, ["data.synthetic.seed=5"])
    pre = Preprocess(scaling=cfg.data.scaling.__class__(low_percentile=2.0))
    m = LoadedModel(backbone=None, preprocess=pre, cfg=cfg, description="x")
    d = E.data_config(m, "synthetic", ["data.synthetic.n_fields=3"])
    assert d.data.synthetic.seed == 5 + E.HELD_OUT_SEED_OFFSET and d.data.synthetic.n_fields == 3
    assert d.data.scaling.low_percentile == 2.0
    assert cfg.data.synthetic.seed == 5  # the model's config is not modified
    with pytest.raises(UserError, match="did you mean"):
        E.data_config(m, None, ["data.synthetc.n_fields=3"])
