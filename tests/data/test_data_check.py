"""``dinocell data check``: the S3 preflight against a local moto server (127.0.0.1 only)."""

from __future__ import annotations

import socket
import time
import uuid
from pathlib import Path

import pytest
from s3_fixtures import JumpBucket

from dinocell.cli import main
from dinocell.config import load_config
from dinocell.data.s3.check import check_s3
from dinocell.errors import UserError


def data_cfg(endpoint: str, tmp_path: Path, *overrides: str):
    return load_config(None, [f"data.s3.endpoint_url={endpoint}", f"data.s3.index_cache={tmp_path / 'i.parquet'}",
                              "data.batch_size=32", "data.repeats=4", *overrides]).data


def test_ok_on_the_jump_layout(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    lines = check_s3(jump_bucket.uri, data_cfg(jump_bucket.endpoint_url, tmp_path), steps_per_s=2.0)
    text = "\n".join(lines)
    assert "anonymous" in text and text.endswith("verdict:     ok")
    fields = next(ln for ln in lines if ln.startswith("fields:"))
    assert "Measurement1/Images/" in fields or "Measurement1/" in fields
    # the path names source_4, so its map is used and said so
    assert "1 -> Mito" in text and "(source_map)" in text
    decoded = next(ln for ln in lines if ln.startswith("decoded:"))
    assert "5 channels of 64x64 uint16" in decoded
    mb = float(decoded.split(", ")[1].split(" MB")[0])
    need = float(next(ln for ln in lines if ln.startswith("bandwidth:")).split()[1])
    assert need == pytest.approx(round(mb, 2) * 32 / 4 * 2.0, rel=0.05)  # 8 fields per step at 2 steps/s


def test_ok_from_a_load_data_table(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    uri = f"s3://{jump_bucket.bucket}/{jump_bucket.load_data_key}"
    lines = check_s3(uri, data_cfg(jump_bucket.endpoint_url, tmp_path))
    assert lines[-1].endswith("ok") and any("(load_data)" in ln for ln in lines)


def test_cli_check_prints_the_verdict(jump_bucket: JumpBucket, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["data", "check", jump_bucket.uri, "--endpoint-url", jump_bucket.endpoint_url,
               f"data.s3.index_cache={tmp_path / 'i.parquet'}"])
    assert rc == 0 and "verdict:     ok" in capsys.readouterr().out


def test_empty_prefix_is_one_line_exit_2(jump_bucket: JumpBucket, capsys: pytest.CaptureFixture[str]) -> None:
    uri = f"s3://{jump_bucket.bucket}/no-such-prefix-{uuid.uuid4().hex[:6]}/"
    rc = main(["data", "check", uri, "--endpoint-url", jump_bucket.endpoint_url])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "no objects under" in err and len(err.splitlines()) == 1


def test_unreachable_endpoint_fails_fast(s3_safe_env: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    rc = main(["data", "check", "s3://cellpainting-test/x/", "--endpoint-url", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "cannot reach http://127.0.0.1:" in err and len(err.splitlines()) == 1
    assert time.perf_counter() - t0 < 30


def test_denied_without_a_public_policy(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    bucket = f"private-{uuid.uuid4().hex[:8]}"
    jump_bucket.admin.create_bucket(Bucket=bucket)  # no public-read policy: moto refuses unsigned requests
    jump_bucket.admin.put_object(Bucket=bucket, Key="p/r01c01f01p01-ch1sk1fk1fl1.tiff", Body=b"x")
    with pytest.raises(UserError, match="access denied .* anonymous .*data.s3.sign=true"):
        check_s3(f"s3://{bucket}/p/", data_cfg(jump_bucket.endpoint_url, tmp_path))


def test_missing_bucket(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="bucket not found"):
        check_s3("s3://no-such-bucket-xyz/p/", data_cfg(jump_bucket.endpoint_url, tmp_path))


def test_local_folder_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dinocell.data.synthetic import write_jump_folder

    write_jump_folder(tmp_path / "f", n_fields=2, size=32, masks=False)
    assert main(["data", "check", str(tmp_path / "f"), "data.source_map=source_4"]) == 0
    out = capsys.readouterr().out
    assert "(source_map)" in out and "verdict:     ok" in out


def test_pretrain_from_s3_runs_the_check_first(s3_safe_env: Path, tmp_path: Path) -> None:
    from dinocell.train.run import pretrain

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(None, ["data.source=s3://cellpainting-test/x/", f"data.s3.endpoint_url=http://127.0.0.1:{port}",
                             "track.logger=none"])
    with pytest.raises(UserError, match="data check: cannot reach"):
        pretrain(cfg, tmp_path / "run", max_steps=1)
    assert not (tmp_path / "run" / "checkpoints").exists()
