"""Image decoding and per-channel intensity scaling.

JUMP images are 16-bit, LZW-compressed TIFFs; tifffile needs ``imagecodecs`` for LZW.  Scaling is
computed once per field (percentiles and CLAHE on the full image), never per crop: crops then only
slice and resize already-scaled data, which is what keeps multi-view sampling close to decode speed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

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


_TIFF_SUFFIXES = (".tif", ".tiff")
_OPENCV_SUFFIXES = (".png", ".jpg", ".jpeg")
_OPENCV_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff(src: str | bytes) -> bool:
    """TIFF by its suffix (a path; no extra read on the training hot path) or by its magic bytes."""
    if isinstance(src, bytes):
        return not src.startswith(_OPENCV_MAGIC)
    low = src.lower()
    if low.endswith(_TIFF_SUFFIXES) or low.endswith(_OPENCV_SUFFIXES):
        return low.endswith(_TIFF_SUFFIXES)
    with open(src, "rb") as f:
        return f.read(4).startswith(_TIFF_MAGIC)


def decode_image(src: str | os.PathLike[str] | bytes, what: str = "image", name: str | None = None) -> np.ndarray:
    """The one image reader: a file path or its bytes -> the array as stored.

    TIFF through tifffile (any plane count and dtype; LZW needs ``imagecodecs``), PNG / JPEG (or any other
    format OpenCV reads) through OpenCV, colour as RGB(A) channels-last.  The callers give the array its
    meaning: :func:`read_image` (one scaled-to-be plane per channel file), ``evaluate.run.read_multichannel``
    (C, H, W), ``segment.data.read_mask`` (labels, never clipped), the TIFF volume reader.  A missing path ->
    ``DataError("<what> not found: ...")``; undecodable or empty data -> ``DataError("cannot decode <what> ...")``.
    """
    if name is None:
        name = "<bytes>" if isinstance(src, bytes) else os.fspath(src)
    data: str | bytes = src if isinstance(src, bytes) else os.fspath(src)
    if isinstance(data, str) and not os.path.isfile(data):
        raise DataError(f"{what} not found: {name}")
    try:
        if _is_tiff(data):
            import tifffile

            arr = np.asarray(tifffile.imread(io.BytesIO(data) if isinstance(data, bytes) else data))
        else:
            arr = _decode_opencv(data)
    except Exception as e:  # tifffile and OpenCV raise many types on truncated/corrupt files
        raise DataError(f"cannot decode {what} {name}: {type(e).__name__}: {e}") from None
    if arr.size == 0:
        raise DataError(f"cannot decode {what} {name}: no image data (truncated or corrupt file)")
    return arr


def _decode_opencv(src: str | bytes) -> np.ndarray:
    """PNG / JPEG (8- or 16-bit) from a path or bytes; OpenCV's BGR(A) turned into RGB(A)."""
    import cv2

    if isinstance(src, bytes):
        arr = cv2.imdecode(np.frombuffer(src, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        arr = cv2.imread(src, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV cannot read it")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = np.ascontiguousarray(arr[..., [2, 1, 0, 3][: arr.shape[-1]]])
    return arr


def read_image(src: str | os.PathLike[str] | bytes) -> np.ndarray:
    """One channel file (TIFF, PNG, JPEG) -> a 2-D uint8/uint16 (or float32) plane; colour becomes its grey
    mean.  Missing, corrupt, multi-plane, tiny or non-finite images -> DataError."""
    arr = decode_image(src)
    name = "<bytes>" if isinstance(src, bytes) else os.fspath(src)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour (H, W, 3|4), whatever the container
        arr = arr.mean(axis=2).astype(arr.dtype)
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
