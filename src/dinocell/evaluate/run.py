"""``dinocell evaluate``: score a model (run folder, checkpoint or export) and/or a profile table.

Model evaluation, on a data source (by default the run's held-out wells of its own data source, which
training never read; ``--data``: a folder, a load_data file, an ``s3://`` prefix, ``synthetic``) or on
labelled images (``class/*.tif`` folders or a CSV of paths and
labels):

* channel consistency: C×C matrix of mean same-field cosines, centred and raw, and a per-pair table;
* cross-channel retrieval (top-1 same-field retrieval across stains);
* dense figures: patch consistency and same-field patch retrieval (:mod:`dinocell.evaluate.heldout`);
* phenotype probes per view (each channel, the mean image, all channels concatenated): weighted kNN
  (k = 10, 20; T = 0.07) and a linear probe (logistic regression) on a stratified 50/50 field split;
* cross-channel transfer: kNN and linear probe fitted on channel A, tested on channel B, all pairs;
* figures: consistency matrices, transfer matrix and nearest-neighbour retrieval examples.

Profile evaluation (``--profiles FILE``): copairs replicate-retrieval mAP and fraction retrieved
(:mod:`dinocell.evaluate.profiling`).

Fields and figures come from :mod:`dinocell.evaluate.heldout`, the code the run summary and the
training callbacks use (``evaluation.json["heldout"]`` holds its flat figures).  A run folder scored on
its held-out wells without ``--limit`` uses the run's ``train.eval_fields`` fields, so it reproduces
``summary.json``.

Outputs in ``--out-dir`` (default ``<run>/eval``): ``evaluation.json``, ``evaluation.md`` and PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dinocell.data.decode import decode_image
from dinocell.data.field import IMAGE_SUFFIXES
from dinocell.errors import DataError, UserError
from dinocell.evaluate.embed import data_config, eval_source
from dinocell.evaluate.heldout import HeldoutFields, measure, spread_indices, with_size
from dinocell.models.loading import LoadedModel, load_model
from dinocell.paths import write_text_atomic
from dinocell.runs import RunDir

# --------------------------------------------------------------------------------------------------
# Labelled images
# --------------------------------------------------------------------------------------------------


def read_multichannel(path: str | os.PathLike[str]) -> np.ndarray:
    """Any image file -> (C, H, W): 2-D -> 1 channel; (H, W, 3|4) colour -> (3, H, W); (C, H, W) as is."""
    p = str(path)
    arr = np.squeeze(decode_image(p))
    if arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[0] not in (3, 4):
        arr = np.moveaxis(arr[..., :3], -1, 0)
    if arr.ndim != 3 or arr.size == 0:
        raise DataError(f"image {p} has shape {arr.shape}; expected (H, W), (H, W, 3) or (C, H, W)")
    return arr


def labelled_paths(folder: str | None = None, csv: str | None = None) -> tuple[list[str], list[str]]:
    """(paths, label names) from ``folder/<class>/*.tif`` or a CSV with ``path`` and ``label`` columns."""
    if folder:
        root = Path(folder)
        if not root.is_dir():
            raise DataError(f"labelled folder not found: {root}")
        paths, labels = [], []
        for cls in sorted(d for d in root.iterdir() if d.is_dir()):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file():
                    paths.append(str(f))
                    labels.append(cls.name)
        if not paths:
            raise DataError(f"no <class>/*.tif images in {root}")
        return paths, labels
    if csv:
        import pandas as pd

        p = Path(csv)
        if not p.is_file():
            raise DataError(f"labels CSV not found: {p}")
        df = pd.read_csv(p)
        missing = [c for c in ("path", "label") if c not in df.columns]
        if missing:
            raise DataError(f"labels CSV {p} needs columns 'path' and 'label' (missing: {', '.join(missing)})")
        paths = [str(q if Path(q).is_absolute() else p.parent / q) for q in df["path"].astype(str)]
        return paths, df["label"].astype(str).tolist()
    raise UserError("give a labelled folder or a labels CSV")


@dataclass
class _Image:
    key: str  # the file path
    metadata: dict[str, Any]
    plate: str = "labelled"


class LabelledImages:
    """Labelled image files as a field source (``records``, ``channels``, ``fluorescent``, ``load``), so
    they go through the one held-out evaluation; ``load`` finishes each bare image with the model's
    :class:`Preprocess` (its stain normalisation and scaling mode and ranges: the data sources' rule).

    Images are taken as illumination-corrected already (no plate functions come with a bare file).
    A model trained with ``fixed`` ranges needs the images' channels named as in training (the model's
    channel names when the counts match); one trained with ``plate`` scaling cannot be fed bare images:
    both fail at once with one line.  The channel count comes from the first readable image; an image
    with another count is skipped."""

    def __init__(self, paths: Sequence[str], labels: Sequence[str], preprocess: Any,
                 channel_names: Sequence[str] = ()) -> None:
        self.preprocess = preprocess
        self.classes = sorted(set(labels))
        ids = {c: i for i, c in enumerate(self.classes)}
        self.records = [_Image(str(p), {"label": ids[lab]}) for p, lab in zip(paths, labels, strict=True)]
        n_ch = None
        for rec in self.records:
            try:
                n_ch = read_multichannel(rec.key).shape[0]
                break
            except DataError:
                continue
        if n_ch is None:
            raise DataError(f"no labelled image is readable (first: {paths[0] if paths else '-'})")
        self.channels = list(channel_names) if len(channel_names) == n_ch else [f"ch{i}" for i in range(n_ch)]
        self.fluorescent = [True] * n_ch
        self.name = "labelled images"
        preprocess.ranges(self.channels)  # fixed ranges for these channels, or one UserError now (plate)

    def load(self, rec: Any) -> np.ndarray:
        raw = read_multichannel(rec.key)
        if raw.shape[0] != len(self.channels):
            raise DataError(f"{rec.key}: {raw.shape[0]} channels, expected {len(self.channels)}")
        return self.preprocess.scale(raw, self.channels)


# --------------------------------------------------------------------------------------------------
# Metrics on embeddings
# --------------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def evaluate_embeddings(
    emb: torch.Tensor | np.ndarray,
    channel_names: Sequence[str],
    labels: Sequence[int] | None,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    seed: int = 0,
) -> dict[str, Any]:
    """Every embedding-level metric of ``dinocell evaluate`` from (F, C+1, D) channel embeddings."""
    from dinocell.evaluate.consistency import channel_consistency, cross_channel_retrieval_matrix, pair_table
    from dinocell.evaluate.probes import knn_accuracy, linear_probe_accuracy, split_train_test
    from dinocell.evaluate.transfer import transfer_matrix

    e = torch.as_tensor(np.asarray(emb)).float() if not isinstance(emb, torch.Tensor) else emb.float()
    names = list(channel_names)
    real = e[:, : len(names)]
    out: dict[str, Any] = {"n_fields": int(e.shape[0]), "channels": names, "embed_dim": int(e.shape[-1])}
    if len(names) >= 2:
        cons, mat = channel_consistency(real, centre=True)
        cons_raw, mat_raw = channel_consistency(real, centre=False)
        top1, rmat = cross_channel_retrieval_matrix(real, centre=True)
        pairs = pair_table(mat, names)
        raw_pairs = pair_table(mat_raw, names)
        ret_pairs = pair_table(rmat, names)
        for row, raw_row, ret_row in zip(pairs, raw_pairs, ret_pairs, strict=True):
            row["centred"] = row.pop("value")
            row["raw"] = raw_row["value"]
            row["retrieval_top1"] = ret_row["value"]
        out["channel_consistency"] = {"centred": cons, "raw": cons_raw, "matrix": mat, "matrix_raw": mat_raw,
                                      "pairs": pairs}
        out["cross_channel_retrieval"] = {"top1": top1, "matrix": rmat, "chance": 1.0 / e.shape[0]}
    if labels is None:
        return _clean(out)
    y = np.asarray(labels)
    if np.unique(y).size < 2 or y.size < 4:
        out["probes_skipped"] = "need at least two classes and four labelled fields"
        return _clean(out)
    train = split_train_test(y, 0.5, seed)
    views: dict[str, np.ndarray] = {n: real[:, i].numpy() for i, n in enumerate(names)}
    views["mean image"] = e[:, -1].numpy()
    if len(names) > 1:
        views["all channels (concat)"] = real.reshape(real.shape[0], -1).numpy()
    probes: dict[str, dict[str, float]] = {}
    for view, x in views.items():
        row = {f"knn_k{k}": knn_accuracy(x[train], y[train], x[~train], y[~train], k=k, temperature=temperature)
               for k in ks}
        row["linear"] = linear_probe_accuracy(x[train], y[train], x[~train], y[~train], seed=seed)
        probes[view] = row
    out["probes"] = {"split": {"train": int(train.sum()), "test": int((~train).sum())}, "views": probes,
                     "n_classes": int(np.unique(y).size), "chance": float(np.bincount(y[~train]).max() / (~train).sum())}
    if len(names) >= 2:
        kacc, kmat = transfer_matrix(real, y, "knn", k=max(ks), temperature=temperature, train_mask=train)
        lacc, lmat = transfer_matrix(real, y, "linear", train_mask=train, seed=seed)
        out["transfer"] = {"knn": {"k": int(max(ks)), "mean_off_diagonal": kacc, "matrix": kmat},
                           "linear": {"mean_off_diagonal": lacc, "matrix": lmat}}
    return _clean(out)


# --------------------------------------------------------------------------------------------------
# Figures and report
# --------------------------------------------------------------------------------------------------


def retrieval_figure(fields: torch.Tensor | Callable[[int], torch.Tensor], emb: torch.Tensor, names: Sequence[str],
                     labels: Sequence[int] | None, query_channel: int = 0, gallery_channel: int = 1,
                     n_queries: int = 6, top: int = 5) -> Any:
    """Nearest neighbours across channels: a query field's channel-A image and the top gallery hits
    among every field's channel-B embedding (green: the same field; orange: same label; red: other).

    ``fields`` is the (F, C, H, W) tensor or a function returning field ``i`` (so large evaluations
    need not keep every image in memory); ``emb`` is (F, C+1, D)."""
    from dinocell.evaluate.consistency import centre_embeddings
    from dinocell.evaluate.plots import new_figure

    c = len(names)
    qa, gb = min(query_channel, c), min(gallery_channel, c)
    view_names = list(names) + ["mean"]
    e = F.normalize(centre_embeddings(emb.double()), dim=-1)
    sim = e[:, qa] @ e[:, gb].T
    n = emb.shape[0]
    queries = spread_indices(n, n_queries)
    top = min(top, n)
    get = fields if callable(fields) else (lambda i: fields[i])

    def img(i: int, ch: int) -> np.ndarray:
        f = get(i).float()
        return (f.mean(0) if ch >= c else f[ch]).numpy()

    fig = new_figure(1.5 * (top + 1) + 0.3, 1.6 * len(queries) + 0.5)
    axes = fig.subplots(len(queries), top + 1, squeeze=False)
    for r, q in enumerate(queries):
        hits = sim[q].argsort(descending=True)[:top].tolist()
        ax = axes[r, 0]
        ax.imshow(img(q, qa), cmap="gray", vmin=0, vmax=1)
        lab = f" · y={labels[q]}" if labels is not None else ""
        ax.set_title(f"query {q}{lab}\n{view_names[qa]}", fontsize=7)
        for j, h in enumerate(hits, start=1):
            ax = axes[r, j]
            ax.imshow(img(h, gb), cmap="gray", vmin=0, vmax=1)
            colour = "tab:green" if h == q else (
                "tab:orange" if labels is not None and labels[h] == labels[q] else "tab:red")
            for s in ax.spines.values():
                s.set_edgecolor(colour)
                s.set_linewidth(3)
            lab = f" · y={labels[h]}" if labels is not None else ""
            ax.set_title(f"#{j}: {h}{lab}\ncos {float(sim[q, h]):.2f}", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(f"retrieval: query {view_names[qa]} -> gallery {view_names[gb]} "
                 "(green = same field, orange = same label)", fontsize=8)
    fig.tight_layout()
    return fig


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _matrix_md(mat: Sequence[Sequence[Any]], names: Sequence[str], corner: str) -> list[str]:
    lines = [f"| {corner} | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for n, row in zip(names, mat, strict=True):
        lines.append(f"| **{n}** | " + " | ".join(_fmt(v) for v in row) + " |")
    return lines


def to_markdown(res: dict[str, Any]) -> str:
    """The evaluation as Markdown tables."""
    lines = ["# dinocell evaluation", ""]
    if "model" in res:
        lines += [f"- model: `{res['model']}`", f"- data: `{res.get('data')}`",
                  f"- fields: {res.get('n_fields')} (image size {res.get('size')} px)",
                  f"- channels: {', '.join(res.get('channels', []))}", ""]
    if "channel_consistency" in res:
        cc, cr = res["channel_consistency"], res["cross_channel_retrieval"]
        lines += ["## Channel consistency", "",
                  "Mean cosine between the embeddings of different channels of the same field (centred: the "
                  "evaluation set's mean embedding removed first; raw cosine rewards collapse).", "",
                  "| metric | value |", "|---|---|",
                  f"| channel consistency (centred) | {_fmt(cc['centred'])} |",
                  f"| channel consistency (raw) | {_fmt(cc['raw'])} |",
                  f"| cross-channel retrieval top-1 | {_fmt(cr['top1'])} (chance {_fmt(cr['chance'])}) |"]
        if "patch_consistency" in res:
            pc, pr_ = res["patch_consistency"], res["patch_retrieval"]
            lines += [f"| patch consistency (centred, same location) | {_fmt(pc['centred'])} |",
                      f"| patch retrieval top-1 (same field) | {_fmt(pr_['top1'])} (chance {_fmt(pr_['chance'])}) |"]
        lines += ["",
                  "### Per channel pair", "",
                  "| channel A | channel B | centred cosine | raw cosine | retrieval A→B |", "|---|---|---|---|---|"]
        lines += [f"| {p['a']} | {p['b']} | {_fmt(p['centred'])} | {_fmt(p['raw'])} | {_fmt(p['retrieval_top1'])} |"
                  for p in cc["pairs"]]
        lines += ["", "### Consistency matrix (centred)", ""] + _matrix_md(cc["matrix"], res["channels"], "") + [""]
    if "probes" in res:
        pr = res["probes"]
        ks = [k for k in next(iter(pr["views"].values())) if k.startswith("knn")]
        lines += ["## Phenotype probes (within view)", "",
                  f"Stratified 50/50 split of fields ({pr['split']['train']} train / {pr['split']['test']} test), "
                  f"{pr['n_classes']} classes, majority-class chance {_fmt(pr['chance'])}.", "",
                  "| view | " + " | ".join(k.replace("knn_k", "kNN k=") for k in ks) + " | linear |",
                  "|---" * (len(ks) + 2) + "|"]
        for view, row in pr["views"].items():
            lines.append(f"| {view} | " + " | ".join(_fmt(row[k]) for k in ks) + f" | {_fmt(row['linear'])} |")
        lines.append("")
    elif "probes_skipped" in res:
        lines += [f"Phenotype probes skipped: {res['probes_skipped']}.", ""]
    if "transfer" in res:
        tr = res["transfer"]
        lines += ["## Cross-channel transfer", "",
                  "Fit on the row channel (train fields), test on the column channel (held-out fields); the "
                  "diagonal is within-channel accuracy.", "",
                  f"kNN (k={tr['knn']['k']}), mean off-diagonal **{_fmt(tr['knn']['mean_off_diagonal'])}**:", ""]
        lines += _matrix_md(tr["knn"]["matrix"], res["channels"], "fit \\ test")
        lines += ["", f"Linear probe, mean off-diagonal **{_fmt(tr['linear']['mean_off_diagonal'])}**:", ""]
        lines += _matrix_md(tr["linear"]["matrix"], res["channels"], "fit \\ test") + [""]
    if "profiles" in res:
        p = res["profiles"]
        lines += ["## Profiles: replicate retrieval (copairs)", "", f"- file: `{p.get('file')}`",
                  f"- profiles: {p['n_profiles']} ({p['n_controls']} controls), labels: {p['n_labels']}", "",
                  "| metric | value |", "|---|---|",
                  f"| mean average precision | {_fmt(p['mean_average_precision'])} |",
                  f"| fraction retrieved (BH-corrected p < {p['threshold']}) | {_fmt(p['fraction_retrieved'])} |",
                  f"| fraction retrieved (uncorrected p) | {_fmt(p['fraction_retrieved_uncorrected'])} |", "",
                  "| label | mAP | p | corrected p | retrieved |", "|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {_fmt(r['mAP'])} | {_fmt(r['p_value'], 4)} | {_fmt(r['corrected_p_value'], 4)} "
                  f"| {'yes' if r['retrieved'] else 'no'} |" for r in p["per_label"]]
        lines.append("")
    if res.get("figures"):
        lines += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in res["figures"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def default_out_dir(model: str | os.PathLike[str] | LoadedModel | None, profiles: str | None) -> Path:
    """``<run>/eval`` for run-folder models (and their exports), else an ``eval`` folder next to the model
    (file or export folder) or profiles file."""
    from dinocell.models.timm_export import is_export_folder

    if isinstance(model, LoadedModel):
        return RunDir(model.run_dir or Path(".")).eval_dir
    if model is not None:
        p = Path(model)
        if p.is_dir() and not is_export_folder(p):
            return RunDir(p).eval_dir
        return (RunDir.of_file(p) or RunDir(p.parent)).eval_dir
    if profiles is not None:
        return RunDir(Path(profiles).parent).eval_dir
    return RunDir(Path(".")).eval_dir


def evaluate(
    model: str | os.PathLike[str] | LoadedModel | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    data: str | None = None,
    overrides: Sequence[str] = (),
    labelled: str | None = None,
    labels_csv: str | None = None,
    limit: int | None = None,
    size: int | None = None,
    batch_size: int = 32,
    profiles: str | os.PathLike[str] | None = None,
    null_size: int = 10000,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the evaluation (see module doc); returns the results and writes the report files."""
    from dinocell.evaluate.plots import matrix_figure, save_figure

    if model is None and profiles is None:
        raise UserError("nothing to evaluate: give a model (run folder, .ckpt, export folder) and/or --profiles")
    out = Path(out_dir) if out_dir is not None else default_out_dir(model, str(profiles) if profiles else None)
    res: dict[str, Any] = {}
    figures: list[str] = []
    if model is not None:
        m = model if isinstance(model, LoadedModel) else load_model(model)
        pre = with_size(m.preprocess, size)
        if labelled or labels_csv:
            cfg = data_config(m, data or "synthetic", overrides)
            # the model's training scaling and stain, unless overridden
            pre = dataclasses.replace(pre, scaling=cfg.data.scaling, stain=cfg.data.stain)
            paths, names_ = labelled_paths(labelled, labels_csv)
            source: Any = LabelledImages(paths, names_, pre, m.channel_names)
            data_desc = labelled or labels_csv
            res["classes"] = source.classes
        else:
            source, data_desc, heldout = eval_source(m, data, overrides)
            res["heldout_fields"] = heldout
            if limit is None and heldout is not None and m.cfg is not None and m.cfg.train.eval_fields > 0:
                limit = int(m.cfg.train.eval_fields)  # the run's evaluation set: summary.json's figures
        fields = HeldoutFields(source, pre, limit=limit, cache=False)
        held = measure(m.backbone, fields, batch_size=batch_size)
        emb, label_list, channel_names = held.emb, held.labels, fields.channels
        res.update({"model": m.description, "data": data_desc, "size": fields.side, "skipped": held.skipped})
        res.update(evaluate_embeddings(emb, channel_names, label_list, ks=ks, temperature=temperature, seed=seed))
        res["heldout"] = held.figures
        if held.figures.get("patch_consistency") is not None:
            f = held.figures
            res["patch_consistency"] = {"centred": f["patch_consistency"], "matrix": f["patch_consistency_matrix"],
                                        "fields": f["patch_fields"]}
            res["patch_retrieval"] = {"top1": f["patch_retrieval_top1"], "chance": f["patch_chance"],
                                      "gallery": "patches of the same field"}
        if "channel_consistency" in res:
            cc = res["channel_consistency"]
            for name, mat, title in (
                ("consistency_matrix.png", cc["matrix"], f"channel consistency, centred (mean {cc['centred']:.3f})"),
                ("consistency_matrix_raw.png", cc["matrix_raw"], f"channel consistency, raw (mean {cc['raw']:.3f})"),
            ):
                save_figure(matrix_figure(np.asarray(mat, dtype=float), channel_names, title), out / name)
                figures.append(str(out / name))
        if "transfer" in res:
            tk = res["transfer"]["knn"]
            save_figure(matrix_figure(np.asarray(tk["matrix"], dtype=float), channel_names,
                                      f"cross-channel kNN transfer (mean off-diagonal {tk['mean_off_diagonal']:.3f})",
                                      vmin=0.0, vmax=1.0, xlabel="test channel", ylabel="fit channel"),
                        out / "transfer_knn.png")
            figures.append(str(out / "transfer_knn.png"))
        gallery = 1 if len(channel_names) > 1 else len(channel_names)
        save_figure(retrieval_figure(fields.field, emb, channel_names, label_list, 0, gallery),
                    out / "retrieval_examples.png")
        figures.append(str(out / "retrieval_examples.png"))
    if profiles is not None:
        from dinocell.evaluate.profiling import read_profiles, replicate_map

        prof = replicate_map(read_profiles(profiles), null_size=null_size, seed=seed)
        prof["file"] = str(profiles)
        res["profiles"] = prof
    res["figures"] = figures
    res = _clean(res)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "evaluation.json", json.dumps(res, indent=2))
    write_text_atomic(out / "evaluation.md", to_markdown(res))
    res["out_dir"] = str(out)
    return res


def summary_line(res: dict[str, Any]) -> str:
    """A few headline numbers for the console."""
    parts = []
    if "channel_consistency" in res:
        parts.append(f"consistency {res['channel_consistency']['centred']:.3f} (raw "
                     f"{res['channel_consistency']['raw']:.3f})")
        parts.append(f"retrieval top-1 {res['cross_channel_retrieval']['top1']:.3f}")
    if "patch_consistency" in res:
        parts.append(f"patch consistency {_fmt(res['patch_consistency']['centred'])}, patch retrieval "
                     f"{_fmt(res['patch_retrieval']['top1'])}")
    if "transfer" in res:
        parts.append(f"kNN transfer {_fmt(res['transfer']['knn']['mean_off_diagonal'])}")
    if "profiles" in res:
        parts.append(f"mAP {res['profiles']['mean_average_precision']:.3f}, fraction retrieved "
                     f"{res['profiles']['fraction_retrieved']:.2f}")
    return "; ".join(parts)


__all__ = ["evaluate", "evaluate_embeddings", "labelled_paths", "LabelledImages", "read_multichannel",
           "retrieval_figure", "to_markdown"]
