from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
import yaml
from extract_stubs import MeanPatchModel

from dinocell.errors import ConfigError, DataError
from dinocell.extract import volumes as V
from dinocell.extract.synthetic_volumes import write_multiscale, write_synthetic_dataset
from dinocell.extract.volumes import (
    ExtractionConfig,
    ModelSpec,
    RandomInitWarning,
    S3Options,
    VolumeArray,
    VolumeEntry,
    choose_level,
    compute_volume_features,
    extract_volume,
    extraction_model,
    kvstore_spec,
    load_manifest,
    open_volume_array,
    quick_verify,
    sample_crop,
    sample_nearest,
    sample_raw,
    volume_paths,
)
from dinocell.extract.volumes import features as VF

# ------------------------------------------------------------------------------------------ URIs


def test_kvstore_specs():
    s3 = kvstore_spec("s3://bucket-a/some/vol.zarr/", S3Options(endpoint="http://127.0.0.1:9", anonymous=True))
    assert s3 == {"driver": "s3", "bucket": "bucket-a", "path": "some/vol.zarr/", "aws_region": "us-east-1",
                  "endpoint": "http://127.0.0.1:9", "aws_credentials": {"type": "anonymous"}}
    f = kvstore_spec("file:///tmp/x.zarr")
    assert f == {"driver": "file", "path": "/tmp/x.zarr/"}
    with pytest.raises(DataError, match="unsupported URI scheme"):
        kvstore_spec("gs://b/x")


def test_choose_level_prefers_coarsest_not_coarser_than_target():
    scales = [np.array([4.0, 4, 4]), np.array([8.0, 8, 8]), np.array([16.0, 16, 16])]
    assert choose_level(scales, None) == 0
    assert choose_level(scales, np.array([8.0, 8, 8])) == 1
    assert choose_level(scales, np.array([12.0, 12, 12])) == 1
    assert choose_level(scales, np.array([2.0, 2, 2])) == 0  # all coarser: finest, then upsampled
    assert choose_level(scales, np.array([8.0, 16, 16])) == 1  # anisotropic target


# -------------------------------------------------------------------------------------- manifest


def test_yaml_manifest_resolves_relative_paths(tmp_path):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"volumes": [
        {"name": "a", "raw": "data/a.zarr/raw", "labels": {"mito": "data/a.zarr/labels/mito"},
         "crop": [0, 0, 0, 80, 80, 80], "dataset": "jrc", "resolution": 8},
        {"raw": "s3://bkt/b.zarr/raw"}]}))
    a, b = load_manifest(tmp_path / "m.yaml")
    assert a.raw == str(tmp_path / "data/a.zarr/raw")
    assert a.labels == {"mito": str(tmp_path / "data/a.zarr/labels/mito")}
    assert a.crop == [0, 0, 0, 80, 80, 80] and a.resolution == [8.0, 8.0, 8.0] and a.dataset == "jrc"
    assert b.raw == "s3://bkt/b.zarr/raw" and b.name == "volume_1" and b.labels == {}


def test_csv_manifest_with_label_columns(tmp_path):
    (tmp_path / "m.csv").write_text("name,raw,label_mito,label_er,crop\n"
                                    "v,/abs/raw.tif,/abs/mito.tif,,8 8 8 64 64 64\n")
    (e,) = load_manifest(tmp_path / "m.csv")
    assert e.labels == {"mito": "/abs/mito.tif"} and e.crop == [8, 8, 8, 64, 64, 64]


@pytest.mark.parametrize("content,match", [
    ({"volumes": [{"name": "x"}]}, "has no 'raw' URI"),
    ({"volumes": [{"raw": "r", "crop": [0, 0, 0, 1, 1]}]}, "crop needs 6 numbers"),
    ({"volumes": [{"raw": "r", "crop": [5, 0, 0, 1, 1, 1]}]}, "z0<z1"),
    ({"volumes": []}, "lists no volumes"),
    ({"other": 1}, "must hold a list of volumes"),
])
def test_manifest_errors(tmp_path, content, match):
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match=match):
        load_manifest(p)


def test_missing_manifest():
    with pytest.raises(ConfigError, match="manifest not found"):
        load_manifest("/nonexistent/m.yaml")


# ---------------------------------------------------------------------------------- array access


