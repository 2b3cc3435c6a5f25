"""Profiles: field vectors, well aggregation, Parquet output and model loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dinocell.config import ModelConfig, load_config, save_config
from dinocell.errors import UserError
from dinocell.evaluate import embed as E

SYNTH = ["data.synthetic.n_fields=8", "data.synthetic.size=32", "data.synthetic.sites_per_well=2",
         "data.synthetic.wells_per_plate=4"]


@pytest.fixture(scope="module")
def export_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dinocell.models.backbone import build_backbone, save_backbone

    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(embed_dim=32, depth=2, num_heads=2, patch_size=8), img_size=32)
    out = tmp_path_factory.mktemp("model") / "export" / "backbone.safetensors"
    save_backbone(bb, out, {"channel_names": ["DNA", "ER", "RNA", "AGP", "Mito"],
                            "views": {"global_crop_size": 32}})
    return out


def test_field_vectors_views() -> None:
    emb = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)  # 2 channels + mean image
    assert E.field_vectors(emb, "concat").tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]]
    assert E.field_vectors(emb, "mean_image").tolist() == [[4, 5], [10, 11]]
    assert E.field_vectors(emb, "channel_mean").tolist() == [[1, 2], [7, 8]]
    with pytest.raises(UserError, match="unknown view"):
        E.field_vectors(emb, "max")


def test_aggregate_wells_means_and_constant_metadata() -> None:
    fields = E.profiles_frame(
        [{"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "1", "Metadata_Label": "x"},
         {"Metadata_Plate": "P", "Metadata_Well": "A01", "Metadata_Site": "2", "Metadata_Label": "x"},
         {"Metadata_Plate": "P", "Metadata_Well": "B01", "Metadata_Site": "1", "Metadata_Label": "y"}],
        np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0]]))
    assert list(fields.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Label",
                                    "emb_0", "emb_1"]
    wells = E.aggregate_wells(fields)
    assert list(wells.columns) == ["Metadata_Plate", "Metadata_Well", "Metadata_Label", "Metadata_Count",
                                   "emb_0", "emb_1"]
    assert wells[["emb_0", "emb_1"]].to_numpy().tolist() == [[2.0, 4.0], [5.0, 5.0]]
    assert wells["Metadata_Count"].tolist() == [2, 1] and wells["Metadata_Label"].tolist() == ["x", "y"]


def test_write_profiles_fp16_atomic(tmp_path: Path) -> None:
    df = E.profiles_frame([{"Metadata_Plate": "P", "Metadata_Well": "A01"}], np.array([[0.1, 2.5]]))
    out = E.write_profiles(df, tmp_path / "p.parquet", dtype="fp16")
    back = pd.read_parquet(out)
    assert back["emb_0"].dtype == np.float16 and back["emb_1"].tolist() == [2.5]
    assert [p.name for p in tmp_path.iterdir()] == ["p.parquet"]
    with pytest.raises(UserError, match="dtype"):
        E.write_profiles(df, tmp_path / "q.parquet", dtype="int8")


def test_run_embed_from_export(export_path: Path, tmp_path: Path) -> None:
    info = E.run_embed(export_path, tmp_path / "prof", data="synthetic", overrides=SYNTH, dtype="fp32")
    fields = pd.read_parquet(tmp_path / "prof" / "fields.parquet")
    wells = pd.read_parquet(tmp_path / "prof" / "wells.parquet")
    assert info["fields"] == 8 and len(fields) == 8 and info["size"] == 32
    assert info["features"] == 5 * 32 and fields.filter(like="emb_").shape[1] == 160
    for col in ("Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_Label", "Metadata_Control"):
        assert col in fields.columns
    assert len(wells) == fields.groupby(["Metadata_Plate", "Metadata_Well"]).ngroups == 4
    assert (wells["Metadata_Count"] == 2).all()
    # the well profile is the mean of its fields
    g = fields.groupby(["Metadata_Plate", "Metadata_Well"])["emb_7"].mean().to_numpy()
    assert np.allclose(wells["emb_7"].to_numpy(), g, atol=1e-6)
    # mean_image view: D features, equal to encoding the mean image directly
    E.run_embed(export_path, tmp_path / "mean", data="synthetic", overrides=SYNTH, view="mean_image")
    assert pd.read_parquet(tmp_path / "mean" / "fields.parquet").filter(like="emb_").shape[1] == 32


def test_load_model_from_checkpoint_and_errors(tmp_path: Path) -> None:
    from dinocell.models.backbone import build_backbone

    cfg = load_config(None, ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
                             "data.views.global_crop_size=32"])
    run = tmp_path / "run"
    save_config(cfg, run)
    torch.manual_seed(3)
    teacher = build_backbone(cfg.model, img_size=32)
    state = {f"meta.teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state["meta.student.backbone.mask_token"] = torch.ones(1, 32)
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": state, "dinocell": {"channel_names": ["DNA", "ER"]}}, run / "checkpoints" / "last.ckpt")
    m = E.load_model(run)
    assert m.crop_size == 32 and m.channel_names == ["DNA", "ER"] and m.run_dir == run
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(m.backbone(x), teacher.eval()(x))

    with pytest.raises(UserError, match="model not found"):
        E.load_model(tmp_path / "missing")
    with pytest.raises(UserError, match="neither export"):
        E.load_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="cannot tell"):
        E.load_model(tmp_path / "weights.bin")
    torch.save({"state_dict": {"other.w": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    (tmp_path / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(UserError, match="no teacher backbone"):
        E.load_model(tmp_path / "bad.ckpt")


def test_data_config_uses_held_out_synthetic_seed(export_path: Path) -> None:
    cfg = load_config(None, ["data.synthetic.seed=5"])
    m = E.LoadedModel(backbone=None, cfg=cfg, crop_size=32, channel_names=[], description="x")
    d = E.data_config(m, "synthetic", ["data.synthetic.n_fields=3"])
    assert d.data.synthetic.seed == 5 + E.HELD_OUT_SEED_OFFSET and d.data.synthetic.n_fields == 3
    assert cfg.data.synthetic.seed == 5  # the model's config is not modified
    with pytest.raises(UserError, match="did you mean"):
        E.data_config(m, None, ["data.synthetc.n_fields=3"])
