"""Features of a crop: the backbone (loaded in ONE place), per-slice patch features, voxel upsampling.

Every 2-D slice of a crop goes through the backbone.  The patch store keeps the resulting patch
grid as it is, ``(C, D, H/p, W/p)`` — about 6 MB for a ViT-S 128^3 crop — and leaves upsampling to
the training loop (:class:`dinocell.extract.upsample.Upsample`, on the GPU).  The voxel store
upsamples every slice bilinearly to its voxels here, ``(C, D, H, W)`` (1.6 GB for the same crop).

:func:`extraction_model` is the only function in ``dinocell.extract`` that obtains a model (through the
project's one loader), and :func:`_encode` the only one that runs it.  The crop is finished by the
model's :class:`~dinocell.models.loading.Preprocess` (:meth:`~dinocell.models.loading.Preprocess.scale_volume`)
before slicing, in the pipeline; the functions here take the prepared volume.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dinocell.errors import ConfigError, DataError
from dinocell.extract.volumes.config import (
    AXES_CHOICES,
    TINY_MODEL,
    ExtractionConfig,
    ModelSpec,
    RandomInitWarning,
)

# --------------------------------------------------------------------------------------------------
# The backbone
# --------------------------------------------------------------------------------------------------

_MODEL_CACHE: dict[str, tuple[Any, dict[str, Any]]] = {}
_MODEL_LOCK = threading.Lock()


def extraction_model(spec: ModelSpec, img_size: int = 224, device: str | None = None) -> tuple[Any, dict[str, Any]]:
    """(:class:`~dinocell.models.loading.LoadedModel` in eval mode, its description) for ``spec``, through
    the one loader (:func:`dinocell.models.loading.load_model`); cached per process (cluster workers).

    ``--backbone`` / ``--weights``: a run folder, checkpoint, export, timm folder or official ``.pth``;
    neither: ``--model-name`` (or a tiny ViT) with random weights, seeded by ``spec.seed``."""
    key = json.dumps([dataclasses.asdict(spec), img_size, device], sort_keys=True)
    with _MODEL_LOCK:
        if key in _MODEL_CACHE:
            return _MODEL_CACHE[key]
        import torch

        from dinocell.config import ModelConfig
        from dinocell.models.loading import load_model

        if spec.backbone or spec.weights:
            path = Path(spec.backbone or spec.weights)
            if not path.exists():
                raise DataError(f"--{'backbone' if spec.backbone else 'weights'} not found: {path}")
            loaded = load_model(path, model_name=spec.model_name)
            kind = {"given": "export"}.get(loaded.kind, loaded.kind)
            info = {"source": kind, "path": str(path), "description": loaded.description}
        else:
            mcfg = ModelConfig(name=spec.model_name, in_chans=1) if spec.model_name else ModelConfig(**TINY_MODEL)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(spec.seed)
                loaded = load_model(None, arch=mcfg, img_size=img_size)
            info = {"source": "random-init", "path": None}
            what = f"'{spec.model_name}'" if spec.model_name else "a tiny ViT (embed 32, depth 2, patch 8)"
            warnings.warn(f"no --backbone/--weights given: using {what} with RANDOM weights "
                          f"(seed {spec.seed}); features only exercise the pipeline", RandomInitWarning,
                          stacklevel=2)
        dev = device or "cpu"
        model = loaded.backbone.to(dev).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        info.update({
            "name": getattr(model, "timm_name", spec.model_name or TINY_MODEL["name"]),
            "embed_dim": int(getattr(model, "embed_dim", 0)),
            "patch_size": int(getattr(model, "patch_size", 0) or 0),
            "n_blocks": int(getattr(model, "n_blocks", 0) or 0),
            "device": dev,
            "preprocess": loaded.preprocess.to_dict(),
        })
        _MODEL_CACHE[key] = (loaded, info)
        return loaded, info


def resolve_device(cfg: ExtractionConfig) -> str:
    """cuda when available and not disabled with ``--no-gpu``; cpu otherwise."""
    if cfg.device:
        return cfg.device
    if cfg.gpu is False:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------------------------------
# Patch features and their upsampling to voxels
# --------------------------------------------------------------------------------------------------


def _encode(model: Any, x: Any, batch_size: int) -> Any:
    """Patch-feature maps ``(B, C, h, w)`` of a batch of 1-channel slices (the one encoder call)."""
    from dinocell.models.encode import encode_features

    return encode_features(model, x, pool="patch", batch_size=batch_size)


def _patch_size(model: Any, shape: Sequence[int], dims: Sequence[int]) -> int:
    patch = int(getattr(model, "patch_size", 1) or 1)
    if any(shape[d] % patch for d in dims):
        raise ConfigError(f"volume sides {tuple(shape)} must be multiples of the patch size {patch} "
                          "(choose --output-image-dim accordingly)")
    return patch


def _encoded_batches(slices: Any, model: Any, batch_size: int) -> Iterator[tuple[int, int, Any]]:
    """``(s0, s1, features)`` per batch of ``slices`` (n, a, b): float32 ``(s1-s0, C, a/p, b/p)`` on the model's device.

    Callers run it under ``torch.inference_mode()``.
    """
    device = next(model.parameters()).device
    for s0 in range(0, slices.shape[0], batch_size):
        s1 = min(s0 + batch_size, slices.shape[0])
        x = slices[s0:s1, None].contiguous().to(device)
        yield s0, s1, _encode(model, x, batch_size).float().to(device)


def compute_patch_features(raw: np.ndarray, model: Any, batch_size: int = 32,
                           out_dtype: str = "float16") -> np.ndarray:
    """Per-z-slice patch features at the ViT's patch grid: (D, H, W) -> (C, D, H/p, W/p).

    Feature cell ``(k, i, j)`` describes voxels ``[k, k+1) x [i*p, (i+1)*p) x [j*p, (j+1)*p)`` of
    the crop; trilinear upsampling to (D, H, W) (align_corners=False) reproduces the voxel store.
    """
    import torch

    patch = _patch_size(model, raw.shape, (1, 2))
    d, h, w = raw.shape
    vol = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    out: torch.Tensor | None = None
    with torch.inference_mode():
        for s0, s1, feats in _encoded_batches(vol, model, batch_size):
            if out is None:
                out = torch.empty((feats.shape[1], d, h // patch, w // patch), dtype=getattr(torch, out_dtype))
            out[:, s0:s1] = feats.permute(1, 0, 2, 3).cpu()
    assert out is not None
    return out.numpy()


def bilinear_matrix(n_in: int, n_out: int) -> Any:
    """(n_out, n_in) matrix M with ``M @ v`` = 1-D bilinear resize of ``v`` (align_corners=False).

    Same sampling as ``torch.nn.functional.interpolate(mode="bilinear")``: output sample ``i`` reads
    source position ``(i + 0.5) * n_in / n_out - 0.5``, clamped at the borders.
    """
    import torch

    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0.0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, i0), 1.0 - w1, accumulate=True)
    m.index_put_((rows, i1), w1, accumulate=True)
    return m.float()


def _slot(out: Any, axis: str, idx: int | slice) -> Any:
    """View of ``out`` (C, D, H, W) for slice(s) ``idx`` taken along ``axis``."""
    return out[:, idx] if axis == "z" else out[:, :, idx] if axis == "y" else out[:, :, :, idx]


def _store(dst: Any, up: Any, overwrite: bool) -> None:
    if overwrite:
        dst.copy_(up)  # one strided pass: layout + cast to float16
    else:
        dst += up


def compute_volume_features(raw: np.ndarray, model: Any, axes: str = "z", batch_size: int = 32,
                            out_dtype: str = "float16") -> np.ndarray:
    """Per-slice patch features upsampled (bilinear) to every voxel: (D, H, W) -> (C, D, H, W).

    ``axes="zyx"`` slices along all three axes and averages, which removes the stair-step along z
    that single-axis slicing leaves in anisotropic features (3x the compute).  Upsampling is done as
    two small matrix products (separable bilinear), which is faster than ``F.interpolate`` for the
    large channel counts of ViT features, and written straight into the float16 output.
    """
    import torch

    if axes not in AXES_CHOICES:
        raise ConfigError(f"axes must be one of {', '.join(AXES_CHOICES)}")
    _patch_size(model, raw.shape, (0, 1, 2))
    vol = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.float32))
    d, h, w = vol.shape
    tdtype = getattr(torch, out_dtype)
    out: torch.Tensor | None = None
    single = axes == "z"
    # Slices along z, y, x: permutation of the volume and of the upsampled batch back to (C, D, H, W).
    plans = {"z": ((0, 1, 2), (1, 0, 2, 3)), "y": ((1, 0, 2), (1, 2, 0, 3)), "x": ((2, 0, 1), (1, 2, 3, 0))}
    with torch.inference_mode():
        for axis in ("z",) if single else ("z", "y", "x"):
            perm, back = plans[axis]
            slices = vol.permute(*perm)
            _, a, b = slices.shape
            mats: tuple[torch.Tensor, torch.Tensor] | None = None
            for s0, s1, feats in _encoded_batches(slices, model, batch_size):
                device = feats.device
                c = feats.shape[1]
                if out is None:
                    out = (torch.empty if single else torch.zeros)((c, d, h, w), dtype=tdtype if single else torch.float32)
                if mats is None:
                    mats = (bilinear_matrix(feats.shape[2], a).to(device),
                            bilinear_matrix(feats.shape[3], b).to(device).T.contiguous())
                if device.type != "cpu":  # whole batch on the accelerator, cast before the transfer
                    up = (mats[0] @ feats @ mats[1]).permute(*back).to(out.dtype).cpu()
                    _store(_slot(out, axis, slice(s0, s1)), up, single)
                    continue
                # CPU: cache-sized pieces (~2 MB of float32 per product) so every upsampled value is
                # cast and stored while still in cache: ~3x faster than whole-batch products.
                cc = max(1, (1 << 19) // max(1, a * b))
                for j in range(s1 - s0):
                    for c0 in range(0, c, cc):
                        up = mats[0] @ feats[j, c0:c0 + cc] @ mats[1]  # (cc, a, b) = one slice's layout
                        _store(_slot(out[c0:c0 + cc], axis, s0 + j), up, single)
    assert out is not None
    if not single:
        out = (out / 3.0).to(tdtype)
    return out.numpy()
