"""``evaluate``: metrics on constructed embeddings, report files, labelled images and profiles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinocell.errors import DataError, UserError
from dinocell.evaluate import run as R
from dinocell.evaluate.consistency import channel_consistency

SYNTH = ["data.synthetic.n_fields=16", "data.synthetic.size=32", "data.synthetic.sites_per_well=2",
         "data.synthetic.wells_per_plate=4", "data.synthetic.n_classes=2"]


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(path)


def test_evaluate_embeddings_on_invariant_separable_case() -> None:
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 8)
    base = rng.normal(0, 1, (3, 16))[y] + 0.1 * rng.standard_normal((24, 16))
    emb = np.repeat(base[:, None], 4, axis=1)  # 3 channels + mean image, identical per field
    res = R.evaluate_embeddings(emb, ["DNA", "ER", "RNA"], y.tolist())
    assert res["channel_consistency"]["centred"] == pytest.approx(1.0)
    assert res["cross_channel_retrieval"]["top1"] == pytest.approx(1.0)
    assert res["cross_channel_retrieval"]["chance"] == pytest.approx(1 / 24)
    assert len(res["channel_consistency"]["pairs"]) == 6
    assert set(res["probes"]["views"]) == {"DNA", "ER", "RNA", "mean image", "all channels (concat)"}
    for row in res["probes"]["views"].values():
        assert row == {"knn_k10": 1.0, "knn_k20": 1.0, "linear": 1.0}
    assert res["transfer"]["knn"]["mean_off_diagonal"] == 1.0
    assert res["probes"]["split"] == {"train": 12, "test": 12}
    json.dumps(res)  # JSON-safe: no NaN, no numpy


def test_evaluate_embeddings_matches_direct_metrics_and_skips_probes() -> None:
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((10, 3, 8))
    res = R.evaluate_embeddings(emb, ["a", "b"], None)
    direct, mat = channel_consistency(emb[:, :2], centre=True)
    assert res["channel_consistency"]["centred"] == pytest.approx(direct)
    assert np.allclose(res["channel_consistency"]["matrix"], mat)
    assert "probes" not in res and "transfer" not in res
    res = R.evaluate_embeddings(emb, ["a", "b"], [0] * 10)
    assert "two classes" in res["probes_skipped"]


def test_evaluate_model_on_synthetic_writes_report(export_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    res = R.evaluate(export_path, out_dir=out, data="synthetic", overrides=SYNTH, ks=(3, 5))
    assert res["n_fields"] == 16 and res["size"] == 32 and res["channels"] == ["DNA", "ER", "RNA", "AGP", "Mito"]
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["channel_consistency"]["centred"] == pytest.approx(res["channel_consistency"]["centred"])
    assert np.asarray(saved["channel_consistency"]["matrix"]).shape == (5, 5)
    assert set(saved["probes"]["views"]["DNA"]) == {"knn_k3", "knn_k5", "linear"}
    assert np.asarray(saved["transfer"]["linear"]["matrix"]).shape == (5, 5)
    md = (out / "evaluation.md").read_text()
    for text in ("## Channel consistency", "| DNA | ER |", "## Phenotype probes", "kNN k=3", "fit \\ test",
                 "![retrieval_examples](retrieval_examples.png)"):
        assert text in md
    for name in ("consistency_matrix.png", "consistency_matrix_raw.png", "transfer_knn.png",
                 "retrieval_examples.png"):
        img = _png(out / name)
        assert img.ndim == 3 and img.shape[0] > 200 and img[..., :3].std() > 0.05
    # 6 query rows x 6 columns of 1.5/1.6 inch at 100 dpi
    assert _png(out / "retrieval_examples.png").shape[:2] == (round(100 * (1.6 * 6 + 0.5)),
                                                              round(100 * (1.5 * 6 + 0.3)))
    assert R.default_out_dir(export_path, None) == export_path.parent.parent / "eval"


def _write_labelled(root: Path, n_per_class: int = 4) -> None:
    import tifffile

    rng = np.random.default_rng(0)
    for cls, level in (("bright", 40000), ("dim", 4000)):
        (root / cls).mkdir(parents=True)
        for i in range(n_per_class):
            img = rng.integers(0, level, size=(2, 40, 40)).astype(np.uint16)
            img[:, 10:20, 10:20] = level  # a blob
            tifffile.imwrite(root / cls / f"{i}.tif", img, photometric="minisblack")
    (root / "dim" / "broken.tif").write_bytes(b"not a tiff")


def test_evaluate_labelled_folder_and_csv(export_path: Path, tmp_path: Path) -> None:
    _write_labelled(tmp_path / "lab")
    res = R.evaluate(export_path, out_dir=tmp_path / "e1", labelled=str(tmp_path / "lab"), ks=(3,))
    assert res["classes"] == ["bright", "dim"] and res["n_fields"] == 8 and res["channels"] == ["ch0", "ch1"]
    assert len(res["skipped"]) == 1 and "broken.tif" in res["skipped"][0]
    assert "probes" in res and "transfer" in res

    rows = [{"path": f"lab/{c}/{i}.tif", "label": c} for c in ("bright", "dim") for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    res2 = R.evaluate(export_path, out_dir=tmp_path / "e2", labels_csv=str(tmp_path / "labels.csv"), ks=(3,))
    assert res2["n_fields"] == 8
    assert res2["channel_consistency"]["centred"] == pytest.approx(res["channel_consistency"]["centred"])
    pd.DataFrame({"file": ["x"], "label": ["a"]}).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="needs columns 'path' and 'label'"):
        R.evaluate(export_path, out_dir=tmp_path / "e3", labels_csv=str(tmp_path / "bad.csv"))


def test_read_multichannel_layouts(tmp_path: Path) -> None:
    import cv2
    import tifffile

    tifffile.imwrite(tmp_path / "g.tif", np.zeros((8, 9), np.uint16))
    tifffile.imwrite(tmp_path / "c.tif", np.zeros((4, 8, 9), np.uint16), photometric="minisblack")
    rgb = np.zeros((8, 9, 3), np.uint8)
    rgb[..., 2] = 255  # red in BGR order
    cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    assert R.read_multichannel(tmp_path / "g.tif").shape == (1, 8, 9)
    assert R.read_multichannel(tmp_path / "c.tif").shape == (4, 8, 9)
    x = R.read_multichannel(tmp_path / "rgb.png")
    assert x.shape == (3, 8, 9) and x[0].min() == 255 and x[2].max() == 0  # converted to RGB
    with pytest.raises(DataError, match="not found"):
        R.read_multichannel(tmp_path / "nope.tif")


def test_evaluate_profiles_only_and_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for lab in ("A", "B"):
        for w in range(3):
            rows.append({"Metadata_Plate": "P1", "Metadata_Well": f"{lab}{w:02d}", "Metadata_Label": lab})
    for w in range(4):
        rows.append({"Metadata_Plate": "P1", "Metadata_Well": f"H{w:02d}", "Metadata_Label": "control"})
    df = pd.DataFrame(rows)
    centres = {"A": 3.0, "B": -3.0, "control": 0.0}
    feats = np.stack([centres[lab] * np.ones(6) + rng.standard_normal(6) for lab in df["Metadata_Label"]])
    for i in range(6):
        df[f"emb_{i}"] = feats[:, i]
    path = tmp_path / "wells.parquet"
    df.to_parquet(path)
    res = R.evaluate(profiles=str(path), null_size=200)
    assert res["out_dir"] == str(tmp_path / "eval")
    assert 0 <= res["profiles"]["mean_average_precision"] <= 1 and res["profiles"]["n_labels"] == 2
    md = (tmp_path / "eval" / "evaluation.md").read_text()
    assert "replicate retrieval (copairs)" in md and "| A |" in md
    with pytest.raises(UserError, match="nothing to evaluate"):
        R.evaluate()
