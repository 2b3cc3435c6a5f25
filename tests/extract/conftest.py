"""Tiny synthetic volumes and shared extractions (tiny random ViT, 16^3 crops, both stores) for the extract tests."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

from dinocell.extract.synthetic_volumes import write_synthetic_dataset
from dinocell.extract.volumes import ExtractionConfig, RandomInitWarning, extract_volume

OUTPUT_DIM = 16
VOLUME_SHAPE = (24, 24, 24)


@pytest.fixture(autouse=True)
def _quiet_random_init():
    """The tiny default backbone warns that it is random; the tests know."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        yield


@pytest.fixture(scope="session")
def synthetic_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 24^3 zarr v3 OME-Zarr volumes; volume 1 has labels only in a central 3/4 box."""
    root = tmp_path_factory.mktemp("synthetic_volumes")
    return write_synthetic_dataset(root, n_volumes=2, shape=VOLUME_SHAPE, seed=3, fmt="zarr3",
                                   label_fraction_box=0.75)


def _make_cfg(output_dir: Path, manifest: Path | None, **kw) -> ExtractionConfig:
    """A small extraction config (16^3 crops, zstd, tiny default model)."""
    kw.setdefault("output_image_dim", OUTPUT_DIM)
    return ExtractionConfig(output_dir=str(output_dir), manifest=str(manifest) if manifest else None, **kw)


@pytest.fixture
def make_cfg():
    """Factory for small extraction configs: ``make_cfg(output_dir, manifest, **overrides)``."""
    return _make_cfg


def _extract_both(out: Path, manifest: Path, store: str) -> Path:
    cfg = _make_cfg(out, manifest, store=store)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        for i in (0, 1):
            extract_volume(cfg, i)
    return out


@pytest.fixture(scope="session")
def extracted_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_manifest: Path) -> Path:
    """Volumes 0 and 1 in the voxel store, extracted once for the session (copy it before modifying it)."""
    return _extract_both(tmp_path_factory.mktemp("extracted"), synthetic_manifest, "voxel")


@pytest.fixture(scope="session")
def extracted_patch_dir(tmp_path_factory: pytest.TempPathFactory, synthetic_manifest: Path) -> Path:
    """The same two volumes in the patch store (the default): features (32, 16, 2, 2), gt/mask 16^3."""
    return _extract_both(tmp_path_factory.mktemp("extracted_patch"), synthetic_manifest, "patch")


@pytest.fixture
def extracted_copy(extracted_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared voxel-store extraction, safe to corrupt."""
    dst = tmp_path / "copy"
    shutil.copytree(extracted_dir, dst)
    return dst


@pytest.fixture
def extracted_patch_copy(extracted_patch_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the shared patch-store extraction, safe to corrupt."""
    dst = tmp_path / "patch_copy"
    shutil.copytree(extracted_patch_dir, dst)
    return dst
