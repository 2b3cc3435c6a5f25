"""What defines one volume's extraction: the typed options, format constants and the optional extra.

Why one module: every other part of the volume pipeline (readers, sampling, features, store, the
runner on a cluster worker) reads these dataclasses, and :class:`ExtractionConfig` is saved in every
volume's metadata, so it must stay a plain, JSON-round-trippable record.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dinocell.errors import ConfigError, require_extra

FORMAT_VERSION = 1
COMPRESSIONS = ("none", "zstd", "blosc-lz4")
AXES_CHOICES = ("z", "zyx")
ARRAYS = ("features", "gt", "mask")
FEATURE_DTYPES = ("float16", "float32")
#: ``patch``: features at the ViT's patch grid (compact; upsample while training).
#: ``voxel``: features upsampled to every voxel (the original format, 768 B/voxel for ViT-S).
STORES = ("patch", "voxel")
TIFF_SUFFIXES = (".tif", ".tiff")
#: Spatial chunk edge of every output array (the "64" in the default ``[C_chunk, 64, 64, 64]``).
DEFAULT_SPATIAL_CHUNK = 64
#: Feature channels per chunk by default: 16 x 64^3 float16 = 8 MiB, large enough for fast reads.
DEFAULT_CHANNEL_CHUNK = 16

#: The random-initialised backbone used when no model is given (runs offline, but features are noise).
TINY_MODEL = {"name": "vit_small_patch16_dinov3", "in_chans": 1, "patch_size": 8, "embed_dim": 32,
              "depth": 2, "num_heads": 2}

#: Packages of the ``volumes`` extra, by import name.
VOLUMES_EXTRA = ("tensorstore", "dask", "distributed", "dask_jobqueue")


class RandomInitWarning(UserWarning):
    """The backbone has random weights: features are only good for testing the pipeline."""


def require_volumes(modules: Sequence[str] = ("tensorstore",), what: str = "3-D volume features") -> None:
    """Raise a one-line :class:`UserError` naming the ``volumes`` extra when one of ``modules`` is missing.

    Why a check up front instead of a late ImportError: tensorstore / dask are optional (the 2-D
    toolkit never needs them), and a cluster run should fail in the driver, not in every worker.
    """
    require_extra("volumes", tuple(modules), what)


@dataclass
class S3Options:
    """How ``s3://`` URIs are opened (TensorStore S3 kvstore)."""

    endpoint: str | None = None
    region: str = "us-east-1"
    anonymous: bool = False


@dataclass
class ModelSpec:
    """Which backbone to run: a dinocell export/run folder, a timm name (+ official weights), or none.

    With nothing set, a tiny random-initialised ViT is used (with a :class:`RandomInitWarning`).
    ``seed`` makes random initialisation identical on every worker of a cluster run.
    """

    backbone: str | None = None
    model_name: str | None = None
    weights: str | None = None
    seed: int = 0


@dataclass
class ExtractionConfig:
    """Everything that defines how volume ``i`` is extracted (saved in each volume's metadata)."""

    output_dir: str
    manifest: str | None = None  # None: the embedded synthetic dataset (generated under output_dir)
    base_resolution: list[float] | None = None  # nm (z, y, x); None: the raw array's finest level
    output_image_dim: int = 128
    min_label_fraction: float = 0.0
    min_unique_ids: int = 0
    min_ground_truth_fraction: float = 0.0
    max_tries: int = 100
    seed: int = 0
    axes: str = "z"  # "z": slices along z; "zyx": slices along all three axes, features averaged
    store: str = "patch"  # "patch": features at the patch grid; "voxel": upsampled to every voxel
    batch_size: int = 32
    compression: str = "zstd"
    compression_level: int | None = None
    checksum: bool = True  # zstd frame checksum, or a crc32c codec for none/blosc-lz4
    chunks: list[int] | None = None  # [C_chunk, 64, 64, 64] by default
    feature_dtype: str = "float16"
    device: str | None = None  # None: cuda if available (and gpu is not False), else cpu
    gpu: bool | None = None
    num_threads: int | None = None  # torch intra-op threads per volume
    model: ModelSpec = field(default_factory=ModelSpec)
    s3: S3Options = field(default_factory=S3Options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractionConfig:
        """Rebuild (e.g. on a cluster worker) through the one config engine: typed, strict, validated."""
        from dinocell.config import load

        return load(cls(output_dir=str(data.get("output_dir", ""))), data=data)

    def validate(self) -> None:
        """One-line ConfigErrors for values that would only fail deep inside a cluster job."""
        if self.compression not in COMPRESSIONS:
            raise ConfigError(f"--compression must be one of {', '.join(COMPRESSIONS)}; got '{self.compression}'")
        if self.axes not in AXES_CHOICES:
            raise ConfigError(f"--axes must be one of {', '.join(AXES_CHOICES)}; got '{self.axes}'")
        if self.store not in STORES:
            raise ConfigError(f"--store must be one of {', '.join(STORES)}; got '{self.store}'")
        if self.store == "patch" and self.axes != "z":
            raise ConfigError("--axes zyx needs --store voxel (slices along z, y and x have three different "
                              "patch grids; only their per-voxel average is stored)")
        if self.feature_dtype not in FEATURE_DTYPES:
            raise ConfigError(f"--feature-dtype must be one of {', '.join(FEATURE_DTYPES)}")
        if self.output_image_dim < 8:
            raise ConfigError(f"--output-image-dim must be >= 8; got {self.output_image_dim}")
        if self.chunks is not None and (len(self.chunks) != 4 or min(self.chunks) < 1):
            raise ConfigError(f"--chunks needs 4 positive integers (C, D, H, W); got {self.chunks}")
        if self.base_resolution is not None:
            if len(self.base_resolution) not in (1, 3) or min(self.base_resolution) <= 0:
                raise ConfigError("--base-resolution needs 1 or 3 positive numbers (nm)")
        for name in ("min_label_fraction", "min_ground_truth_fraction"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1]; got {v}")
        if self.batch_size < 1 or self.max_tries < 1:
            raise ConfigError("--batch-size and --max-tries must be >= 1")


def base_resolution(cfg: ExtractionConfig) -> np.ndarray | None:
    """The requested output voxel size (z, y, x) in nm, or None for the raw array's finest level."""
    if cfg.base_resolution is None:
        return None
    r = np.asarray(cfg.base_resolution, float)
    return np.repeat(r, 3) if r.size == 1 else r
