"""Every bad input is one line on stderr and exit 2 (never a traceback); valid edge cases are accepted.

Table-driven: each case builds its input in a temp folder, runs ``dinocell ...`` in-process and checks the
exit code, that stderr is exactly one ``dinocell: error:`` line (usage errors: usage + one error line)
and that the line names the problem.  Cases come from the issue-23 sweep.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from dinocell.cli import main
from dinocell.data.synthetic import write_jump_folder
from tests_tiny import TINY

TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A synthetic plate (load_data.csv next to it), a tiny pretraining run, a segmentation run folder,
    a labelled per-well profile table and a few broken image folders."""
    root = tmp_path_factory.mktemp("bad")
    write_jump_folder(root / "plate", n_fields=8, size=32, seed=0, n_plates=1, wells_per_plate=4, sites_per_well=2)
    spec = importlib.util.spec_from_file_location("loading_fixtures_bad", TESTS / "models" / "loading_fixtures.py")
    assert spec is not None and spec.loader is not None
    lf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lf)
    lf.fake_run(root)
    seg = root / "segrun"
    (seg / "checkpoints").mkdir(parents=True)
    (seg / "config.yaml").write_text("data: {source: synthetic}\nmodel: {backbone: null}\ntask: {objects: nuclei}\n"
                                     "post: {}\ninfer: {tile: 32}\n")
    rng = np.random.default_rng(0)
    prof = pd.DataFrame({"Metadata_Plate": ["P"] * 8, "Metadata_Well": [f"A0{i}" for i in range(1, 9)],
                         "Metadata_Label": ["a", "a", "b", "b", "c", "c", "ctrl", "ctrl"],
                         "Metadata_pert_type": ["trt"] * 6 + ["negcon"] * 2})
    for i in range(4):
        prof[f"Cells_dinocell_{i}"] = rng.normal(size=8)
    prof.to_parquet(root / "profiles.parquet")
    return {"root": root, "plate": root / "plate", "run": root / "run", "seg": seg,
            "profiles": root / "profiles.parquet"}


