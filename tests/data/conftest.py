"""Fixtures for the S3 tests: a local moto server with a JUMP-layout public bucket.

Nothing contacts AWS: every endpoint is 127.0.0.1, instance metadata lookups are disabled, shared
config/credential files are hidden, and caches default to a temporary folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_fixtures import FaultProxy, JumpBucket, fill_jump_bucket, start_moto

BUCKET = "cellpainting-test"
PREFIX = "cpg0016-jump/source_4/images/2021_04_26_Batch1/images/"
N_FIELDS = 12  # 2 plates x 2 sites x 3 of the 4 wells
FIELD_SIZE = 64


@pytest.fixture(scope="session")
def s3_safe_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Environment that cannot reach AWS; returns the temporary cache home."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("xdg-cache")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
    mp.setenv("AWS_CONFIG_FILE", str(cache / "no-aws-config"))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(cache / "no-aws-credentials"))
    mp.setenv("XDG_CACHE_HOME", str(cache))
    for var in ("AWS_PROFILE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(var, raising=False)
    yield cache
    mp.undo()


@pytest.fixture(scope="session")
def moto_url(s3_safe_env: Path) -> Iterator[str]:
    """Endpoint URL of a moto S3 server on 127.0.0.1 (one per test session)."""
    server, url = start_moto()
    yield url
    server.stop()


@pytest.fixture(scope="session")
def jump_bucket(moto_url: str, tmp_path_factory: pytest.TempPathFactory) -> JumpBucket:
    """12 synthetic 64-px JUMP fields (5 LZW TIFF channels each) plus a load_data Parquet."""
    out = tmp_path_factory.mktemp("jump")
    return fill_jump_bucket(moto_url, BUCKET, PREFIX, out, n_fields=N_FIELDS, size=FIELD_SIZE)


@pytest.fixture()
def proxy(moto_url: str) -> Iterator[FaultProxy]:
    """A fault proxy in front of the moto server (no faults until a test sets a schedule)."""
    p = FaultProxy(moto_url, slow_s=1.0).start()
    yield p
    p.stop()
