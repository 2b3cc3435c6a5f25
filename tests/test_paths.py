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


_CASES = [(c, k) for c in _commands("x") for k in ("file", "read-only")]


@pytest.mark.parametrize("command, kind", _CASES)
def test_bad_output_location_is_one_line_exit_2(command: str, kind: str, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    if kind == "file":
        target = tmp_path / "taken"
        target.write_text("x")
    else:
        target = _read_only_dir(tmp_path) / "out"
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


# -------------------------------------------------------------------------------------------------
# Full disk: one line, exit 2, no temp file, the last complete file untouched
# -------------------------------------------------------------------------------------------------

TORCH_FULL = ("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
              "data/0: file write failed")
SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                    '"No space left on device" })')


def _filling_writer(exc: BaseException, nbytes: int = 700):
    """A writer that puts ``nbytes`` into the temp file, then fails like a full disk."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * nbytes)
        raise exc
    return write


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), OSError(122, "Disk quota exceeded"),
                                 RuntimeError(TORCH_FULL), Exception(SAFETENSORS_FULL)])
def test_write_atomic_disk_full_is_one_line_and_keeps_the_old_file(tmp_path: Path, exc: BaseException) -> None:
    from dinocell.paths import DiskFullError, write_atomic

    target = tmp_path / "last.ckpt"
    target.write_bytes(b"complete")
    with pytest.raises(DiskFullError) as info:
        write_atomic(target, _filling_writer(exc), needed=1_500_000)
    msg = str(info.value)
    assert str(target) in msg and "1.5 MB" in msg and "free there" in msg and "\n" not in msg
    assert target.read_bytes() == b"complete" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    with pytest.raises(DiskFullError, match="more than the 700 B written"):
        write_atomic(target, _filling_writer(exc))  # no estimate: what was written is the lower bound


def test_write_atomic_other_errors_pass_through_without_temp(tmp_path: Path) -> None:
    from dinocell.paths import is_disk_full, write_atomic, write_text_atomic

    with pytest.raises(ValueError, match="not a disk problem"):
        write_atomic(tmp_path / "a.bin", _filling_writer(ValueError("not a disk problem")))
    assert list(tmp_path.iterdir()) == []
    assert not is_disk_full(OSError(13, "Permission denied"))
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(28, "No space left on device")
    assert is_disk_full(wrapped)
    assert write_text_atomic(tmp_path / "b.txt", "ok").read_text() == "ok"


def test_write_atomic_unique_temp_names_and_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``unique``: concurrent writers of one file (ranks, threads) each get their own temp name;
    ``fsync``: the temp file's bytes are synced before the rename."""
    import threading

    from dinocell import paths

    seen: list[str] = []
    synced: list[int] = []
    monkeypatch.setattr(paths.os, "fsync", lambda fd: synced.append(fd))
    target = tmp_path / "meta.json"

    def write(tmp: Path) -> None:
        seen.append(tmp.name)
        tmp.write_text(str(len(seen)))

    paths.write_atomic(target, write, unique=True, fsync=True)
    worker = threading.Thread(target=paths.write_atomic, args=(target, write), kwargs={"unique": True})
    worker.start()
    worker.join()
    assert seen[0] != seen[1] and all(n.startswith(f".meta.json.{os.getpid()}.") and n.endswith(".tmp") for n in seen)
    assert len(synced) == 1 and target.read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_write_files_atomic_moves_the_named_files_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dinocell.paths import DiskFullError, write_files_atomic

    out = tmp_path / "export"
    order: list[str] = []

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        for name in ("weights.bin", "config.json", "scratch.txt"):
            (tmp / name).write_text(name)

    real_replace = os.replace

    def recording(src: object, dst: object) -> None:
        order.append(Path(str(dst)).name)
        real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", recording)
        write_files_atomic(out, fill, ("weights.bin", "config.json"))
    assert order == ["weights.bin", "config.json"]  # the marker of completion last
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "weights.bin"]  # temp folder and extras gone

    def full(tmp: Path) -> None:
        tmp.mkdir()
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskFullError, match="no space left"):
        write_files_atomic(out, full, ("weights.bin",))
    assert (out / "weights.bin").read_text() == "weights.bin" and len(list(out.iterdir())) == 2