def test_tiff_and_n5_open_in_zyx_order(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.uint16).reshape(4, 5, 6)
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="minisblack")
    t = open_volume_array(str(tmp_path / "s.tif"), resolution=[10, 5, 5])
    assert t.shape == (4, 5, 6) and t.fmt == "tiff"
    np.testing.assert_allclose(t.scale, [10, 5, 5])
    n5 = write_multiscale(tmp_path / "v.n5", data, "n5", resolution=(10, 5, 5), n_levels=1)
    a = open_volume_array(str(n5))
    assert a.shape == (4, 5, 6) and a.fmt == "n5"
    np.testing.assert_allclose(a.scale, [10, 5, 5])
    np.testing.assert_array_equal(a.read_box((0, 0, 0), (4, 5, 6)), data)


def test_open_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="cannot open"):
        open_volume_array(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="TIFF stack not found"):
        open_volume_array(str(tmp_path / "nope.tif"))


def test_read_box_pads_outside_with_zero():
    arr = VolumeArray("mem", np.arange(8, dtype=np.uint8).reshape(2, 2, 2) + 1, np.ones(3), np.zeros(3))
    box = arr.read_box((-1, 0, 0), (2, 2, 3))
    assert box.shape == (3, 2, 3)
    assert (box[0] == 0).all() and (box[:, :, 2] == 0).all()
    np.testing.assert_array_equal(box[1:, :, :2], arr.data)


