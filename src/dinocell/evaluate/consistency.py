"""Channel consistency: does the model describe the same field the same way whatever the stain?

Every Cell Painting channel images the *same* cells, so a channel-invariant encoder should give the
per-channel images of one field similar embeddings.  Three read-outs, from weakest to strictest:

* :func:`channel_consistency` — mean cosine between the channel embeddings of the same field.  Raw
  cosine rewards collapse (a constant embedding scores 1.0), so the headline number is *centred*: the
  evaluation set's mean embedding (over all fields and channels) is subtracted first, which leaves only
  what distinguishes this field from the others.
* :func:`cross_channel_retrieval` — given one field's channel-a embedding, is its nearest channel-b
  embedding among all fields the same field?  Chance is 1/F; collapse scores chance.
* :func:`dinocell.evaluate.transfer.transfer_knn` — classify phenotypes on channel b with a kNN fitted
  on channel a.

All embeddings come from :func:`dinocell.models.encode.encode_features` (eval mode, no grad).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.errors import DataError
from dinocell.models.encode import encode_features

# --------------------------------------------------------------------------------------------------
# Embedding every channel of every field
# --------------------------------------------------------------------------------------------------


def _round_to_patch(size: int, patch: int) -> int:
    return max(patch, int(round(size / patch)) * patch)


def _target_size(h: int, w: int, crop_size: int | None, patch: int) -> tuple[int, int]:
    if crop_size is not None:
        s = _round_to_patch(int(crop_size), patch)
        return s, s
    return _round_to_patch(h, patch), _round_to_patch(w, patch)


def channel_views(fields: torch.Tensor, fluorescent: Sequence[bool]) -> torch.Tensor:
    """(F, C, H, W) -> (F, C+1, H, W): every channel plus the fluorescent-channel mean as channel C.

    The mean image is the training's anchor view (``data.views``); including it shows how far each
    single channel is from it.
    """
    if fields.ndim != 4:
        raise DataError(f"expected fields (F, C, H, W), got shape {tuple(fields.shape)}")
    flags = [bool(f) for f in fluorescent]
    if len(flags) != fields.shape[1]:
        raise DataError(f"fields have {fields.shape[1]} channels but {len(flags)} fluorescent flags were given")
    if not any(flags):
        raise DataError("channel embeddings need at least one fluorescent channel for the mean image")
    idx = torch.tensor([i for i, f in enumerate(flags) if f], dtype=torch.long)
    mean = fields.float().index_select(1, idx).mean(1, keepdim=True)
    return torch.cat([fields.float(), mean], dim=1)


def channel_embeddings(
    backbone: Any,
    fields: torch.Tensor,
    fluorescent: Sequence[bool],
    crop_size: int | None = None,
    batch_size: int = 64,
    pool: str = "cls",
) -> torch.Tensor:
    """Embed each channel of each field as a 1-channel image: (F, C+1, D), index C = mean image
    (``pool="patch"``: (F, C+1, D, h, w) patch-token maps).

    Fields (F, C, H, W) float in [0, 1] are resized (antialiased bilinear) to ``crop_size`` (or kept at
    their size) rounded to a multiple of the patch size.  Fields are processed in chunks of about
    ``batch_size`` images, so memory stays bounded for large evaluation sets.
    """
    views = channel_views(fields, fluorescent)
    n_fields, n_views, h, w = views.shape
    patch = int(getattr(backbone, "patch_size", 1))
    th, tw = _target_size(h, w, crop_size, patch)
    per_chunk = max(1, batch_size // n_views)
    out = []
    for i in range(0, n_fields, per_chunk):
        x = views[i:i + per_chunk].reshape(-1, 1, h, w)
        if (th, tw) != (h, w):
            x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
        emb = encode_features(backbone, x, pool=pool, batch_size=batch_size)
        out.append(emb.reshape(-1, n_views, *emb.shape[1:]))
    if not out:
        return torch.empty(0, n_views, int(getattr(backbone, "embed_dim", 0)))
    return torch.cat(out).float()


# --------------------------------------------------------------------------------------------------
# Metrics on (F, C, D) embeddings
# --------------------------------------------------------------------------------------------------


def _check_emb(emb: np.ndarray | torch.Tensor, min_channels: int = 2) -> torch.Tensor:
    e = (emb if isinstance(emb, torch.Tensor) else torch.as_tensor(np.asarray(emb))).detach().double().cpu()
    if e.ndim != 3:
        raise DataError(f"expected embeddings (fields, channels, dim), got shape {tuple(e.shape)}")
    if e.shape[1] < min_channels:
        raise DataError(f"need at least {min_channels} channels to compare, got {e.shape[1]}")
    if e.shape[0] < 1:
        raise DataError("need at least one field")
    return e


def centre_embeddings(emb: torch.Tensor) -> torch.Tensor:
    """Subtract the mean embedding over all fields and channels (removes the shared component)."""
    return emb - emb.reshape(-1, emb.shape[-1]).mean(0)


def channel_consistency(emb: np.ndarray | torch.Tensor, centre: bool = True) -> tuple[float, np.ndarray]:
    """Mean off-diagonal cosine between channel embeddings of the same field, and the (C, C) matrix.

    ``matrix[a, b]`` = mean over fields of ``cos(emb[f, a], emb[f, b])`` (diagonal 1).  ``centre``
    subtracts the evaluation set's mean embedding first (see module doc: raw cosine rewards collapse).
    """
    e = _check_emb(emb)
    if centre:
        e = centre_embeddings(e)
    u = F.normalize(e, dim=-1)
    mat = torch.einsum("fad,fbd->ab", u, u) / e.shape[0]
    c = mat.shape[0]
    off = ~torch.eye(c, dtype=torch.bool)
    return float(mat[off].mean()), mat.numpy()


def cross_channel_retrieval(emb: np.ndarray | torch.Tensor, centre: bool = True) -> float:
    """Top-1 same-field retrieval across channels, averaged over fields and ordered pairs (a, b), a != b.

    Query: field f's channel-a embedding; gallery: every field's channel-b embedding; a hit when the
    most similar (cosine) gallery item is field f.  Chance level is 1/F.
    """
    acc, _ = cross_channel_retrieval_matrix(emb, centre=centre)
    return acc


def cross_channel_retrieval_matrix(emb: np.ndarray | torch.Tensor, centre: bool = True) -> tuple[float, np.ndarray]:
    """:func:`cross_channel_retrieval` plus the (C, C) matrix of per-pair accuracies (diagonal NaN)."""
    e = _check_emb(emb)
    if centre:
        e = centre_embeddings(e)
    u = F.normalize(e, dim=-1)
    n, c, _ = u.shape
    target = torch.arange(n)
    mat = np.full((c, c), math.nan)
    for a in range(c):
        for b in range(c):
            if a == b:
                continue
            sim = u[:, a] @ u[:, b].T  # (F queries, F gallery)
            mat[a, b] = float((sim.argmax(1) == target).double().mean())
    off = ~np.eye(c, dtype=bool)
    return float(mat[off].mean()), mat


def pair_table(matrix: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """Off-diagonal entries of a (C, C) matrix as rows ``{"a", "b", "value"}`` (for per-pair tables)."""
    rows = []
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                rows.append({"a": a, "b": b, "value": float(matrix[i, j])})
    return rows


__all__ = [
    "centre_embeddings",
    "channel_consistency",
    "channel_embeddings",
    "channel_views",
    "cross_channel_retrieval",
    "cross_channel_retrieval_matrix",
    "pair_table",
]
