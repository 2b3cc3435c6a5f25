"""Shared fixtures: the real fixtures in ../shared/data (skipped cleanly when absent) and tiny configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests_tiny import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DINOCELL_SHARED_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data, or skip with the reason when this checkout has no shared folder."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real fixture data not available at {SHARED_DATA} (../shared is absent)")
    return SHARED_DATA


def _fixture(shared_data: Path, relpath: str) -> Path:
    """One fixture below ../shared/data, or skip naming it when this copy lacks it."""
    p = shared_data / relpath
    if not p.exists():
        pytest.skip(f"{p} missing")
    return p


@pytest.fixture(scope="session")
def cpg0000_site(shared_data: Path) -> Path:
    """One JUMP cpg0000 site: AGP, RNA, DNA 16-bit LZW TIFFs."""
    return _fixture(shared_data, "jump_cpg0000_BR00117006")


@pytest.fixture(scope="session")
def cpg0016_load_data(shared_data: Path) -> Path:
    """A real cpg0016 load_data_with_illum Parquet."""
    return _fixture(shared_data, "jump_cpg0016_load_data/BR00126114_load_data_with_illum.parquet")


@pytest.fixture
def tiny_overrides() -> list[str]:
    """Overrides that make a model/run small enough for unit tests on 2 CPU cores."""
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def pediatric_site(shared_data: Path) -> Path:
    """One 6-channel pediatric atlas site with CellProfiler nuclei/cell outlines."""
    return _fixture(shared_data, "pediatric_BR00143976_C03_3")


@pytest.fixture(scope="session")
def dsb2018_nuclei(shared_data: Path) -> Path:
    """One DSB 2018 fluorescence image and its 125 annotated nuclei."""
    return _fixture(shared_data, "dsb2018_nuclei")
