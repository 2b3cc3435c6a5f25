from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from dinocell.cli import main


def test_data_ls_real_fixture_json(cpg0000_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "ls", str(cpg0000_site), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fields"] == 1
    assert sorted(out["channels"]) == ["AGP", "DNA", "RNA"]
    assert out["plates"] and out["skipped"] == []


def test_data_ls_human(cpg0000_site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "ls", str(cpg0000_site)]) == 0
    assert "fields:   1" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data", "ls", "/nonexistent/folder"], "path not found"),
        (["data", "ls", "synthetic", "--channels", "Actin"], "unknown channel 'Actin'"),
        (["data", "ls", "synthetic", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    ],
)
def test_bad_input_one_line_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_folder_and_unreadable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "ls", str(tmp_path)]) == 2
    assert "no images" in capsys.readouterr().err


def test_data_ls_channels_without_match(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dinocell.data.jump import format_name

    tifffile.imwrite(tmp_path / format_name(1, 1, 1, 5), np.zeros((4, 4), np.uint16))
    assert main(["data", "ls", str(tmp_path), "--channels", "RNA"]) == 2
    assert "unknown channel 'RNA'; available: DNA" in capsys.readouterr().err


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "data" in capsys.readouterr().out


def test_data_ls_reports_unreadable_tiff(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dinocell.data.jump import format_name

    for site in (1, 2):
        for ch in (2, 5):
            tifffile.imwrite(tmp_path / format_name(1, 1, site, ch), np.ones((8, 8), np.uint16), compression="lzw")
    (tmp_path / format_name(1, 1, 2, 5)).write_bytes(b"II*\x00corrupt")
    assert main(["data", "ls", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fields"] == 1 and len(out["skipped"]) == 1 and "r01c01f02p01-ch5" in out["skipped"][0]
    (tmp_path / format_name(1, 1, 1, 2)).write_bytes(b"garbage")
    assert main(["data", "ls", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no readable field" in err and len(err.strip().splitlines()) == 1


def test_third_party_deprecation_noise_is_silenced_and_user_warnings_stay() -> None:
    import warnings

    from lightning.pytorch.utilities._pytree import _tree_flatten

    from dinocell.cli import silence_third_party_noise

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _tree_flatten({"a": 1})  # Lightning builds a deprecated torch LeafSpec: the noise users see on every run
        assert any("LeafSpec" in str(w.message) for w in seen), "the noise no longer exists: drop its filter"
        seen.clear()
        silence_third_party_noise()
        _tree_flatten({"a": 1})
        warnings.warn("channel DNA is constant in 3 fields", UserWarning, stacklevel=1)
        warnings.warn("something else is deprecated", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["channel DNA is constant in 3 fields", "something else is deprecated"]
