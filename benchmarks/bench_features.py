"""P4/P5/P6: cached volume features — read speed, cache vs on-the-fly, extraction overhead.

    python benchmarks/bench_features.py [--quick] [--reps N] [--dim D]

* P4: MB/s of reading one cached volume through ``FeatureVolumeDataset`` (features + gt + mask,
  TensorStore zarr v3, warm page cache) ÷ MB/s of ``numpy.fromfile`` of a raw file holding the same
  number of bytes.  Storage variants: uncompressed without checksum (the P4 figure), uncompressed
  + crc32c, blosc-lz4 + crc32c, zstd (+ frame checksum, the default).  Interleaved repetitions,
  medians.
* P5: seconds to produce a training-ready item on the fly (crop sampling: raw + gt + mask, then the
  per-slice ViT to patch features, model already loaded) ÷ seconds to load the same item from the
  compact patch store (default zstd storage: patch-grid features + full-resolution gt/mask).  The
  table also shows the seed's figure: on-the-fly voxel features (+ bilinear upsampling to every
  voxel) ÷ loading them from the voxel store, and the time breakdown of both sides.
* P6: slices/s of the extraction's encoder stage (``encode_features(pool="patch")`` on the volume's
  slices, as ``compute_volume_features`` calls it) ÷ slices/s of a bare timm ``forward_features``
  loop over the same tensors and batch size.  The table also shows the whole per-slice stage
  including bilinear upsampling to every voxel (the voxel store), which the bare loop does not do.

Model: ViT-S/16 (DINOv3 small, random init: weights do not change timing), 128^3 crops; ``--quick``:
the tiny test ViT (embed 32, patch 8) on 64^3.  The last three lines are
``P4 ratio=... target>=0.5``, ``P5 ratio=... target>=100``, ``P6 ratio=... target>=0.9``.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinocell.extract.dataset import FeatureVolumeDataset
from dinocell.extract.synthetic_volumes import write_synthetic_dataset
from dinocell.extract.upsample import Upsample
from dinocell.extract.volumes import (
    ARRAYS,
    ExtractionConfig,
    ModelSpec,
    RandomInitWarning,
    compute_patch_features,
    compute_volume_features,
    extract_volume,
    extraction_model,
    load_manifest,
    sample_crop,
)
from dinocell.models.encode import encode_features


def _median_interleaved(fns: dict[str, Any], reps: int) -> dict[str, float]:
    """Run every function once per round (A B C A B C ...) and return the median seconds of each."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up: page cache, allocator, handles
        f()
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _rewrite(src: Path, dst: Path, compression: str, checksum: bool) -> dict[str, Any]:
    """Copy volume 0 of ``src`` into ``dst`` with other codecs (same chunks), metadata last."""
    import json

    import tensorstore as ts

    from dinocell.extract.volumes import array_spec, dir_size_bytes, volume_paths, write_json_atomic

    meta = json.loads(volume_paths(src, 0)["metadata"].read_text())
    dst.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name in ARRAYS:
        data = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(volume_paths(src, 0)[name])}}
                       ).result().read().result()
        spec = array_spec(volume_paths(dst, 0)[name], data.shape, meta["dtypes"][name], meta["chunks"][name],
                          compression, None, checksum)
        ts.open(spec, create=True, delete_existing=True).result().write(data).result()
    meta["timing"]["write_seconds"] = time.perf_counter() - t0
    meta["configuration"].update(compression=compression, checksum=checksum)
    meta["storage"] = {f"{n}_gb": dir_size_bytes(volume_paths(dst, 0)[n]) / 1e9 for n in ARRAYS}
    meta["storage"]["total_gb"] = sum(meta["storage"].values())
    write_json_atomic(volume_paths(dst, 0)["metadata"], meta)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny ViT, 64^3 crop (seconds)")
    ap.add_argument("--smoke", action="store_true", help="every code path in seconds (--quick, 32^3, 1 rep)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None, help="crop side in voxels")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = ap.parse_args()
    args.quick = args.quick or args.smoke
    dim = args.dim or (32 if args.smoke else 64 if args.quick else 128)
    reps = args.reps or (1 if args.smoke else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = ModelSpec() if args.quick else ModelSpec(model_name="vit_small_patch16_dinov3")
    warnings.simplefilter("ignore", RandomInitWarning)
    tmp = Path(tempfile.mkdtemp(prefix="bench_features_"))
    rows: list[tuple[str, str]] = []
    try:
        manifest = write_synthetic_dataset(tmp / "src", n_volumes=1, shape=(dim + 16,) * 3, seed=0)
        loaded, info = extraction_model(spec, dim, "cpu")
        model = loaded.backbone
        rows.append(("model", f"{info['name']} embed {info['embed_dim']} patch {info['patch_size']} "
                              f"blocks {info['n_blocks']} (random init), {torch.get_num_threads()} threads"))

        # ---- cached volumes: the voxel store in four storage variants (same crop, same model) ...
        variants = {"none": ("none", False), "none+crc32c": ("none", True),
                    "blosc-lz4+crc32c": ("blosc-lz4", True), "zstd": ("zstd", True)}
        dirs = {}
        for name, (comp, checksum) in variants.items():
            d = tmp / name
            cfg = ExtractionConfig(output_dir=str(d), manifest=str(manifest), output_image_dim=dim,
                                   compression=comp, checksum=checksum, model=spec, store="voxel")
            if not dirs:
                meta = extract_volume(cfg, 0, model=loaded, model_info=info)
                rows.append(("extraction (voxel features)", f"{meta['timing']['extraction_seconds']:.2f} s"))
            else:  # same volume, other storage: rewrite the arrays instead of recomputing them
                meta = _rewrite(next(iter(dirs.values())), d, comp, checksum)
            dirs[name] = d
            rows.append((f"write {name}", f"{meta['timing']['write_seconds']:.2f} s, "
                                          f"{meta['storage']['total_gb'] * 1e3:.1f} MB on disk"))
        # ... and the patch store (the default: zstd, features at the patch grid)
        patch_cfg = ExtractionConfig(output_dir=str(tmp / "patch"), manifest=str(manifest), output_image_dim=dim,
                                     model=spec)
        meta = extract_volume(patch_cfg, 0, model=loaded, model_info=info)
        rows.append(("extraction (patch features)", f"{meta['timing']['extraction_seconds']:.2f} s"))
        rows.append(("write patch (zstd)", f"{meta['timing']['write_seconds']:.2f} s, "
                                           f"{meta['storage']['total_gb'] * 1e3:.2f} MB on disk (features "
                                           f"{meta['storage']['features_gb'] * 1e3:.2f} MB, shape "
                                           f"{meta['shapes']['features']})"))
        patch_ds = FeatureVolumeDataset(tmp / "patch")
        datasets = {k: FeatureVolumeDataset(d) for k, d in dirs.items()}
        nbytes = datasets["none"].nbytes(0)
        raw = tmp / "raw.bin"
        np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tofile(raw)

        # ---- P4: read MB/s vs numpy.fromfile of the same number of bytes
        fns = {"fromfile": lambda: np.fromfile(raw, dtype=np.uint8)}
        fns.update({k: (lambda ds=ds: ds[0]) for k, ds in datasets.items()})
        t = _median_interleaved(fns, reps)
        mbs = {k: nbytes / 1e6 / v for k, v in t.items()}
        rows.append(("volume bytes (decoded)", f"{nbytes / 1e6:.1f} MB (features + gt + mask)"))
        for k in ("fromfile", *variants):
            ratio = "" if k == "fromfile" else f"  ratio {mbs[k] / mbs['fromfile']:.2f}"
            rows.append((f"read {k}", f"{mbs[k]:8.0f} MB/s  ({t[k] * 1e3:.1f} ms){ratio}"))
        p4 = mbs["none"] / mbs["fromfile"]

        # ---- P5: on-the-fly training-ready item vs cached load (patch store; the seed's voxel figure too)
        cfg = ExtractionConfig(output_dir=str(tmp / "otf"), manifest=str(manifest), output_image_dim=dim, model=spec)
        entries = load_manifest(manifest)
        parts: dict[str, list[float]] = {"sampling": [], "patch features": [], "voxel features": []}

        def on_the_fly(kind: str) -> Any:
            t0 = time.perf_counter()
            crop = sample_crop(entries, 0, cfg)
            t1 = time.perf_counter()
            vol = loaded.preprocess.scale_volume(crop.raw)  # what extraction feeds the model
            if kind == "patch":
                feats = compute_patch_features(vol, model, cfg.batch_size, cfg.feature_dtype)
            else:
                feats = compute_volume_features(vol, model, "z", cfg.batch_size, cfg.feature_dtype)
            parts["sampling"].append(t1 - t0)
            parts[f"{kind} features"].append(time.perf_counter() - t1)
            return feats, crop.gt, crop.mask

        # Two interleaved groups: the small patch reads are not timed right after 1.6 GB voxel reads.
        store = patch_ds.stores(0)
        n5 = max(3, reps // 2)
        t5 = _median_interleaved({
            "otf patch": lambda: on_the_fly("patch"), "patch": lambda: patch_ds[0],
            **{f"patch {n}": (lambda n=n: store[n].read().result()) for n in ARRAYS}}, n5)
        t5.update(_median_interleaved({
            "otf voxel": lambda: on_the_fly("voxel"), "voxel zstd": lambda: datasets["zstd"][0],
            "voxel none": lambda: datasets["none"][0]}, n5))
        med = {k: statistics.median(v) for k, v in parts.items()}
        rows.append(("on-the-fly item (patch)", f"{t5['otf patch']:.3f} s (median parts: sampling {med['sampling']:.3f} s "
                                                f"+ ViT patch features {med['patch features']:.3f} s)"))
        rows.append(("cached load (patch, zstd)", f"{t5['patch'] * 1e3:.1f} ms (features "
                                                  f"{t5['patch features'] * 1e3:.1f} + gt {t5['patch gt'] * 1e3:.1f} "
                                                  f"+ mask {t5['patch mask'] * 1e3:.1f} ms read alone)  "
                                                  f"ratio {t5['otf patch'] / t5['patch']:.1f}"))
        rows.append(("on-the-fly item (voxel)", f"{t5['otf voxel']:.3f} s (median parts: sampling {med['sampling']:.3f} s "
                                                f"+ ViT + upsampling {med['voxel features']:.3f} s)"))
        rows.append(("cached load (voxel, zstd)", f"{t5['voxel zstd'] * 1e3:.1f} ms  "
                                                  f"ratio {t5['otf voxel'] / t5['voxel zstd']:.1f} (the seed's P5)"))
        rows.append(("cached load (voxel, none)", f"{t5['voxel none'] * 1e3:.1f} ms  "
                                                  f"ratio {t5['otf voxel'] / t5['voxel none']:.1f}"))
        # What the training step adds (on the GPU in practice): upsampling logits of a 1x1x1 head.
        feats0 = patch_ds[0][0][None].float()
        head = torch.nn.Conv3d(feats0.shape[1], len(meta["statistics"]["classes"]), 1)
        up = Upsample(patch_ds.grids[0].volume_shape)
        with torch.no_grad():
            t_up = _median_interleaved({"up": lambda: up(head(feats0))}, 3)["up"]
        rows.append(("head + Upsample of logits, CPU", f"{t_up * 1e3:.1f} ms ({feats0.shape[1]} features -> "
                                                       f"{head.out_channels} classes at {up.size}; not in P5)"))
        p5 = t5["otf patch"] / t5["patch"]

        # ---- P6: encoder stage vs bare timm loop on the same slices
        crop = sample_crop(entries, 0, cfg)
        slices = torch.from_numpy(crop.raw)[:, None].contiguous()
        bs = cfg.batch_size
        timm_model = model.model

        def ours() -> None:
            for s in range(0, len(slices), bs):
                encode_features(model, slices[s:s + bs], pool="patch", batch_size=bs)

        def bare() -> None:
            with torch.no_grad():
                for s in range(0, len(slices), bs):
                    timm_model.forward_features(slices[s:s + bs])

        def full() -> None:
            compute_volume_features(crop.raw, model, "z", bs, "float16")

        t6 = _median_interleaved({"ours": ours, "bare": bare, "full": full}, reps)
        ips = {k: len(slices) / v for k, v in t6.items()}
        rows.append(("bare timm forward_features", f"{ips['bare']:8.1f} slices/s"))
        rows.append(("extraction encoder stage", f"{ips['ours']:8.1f} slices/s"))
        rows.append(("  + upsampling to voxels", f"{ips['full']:8.1f} slices/s (ratio {ips['full'] / ips['bare']:.2f})"))
        p6 = ips["ours"] / ips["bare"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    width = max(len(k) for k, _ in rows)
    print(f"bench_features ({'quick' if args.quick else 'full'}: {dim}^3 crop, {reps} reps, medians)")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"P4 ratio={p4:.2f} target>=0.5")
    print(f"P5 ratio={p5:.1f} target>=100")
    print(f"P6 ratio={p6:.2f} target>=0.9")


if __name__ == "__main__":
    main()