def test_sample_nearest_respects_scale_and_translation():
    # 4 voxels of 2 nm along x starting at x=2 nm; sampled at 1 nm from origin 0.
    lab = np.array([1, 2, 3, 4], np.uint32).reshape(1, 1, 4)
    arr = VolumeArray("mem", lab, np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.0, 2.0]))
    vals, inside = sample_nearest(arr, np.zeros(3), np.ones(3), 10)
    # output voxel x covers [x, x+1): centre x+0.5 -> label index floor((x+0.5-2)/2)
    np.testing.assert_array_equal(vals[0, 0], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(inside[0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    assert not inside[1:].any()  # z, y beyond the 1-voxel array


def test_sample_raw_direct_and_resampled():
    ramp = np.tile(np.arange(16, dtype=np.uint8) * 10, (16, 16, 1))  # x ramp
    arr = VolumeArray("mem", ramp, np.full(3, 4.0), np.zeros(3))
    direct = sample_raw(arr, np.array([4.0, 8.0, 12.0]), np.full(3, 4.0), 8)
    np.testing.assert_allclose(direct, ramp[1:9, 2:10, 3:11] / 255.0)
    # 2 nm output grid on 4 nm voxels: linear interpolation of a linear ramp is exact inside
    res = sample_raw(arr, np.array([8.0, 8.0, 8.0]), np.full(3, 2.0), 8)
    centres = (8.0 + (np.arange(8) + 0.5) * 2.0) / 4.0 - 0.5  # continuous x index of each output voxel
    np.testing.assert_allclose(res[3, 3], centres * 10 / 255.0, atol=1e-5)


# ------------------------------------------------------------------------------------ crop sampling


def test_crop_is_seeded_by_index(synthetic_manifest, tmp_path, make_cfg):
    entries = load_manifest(synthetic_manifest)
    cfg = make_cfg(tmp_path, synthetic_manifest)
    a = sample_crop(entries, 2, cfg)
    b = sample_crop(entries, 2, cfg)
    c = sample_crop(entries, 4, cfg)
    np.testing.assert_array_equal(a.origin_nm, b.origin_nm)
    np.testing.assert_array_equal(a.raw, b.raw)
    assert a.entry.name == c.entry.name == "vol_000"  # index % n_volumes
    assert sample_crop(entries, 3, cfg).entry.name == "vol_001"
    assert a.raw.shape == (16, 16, 16) and a.gt.shape == (3, 16, 16, 16) and a.mask.shape == (1, 16, 16, 16)
    assert 0.0 <= a.raw.min() and a.raw.max() <= 1.0


def test_partial_labels_give_partial_mask(synthetic_manifest, tmp_path, make_cfg):
    entries = load_manifest(synthetic_manifest)
    crop = sample_crop(entries, 1, make_cfg(tmp_path, synthetic_manifest))
    frac = crop.stats["valid_gt_fraction"]
    assert 0.0 < frac < 1.0 and frac == pytest.approx(crop.mask.mean())
    assert not (crop.gt[:, crop.mask[0] == 0] > 0).any()


def test_criteria(synthetic_manifest, tmp_path, make_cfg):
    entries = load_manifest(synthetic_manifest)
    crop = sample_crop(entries, 0, make_cfg(tmp_path, synthetic_manifest, min_unique_ids=3))
    assert crop.stats["unique_ids"] >= 3
    with pytest.raises(DataError, match="no crop met min_label_fraction=0.99"):
        sample_crop(entries, 0, make_cfg(tmp_path, synthetic_manifest, min_label_fraction=0.99, max_tries=5))
    with pytest.raises(DataError, match="smaller than the output crop"):
        sample_crop(entries, 0, make_cfg(tmp_path, synthetic_manifest, output_image_dim=32))


def test_manifest_crop_limits_mask(synthetic_manifest, tmp_path, make_cfg):
    (e0,) = load_manifest(synthetic_manifest)[:1]
    e = VolumeEntry(name="c", raw=e0.raw, labels=e0.labels, crop=[0, 0, 0, 96, 192, 192])
    crop = sample_crop([e], 0, make_cfg(tmp_path, None))
    z_centres = crop.origin_nm[0] + (np.arange(16) + 0.5) * 8
    np.testing.assert_array_equal(crop.mask[0, :, 0, 0], (z_centres < 96).astype(np.uint8))


def test_other_resolution_uses_coarser_level(tmp_path, make_cfg):
    m = write_synthetic_dataset(tmp_path / "src", n_volumes=1, shape=(40, 40, 40), fmt="zarr2")
    crop = sample_crop(load_manifest(m), 0, make_cfg(tmp_path, m, base_resolution=[16.0]))
    assert crop.raw_info["level"] == "s1"
    np.testing.assert_allclose(crop.resolution, [16, 16, 16])


# ------------------------------------------------------------------------------------------ features


def test_z_slices_upsample_per_slice_features():
    d = 8
    vol = np.broadcast_to((np.arange(d, dtype=np.float32) / d)[:, None, None], (d, 8, 8)).copy()
    f = compute_volume_features(vol, MeanPatchModel(), axes="z", batch_size=3)
    assert f.shape == (2, 8, 8, 8) and f.dtype == np.float16
    np.testing.assert_allclose(f[0], vol, atol=1e-3)  # constant per slice survives pooling + upsampling
    np.testing.assert_allclose(f[1], 1.0)


def test_three_axes_keep_axis_order():
    n = 16
    ramp = np.broadcast_to(np.linspace(0, 1, n, dtype=np.float32)[None, None, :], (n, n, n)).copy()
    f = compute_volume_features(ramp, MeanPatchModel(), axes="zyx", out_dtype="float32")
    # inside the first/last patch centres bilinear upsampling of patch means is exact for a ramp
    inner = slice(2, n - 2)
    np.testing.assert_allclose(f[0][:, :, inner], ramp[:, :, inner], atol=1e-5)
    z_only = compute_volume_features(ramp, MeanPatchModel(), axes="z", out_dtype="float32")
    np.testing.assert_allclose(z_only[0][:, :, inner], ramp[:, :, inner], atol=1e-5)


def test_side_must_be_multiple_of_patch():
    with pytest.raises(ConfigError, match="multiples of the patch size 4"):
        compute_volume_features(np.zeros((6, 8, 8), np.float32), MeanPatchModel())


# --------------------------------------------------------------------------------- extract + verify


def test_extract_volume_outputs(extracted_dir):
    meta = json.loads((extracted_dir / "volume_000001_metadata.json").read_text())
    assert meta["volume_index"] == 1 and meta["volume_name"] == "volume_000001"
    assert meta["shapes"] == {"features": [32, 16, 16, 16], "gt": [3, 16, 16, 16], "mask": [1, 16, 16, 16]}
    assert meta["dtypes"] == {"features": "float16", "gt": "uint32", "mask": "uint8"}
    assert meta["configuration"]["compression"] == "zstd"
    assert meta["configuration"]["model"]["source"] == "random-init"
    assert set(meta["timing"]) >= {"extraction_seconds", "write_seconds", "total_seconds"}
    assert meta["storage"]["total_gb"] > 0
    assert 0 < meta["statistics"]["valid_gt_fraction"] < 1
    assert meta["statistics"]["classes"] == ["nucleus", "mito", "vesicle"]
    from dinocell.provenance import provenance

    assert {k: meta[k] for k in ("dinocell_version", "git_commit")} == provenance()  # the code that made it
    zarr = json.loads((extracted_dir / "volume_000001_features.zarr" / "zarr.json").read_text())
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [16, 16, 16, 16]
    assert [c["name"] for c in zarr["codecs"]] == ["bytes", "zstd"]
    assert quick_verify(extracted_dir, 1) == []


@pytest.mark.parametrize("compression,checksum,codecs", [
    ("none", False, ["bytes"]), ("none", True, ["bytes", "crc32c"]),
    ("blosc-lz4", True, ["bytes", "blosc", "crc32c"]), ("zstd", False, ["bytes", "zstd"])])
def test_compression_and_chunks(synthetic_manifest, tmp_path, compression, checksum, codecs, make_cfg):
    cfg = make_cfg(tmp_path, synthetic_manifest, compression=compression, checksum=checksum, chunks=[8, 8, 16, 16],
                   store="voxel")
    extract_volume(cfg, 0)
    zarr = json.loads((tmp_path / "volume_000000_features.zarr" / "zarr.json").read_text())
    assert [c["name"] for c in zarr["codecs"]] == codecs
    assert zarr["chunk_grid"]["configuration"]["chunk_shape"] == [8, 8, 16, 16]
    assert quick_verify(tmp_path, 0) == []  # 4 * 2 chunk files, all present


def test_quick_verify_catches_missing_chunk_and_shape(extracted_copy):
    chunk = next((extracted_copy / "volume_000000_features.zarr" / "c").rglob("*"))
    while chunk.is_dir():
        chunk = next(chunk.iterdir())
    chunk.unlink()
    assert any("chunk files present" in p for p in quick_verify(extracted_copy, 0))
    meta_path = extracted_copy / "volume_000001_metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["shapes"]["gt"] = [2, 16, 16, 16]
    meta_path.write_text(json.dumps(meta))
    assert any(p.startswith("gt: shape") for p in quick_verify(extracted_copy, 1))
    assert quick_verify(extracted_copy, 7) == ["metadata missing or unreadable"]


def test_failed_reextraction_leaves_no_marker(extracted_copy, synthetic_manifest, make_cfg):
    cfg = make_cfg(extracted_copy, synthetic_manifest, min_label_fraction=0.99, max_tries=2)
    with pytest.raises(DataError):
        extract_volume(cfg, 0)
    assert not volume_paths(extracted_copy, 0)["metadata"].exists()  # stale marker removed first


def test_default_source_is_synthetic(tmp_path, make_cfg):
    meta = extract_volume(make_cfg(tmp_path, None), 5)
    assert meta["source"]["dataset"] == "synthetic"
    assert (tmp_path / "synthetic_source_e24" / "manifest.yaml").is_file()


def test_config_validation(tmp_path):
    for kw, match in [({"compression": "gzip"}, "--compression"), ({"axes": "xy"}, "--axes"),
                      ({"chunks": [1, 2]}, "--chunks"), ({"min_label_fraction": 2.0}, "min-label-fraction")]:
        with pytest.raises(ConfigError, match=match):
            ExtractionConfig(output_dir=str(tmp_path), **kw).validate()


def test_config_roundtrip():
    cfg = ExtractionConfig(output_dir="/o", model=ModelSpec(model_name="m"), s3=S3Options(endpoint="e"))
    again = ExtractionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


# --------------------------------------------------------------------------------------------- models


def test_random_init_warns_and_is_seeded(monkeypatch):
    monkeypatch.setattr(VF, "_MODEL_CACHE", {})
    with pytest.warns(RandomInitWarning, match="RANDOM weights"):
        m1, info = extraction_model(ModelSpec(seed=1), 16)
    assert info["source"] == "random-init" and info["embed_dim"] == 32 and info["patch_size"] == 8
    monkeypatch.setattr(VF, "_MODEL_CACHE", {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m2, _ = extraction_model(ModelSpec(seed=1), 16)
    for a, b in zip(m1.backbone.state_dict().values(), m2.backbone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_backbone_from_export_and_run_folder(tmp_path, monkeypatch):
    from dinocell.config import Config, ModelConfig, save_config
    from dinocell.models.backbone import build_backbone
    from dinocell.models.loading import Preprocess
    from dinocell.models.timm_export import save_timm

    mcfg = ModelConfig(**V.TINY_MODEL)
    torch.manual_seed(7)
    bb = build_backbone(mcfg, 16)
    export = save_timm(bb, tmp_path / "export" / "backbone", Preprocess(patch_size=bb.patch_size, crop_size=16))
    monkeypatch.setattr(VF, "_MODEL_CACHE", {})
    loaded, info = extraction_model(ModelSpec(backbone=str(export)), 16)
    assert info["source"] == "export"
    torch.testing.assert_close(loaded.backbone.state_dict(), bb.state_dict())

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = Config()
    cfg.model = mcfg
    save_config(cfg, run)
    teacher = {f"meta.teacher.backbone.{k}": v for k, v in bb.state_dict().items()}
    student = {f"meta.student.backbone.{k}": torch.zeros_like(v) for k, v in bb.state_dict().items()}
    torch.save({"state_dict": {**student, **teacher}}, run / "checkpoints" / "last.ckpt")
    monkeypatch.setattr(VF, "_MODEL_CACHE", {})
    loaded, info = extraction_model(ModelSpec(backbone=str(run)), 16)
    assert info["source"] == "checkpoint"
    torch.testing.assert_close(loaded.backbone.state_dict(), bb.state_dict())  # the teacher, not the student
    with pytest.raises(DataError, match="--backbone not found"):
        extraction_model(ModelSpec(backbone=str(tmp_path / "nope.safetensors")), 16)


# ------------------------------------------------------------------------------------------------ s3


def test_s3_volume_via_local_moto(tmp_path, monkeypatch, make_cfg):
    """Raw + labels read through TensorStore's S3 kvstore from a moto server on 127.0.0.1."""
    import boto3
    import moto.server as moto_server
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    src = tmp_path / "src"
    write_synthetic_dataset(src, n_volumes=1, shape=(24, 24, 24), fmt="zarr3", n_levels=1)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket="vols")
        for p in (src / "vol_000.zarr").rglob("*"):
            if p.is_file():
                client.upload_file(str(p), "vols", f"data/{p.relative_to(src)}")
        manifest = tmp_path / "s3.yaml"
        manifest.write_text(yaml.safe_dump({"volumes": [{
            "name": "remote", "raw": "s3://vols/data/vol_000.zarr/raw",
            "labels": {"mito": "s3://vols/data/vol_000.zarr/labels/mito"}}]}))
        cfg = make_cfg(tmp_path / "out", manifest, s3=S3Options(endpoint=endpoint))
        meta = extract_volume(cfg, 0)
        local = sample_crop(load_manifest(src / "manifest.yaml"), 0, make_cfg(tmp_path / "x", None))
    finally:
        server.stop()
    assert meta["source"]["raw"].startswith("s3://") and meta["statistics"]["classes"] == ["mito"]
    import tensorstore as ts

    gt = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(
        tmp_path / "out" / "volume_000000_gt.zarr")}}).result().read().result()
    np.testing.assert_array_equal(meta["source"]["origin_nm"], local.origin_nm)  # same seeded crop
    np.testing.assert_array_equal(gt[0], local.gt[1])  # mito is class 1 of the local manifest
    shutil.rmtree(tmp_path / "out")


def test_stale_paths_are_local():
    assert isinstance(volume_paths("/x", 3)["metadata"], Path)
    assert volume_paths("/x", 3)["error"] == Path("/x/logs/volume_000003.err")


@pytest.mark.parametrize("n_in,n_out", [(2, 16), (8, 128), (3, 7), (5, 5)])
def test_bilinear_matrix_matches_interpolate(n_in, n_out):
    from dinocell.extract.volumes import bilinear_matrix

    x = torch.randn(2, 3, n_in, n_in + 1)
    want = F.interpolate(x, size=(n_out, n_out + 2), mode="bilinear", align_corners=False)
    got = bilinear_matrix(n_in, n_out) @ x @ bilinear_matrix(n_in + 1, n_out + 2).T
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
