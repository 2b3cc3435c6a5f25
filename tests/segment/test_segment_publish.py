"""``segment predict`` stages its outputs and publishes them so a killed run never mixes generations."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dinocell.data.synthetic import write_jump_folder
from dinocell.errors import UserError
from dinocell.models.loading import load_model
from dinocell.segment import predict as predict_mod
from dinocell.segment import publish as publish_mod
from dinocell.segment.config import load_segment_config
from dinocell.segment.model import SegmentationNet

TINY = ["model.arch.embed_dim=32", "model.arch.depth=2", "model.arch.num_heads=2", "model.arch.patch_size=8",
        "model.neck_dim=16", "model.decoder_dim=8", "infer.tile=32", "model.input_scale=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[SegmentationNet, object, Path]:
    cfg = load_segment_config(None, TINY)
    net = SegmentationNet(load_model(None, arch=cfg.model.arch).backbone, cfg.model).eval()
    data = tmp_path_factory.mktemp("jump")
    write_jump_folder(data, n_fields=3, size=32, n_plates=1, wells_per_plate=4, sites_per_well=1)
    return net, cfg, data


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_predict_publishes_and_leaves_no_staging(setup: tuple, tmp_path: Path) -> None:
    net, cfg, data = setup
    res = predict_mod.predict(net, cfg, [str(data)], tmp_path)
    assert res["fields"] == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["masks", "nuclei.parquet"]  # no staging folder, no marker
    assert len(list((tmp_path / "masks").glob("*_nuclei_masks.tif"))) == 3
    (tmp_path / "masks" / "x_cells_masks.tif").write_bytes(b"other class")  # another object class stays
    predict_mod.predict(net, cfg, [str(data)], tmp_path)
    assert (tmp_path / "masks" / "x_cells_masks.tif").read_bytes() == b"other class"


def test_kill_while_staging_keeps_the_old_generation(setup: tuple, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    net, cfg, data = setup
    predict_mod.predict(net, cfg, [str(data)], tmp_path)
    before = _snapshot(tmp_path)
    calls = []
    real = predict_mod._write_tiff

    def dying(path: Path, labels: object) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C between two fields
        real(path, labels)  # type: ignore[arg-type]

    monkeypatch.setattr(predict_mod, "_write_tiff", dying)
    with pytest.raises(KeyboardInterrupt):
        predict_mod.predict(net, cfg, [str(data)], tmp_path)
    assert _snapshot(tmp_path) == before  # old table and old masks, byte for byte; no staging left
    assert not list(tmp_path.glob(".staging-*"))


def test_kill_while_publishing_never_leaves_the_old_table(setup: tuple, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    net, cfg, data = setup
    predict_mod.predict(net, cfg, [str(data)], tmp_path)
    real = os.replace

    def dying(src: object, dst: object) -> None:
        if Path(str(dst)) == tmp_path / "nuclei.parquet":  # the publishing rename (not the staged write's)
            raise SystemExit(137)  # killed after the new masks moved in, before the table
        real(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(publish_mod.os, "replace", dying)
    with pytest.raises(SystemExit):
        predict_mod.predict(net, cfg, [str(data)], tmp_path)
    assert not (tmp_path / "nuclei.parquet").exists()  # new masks are never described by the old table
    assert publish_mod.in_progress(tmp_path, "nuclei")
    monkeypatch.setattr(publish_mod.os, "replace", real)
    predict_mod.predict(net, cfg, [str(data)], tmp_path)  # the next run replaces the half generation
    assert (tmp_path / "nuclei.parquet").is_file() and not publish_mod.in_progress(tmp_path, "nuclei")
    assert not list(tmp_path.glob(".staging-*"))


def test_live_concurrent_predict_is_refused(tmp_path: Path) -> None:
    (tmp_path / f".staging-nuclei-{os.getppid()}").mkdir()  # a live process (our parent) owns it
    with pytest.raises(UserError, match="another 'segment predict'"):
        publish_mod.begin(tmp_path, "nuclei")
    (tmp_path / ".staging-nuclei-999999999").mkdir()  # dead pid: stale, removed
    os.rmdir(tmp_path / f".staging-nuclei-{os.getppid()}")
    stage = publish_mod.begin(tmp_path, "nuclei")
    assert [p.name for p in tmp_path.glob(".staging-*")] == [stage.name]
