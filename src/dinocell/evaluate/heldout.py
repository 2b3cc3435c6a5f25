"""The one held-out evaluation: the end-of-run summary, the ``eval/*`` and ``reference/*`` callbacks
and ``dinocell evaluate`` all call :func:`evaluate_heldout` (or its two halves), so the same
checkpoint on the same fields gives the same figures everywhere.

One field selection, one view builder, one embedder:

* **fields**: at most ``limit`` records spread evenly over the source (:func:`spread_indices`;
  neighbouring records are sites of one well, so a prefix would see few phenotypes); unreadable
  fields (``DataError`` / ``UserError``) are skipped and listed.
* **inputs** (:func:`heldout_input`): the field as the loaded model's :class:`Preprocess` gives it
  (cropped to patch multiples), centre-cropped to its largest square, then resized (antialiased
  bilinear) to the model's training crop (``size`` overrides).  The square crop keeps the cells'
  aspect; the resize puts a whole field at roughly the magnification the training views show (global
  crops cover 32-100 % of a field and are resized to the same size).  Every channel of a field gets
  the same geometry, so patch ``p`` shows the same cells in every channel.
* **embeddings**: each channel (and the fluorescent mean image) encoded as its own 1-channel image by
  :func:`dinocell.evaluate.consistency.channel_embeddings` (normalised CLS; normalised patch tokens
  for the dense figures).

Figures (:data:`FIGURES`), on the real channels (the mean image excluded):

* ``channel_consistency`` / ``_raw``: centred / raw mean same-field cosine across channels;
* ``cross_channel_retrieval_top1``: same-field retrieval across channels among all fields;
* ``transfer_knn_accuracy``: kNN (k=20, T=0.07) fitted on channel a of half the fields, tested on
  channel b of the other half, mean over a != b; ``knn_accuracy``: the same within a channel (the
  diagonal) — defined with one channel too, the forgetting guard's probe;
* ``patch_consistency``: cosine between the patch tokens at the same location of two channels of a
  field, centred by the evaluation set's mean patch token (over fields, channels and locations;
  raw cosine would reward tokens that all look alike), mean over fields, locations and a != b;
* ``patch_retrieval_top1``: for a patch of channel a, is the most similar (centred cosine) patch of
  channel b *of the same field* the one at the same location?  Chance ``1 / patches``
  (``patch_chance``).  Same field, not all fields: this isolates dense spatial correspondence (what a
  segmenter trained on one stain needs on another) from field identity, which
  ``cross_channel_retrieval_top1`` already scores, and costs O(fields x patches^2), not
  O((fields x patches)^2).  Collapsed tokens score chance: ties go to the first patch.

The dense figures use at most :data:`MAX_PATCH_FIELDS` fields (spread over the evaluated ones): their
patch tokens need a second forward pass, and memory stays bounded when ``dinocell evaluate`` scores
thousands of fields.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.errors import DataError, UserError
from dinocell.models.loading import Preprocess

log = logging.getLogger(__name__)

#: The scalar figures, in the order summaries print them (keys of :func:`heldout_figures`).
FIGURES = ("channel_consistency", "channel_consistency_raw", "cross_channel_retrieval_top1",
           "transfer_knn_accuracy", "knn_accuracy", "patch_consistency", "patch_retrieval_top1")
MAX_PATCH_FIELDS = 64  # dense figures: 64 fields x all patches x all pairs is plenty, and a second pass
KNN_K, KNN_T, SPLIT_SEED = 20, 0.07, 0
CHUNK_FIELDS = 64  # fields loaded/encoded at a time when streaming


# --------------------------------------------------------------------------------------------------
# Fields -> model inputs
# --------------------------------------------------------------------------------------------------


def spread_indices(n_total: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n_total)`` (all when ``limit`` is None)."""
    if limit is None or limit >= n_total:
        return np.arange(n_total)
    return np.unique(np.linspace(0, n_total - 1, max(1, limit)).round().astype(int))


def input_size(preprocess: Preprocess, size: int | None = None) -> int:
    """The side of the evaluation inputs: ``size`` or the training crop, rounded to the patch size."""
    patch = int(preprocess.patch_size)
    return max(patch, int(round((size or preprocess.crop_size) / patch)) * patch)