def _load_data(w: dict[str, Path], name: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> str:
    df = pd.read_csv(w["plate"] / "load_data.csv", dtype=str)
    out = w["root"] / name
    edit(df.copy()).to_csv(out, index=False)
    return str(out)


def _set(col: str, value: object, row: int | None = None) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        if row is None:
            df[col] = value
        else:
            df.loc[row, col] = value
        return df
    return edit


def _folder(w: dict[str, Path], name: str, planes: dict[int, np.ndarray | None]) -> str:
    d = w["root"] / name / "P1__2024-01-01T00_00_00-Measurement1" / "Images"
    d.mkdir(parents=True, exist_ok=True)
    for ch, a in planes.items():
        f = d / f"r01c01f01p01-ch{ch}sk1fk1fl1.tiff"
        f.write_bytes(b"") if a is None else tifffile.imwrite(f, a)
    return str(w["root"] / name)


def _profiles(w: dict[str, Path], name: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> str:
    out = w["root"] / name
    edit(pd.read_parquet(w["profiles"])).to_parquet(out)
    return str(out)


def _text_feature(df: pd.DataFrame) -> pd.DataFrame:
    df["Cells_dinocell_0"] = df["Cells_dinocell_0"].astype(str)
    df.loc[3, "Cells_dinocell_0"] = "abc"
    return df


S4 = "data.channel_map=source_4"
OK = np.ones((32, 32), np.uint16)
CPG0000 = TESTS.parents[1] / "shared" / "data" / "jump_cpg0000_BR00117006"

# (id, argv from the world, expected exit code, text stderr must contain ('' for exit 0))
CASES: list[tuple[str, Callable[[dict[str, Path]], list[str]], int, str]] = [
    ("ls: all-empty Metadata column is fine",
     lambda w: ["data", "ls", _load_data(w, "empty_label.csv", _set("Metadata_Label", ""))], 0, ""),
    ("check: all-empty Metadata column is fine",
     lambda w: ["data", "check", _load_data(w, "empty_label2.csv", _set("Metadata_Label", ""))], 0, ""),
    ("ls: empty Metadata_Well",
     lambda w: ["data", "ls", _load_data(w, "no_well.csv", _set("Metadata_Well", "", 0))], 2, "empty Metadata_Well"),
    ("ls: NaN Metadata_Plate",
     lambda w: ["data", "ls", _load_data(w, "nan_plate.csv", _set("Metadata_Plate", np.nan, 3))], 2,
     "row 5: empty Metadata_Plate"),
    ("ls: Metadata_Site not a number",
     lambda w: ["data", "ls", _load_data(w, "site.csv", _set("Metadata_Site", "x", 1))], 2, "Metadata_Site 'x'"),
    ("ls: rows collapsing into one field",
     lambda w: ["data", "ls", _load_data(w, "dupkey.csv", _set("Metadata_Site", "1"))], 2,
     "would collapse into one field"),
    ("ls: identical repeated rows are one field",
     lambda w: ["data", "ls", _load_data(w, "duprow.csv", lambda d: pd.concat([d, d.iloc[[0]]]))], 0, ""),
    ("embed: Metadata_PatchIndex column",
     lambda w: ["embed", str(w["run"]), "--data", _load_data(w, "patch.csv", _set("Metadata_PatchIndex", "abc")),
                "--out", str(w["root"] / "m1"), "--no-progress"], 2, "Metadata_PatchIndex is reserved"),
    ("check: endpoint without scheme",
     lambda w: ["data", "check", "s3://bucket/prefix/", "--endpoint-url", "127.0.0.1:9"], 2, "endpoint"),
    ("check: endpoint unparsable",
     lambda w: ["data", "check", "s3://bucket/prefix/", "--endpoint-url", "http://[::1"], 2, "endpoint"),
    ("check: --steps-per-s -1", lambda w: ["data", "check", str(w["plate"]), "--steps-per-s", "-1"], 2,
     "--steps-per-s must be greater than 0"),
    ("evaluate: --batch-size 0", lambda w: ["evaluate", str(w["run"]), "--data", str(w["plate"]), "--batch-size", "0"],
     2, "--batch-size must be greater than 0"),
    ("evaluate: --limit 0", lambda w: ["evaluate", str(w["run"]), "--data", str(w["plate"]), "--limit", "0"], 2,
     "--limit must be greater than 0"),
    ("embed: --limit -1", lambda w: ["embed", str(w["run"]), "--data", str(w["plate"]), "--limit", "-1",
                                     "--out", str(w["root"] / "m2")], 2, "--limit must be greater than 0"),
    ("embed: --tile below the patch size",
     lambda w: ["embed", str(w["run"]), "--data", str(w["plate"]), "--tile", "3", "--out", str(w["root"] / "m5"),
                "--no-progress"], 2, "below the model's patch size"),
    ("synth: --fields 0", lambda w: ["data", "synth", "--out", str(w["root"] / "s"), "--fields", "0"], 2,
     "--fields must be greater than 0"),
    ("segment evaluate: --fields -1",
     lambda w: ["segment", "evaluate", str(w["seg"]), "--data", "synthetic", "--fields", "-1"], 2,
     "--fields must be greater than 0"),
    ("evaluate: text in a profile feature column",
     lambda w: ["evaluate", "--profiles", _profiles(w, "p_text.parquet", _text_feature)], 2,
     "Cells_dinocell_0 holds text ('abc'"),
    ("evaluate: profiles without Metadata_Well",
     lambda w: ["evaluate", "--profiles", _profiles(w, "p_nowell.parquet", lambda d: d.drop(columns="Metadata_Well"))],
     2, "no Metadata_Well column"),
    ("pretrain: train.keep_last_n=-1",
     lambda w: ["pretrain", "--output-dir", str(w["root"] / "p1"), *TINY, "train.keep_last_n=-1"], 2,
     "'train.keep_last_n' must be >= 1"),
    ("pretrain: train.checkpoint_every_steps=0",
     lambda w: ["pretrain", "--output-dir", str(w["root"] / "p2"), *TINY, "train.checkpoint_every_steps=0"], 2,
     "'train.checkpoint_every_steps' must be >= 1"),
    ("pretrain: model.pretrained is a segmentation run",
     lambda w: ["pretrain", "--output-dir", str(w["root"] / "p3"), *TINY, f"model.pretrained={w['seg']}"], 2,
     "is a segmentation run"),
    ("ls: 0-byte TIFF with --no-verify",
     lambda w: ["data", "ls", _folder(w, "zero", {1: None, 5: OK}), "--no-verify", S4], 2, "empty file (0 bytes)"),
    ("ls: NaN TIFF", lambda w: ["data", "ls", _folder(w, "nan", {1: np.full((32, 32), np.nan, np.float32),
                                                                 5: OK.astype(np.float32)}), S4], 2,
     "NaN or infinite pixels"),
    ("ls: 1x1 image", lambda w: ["data", "ls", _folder(w, "one", {1: OK[:1, :1], 5: OK[:1, :1]}), S4], 2,
     "1x1 px, smaller than 8 px"),
    ("ls: channels of different sizes",
     lambda w: ["data", "ls", _folder(w, "mixed", {1: OK, 5: np.ones((48, 48), np.uint16)}), S4], 2,
     "channels of different sizes"),
    ("evaluate: a segmentation run as the model",
     lambda w: ["evaluate", str(w["seg"]), "--data", str(w["plate"])], 2, "is a segmentation run"),
    ("embed: a segmentation run as the model",
     lambda w: ["embed", str(w["seg"]), "--data", str(w["plate"]), "--out", str(w["root"] / "m3")], 2,
     "is a segmentation run"),
    ("export: a segmentation run",
     lambda w: ["export", str(w["seg"]), "--out", str(w["root"] / "x")], 2, "is a segmentation run"),
    ("embed: an assumed channel map",
     lambda w: ["embed", str(w["run"]), "--data", _folder(w, "bare", {1: OK, 5: OK}), "--out", str(w["root"] / "m4")],
     2, "data.channel_map=source_4 to accept"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case: tuple, world: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, argv, code, needle = case
    args = argv(world)
    capsys.readouterr()
    assert main(args) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 0:
        assert "dinocell: error" not in err
        return
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dinocell: error: "), err
    assert needle in lines[0], lines[0]


def test_segment_without_action_is_usage_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["segment"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("usage: dinocell segment") and "choose an ACTION" in err


def test_pretrain_refuses_the_real_folder_without_a_channel_map(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    if not CPG0000.is_dir():
        pytest.skip("needs ../shared/data")
    assert main(["pretrain", "--output-dir", str(tmp_path / "r"), *TINY, f"data.source={CPG0000}"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "error: pretrain: nothing says which stain" in err
    assert main(["data", "ls", str(CPG0000)]) == 0  # data ls keeps showing the guess
    assert "(assumed)" in capsys.readouterr().out
