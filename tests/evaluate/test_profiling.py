"""copairs replicate-retrieval mAP on hand-computed and separable profiles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from dinocell.errors import DataError
from dinocell.evaluate.profiling import control_mask, feature_columns, read_profiles, replicate_map


def _frame(rows: list[tuple[str, str, bool, list[float]]], plate: str = "P1") -> pd.DataFrame:
    d = len(rows[0][3])
    data = {
        "Metadata_Plate": [plate] * len(rows),
        "Metadata_Well": [r[0] for r in rows],
        "Metadata_Label": [r[1] for r in rows],
        "Metadata_Control": [r[2] for r in rows],
    }
    for i in range(d):
        data[f"emb_{i}"] = [r[3][i] for r in rows]
    return pd.DataFrame(data)


def test_replicate_map_hand_case() -> None:
    # A: replicates are each other's nearest neighbours -> AP 1, 1.
    # B: control C1 sits between B1 and B2 for both queries -> the replicate is 2nd -> AP 1/2, 1/2.
    rows = [
        ("A01", "A", False, [1.0, 0.0, 0.0]),
        ("A02", "A", False, [1.0, 0.1, 0.0]),
        ("B01", "B", False, [0.0, 1.0, 0.0]),
        ("B02", "B", False, [0.0, 1.0, 0.5]),
        ("C01", "control", True, [0.0, 1.0, 0.2]),
        ("C02", "control", True, [0.0, 0.0, 1.0]),
        ("C03", "control", True, [-1.0, 0.0, 0.0]),
    ]
    out = replicate_map(_frame(rows), null_size=500, normalize="none")
    per = {r["label"]: r["mAP"] for r in out["per_label"]}
    assert per == {"A": pytest.approx(1.0), "B": pytest.approx(0.5)}
    assert out["mean_average_precision"] == pytest.approx(0.75)
    assert out["mean_average_precision_per_profile"] == pytest.approx(0.75)
    assert out["n_controls"] == 3 and out["n_labels"] == 2


def test_same_well_fields_are_not_replicates() -> None:
    # two fields of well A01 are identical, but only the other well counts as a replicate
    rows = [
        ("A01", "A", False, [1.0, 0.0]),
        ("A01", "A", False, [1.0, 0.0]),
        ("A02", "A", False, [0.0, 1.0]),
        ("C01", "control", True, [0.8, 0.6]),
    ]
    out = replicate_map(_frame(rows), null_size=200, normalize="none")
    # queries from A01: negatives = C01 (cos .8) beats A02 (cos 0) -> AP 1/2 twice;
    # query A02: its positives are the two A01 fields (cos 0), control cos .6 first -> AP (1/2 + 2/3)/2
    expected = (0.5 + 0.5 + (1 / 2 + 2 / 3) / 2) / 3
    assert out["mean_average_precision"] == pytest.approx(expected)


def test_separable_replicates_are_all_retrieved() -> None:
    rng = np.random.default_rng(0)
    rows = []
    centres = rng.normal(0, 1, (5, 16))
    for lab in range(4):
        for rep in range(4):
            rows.append((f"{'ABCD'[lab]}{rep + 1:02d}", f"pheno{lab}", False,
                         list(centres[lab] + 0.05 * rng.standard_normal(16))))
    for rep in range(8):
        rows.append((f"H{rep + 1:02d}", "control", True, list(centres[4] + 0.05 * rng.standard_normal(16))))
    out = replicate_map(_frame(rows), null_size=2000)
    assert out["mean_average_precision"] == pytest.approx(1.0)
    assert out["fraction_retrieved"] == 1.0 and out["fraction_retrieved_uncorrected"] == 1.0
    shuffled = _frame(rows)
    feats = feature_columns(shuffled)
    shuffled[feats] = rng.standard_normal((len(shuffled), 16))
    noise = replicate_map(shuffled, null_size=2000)
    assert noise["mean_average_precision"] < 0.7 and noise["fraction_retrieved"] < 1.0


def test_controls_from_label_and_errors(tmp_path) -> None:
    df = pd.DataFrame({"Metadata_Label": ["control", "A", "Control"], "emb_0": [1.0, 2.0, 3.0]})
    assert control_mask(df).tolist() == [True, False, True]
    df2 = pd.DataFrame({"Metadata_Control": ["True", "false", "1"], "Metadata_Label": ["x", "y", "z"]})
    assert control_mask(df2).tolist() == [True, False, True]
    with pytest.raises(DataError, match="no control profiles"):
        replicate_map(pd.DataFrame({"Metadata_Label": ["A", "A"], "emb_0": [1.0, 2.0]}))
    with pytest.raises(DataError, match="no feature columns"):
        replicate_map(pd.DataFrame({"Metadata_Label": ["A"], "x": [1.0]}))
    with pytest.raises(DataError, match="replicate wells"):
        replicate_map(_frame([("A01", "A", False, [1.0]), ("B01", "B", False, [0.5]),
                              ("C01", "control", True, [0.1])]), null_size=100)
    with pytest.raises(DataError, match="not found"):
        read_profiles(tmp_path / "nope.parquet")
    df.to_csv(tmp_path / "p.csv", index=False)
    assert read_profiles(tmp_path / "p.csv").shape == (3, 2)


def test_normalize_features_per_plate() -> None:
    from dinocell.evaluate.profiling import normalize_features

    x = np.array([[1.0, 5.0], [3.0, 5.0], [10.0, 0.0], [14.0, 2.0]])
    plates = np.array(["P1", "P1", "P2", "P2"])
    ctrl = np.array([True, False, True, False])
    z = normalize_features(x, plates, ctrl, "standardize")
    assert np.allclose(z, [[-1, 0], [1, 0], [-1, -1], [1, 1]])  # constant feature on P1 -> 0
    assert np.allclose(normalize_features(x, plates, ctrl, "center"), [[-1, 0], [1, 0], [-2, -1], [2, 1]])
    assert np.array_equal(normalize_features(x, plates, ctrl, "none"), x)
    with pytest.raises(DataError, match="fewer than 2 control"):
        normalize_features(x, plates, ctrl, "control")
    with pytest.raises(DataError, match="unknown normalisation"):
        normalize_features(x, plates, ctrl, "spherize")


def test_constant_features_do_not_score_perfectly() -> None:
    """copairs puts tied positives first: without normalisation a collapsed model would get mAP 1."""
    rows = [(f"A{i:02d}", "A", False, [1.0, 2.0]) for i in range(1, 4)]
    rows += [(f"C{i:02d}", "control", True, [1.0, 2.0]) for i in range(1, 4)]
    assert replicate_map(_frame(rows), null_size=100, normalize="none")["mean_average_precision"] == 1.0
    with pytest.raises(DataError, match="collapsed"):
        replicate_map(_frame(rows), null_size=100)


@pytest.mark.slow
def test_trained_model_beats_untrained_on_replicate_map(tmp_path) -> None:
    """Synthetic plates whose replicate wells share a phenotype: a short multi-view pretraining must
    give profiles with higher replicate-retrieval mAP than the same architecture untrained."""
    import json

    import lightning as L

    from dinocell.cli import main
    from dinocell.config import load_config
    from dinocell.evaluate.embed import run_embed
    from dinocell.models.backbone import build_backbone
    from dinocell.models.loading import LoadedModel, preprocess_from_config
    from dinocell.train.run import pretrain
    tiny = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.patch_size=8",
            "head.prototypes=64", "head.hidden_dim=64", "head.bottleneck_dim=32",
            "data.views.global_crop_size=32", "data.views.local_crop_size=16", "data.views.n_local_crops=2",
            "data.synthetic.n_fields=64", "data.synthetic.size=64", "data.batch_size=8",
            "optim.lr=1e-3", "optim.warmup_epochs=1", "train.epochs=8",
            "track.logger=none", "train.progress_bar=false", "train.eval_fields=0"]
    cfg = load_config(None, tiny)
    run = tmp_path / "run"
    pretrain(cfg, run, max_steps=60)
    plates = ["data.synthetic.n_fields=128", "data.synthetic.sites_per_well=2", "data.synthetic.wells_per_plate=32",
              "data.synthetic.n_classes=8"]  # held-out seed: 4 control wells + 7 phenotypes x 4 wells per plate
    assert main(["embed", str(run), "--out", str(tmp_path / "trained"), *plates]) == 0

    L.seed_everything(cfg.train.seed, verbose=False)
    run_cfg = load_config(run / "config.yaml")
    untrained = LoadedModel(build_backbone(cfg.model, img_size=32).eval(), preprocess_from_config(run_cfg), run_cfg,
                            "untrained")
    run_embed(untrained, tmp_path / "untrained", data="synthetic", overrides=plates)

    scores = {}
    for name in ("trained", "untrained"):
        for level in ("fields", "wells"):
            out = tmp_path / f"eval_{name}_{level}"
            assert main(["evaluate", "--profiles", str(tmp_path / name / f"{level}.parquet"), "--null-size", "1000",
                         "--out-dir", str(out)]) == 0
            scores[name, level] = json.loads((out / "evaluation.json").read_text())["profiles"]
    for level in ("fields", "wells"):
        trained, base = scores["trained", level], scores["untrained", level]
        assert trained["n_labels"] == 7 and trained["n_controls"] == (16 if level == "fields" else 8)
        assert trained["mean_average_precision"] > base["mean_average_precision"] + 0.02, (level, trained, base)