def test_ensure_free_space_refuses_up_front(tmp_path: Path) -> None:
    from dinocell.paths import DiskFullError, ensure_free_space, free_bytes

    free = free_bytes(tmp_path)
    assert free is not None and free > 0
    ensure_free_space(tmp_path / "x", 1)
    with pytest.raises(DiskFullError, match="x.safetensors: it needs"):
        ensure_free_space(tmp_path / "x.safetensors", free * 2)


def test_cli_pretrain_disk_full_one_line_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A torch.save that hits a full disk inside a run: one line, exit 2, its temp removed, the earlier
    checkpoint untouched (the trainer itself is stubbed: the failure path is the CLI's)."""
    import dinocell.train.run as run_mod

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    old = run / "checkpoints" / "last.ckpt"
    old.write_bytes(b"complete checkpoint")
    stale = run / "checkpoints" / "step5.ckpt.tmp"  # an older run's leftover is not ours to delete
    stale.write_bytes(b"old")
    os.utime(stale, (1, 1))

    def fake_pretrain(cfg, out, **kw):  # noqa: ANN001, ANN003, ANN202
        (Path(out) / "checkpoints" / "last.ckpt.tmp").write_bytes(b"half")
        raise RuntimeError(TORCH_FULL)

    monkeypatch.setattr(run_mod, "pretrain", fake_pretrain)
    assert main(["pretrain", "--output-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dinocell: error: no space left on the disk") and "file write failed" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert old.read_bytes() == b"complete checkpoint" and not (run / "checkpoints" / "last.ckpt.tmp").exists()
    assert stale.exists()


def _fake_run(root: Path) -> Path:
    """tests/models/loading_fixtures.fake_run (a tiny run folder with a checkpoint), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("loading_fixtures_paths",
                                                  Path(__file__).parent / "models" / "loading_fixtures.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.fake_run(root)[0]


def test_cli_export_disk_full_one_line_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import safetensors.torch

    run = _fake_run(tmp_path)
    out = tmp_path / "exp"
    assert main(["export", str(run), "--out", str(out)]) == 0
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "exp" in p.name}

    def full_disk(tensors, filename, metadata=None):  # noqa: ANN001, ANN202
        Path(filename).write_bytes(b"x" * 100)
        raise Exception(SAFETENSORS_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert main(["export", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left on the disk" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "exp" in p.name}
    assert after == before, "a temp file was left or the previous export changed"


def test_export_refuses_when_the_weights_cannot_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import dinocell.paths as paths

    run = _fake_run(tmp_path)
    monkeypatch.setattr(paths, "free_bytes", lambda path: 1000)
    assert main(["export", str(run), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors: it needs" in err and "1.0 kB free there" in err
    assert not (tmp_path / "e").exists()


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):  # noqa: ANN201
    """A 64 kB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_write_text_atomic_on_a_really_full_disk(tiny_tmpfs: Path) -> None:
    from dinocell.paths import DiskFullError, write_text_atomic

    target = tiny_tmpfs / "summary.json"
    write_text_atomic(target, "small and complete")
    with pytest.raises(DiskFullError, match=r"summary.json: it needs 200.0 kB"):
        write_text_atomic(target, "x" * 200_000)
    assert target.read_text() == "small and complete" and [p.name for p in tiny_tmpfs.iterdir()] == ["summary.json"]


def test_write_folder_atomic_publishes_a_whole_tree_or_nothing(tmp_path: Path) -> None:
    from dinocell.paths import DiskFullError, write_folder_atomic

    out = tmp_path / "dataset"

    def fill(tag: str):
        def write(tmp: Path) -> None:
            (tmp / "vol.zarr").mkdir(parents=True)
            (tmp / "vol.zarr" / "chunk").write_text(tag)
            (tmp / "manifest.yaml").write_text(tag)
        return write

    def broken(tmp: Path) -> None:
        (tmp / "vol.zarr").mkdir(parents=True)
        raise OSError(28, "No space left on device")

    with pytest.raises(DiskFullError, match="no space left"):
        write_folder_atomic(out, broken)
    assert list(tmp_path.iterdir()) == []  # no half tree, no temp folder
    assert write_folder_atomic(out, fill("first")) == out
    assert (out / "manifest.yaml").read_text() == "first" and (out / "vol.zarr" / "chunk").read_text() == "first"
    write_folder_atomic(out, fill("second"))  # another process finished first: its complete copy is kept
    assert (out / "manifest.yaml").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["dataset"]
