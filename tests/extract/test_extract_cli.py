from __future__ import annotations

import argparse
import json

import pytest

from dinocell.errors import ConfigError
from dinocell.extract.cli import _ints, extraction_configs, register


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dinocell")
    register(p.add_subparsers(dest="command"))
    return p


def test_register_adds_the_three_commands():  # extract-fields is embed's alias (evaluate/cli.py)
    p = _parser()
    a = p.parse_args(["extract-volumes", "--output-dir", "o", "--num-volumes", "4"])
    assert callable(a.func)
    cfg, opts = extraction_configs(a)  # flags not given keep the dataclass defaults (written once)
    assert opts.cluster == "local" and cfg.output_image_dim == 128 and cfg.compression == "zstd" and cfg.checksum
    assert cfg.gpu is None and opts.gpu is None and cfg.axes == "z" and cfg.output_dir == "o"
    assert p.parse_args(["check", "--output-dir", "o", "--verify", "--json"]).verify
    assert p.parse_args(["bench-load", "--preprocessed-dir", "o"]).num_batches == 20
    cfg, opts = extraction_configs(p.parse_args(["extract-volumes", "--output-dir", "o", "--no-gpu", "--num-volumes",
                                                 "1", "--chunks", "8,32,32,32", "--s3-region", "eu-west-1",
                                                 "--backbone", "run"]))
    assert cfg.gpu is False and opts.gpu is False and cfg.chunks == [8, 32, 32, 32]
    assert cfg.s3.region == "eu-west-1" and cfg.model.backbone == "run"
    with pytest.raises(ConfigError, match="--axes zyx needs --store voxel"):  # validate() runs in the engine
        extraction_configs(p.parse_args(["extract-volumes", "--output-dir", "o", "--axes", "zyx"]))


def test_extraction_config_round_trips_through_the_engine():
    from dinocell.extract.volumes import ExtractionConfig

    cfg, _ = extraction_configs(_parser().parse_args(["extract-volumes", "--output-dir", "o", "--seed", "3"]))
    assert ExtractionConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match=r"unknown config key 'sed'.*did you mean 'seed'"):
        ExtractionConfig.from_dict({**cfg.to_dict(), "sed": 1})


def test_index_ranges():
    assert _ints("0 3-5,9") == [0, 3, 4, 5, 9]


def test_done_criterion_local_then_check(tmp_path, capsys):
    """extract-volumes --num-volumes 4 --cluster local on synthetic volumes; check --verify --json."""
    from dinocell.cli import main

    out = str(tmp_path / "run")
    assert main(["extract-volumes", "--output-dir", out, "--num-volumes", "4", "--cluster", "local",
                 "--output-image-dim", "16", "--num-processors", "1", "--no-progress"]) == 0
    assert "extracted 4, skipped 0" in capsys.readouterr().out
    assert main(["check", "--output-dir", out, "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["completed"] == 4 and report["missing_indices"] == [] and report["gaps"] == []
    assert report["verify"]["ok"] and report["ok"]
    # a second run skips everything; --volume-index adds exactly one more
    assert main(["extract-volumes", "--output-dir", out, "--num-volumes", "4", "--output-image-dim", "16",
                 "--no-progress"]) == 0
    assert "extracted 0, skipped 4" in capsys.readouterr().out
    assert main(["extract-volumes", "--output-dir", out, "--volume-index", "9", "--output-image-dim", "16",
                 "--cluster", "serial", "--no-progress"]) == 0
    assert main(["check", "--output-dir", out]) == 0  # 4-8 were never requested: gaps, not missing
    text = capsys.readouterr().out
    assert "completed: 5 of 5 requested  [0-3,9]" in text and "gaps in the completed range: [4-8]" in text
    assert main(["bench-load", "--preprocessed-dir", out, "--batch-size", "2", "--num-batches", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("cold:") and lines[2].startswith("warm:")


@pytest.mark.parametrize("cluster,marker", [("lsf", "#BSUB"), ("slurm", "#SBATCH")])
def test_dry_run_prints_job_script(tmp_path, capsys, cluster, marker):
    from dinocell.cli import main

    assert main(["extract-volumes", "--output-dir", str(tmp_path / "o"), "--num-volumes", "8",
                 "--cluster", cluster, "--dry-run", "--queue", "q1", "--walltime", "02:00"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("#!/usr/bin/env bash") and marker in captured.out
    assert "8 volume(s) to extract" in captured.err
    assert not (tmp_path / "o").exists()


def test_user_errors_exit_2(tmp_path, capsys):
    from dinocell.cli import main

    assert main(["extract-volumes", "--output-dir", str(tmp_path), "--num-volumes", "1",
                 "--manifest", str(tmp_path / "missing.yaml"), "--no-progress"]) == 2
    assert "manifest not found" in capsys.readouterr().err
    assert main(["check", "--output-dir", str(tmp_path / "none")]) == 2
    assert main(["extract-volumes", "--output-dir", str(tmp_path)]) == 2  # neither --num-volumes nor --indices
