"""Image decoding and per-channel intensity scaling.

JUMP images are 16-bit, LZW-compressed TIFFs; tifffile needs ``imagecodecs`` for LZW.  Scaling is
computed once per field (percentiles and CLAHE on the full image), never per crop: crops then only
slice and resize already-scaled data, which is what keeps multi-view sampling close to decode speed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from dinocell.errors import DataError
from dinocell.scaling import (  # noqa: F401  (the one finishing rule, shared with models.loading; re-exported)
    PERCENTILE_SUBSAMPLE_ABOVE,
    clahe,
    finish_field,
    percentile_scale,
    scale_field,
    scale_range,
    to_unit,
)

#: Smallest field side accepted (px): below it no crop, tile or patch grid is meaningful (a 1x1 "image"
#: is a broken export, not a field).
MIN_SIDE = 8


def _plane_problem(shape: Sequence[int]) -> str | None:
    """Why a plane of ``shape`` cannot be a field, or None."""
    dims = [int(d) for d in shape if int(d) != 1] if len(shape) > 2 else [int(d) for d in shape]
    if len(dims) == 2 and min(dims) < MIN_SIDE:
        return f"{dims[0]}x{dims[1]} px, smaller than {MIN_SIDE} px"
    return None


def read_image(src: str | os.PathLike[str] | bytes) -> np.ndarray:
    """Decode a TIFF (or PNG) into a 2-D uint8/uint16 array.  Corrupt data -> DataError."""
    import tifffile

    name = "<bytes>" if isinstance(src, bytes) else os.fspath(src)
    if not isinstance(src, bytes) and not os.path.exists(name):
        raise DataError(f"image not found: {name}")
    try:
        handle: Any = io.BytesIO(src) if isinstance(src, bytes) else name
        arr = tifffile.imread(handle)
    except Exception as e:  # tifffile raises many types on truncated/corrupt files
        if isinstance(src, bytes) and (src[:8] == b"\x89PNG\r\n\x1a\n" or src[:3] == b"\xff\xd8\xff"):
            arr = _read_with_cv2(src)
        elif not isinstance(src, bytes) and name.lower().endswith((".png", ".jpg", ".jpeg")):
            arr = _read_with_cv2(name)
        else:
            raise DataError(f"cannot decode image {name}: {type(e).__name__}: {e}") from None
    arr = np.asarray(arr)
    if arr.size == 0:
        raise DataError(f"cannot decode image {name}: no image data (truncated or corrupt file)")
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise DataError(f"image {name} has shape {arr.shape}; expected one 2-D plane per channel file")
    if (why := _plane_problem(arr.shape)) is not None:
        raise DataError(f"image {name} is {why}")
    if arr.dtype not in (np.uint8, np.uint16):
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise DataError(f"image {name} holds NaN or infinite pixels")
            return arr.astype(np.float32)
        arr = np.clip(arr, 0, 65535).astype(np.uint16)
    return arr


def image_shape(path: str | os.PathLike[str]) -> tuple[int, ...] | None:
    """A TIFF's first-plane shape from its header (no decode); None when it cannot be read or is no TIFF."""
    import tifffile

    name = os.fspath(path)
    if not name.lower().endswith((".tif", ".tiff")):
        return None
    try:
        with tifffile.TiffFile(name) as tf:
            return tuple(int(d) for d in tf.pages[0].shape if int(d) != 1) if tf.pages else None
    except Exception:
        return None


def check_image(path: str | os.PathLike[str]) -> str | None:
    """Cheap readability check (header and first IFD only; float TIFFs are decoded to look for NaN):
    None if fine, else the reason (missing, empty, truncated, smaller than :data:`MIN_SIDE`, NaN)."""
    import tifffile

    name = os.fspath(path)
    if not os.path.exists(name):
        return "file not found"
    if os.path.getsize(name) == 0:
        return "empty file (0 bytes)"
    if not name.lower().endswith((".tif", ".tiff")):
        return None
    try:
        with tifffile.TiffFile(name) as tf:
            if not tf.pages or tf.pages[0].shape == () or 0 in tf.pages[0].shape:
                return "no image data"
            page = tf.pages[0]
            end = max((o + c for o, c in zip(page.dataoffsets, page.databytecounts, strict=False)), default=0)
            if end > os.path.getsize(name):
                return "truncated file"
            if (why := _plane_problem(page.shape)) is not None:
                return why
            if np.issubdtype(page.dtype, np.floating) and not np.isfinite(page.asarray()).all():
                return "NaN or infinite pixels"  # float TIFFs are rare: decoding them here is affordable
    except Exception as e:
        return f"unreadable TIFF ({type(e).__name__})"
    return None


def _read_with_cv2(src: str | bytes) -> np.ndarray:
    """PNG / JPEG (8- or 16-bit) from a path or bytes; colour images become their grey mean."""
    import cv2

    if isinstance(src, bytes):
        arr = cv2.imdecode(np.frombuffer(src, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        arr = cv2.imread(src, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DataError(f"cannot decode image {'<bytes>' if isinstance(src, bytes) else src}")
    if arr.ndim == 3:
        arr = arr.mean(axis=2).astype(arr.dtype)
    return arr
