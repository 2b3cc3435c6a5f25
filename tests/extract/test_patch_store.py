"""The compact patch store: round trip, feature-cell -> voxel mapping, Upsample, dataset items, check."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts
import torch
import torch.nn.functional as F
from extract_stubs import MeanPatchModel

from dinocell.errors import ConfigError
from dinocell.extract.check import check_output, format_report, verify_volume
from dinocell.extract.dataset import FeatureVolumeDataset, create_feature_dataloader
from dinocell.extract.upsample import Upsample
from dinocell.extract.volumes import (
    ExtractionConfig,
    FeatureGrid,
    compute_patch_features,
    compute_volume_features,
    quick_verify,
    volume_paths,
)


def _read(path):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()


# ------------------------------------------------------------------------------------ round trip


def test_patch_store_layout_and_metadata(extracted_patch_dir):
    meta = json.loads(volume_paths(extracted_patch_dir, 1)["metadata"].read_text())
    assert meta["store"] == "patch" and meta["configuration"]["store"] == "patch"
    # tiny ViT: patch 8 -> a 16^3 crop has 2 x 2 patches per z-slice, every slice kept
    assert meta["shapes"] == {"features": [32, 16, 2, 2], "gt": [3, 16, 16, 16], "mask": [1, 16, 16, 16]}
    grid = FeatureGrid.from_metadata(meta)
    assert grid.store == "patch" and grid.cell == [1, 8, 8]
    assert grid.volume_shape == [16, 16, 16] and grid.feature_shape == [16, 2, 2]
    assert grid.origin_nm == meta["source"]["origin_nm"] and grid.origin_voxel == meta["source"]["origin_voxel"]
    assert quick_verify(extracted_patch_dir, 1) == []
    zarr = json.loads((volume_paths(extracted_patch_dir, 1)["features"] / "zarr.json").read_text())
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [32, 16, 2, 2]  # whole array: 1 chunk


def test_patch_store_is_smaller_and_same_crop(extracted_patch_dir, extracted_dir):
    for i in (0, 1):
        p = json.loads(volume_paths(extracted_patch_dir, i)["metadata"].read_text())
        v = json.loads(volume_paths(extracted_dir, i)["metadata"].read_text())
        assert p["source"]["origin_nm"] == v["source"]["origin_nm"]  # the index is the seed, whatever the store
        assert p["storage"]["features_gb"] < v["storage"]["features_gb"] / 4
        np.testing.assert_array_equal(_read(volume_paths(extracted_patch_dir, i)["gt"]),
                                      _read(volume_paths(extracted_dir, i)["gt"]))


def test_compute_patch_features_values():
    vol = np.random.default_rng(0).random((3, 8, 12), dtype=np.float32)
    f = compute_patch_features(vol, MeanPatchModel(), batch_size=2, out_dtype="float32")
    assert f.shape == (2, 3, 2, 3) and f.dtype == np.float32
    want = vol.reshape(3, 2, 4, 3, 4).mean((2, 4))  # patch means per z-slice
    np.testing.assert_allclose(f[0], want, atol=1e-6)
    np.testing.assert_allclose(f[1], 1.0)
    with pytest.raises(ConfigError, match="multiples of the patch size 4"):
        compute_patch_features(np.zeros((3, 6, 8), np.float32), MeanPatchModel())


def test_store_config_validation(tmp_path):
    assert ExtractionConfig(output_dir=str(tmp_path)).store == "patch"
    with pytest.raises(ConfigError, match="--store must be one of"):
        ExtractionConfig(output_dir=str(tmp_path), store="dense").validate()
    with pytest.raises(ConfigError, match="--axes zyx needs --store voxel"):
        ExtractionConfig(output_dir=str(tmp_path), axes="zyx").validate()
    ExtractionConfig(output_dir=str(tmp_path), axes="zyx", store="voxel").validate()


# ------------------------------------------------------------------------------- cells -> voxels


def test_trilinear_upsampling_of_patch_store_reproduces_voxel_store(extracted_patch_dir, extracted_dir):
    patch = torch.from_numpy(_read(volume_paths(extracted_patch_dir, 0)["features"]))
    voxel = torch.from_numpy(_read(volume_paths(extracted_dir, 0)["features"])).float()
    up = Upsample((16, 16, 16))(patch)
    assert up.shape == voxel.shape and up.dtype == torch.float16
    torch.testing.assert_close(up.float(), voxel, atol=2e-2, rtol=1e-2)  # float16 storage of both


def test_upsampling_matches_in_memory_voxel_features():
    vol = np.random.default_rng(1).random((4, 16, 12), dtype=np.float32)
    patch = torch.from_numpy(compute_patch_features(vol, MeanPatchModel(), out_dtype="float32"))
    voxel = compute_volume_features(vol, MeanPatchModel(), out_dtype="float32")
    torch.testing.assert_close(Upsample(vol.shape)(patch).numpy(), voxel, atol=1e-5, rtol=1e-5)


def test_grid_maps_cells_to_voxels():
    grid = FeatureGrid("patch", [4, 16, 16], [4, 2, 2], [1, 8, 8], [10, 20, 30], [100.0, 200.0, 300.0],
                       [8.0, 4.0, 4.0])
    lo, hi = grid.voxel_box((3, 1, 0))
    assert lo.tolist() == [3, 8, 0] and hi.tolist() == [4, 16, 8]
    np.testing.assert_allclose(grid.stride_nm, [8, 32, 32])
    z, y, x = grid.cell_centres_nm()
    np.testing.assert_allclose(z, [104, 112, 120, 128])  # origin + (k + 0.5) * 8 nm
    np.testing.assert_allclose(y, [216, 248])
    np.testing.assert_allclose(x, [316, 348])
    # the voxels of a cell, at resolution_nm, have the cell centre as their mean centre
    lo, hi = grid.voxel_box((0, 1, 1))
    voxel_centres_y = 200.0 + (np.arange(lo[1], hi[1]) + 0.5) * 4.0
    assert voxel_centres_y.mean() == pytest.approx(y[1])


def test_grid_of_old_voxel_metadata_without_grid(extracted_dir):
    meta = json.loads(volume_paths(extracted_dir, 0)["metadata"].read_text())
    meta.pop("grid")
    meta.pop("store")
    grid = FeatureGrid.from_metadata(meta)
    assert grid.store == "voxel" and grid.cell == [1, 1, 1] and grid.feature_shape == [16, 16, 16]
    assert quick_verify(extracted_dir, 0, meta) == []  # caches written before the patch store stay complete


# ------------------------------------------------------------------------------------- Upsample


def test_upsample_shapes_modes_and_errors():
    x = torch.randn(2, 5, 4, 2, 3)
    assert Upsample((8, 16, 24))(x).shape == (2, 5, 8, 16, 24)
    assert Upsample((8, 16, 24))(x[0]).shape == (5, 8, 16, 24)  # unbatched
    torch.testing.assert_close(Upsample((8, 16, 24))(x), F.interpolate(x, (8, 16, 24), mode="trilinear"))
    assert torch.equal(Upsample((7, 5, 9), "nearest")(x), F.interpolate(x, (7, 5, 9), mode="nearest"))
    const = torch.full((1, 1, 2, 2, 2), 3.5, dtype=torch.float16)
    out = Upsample((4, 16, 16))(const)
    assert out.dtype == torch.float16 and torch.all(out == 3.5)
    ids = torch.tensor([[[[2**31 - 1, 7], [0, 2**24 + 1]]]], dtype=torch.int32)  # (1, 1, 2, 2)
    up = Upsample((2, 4, 4), "nearest")(ids)
    assert up.dtype == torch.int32 and set(up.unique().tolist()) == {0, 7, 2**24 + 1, 2**31 - 1}  # exact ids
    same = torch.randn(1, 2, 3, 4, 5)
    assert Upsample((3, 4, 5))(same) is same
    with pytest.raises(ConfigError, match="mode"):
        Upsample((2, 2, 2), "cubic")
    with pytest.raises(ConfigError, match="3 positive sides"):
        Upsample((2, 2))
    with pytest.raises(ValueError, match="floating-point"):
        Upsample((4, 4, 4))(ids)
    with pytest.raises(ValueError, match=r"\(B, C, d, h, w\)"):
        Upsample((4, 4, 4))(torch.zeros(2, 2, 2))


def test_upsample_from_metadata(extracted_patch_dir, extracted_dir):
    for d in (extracted_patch_dir, extracted_dir):
        meta = json.loads(volume_paths(d, 0)["metadata"].read_text())
        assert Upsample.from_metadata(meta).size == (16, 16, 16)


# ------------------------------------------------------------------------------------- dataset


def test_dataset_yields_patch_features_and_full_resolution_labels(extracted_patch_dir):
    ds = FeatureVolumeDataset(extracted_patch_dir, return_metadata=True)
    feats, gt, mask, meta = ds[1]
    assert feats.dtype == torch.float16 and feats.shape == (32, 16, 2, 2)
    assert gt.dtype == torch.int32 and gt.shape == (3, 16, 16, 16)
    assert mask.dtype == torch.bool and mask.shape == (1, 16, 16, 16)
    assert meta["store"] == "patch" and ds.grids[1].cell == [1, 8, 8]
    np.testing.assert_array_equal(feats.numpy(), _read(volume_paths(extracted_patch_dir, 1)["features"]))
    assert ds.nbytes(1) == 32 * 16 * 2 * 2 * 2 + 3 * 16**3 * 4 + 16**3
    up = ds.upsampler(1)
    assert up(feats).shape == (32, 16, 16, 16)
    loader = create_feature_dataloader(extracted_patch_dir, batch_size=2)
    (bf, bg, bm), = list(loader)
    assert bf.shape == (2, 32, 16, 2, 2) and bg.shape == (2, 3, 16, 16, 16) and bm.shape == (2, 1, 16, 16, 16)
    logits = torch.nn.Conv3d(32, 4, 1)(bf.float())  # a head on the patch grid ...
    assert ds.upsampler()(logits).shape == (2, 4, 16, 16, 16)  # ... upsampled to the labels


# ---------------------------------------------------------------------------------------- check


def test_check_verifies_patch_store(extracted_patch_copy):
    r = check_output(extracted_patch_copy, verify=True)
    assert r["ok"] and r["verify"]["ok"] and r["completed"] == 2
    (cfg,) = r["configurations"]
    assert cfg["configuration"]["store"] == "patch" and "patch store" in format_report(r)
    # NaN in the features and a label outside the mask are found by reading
    paths = volume_paths(extracted_patch_copy, 1)
    feats = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(paths["features"])}}).result()
    feats[0, 0, 0, 0] = np.float16(np.nan)
    assert "features: 1 NaN/Inf values" in verify_volume(extracted_patch_copy, 1)
    # a grid that does not match the arrays makes the volume incomplete
    meta_path = paths["metadata"]
    meta = json.loads(meta_path.read_text())
    meta["grid"]["cell"] = [1, 4, 4]
    meta_path.write_text(json.dumps(meta))
    r = check_output(extracted_patch_copy)
    assert not r["ok"] and r["incomplete"]["1"] == ["grid: [16, 2, 2] cells x [1, 4, 4] voxels != volume [16, 16, 16]"]


def test_check_of_mixed_stores_lists_both_configurations(extracted_patch_copy, extracted_dir):
    import shutil

    for suffix in ("features.zarr", "gt.zarr", "mask.zarr", "metadata.json"):
        src = extracted_dir / f"volume_000000_{suffix}"
        dst = extracted_patch_copy / f"volume_000002_{suffix}"
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            meta = json.loads(src.read_text())
            meta["volume_index"] = 2
            dst.write_text(json.dumps(meta))
    r = check_output(extracted_patch_copy, verify=True)
    assert r["ok"] and r["completed_indices"] == [0, 1, 2]
    assert sorted(c["configuration"]["store"] for c in r["configurations"]) == ["patch", "voxel"]
