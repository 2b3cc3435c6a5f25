"""``dinocell evaluate | embed | preview`` through the real command-line entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dinocell.cli import main

SYNTH = ["data.synthetic.n_fields=8", "data.synthetic.size=32", "data.synthetic.sites_per_well=1",
         "data.synthetic.wells_per_plate=8", "data.synthetic.n_plates=1", "data.synthetic.n_classes=2"]


def test_embed_then_evaluate_profiles(export_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "prof"
    assert main(["embed", str(export_path), "--out", str(out), "--view", "channel_mean", *SYNTH]) == 0
    text = capsys.readouterr().out
    assert "embedded 8 fields (8 wells, 32 features, fp32, tiles 32 px)" in text
    wells = pd.read_parquet(out / "wells.parquet")
    assert len(wells) == 8 and str(wells["Cells_dinocell_0"].dtype) == "float32"
    code = main(["evaluate", "--profiles", str(out / "wells.parquet"), "--null-size", "100", "--json",
                 "--out-dir", str(tmp_path / "ev")])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert 0.0 <= res["profiles"]["mean_average_precision"] <= 1.0
    assert (tmp_path / "ev" / "evaluation.md").is_file()


def test_evaluate_model_cli(export_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["evaluate", str(export_path), "--out-dir", str(tmp_path / "ev"), "--limit", "6", *SYNTH])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("consistency ") and "retrieval top-1" in out
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["n_fields"] == 6


def test_cli_user_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["evaluate"]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "model not found" in capsys.readouterr().err
    assert main(["evaluate", "--profiles", str(tmp_path / "none.parquet")]) == 2
    assert "profiles file not found" in capsys.readouterr().err
    assert main(["preview", "--csv", "x.csv"]) == 2
    assert "--tile-col" in capsys.readouterr().err


def test_preview_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["preview", "--dir", "synthetic", "--n", "2", "--out-dir", str(tmp_path),
                 "data.synthetic.n_fields=4", "data.synthetic.size=32", "data.views.global_crop_size=32",
                 "data.views.local_crop_size=16", "data.views.n_local_crops=1", "model.patch_size=8"])
    assert code == 0
    assert (tmp_path / "preview_scaling.png").is_file() and (tmp_path / "preview_views.png").is_file()
    assert "(2 images)" in capsys.readouterr().out
