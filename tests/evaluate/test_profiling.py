"""pycytominer aggregation/normalisation and copairs mAP on hand-computed and separable profiles."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from dinocell.errors import DataError
from dinocell.evaluate.profiling import (
    aggregate_wells,
    feature_columns,
    feature_name,
    metadata_columns,
    negcon_mask,
    normalize_profiles,
    read_profiles,
    replicate_map,
)


def _frame(rows: list[tuple[str, str, bool, list[float]]], plate: str = "P1", prefix: str = "emb_") -> pd.DataFrame:
    d = len(rows[0][3])
    data: dict[str, list] = {
        "Metadata_Plate": [plate] * len(rows),
        "Metadata_Well": [r[0] for r in rows],
        "Metadata_Label": [r[1] for r in rows],
        "Metadata_Control": [r[2] for r in rows],
    }
    for i in range(d):
        data[f"{prefix}{i}"] = [r[3][i] for r in rows]
    return pd.DataFrame(data)


def _separable(rng: np.random.Generator, plates: int = 2, noise: float = 0.05) -> pd.DataFrame:
    """4 perturbations x 2 wells per plate + 16 negcon wells per plate (MAD needs a few), JUMP-style metadata."""
    centres = rng.normal(0, 1, (5, 16))
    frames = []
    for p in range(plates):
        rows = []
        for lab in range(4):
            for rep in range(2):
                rows.append((f"{'ABCD'[lab]}{rep + 1:02d}", f"JCP2022_00000{lab}", False,
                             list(centres[lab] + noise * rng.standard_normal(16))))
        for rep in range(16):
            rows.append((f"{'HIJK'[rep // 4]}{rep % 4 + 1:02d}", "JCP2022_033924", True, list(centres[4] + noise * rng.standard_normal(16))))
        f = _frame(rows, plate=f"P{p}", prefix="Cells_dinocell_")
        frames.append(f.rename(columns={"Metadata_Label": "Metadata_JCP2022"}).drop(columns="Metadata_Control"))
    return pd.concat(frames, ignore_index=True)


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
    assert out["metric"] == "negcon" and per == {"A": pytest.approx(1.0), "B": pytest.approx(0.5)}
    assert out["mean_average_precision"] == pytest.approx(0.75)
    assert out["n_controls"] == 3 and out["n_labels"] == 2
    # nonrep: controls left out; A's replicate is first for both, B's too (A is orthogonal)
    assert out["nonrep"]["mean_average_precision"] == pytest.approx(1.0)


def test_same_well_fields_are_not_replicates() -> None:
    rows = [
        ("A01", "A", False, [1.0, 0.0]),
        ("A01", "A", False, [1.0, 0.0]),
        ("A02", "A", False, [0.0, 1.0]),
        ("C01", "control", True, [0.8, 0.6]),
    ]
    out = replicate_map(_frame(rows), null_size=200, normalize="none")
    # queries from A01: C01 (cos .8) beats A02 (cos 0) -> AP 1/2 twice;
    # query A02: its positives are the two A01 fields (cos 0), control cos .6 first -> AP (1/2 + 2/3)/2
    expected = (0.5 + 0.5 + (1 / 2 + 2 / 3) / 2) / 3
    assert out["mean_average_precision"] == pytest.approx(expected)


def test_separable_replicates_across_plates_are_retrieved() -> None:
    rng = np.random.default_rng(0)
    df = _separable(rng)
    out = replicate_map(df, null_size=2000)
    assert out["perturbation"] == "Metadata_JCP2022" and out["n_controls"] == 32 and out["n_labels"] == 4
    assert out["mean_average_precision"] == pytest.approx(1.0)
    assert out["fraction_retrieved"] == 1.0 and out["nonrep"]["mean_average_precision"] == pytest.approx(1.0)
    noise = df.copy()
    noise[feature_columns(df)] = rng.standard_normal((len(df), 16))
    bad = replicate_map(noise, null_size=2000)
    assert bad["mean_average_precision"] < 0.7 and bad["fraction_retrieved"] < 1.0


def test_without_negcons_falls_back_with_warnings(caplog: pytest.LogCaptureFixture) -> None:
    df = _separable(np.random.default_rng(1))
    df = df[df["Metadata_JCP2022"] != "JCP2022_033924"].reset_index(drop=True)
    with caplog.at_level(logging.WARNING, logger="dinocell.evaluate.profiling"):
        out = replicate_map(df, null_size=500)
    assert out["metric"] == "nonrep" and "negcon" not in out and out["n_controls"] == 0
    assert out["mean_average_precision"] == pytest.approx(1.0)
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "no negcon wells on plate(s) P0, P1" in text and "no negative-control profiles" in text


def test_normalisation_against_negcons() -> None:
    df = pd.DataFrame({"Metadata_Plate": ["P1"] * 4 + ["P2"] * 4,
                       "Metadata_pert_type": ["negcon", "negcon", "trt", "trt"] * 2,
                       feature_name(0): [1.0, 3.0, 10.0, 2.0, 101.0, 103.0, 110.0, 102.0],
                       feature_name(1): [5.0, 5.0, 6.0, 7.0, 0.0, 1.0, 2.0, 3.0]})
    z = normalize_profiles(df, "mad_robustize")
    # plate median of the negcons (2) and MAD (1 x 1.4826, pycytominer's normal-consistent MAD)
    assert np.allclose(z[feature_name(0)][:4], np.array([-1, 1, 8, 0]) / 1.4826, atol=1e-6)
    assert np.allclose(z[feature_name(0)][4:], z[feature_name(0)][:4])  # the plate offset is gone
    assert z[feature_name(1)][:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # no spread in P1's negcons -> 0
    assert list(z.columns) == list(df.columns)
    s = normalize_profiles(df, "standardize", spherize=True)
    assert np.isfinite(s[[feature_name(0), feature_name(1)]].to_numpy()).all()
    with pytest.raises(DataError, match="unknown normalisation"):
        normalize_profiles(df, "zscore")


def test_constant_features_do_not_score_perfectly() -> None:
    """copairs puts tied positives first: without normalisation a collapsed model would get mAP 1."""
    rows = [(f"A{i:02d}", "A", False, [1.0, 2.0]) for i in range(1, 4)]
    rows += [(f"C{i:02d}", "control", True, [1.0, 2.0]) for i in range(1, 4)]
    assert replicate_map(_frame(rows), null_size=100, normalize="none")["mean_average_precision"] == 1.0
    with pytest.raises(DataError, match="collapsed"):
        replicate_map(_frame(rows), null_size=100)


def test_errors_and_reading(tmp_path) -> None:
    with pytest.raises(DataError, match="no feature columns"):
        replicate_map(pd.DataFrame({"Metadata_Label": ["A"], "x": [1.0]}))
    with pytest.raises(DataError, match="replicate wells"):
        replicate_map(_frame([("A01", "A", False, [1.0]), ("B01", "B", False, [0.5]),
                              ("C01", "control", True, [0.1])]), null_size=100, normalize="none")
    with pytest.raises(DataError, match="every profile is a negative control"):
        replicate_map(_frame([("C01", "control", True, [1.0]), ("C02", "control", True, [0.5])]), normalize="none")
    with pytest.raises(DataError, match="not found"):
        read_profiles(tmp_path / "nope.parquet")
    df = pd.DataFrame({"Metadata_Label": ["control", "A", "Control"], "emb_0": [1.0, 2.0, 3.0]})
    assert negcon_mask(df).tolist() == [True, False, True]
    df.to_csv(tmp_path / "p.csv", index=False)
    assert read_profiles(tmp_path / "p.csv").shape == (3, 2)
    assert negcon_mask(pd.DataFrame({"Metadata_Control": ["True", "false", "1"]})).tolist() == [True, False, True]


def test_aggregate_wells_by_median() -> None:
    fields = pd.DataFrame({"Metadata_Plate": ["P"] * 4, "Metadata_Well": ["A01", "A01", "A01", "B01"],
                           "Metadata_Site": ["1", "2", "3", "1"], "Metadata_Label": ["x", "x", "x", "y"],
                           feature_name(0): [1.0, 2.0, 30.0, 5.0], feature_name(1): [0.0, 0.0, 3.0, 1.0]})
    wells = aggregate_wells(fields)
    assert wells[feature_name(0)].tolist() == [2.0, 5.0]  # the median ignores the outlier site
    assert wells["Metadata_Count"].tolist() == [3, 1] and wells["Metadata_Label"].tolist() == ["x", "y"]
    assert "Metadata_Site" not in wells.columns
    from pycytominer.cyto_utils.features import infer_cp_features

    assert infer_cp_features(wells) == [feature_name(0), feature_name(1)]  # pycytominer finds the features


def test_metadata_columns_from_load_data_rows() -> None:
    rows = [{"Metadata_Plate": "BR1", "Metadata_Well": "A1", "Metadata_Site": 1, "Metadata_Source": "source_4",
             "FileName_OrigDNA": "x.tiff"},
            {"Metadata_Plate": "BR1", "Metadata_Well": "B02", "Metadata_Site": 2, "Metadata_Source": "source_4"}]
    ann = pd.DataFrame({"Metadata_Plate": ["BR1", "BR1"], "Metadata_Well": ["A01", "B2"],
                        "Metadata_JCP2022": ["JCP2022_033924", "JCP2022_012345"]})
    meta = metadata_columns(rows, ann)
    assert list(meta.columns[:5]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Site", "Metadata_pert_type",
                                      "Metadata_JCP2022"]
    assert meta["Metadata_Well"].tolist() == ["A01", "B02"] and "FileName_OrigDNA" not in meta.columns
    assert meta["Metadata_pert_type"].tolist() == ["negcon", "trt"]
    synth = metadata_columns([{"Metadata_Plate": "S", "Metadata_Well": "A01", "Metadata_Site": "1",
                               "Metadata_Label": "control", "Metadata_Control": "True"}])
    assert synth["Metadata_pert_type"].tolist() == ["negcon"] and "Metadata_JCP2022" not in synth.columns
    with pytest.raises(DataError, match="Metadata_Well"):
        metadata_columns([{"Metadata_Plate": "S", "Metadata_Site": "1"}])


def test_evaluate_cli_scores_a_profile_table(tmp_path) -> None:
    import json

    from dinocell.cli import main

    df = _separable(np.random.default_rng(3))
    df.to_parquet(tmp_path / "wells.parquet")
    assert main(["evaluate", "--profiles", str(tmp_path / "wells.parquet"), "--null-size", "200",
                 "--out-dir", str(tmp_path / "ev")]) == 0
    prof = json.loads((tmp_path / "ev" / "evaluation.json").read_text())["profiles"]
    assert prof["metric"] == "negcon" and prof["mean_average_precision"] == pytest.approx(1.0)
    assert prof["nonrep"]["n_labels"] == 4 and "replicate retrieval" in (tmp_path / "ev" / "evaluation.md").read_text()


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
    # --data: the plates below, not the run's few held-out wells
    assert main(["embed", str(run), "--data", "synthetic", "--out", str(tmp_path / "trained"), *plates]) == 0

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
