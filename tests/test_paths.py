"""Output locations a new user gets wrong: one line and exit 2 from every command that writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dinocell.cli import main
from dinocell.errors import UserError
from dinocell.paths import check_output_dir, check_output_file


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder nobody can write into: chmod 555, or for root (who ignores modes) a sysfs folder."""
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o555)
    try:
        tempfile.NamedTemporaryFile(dir=d).close()
    except OSError:
        return d
    sysfs = Path("/sys/kernel")
    try:
        tempfile.NamedTemporaryFile(dir=sysfs).close()
    except OSError:
        return sysfs
    raise AssertionError("no read-only folder available on this machine")


def test_helpers(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert check_output_file(tmp_path / "out.safetensors") == tmp_path / "out.safetensors"
    assert check_output_file(a_file) == a_file  # overwriting a file is fine
    with pytest.raises(UserError, match="is a file; give a folder"):
        check_output_dir(a_file)
    with pytest.raises(UserError, match="is a file, not a folder"):
        check_output_dir(a_file / "sub")
    with pytest.raises(UserError, match="is a folder; give a file name"):
        check_output_file(tmp_path)
    ro = _read_only_dir(tmp_path)
    with pytest.raises(UserError, match="not writable"):
        check_output_dir(ro / "run")
    with pytest.raises(UserError, match="not writable"):
        check_output_file(ro / "model.safetensors")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dinocell-probe")]


def _commands(out: str) -> dict[str, list[str]]:
    return {
        "pretrain": ["pretrain", "--output-dir", out, "track.logger=none"],
        "export": ["export", "somewhere", "--out", out],
        "evaluate": ["evaluate", "somewhere", "--out-dir", out],
        "embed": ["embed", "somewhere", "--out", out],
        "extract-volumes": ["extract-volumes", "--output-dir", out],
        "extract-fields": ["extract-fields", "--output-dir", out],
        "data synth": ["data", "synth", "--out", out, "--fields", "1", "--size", "16"],
    }


# only export writes a single file (--out FILE): an existing folder there is the user's mistake
_CASES = [(c, k) for c in _commands("x") for k in ("file", "read-only")] + [("export", "folder-for-file")]


@pytest.mark.parametrize("command, kind", _CASES)
def test_bad_output_location_is_one_line_exit_2(command: str, kind: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "file":
        target = tmp_path / "taken"
        target.write_text("x")
        if command == "export":  # a file is a fine --out FILE; one *under* a file is not
            target = target / "model.safetensors"
    elif kind == "read-only":
        target = _read_only_dir(tmp_path) / "out"
    else:
        target = tmp_path / "a_folder"
        target.mkdir()
    before = sorted(os.listdir(tmp_path))
    assert main(_commands(str(target))[command]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinocell: error:") and str(target) in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == before  # nothing was written


def test_write_text_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path) -> None:
    from dinocell.paths import write_text_atomic

    target = tmp_path / "deep" / "summary.json"
    assert write_text_atomic(target, "one") == target and target.read_text() == "one"
    write_text_atomic(target, "two")
    assert target.read_text() == "two" and not list(target.parent.glob("*.tmp"))