def heldout_input(field: np.ndarray | torch.Tensor, preprocess: Preprocess, size: int | None = None,
                  scaled: bool = True) -> torch.Tensor:
    """The one view builder: a (C, H, W) field -> (C, S, S) float32 model input (see module doc).

    ``scaled``: the field comes from a dinocell source (already scaled with the model's scaling);
    ``False`` applies :meth:`Preprocess.scale` first (raw image files)."""
    if int(preprocess.in_chans) != 1:
        raise UserError(f"held-out channel figures need a 1-channel model (each stain its own image); "
                        f"this model takes {preprocess.in_chans} channels")
    x = preprocess(field, scaled=scaled)[:, 0]  # (C, H', W'): patch multiples, nothing resized yet
    h, w = int(x.shape[-2]), int(x.shape[-1])
    s = min(h, w)
    x = x[..., (h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    side = input_size(preprocess, size)
    if s != side:
        x = F.interpolate(x[None], size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    return x.contiguous()


def record_label(rec: Any) -> Any:
    """A record's phenotype: ``label`` (integer) or ``Metadata_Label`` (name); None when unknown."""
    meta = getattr(rec, "metadata", None) or {}
    if "label" in meta:
        return meta["label"]
    return meta.get("Metadata_Label")


def labels_of(records: Sequence[Any]) -> list[int] | None:
    """Integer labels when every record has one: ``label`` ints as they are, else names by sorted order."""
    raw = [record_label(r) for r in records]
    if not raw or any(v is None for v in raw):
        return None
    try:
        ints = [int(v) for v in raw]
    except (TypeError, ValueError):
        pass
    else:
        return ints if all(v >= 0 for v in ints) else None  # -1: unknown phenotype
    names = sorted({str(v) for v in raw})
    ids = {n: i for i, n in enumerate(names)}
    return [ids[str(v)] for v in raw]


class HeldoutFields:
    """The evaluated fields of a source: spread records, loaded through :func:`heldout_input`.

    ``cache=True`` (training: the same fields are scored many times) keeps the inputs after the first
    pass; ``False`` (``dinocell evaluate`` on many fields) streams them in chunks."""

    def __init__(self, source: Any, preprocess: Preprocess, limit: int | None = None, size: int | None = None,
                 cache: bool = True) -> None:
        self.source, self.preprocess, self.size, self.cache = source, preprocess, size, cache
        recs = source.records
        self.records = [recs[int(i)] for i in spread_indices(len(recs), limit)]
        self.channels = list(source.channels)
        self.fluorescent = list(getattr(source, "fluorescent", [True] * len(self.channels)))
        self.skipped: dict[str, str] = {}
        self._chunks: list[tuple[torch.Tensor, list[Any]]] | None = None

    @property
    def side(self) -> int:
        return input_size(self.preprocess, self.size)

    def load(self, rec: Any) -> torch.Tensor | None:
        """One field's input, or None (logged, listed in ``skipped``) when it cannot be read."""
        if rec.key in self.skipped:
            return None
        try:
            return heldout_input(np.ascontiguousarray(self.source.load(rec), dtype=np.float32), self.preprocess,
                                 self.size)
        except (DataError, UserError) as e:  # unreadable / undecodable field, S3 error: skip it, as training does
            self.skipped[rec.key] = str(e)
            log.warning("held-out evaluation: skipping field %s: %s", rec.key, e)
            return None

    def chunks(self, n: int = CHUNK_FIELDS) -> Iterator[tuple[torch.Tensor, list[Any]]]:
        """(inputs (k, C, S, S), their records) of the readable fields, ``n`` fields at a time."""
        if self._chunks is not None:
            yield from self._chunks
            return
        done: list[tuple[torch.Tensor, list[Any]]] = []
        for start in range(0, len(self.records), n):
            xs, kept = [], []
            for rec in self.records[start:start + n]:
                x = self.load(rec)
                if x is not None:
                    xs.append(x)
                    kept.append(rec)
            if xs:
                chunk = (torch.stack(xs), kept)
                if self.cache:
                    done.append(chunk)
                yield chunk
        if self.cache:
            self._chunks = done

    def field(self, i: int) -> torch.Tensor:
        """Input of the ``i``-th readable field (for figures; reloads when not cached)."""
        kept = [r for r in self.records if r.key not in self.skipped]
        if self._chunks is not None:
            flat = [x for xs, _ in self._chunks for x in xs]
            return flat[i]
        x = self.load(kept[i])
        if x is None:
            raise DataError(f"field {kept[i].key} became unreadable")
        return x


# --------------------------------------------------------------------------------------------------
# Figures on embeddings (pure math)
# --------------------------------------------------------------------------------------------------


def patch_figures(tokens: torch.Tensor | np.ndarray) -> dict[str, Any]:
    """Dense invariance of (F, C, N, D) patch tokens (C real channels, N locations in the same order).

    Returns ``patch_consistency`` (centred cosine at the same location, mean over a != b),
    ``patch_consistency_matrix`` (C x C), ``patch_retrieval_top1`` (same-field, same-location
    retrieval, mean over a != b), ``patch_chance`` (1/N) and ``patch_fields``."""
    t = torch.as_tensor(np.asarray(tokens)) if not isinstance(tokens, torch.Tensor) else tokens
    t = t.detach().double().cpu()
    if t.ndim != 4:
        raise DataError(f"expected patch tokens (fields, channels, patches, dim), got {tuple(t.shape)}")
    n_f, c, n, d = t.shape
    if c < 2 or n_f < 1 or n < 1:
        raise DataError(f"patch figures need >= 2 channels, a field and a patch; got shape {tuple(t.shape)}")
    u = F.normalize(t - t.reshape(-1, d).mean(0), dim=-1)
    mat = torch.einsum("fand,fbnd->ab", u, u) / (n_f * n)
    off = ~torch.eye(c, dtype=torch.bool)
    target = torch.arange(n)
    hits = []
    for a in range(c):
        for b in range(c):
            if a != b:
                sim = torch.bmm(u[:, a], u[:, b].transpose(1, 2))  # (F, N query, N gallery)
                hits.append((sim.argmax(-1) == target).double().mean())
    return {"patch_consistency": float(mat[off].mean()), "patch_consistency_matrix": mat.numpy().tolist(),
            "patch_retrieval_top1": float(torch.stack(hits).mean()), "patch_chance": 1.0 / n,
            "patch_fields": int(n_f)}


def heldout_figures(emb: torch.Tensor | np.ndarray, labels: Sequence[int] | None, channels: Sequence[str],
                    patches: torch.Tensor | np.ndarray | None = None) -> dict[str, Any]:
    """Every held-out figure from (F, C(+1), D) CLS embeddings (index C = mean image, ignored), labels
    (None: no kNN figures) and optional (F', C(+1), N, D) patch tokens.  Undefined figures are None."""
    from dinocell.evaluate.consistency import channel_consistency, cross_channel_retrieval
    from dinocell.evaluate.transfer import transfer_knn

    names = list(channels)
    e = torch.as_tensor(np.asarray(emb)) if not isinstance(emb, torch.Tensor) else emb
    real = e[:, : len(names)].float()
    out: dict[str, Any] = {k: None for k in FIGURES}
    out.update({"consistency_matrix": None, "channels": names, "n_fields": int(real.shape[0])})
    if len(names) >= 2 and real.shape[0] >= 1:
        out["channel_consistency"], mat = channel_consistency(real, centre=True)
        out["channel_consistency_raw"], _ = channel_consistency(real, centre=False)
        out["cross_channel_retrieval_top1"] = cross_channel_retrieval(real, centre=True)
        out["consistency_matrix"] = mat.tolist()
    if labels is not None:
        y = np.asarray(labels)
        if y.shape[0] == real.shape[0] and (y >= 0).all() and np.unique(y).size >= 2:
            try:
                acc, kmat = transfer_knn(real, y, k=KNN_K, temperature=KNN_T, seed=SPLIT_SEED)
            except DataError as e:  # a split with no test field (singleton classes): not defined
                log.info("held-out kNN figures skipped: %s", e)
            else:
                out["transfer_knn_accuracy"] = acc if len(names) >= 2 else None
                out["knn_accuracy"] = float(np.diag(kmat).mean())
    if patches is not None and len(names) >= 2:
        p = torch.as_tensor(np.asarray(patches)) if not isinstance(patches, torch.Tensor) else patches
        pf = patch_figures(p[:, : len(names)])
        out.update(pf)
    return out


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class HeldoutResult:
    """Figures plus what a report needs to draw them: CLS embeddings (F, C+1, D), labels, records."""

    figures: dict[str, Any]
    emb: torch.Tensor
    labels: list[int] | None
    records: list[Any] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


@torch.no_grad()
def measure(backbone: Any, fields: HeldoutFields, batch_size: int = 64, dense: bool = True) -> HeldoutResult:
    """Embed ``fields`` with ``backbone`` (eval mode restored afterwards) and compute every figure."""
    from dinocell.evaluate.consistency import channel_embeddings

    embs, toks, kept = [], [], []
    # the dense subset: readable fields at positions spread over the selection (deterministic)
    dense_at = set(spread_indices(len(fields.records), MAX_PATCH_FIELDS).tolist())
    for xs, recs in fields.chunks():
        embs.append(channel_embeddings(backbone, xs, fields.fluorescent, batch_size=batch_size))
        if dense and len(fields.channels) >= 2:
            pick = [i for i in range(len(recs)) if len(kept) + i in dense_at]
            if pick:
                maps = channel_embeddings(backbone, xs[torch.as_tensor(pick)], fields.fluorescent,
                                          batch_size=batch_size, pool="patch")  # (k, V, D, h, w)
                toks.append(maps.flatten(3).transpose(2, 3))  # (k, V, N, D)
        kept += recs
    skipped = [f"{k}: {v}" for k, v in fields.skipped.items()]
    if len(kept) < 2:
        raise DataError(f"need at least 2 readable held-out fields, got {len(kept)}"
                        + (f" (first problem: {skipped[0]})" if skipped else ""))
    emb = torch.cat(embs)
    labels = labels_of(kept)
    figs = heldout_figures(emb, labels, fields.channels, torch.cat(toks) if toks else None)
    return HeldoutResult(figs, emb, labels, kept, skipped)


def evaluate_heldout(model: Any, source: Any | HeldoutFields, *, preprocess: Preprocess | None = None,
                     limit: int | None = None, size: int | None = None, batch_size: int = 64,
                     dense: bool = True) -> HeldoutResult:
    """The held-out figures of ``model`` (a :class:`~dinocell.models.loading.LoadedModel` or a backbone
    with ``preprocess``) on ``source`` (a FieldSource, or :class:`HeldoutFields` already selected)."""
    backbone = getattr(model, "backbone", model)
    pre = preprocess if preprocess is not None else getattr(model, "preprocess", None)
    if isinstance(source, HeldoutFields):
        fields = source
    else:
        if pre is None:
            raise UserError("evaluate_heldout needs the model's preprocessing (a LoadedModel or preprocess=)")
        fields = HeldoutFields(source, pre, limit=limit, size=size, cache=False)
    return measure(backbone, fields, batch_size=batch_size, dense=dense)


def training_preprocess(cfg: Any, channel_names: Sequence[str] | None = None) -> Preprocess:
    """The :class:`Preprocess` a training config implies (what its checkpoint will load with)."""
    from dinocell.models.loading import preprocess_from_config

    return preprocess_from_config(cfg, list(channel_names) if channel_names is not None else None)


def primary(figures: dict[str, Any]) -> tuple[str, float] | None:
    """The forgetting guard's score: within-channel kNN when labels allow, else retrieval top-1."""
    for key in ("knn_accuracy", "cross_channel_retrieval_top1"):
        v = figures.get(key)
        if v is not None and math.isfinite(float(v)):
            return key, float(v)
    return None


def with_size(preprocess: Preprocess, size: int | None) -> Preprocess:
    """``preprocess`` with another training crop (``--size``)."""
    return preprocess if size is None else dataclasses.replace(preprocess, crop_size=int(size))


__all__ = ["FIGURES", "MAX_PATCH_FIELDS", "HeldoutFields", "HeldoutResult", "evaluate_heldout", "heldout_figures",
           "heldout_input", "input_size", "labels_of", "measure", "patch_figures", "primary", "spread_indices",
           "training_preprocess", "with_size"]
