"""RunDir: the one place that knows a run folder's layout."""

from __future__ import annotations

import os
from pathlib import Path

from dinocell.runs import STEP_NAME, RunDir


def test_layout_paths(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.config == tmp_path / "config.yaml" and run.summary == tmp_path / "summary.json"
    assert run.last_checkpoint == tmp_path / "checkpoints" / "last.ckpt"
    assert run.step_checkpoint(12) == tmp_path / "checkpoints" / "step00000012.ckpt"
    assert STEP_NAME.fullmatch(run.step_checkpoint(12).name).group(1) == "00000012"
    assert run.holdout.name == "holdout.txt" and run.eval_dir == tmp_path / "eval"
    assert RunDir(str(tmp_path)) == run  # strings and paths name the same folder


def test_of_file_finds_the_owning_run(tmp_path: Path) -> None:
    assert RunDir.of_file(tmp_path / "checkpoints" / "last.ckpt") == RunDir(tmp_path)
    assert RunDir.of_file(tmp_path / "export" / "m.safetensors") == RunDir(tmp_path)
    assert RunDir.of_file(tmp_path / "export" / "m") == RunDir(tmp_path)  # an export folder
    assert RunDir.of_file(tmp_path / "elsewhere" / "m.safetensors") is None


def test_exports_are_oldest_first(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.exports() == []
    run.export_dir.mkdir()
    for i, name in enumerate(["b.safetensors", "a.safetensors"]):
        (run.export_dir / name).write_bytes(b"x")
        os.utime(run.export_dir / name, (1000 + i, 1000 + i))
    (run.export_dir / "a.safetensors.json").write_text("{}")  # sidecars are not exports
    assert [p.name for p in run.exports()] == ["b.safetensors", "a.safetensors"]
    (run.export_dir / "half").mkdir()  # an export folder without its config.json is not complete
    (run.export_dir / "half" / "model.safetensors").write_bytes(b"x")
    for name, age in (("new", 1002.0), ("mid", 1000.5)):  # mid: between the two files' ages
        (run.export_dir / name).mkdir()
        (run.export_dir / name / "config.json").write_text("{}")
        os.utime(run.export_dir / name / "config.json", (age, age))
    assert [p.name for p in run.exports()] == ["b.safetensors", "mid", "a.safetensors", "new"]
