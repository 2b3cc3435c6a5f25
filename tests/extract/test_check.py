from __future__ import annotations

import json

import numpy as np
import pytest
import tensorstore as ts

from dinocell.errors import DataError
from dinocell.extract.check import _ranges, check_output, format_report, verify_volume
from dinocell.extract.volumes import volume_paths


def _open(path):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result()


def test_healthy_report(extracted_dir):
    r = check_output(extracted_dir, verify=True)
    assert r["ok"] and r["completed"] == 2 and r["completed_indices"] == [0, 1]
    assert r["missing_indices"] == [] and r["failed"] == {} and r["incomplete"] == {}
    assert r["verify"] == {"checked": [0, 1], "problems": {}, "ok": True}
    assert r["timing"]["total_seconds"]["count"] == 2 and r["timing"]["total_seconds"]["max"] > 0
    per_array = r["storage"]["per_array_gb"]
    assert r["storage"]["total_gb"] == pytest.approx(sum(per_array.values()))
    assert per_array["features"] > per_array["gt"] > 0
    assert r["sources"] == {"synthetic": 2}
    (cfg,) = r["configurations"]
    assert cfg["volumes"] == 2 and cfg["configuration"]["compression"] == "zstd"
    assert r["statistics"]["classes"] == ["mito", "nucleus", "vesicle"]
    text = format_report(r)
    assert "completed: 2  [0-1]" in text and "status: OK" in text and "all healthy" in text


def test_corrupt_chunk_is_flagged(extracted_copy):
    chunk = volume_paths(extracted_copy, 0)["features"] / "c" / "1" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
    chunk.write_bytes(bytes(data))
    r = check_output(extracted_copy)
    assert r["ok"] and r["completed"] == 2  # metadata and chunk counts cannot see it ...
    r = check_output(extracted_copy, verify=True)
    assert not r["ok"] and list(r["verify"]["problems"]) == ["0"]  # ... reading does
    (problem,) = r["verify"]["problems"]["0"]
    assert problem.startswith("features: chunk at (16, 0, 0, 0) unreadable")
    assert "volume 0: features: chunk at (16, 0, 0, 0)" in format_report(r)


def test_nan_features_bad_mask_and_gt_outside_mask(extracted_copy):
    paths = volume_paths(extracted_copy, 1)
    feats = _open(paths["features"])
    feats[3, 2, 2, 2] = np.float16(np.nan)
    feats[4, 0, 0, 0] = np.float16(np.inf)
    mask = _open(paths["mask"])
    m = mask.read().result()
    zero = np.argwhere(m[0] == 0)[0]
    gt = _open(paths["gt"])
    gt[(1, *zero)] = 5  # a label where the ground truth is undefined
    probs = verify_volume(extracted_copy, 1)
    assert "features: 2 NaN/Inf values" in probs and "gt: labels outside the valid mask" in probs
    mask[0, 0, 0, 0] = 3
    assert "mask: chunk at (0, 0, 0, 0) holds values other than 0/1" in verify_volume(extracted_copy, 1)


def test_sample_and_explicit_verify(extracted_dir):
    r = check_output(extracted_dir, verify=True, sample_size=1)
    assert len(r["verify"]["checked"]) == 1 and r["verify"]["ok"]
    r = check_output(extracted_dir, verify=True, verify_indices=[1, 5])
    assert r["verify"]["checked"] == [1, 5] and r["verify"]["problems"] == {"5": ["not complete (no valid metadata)"]}


def test_missing_chunk_and_missing_dir(extracted_copy, tmp_path):
    (volume_paths(extracted_copy, 1)["mask"] / "c" / "0" / "0" / "0" / "0").unlink()
    r = check_output(extracted_copy)
    assert r["completed_indices"] == [0] and r["missing_indices"] == [1]
    assert r["incomplete"]["1"] == ["mask: 0 of 1 chunk files present"]
    with pytest.raises(DataError, match="output directory not found"):
        check_output(tmp_path / "nothing")


def test_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert _ranges([]) == ""


def test_cli_json(extracted_dir, capsys):
    from dinocell.cli import main

    assert main(["check", "--output-dir", str(extracted_dir), "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 2 and report["missing_indices"] == [] and report["verify"]["ok"]


def test_crc32c_flags_corruption_of_uncompressed_chunks(tmp_path, synthetic_manifest, make_cfg):
    from dinocell.extract.volumes import extract_volume

    extract_volume(make_cfg(tmp_path, synthetic_manifest, compression="none"), 0)
    chunk = volume_paths(tmp_path, 0)["features"] / "c" / "0" / "0" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0x01  # a single flipped bit decodes to a plausible float16 without the checksum
    chunk.write_bytes(bytes(data))
    (problem,) = verify_volume(tmp_path, 0)
    assert problem.startswith("features: chunk at (0, 0, 0, 0) unreadable") and "igest" in problem
