"""Training-time access to cached volume features: a Dataset, a DataLoader and a load benchmark.

Why TensorStore's own parallelism instead of DataLoader workers: every item is three zarr arrays
whose chunks TensorStore already reads and decodes on its thread pools.  Issuing the reads of a
whole batch at once (``__getitems__``) keeps all chunks in flight without forking worker processes
that would each need their own copy of the pools; ``num_workers=0`` is therefore the default.
Uncompressed chunks are memory-mapped (``file_io_mode: memmap``), which avoids one copy per read.

A patch-store volume yields its features at the ViT's patch grid and gt/mask at full resolution;
:meth:`FeatureVolumeDataset.upsampler` gives the module that maps features (or logits) to voxels on
the training device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dinocell.errors import DataError
from dinocell.extract.check import scan_output
from dinocell.extract.upsample import Upsample
from dinocell.extract.volumes.config import ARRAYS, require_volumes
from dinocell.extract.volumes.store import FeatureGrid, read_metadata, volume_paths


def feature_context(num_threads: int = 8, cache_bytes: int = 0, memmap: bool = True) -> Any:
    """A TensorStore Context with bounded copy/IO concurrency and (by default) no chunk cache.

    No cache: an epoch over thousands of volumes would only churn it; the OS page cache already
    keeps recently read chunk files.
    """
    import tensorstore as ts

    spec: dict[str, Any] = {
        "data_copy_concurrency": {"limit": int(num_threads)},
        "file_io_concurrency": {"limit": int(num_threads)},
        "cache_pool": {"total_bytes_limit": int(cache_bytes)},
    }
    if memmap:
        spec["file_io_mode"] = {"mode": "memmap"}
    return ts.Context(spec)


def completed_indices(preprocessed_dir: str | os.PathLike[str]) -> list[int]:
    """Indices whose metadata marker exists (the extraction's definition of complete)."""
    return sorted(scan_output(preprocessed_dir)["metadata"])


class FeatureVolumeDataset(Dataset):
    """Cached volumes as ``(features, gt, mask[, metadata])`` tensors.

    ``features`` float16: (C, D, H/p, W/p) from a patch store, (C, D, H, W) from a voxel store;
    ``gt`` (K, D, H, W) int32 instance ids per class, ``mask`` (1, D, H, W) bool, always at full
    resolution.  ``grids[item]`` maps feature cells to voxels.  ``volume_indices`` selects volumes
    (all completed ones by default); asking for an incomplete one is a :class:`DataError`.
    """

    def __init__(self, preprocessed_dir: str | os.PathLike[str], volume_indices: Sequence[int] | None = None,
                 num_threads: int = 8, return_metadata: bool = False, cache_bytes: int = 0,
                 memmap: bool = True) -> None:
        require_volumes(("tensorstore",), "FeatureVolumeDataset")
        self.root = Path(preprocessed_dir)
        if not self.root.is_dir():
            raise DataError(f"preprocessed directory not found: {self.root}")
        available = completed_indices(self.root)
        if volume_indices is None:
            self.indices = available
        else:
            self.indices = [int(i) for i in volume_indices]
            missing = sorted(set(self.indices) - set(available))
            if missing:
                raise DataError(f"volumes not complete in {self.root}: {missing[:10]}"
                                f"{' ...' if len(missing) > 10 else ''}")
        if not self.indices:
            raise DataError(f"no completed volumes in {self.root} (run dinocell extract-volumes first)")
        self.metadata = []
        for i in self.indices:
            meta = read_metadata(self.root, i)
            if meta is None:
                raise DataError(f"metadata of volume {i} in {self.root} is unreadable")
            self.metadata.append(meta)
        self.grids = [FeatureGrid.from_metadata(m) for m in self.metadata]
        self.num_threads = num_threads
        self.return_metadata = return_metadata
        self.cache_bytes = cache_bytes
        self.memmap = memmap
        self._pid: int | None = None
        self._ctx: Any = None
        self._stores: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return len(self.indices)

    # TensorStore handles are per process: drop them when pickled into DataLoader workers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_pid=None, _ctx=None, _stores={})
        return state

    def _context(self) -> Any:
        if self._ctx is None or self._pid != os.getpid():
            self._ctx = feature_context(self.num_threads, self.cache_bytes, self.memmap)
            self._stores = {}
            self._pid = os.getpid()
        return self._ctx

    def stores(self, item: int) -> dict[str, Any]:
        """Open (once) the three arrays of dataset item ``item``."""
        import tensorstore as ts

        ctx = self._context()
        if item not in self._stores:
            paths = volume_paths(self.root, self.indices[item])
            try:
                self._stores[item] = {
                    name: ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(paths[name])}},
                                  read=True, context=ctx).result()
                    for name in ARRAYS}
            except Exception as e:
                raise DataError(f"cannot open volume {self.indices[item]}: {str(e).splitlines()[0]}") from None
        return self._stores[item]

    def upsampler(self, item: int = 0, mode: str = "trilinear") -> Upsample:
        """Module upsampling item ``item``'s features (or logits on its grid) to its gt/mask voxels."""
        return Upsample(self.grids[item].volume_shape, mode)

    def nbytes(self, item: int) -> int:
        """Decoded bytes of one item (features + gt + mask)."""
        meta = self.metadata[item]
        total = 0
        for name in ARRAYS:
            n = int(np.prod(meta["shapes"][name]))
            total += n * np.dtype(meta["dtypes"][name]).itemsize
        return total

    def _issue(self, item: int) -> list[Any]:
        return [self.stores(item)[name].read() for name in ARRAYS]

    def _finish(self, item: int, futures: list[Any]) -> tuple[Any, ...]:
        try:
            feats, gt, mask = (f.result() for f in futures)
        except Exception as e:
            raise DataError(f"cannot read volume {self.indices[item]}: {str(e).splitlines()[0]}") from None
        out: tuple[Any, ...] = (
            torch.from_numpy(feats),
            torch.from_numpy(gt.view(np.int32)),  # ids < 2**31 (renumbered at extraction otherwise)
            torch.from_numpy(mask).view(torch.bool),
        )
        if self.return_metadata:
            out = (*out, self.metadata[item])
        return out

    def __getitem__(self, item: int) -> tuple[Any, ...]:
        return self._finish(item, self._issue(item))

    def __getitems__(self, items: Sequence[int]) -> list[tuple[Any, ...]]:
        """All reads of a batch in flight at once (DataLoader calls this with the batch's indices)."""
        futures = [self._issue(i) for i in items]
        return [self._finish(i, f) for i, f in zip(items, futures, strict=True)]


def collate_feature_batch(items: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Stack features/gt/mask of equal-shaped volumes; metadata (if any) stays a list of dicts."""
    shapes = {tuple(it[0].shape) for it in items}
    if len(shapes) > 1:
        raise DataError(f"volumes in a batch have different feature shapes {sorted(shapes)}; use batch_size=1")
    feats = torch.stack([it[0] for it in items])
    gts = [it[1] for it in items]
    if len({tuple(g.shape) for g in gts}) > 1:
        raise DataError("volumes in a batch have different class counts; use batch_size=1")
    out: tuple[Any, ...] = (feats, torch.stack(gts), torch.stack([it[2] for it in items]))
    if len(items[0]) > 3:
        out = (*out, [it[3] for it in items])
    return out


def create_feature_dataloader(preprocessed_dir: str | os.PathLike[str], batch_size: int = 1,
                              shuffle: bool = False, num_workers: int = 0,
                              volume_indices: Sequence[int] | None = None, num_threads: int = 8,
                              return_metadata: bool = False, drop_last: bool = False, seed: int = 0,
                              pin_memory: bool = False) -> DataLoader:
    """A DataLoader over :class:`FeatureVolumeDataset` (batch reads issued together, seeded shuffle).

    ``num_workers > 0`` uses spawned processes (TensorStore does not survive ``fork``); usually
    unnecessary because TensorStore already reads and decodes chunks on ``num_threads`` threads.
    """
    ds = FeatureVolumeDataset(preprocessed_dir, volume_indices, num_threads, return_metadata)
    gen = torch.Generator()
    gen.manual_seed(seed)
    # TensorStore's thread pools abort a forked child: worker processes must be spawned.
    extra: dict[str, Any] = {"multiprocessing_context": "spawn", "persistent_workers": True} if num_workers else {}
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate_feature_batch, drop_last=drop_last, generator=gen,
                      pin_memory=pin_memory, **extra)


def drop_page_cache(preprocessed_dir: str | os.PathLike[str]) -> int:
    """Ask the kernel to evict the cached pages of every chunk file (``POSIX_FADV_DONTNEED``).

    Needs no privileges (clean pages only), so "cold" timings mean reads from the storage device.
    Returns the number of files advised (0 where fadvise is unavailable).
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    n = 0
    for dirpath, _, files in os.walk(preprocessed_dir):
        for f in files:
            try:
                fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            finally:
                os.close(fd)
    return n


def bench_load(preprocessed_dir: str | os.PathLike[str], batch_size: int = 4, num_batches: int = 20,
               num_threads: int = 8, printer: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Time loading batches cold, then warm.

    Cold: one epoch (at most ``num_batches`` batches) right after evicting the chunk files from the
    page cache and with fresh TensorStore handles, so every volume is read from the device once.
    Warm: ``num_batches`` further batches (epochs repeat) with the files cached and handles open.
    """
    loader = create_feature_dataloader(preprocessed_dir, batch_size=batch_size, shuffle=True,
                                       num_threads=num_threads)
    ds = loader.dataset
    assert isinstance(ds, FeatureVolumeDataset)
    bytes_per_item = [ds.nbytes(i) for i in range(len(ds))]

    def run(limit: int, one_epoch: bool) -> tuple[float, int, int]:
        n_batches, n_bytes = 0, 0
        t0 = time.perf_counter()
        while n_batches < limit:
            for feats, gt, mask in loader:
                n_batches += 1
                n_bytes += feats.numel() * feats.element_size() + gt.numel() * 4 + mask.numel()
                if n_batches >= limit:
                    break
            if one_epoch:
                break
        return time.perf_counter() - t0, n_batches, n_bytes

    dropped = drop_page_cache(preprocessed_dir)
    cold_s, cold_n, cold_bytes = run(num_batches, one_epoch=True)
    warm_s, warm_n, warm_bytes = run(num_batches, one_epoch=False)
    res = {
        "volumes": len(ds), "batch_size": batch_size,
        "mean_volume_mb": float(np.mean(bytes_per_item)) / 1e6,
        "cold_batches": cold_n, "cold_seconds": cold_s, "cold_seconds_per_batch": cold_s / cold_n,
        "cold_mb_per_s": cold_bytes / 1e6 / cold_s,
        "warm_batches": warm_n, "warm_seconds": warm_s, "warm_seconds_per_batch": warm_s / warm_n,
        "warm_mb_per_s": warm_bytes / 1e6 / warm_s,
        "page_cache_dropped_files": dropped,
    }
    if printer is not None:
        printer(f"{res['volumes']} volumes, {res['mean_volume_mb']:.1f} MB each (decoded), batch {batch_size}")
        printer(f"cold: {cold_s:.3f} s for {cold_n} batches ({res['cold_seconds_per_batch']:.3f} s/batch, "
                f"{res['cold_mb_per_s']:.0f} MB/s; page cache dropped for {dropped} files)")
        printer(f"warm: {warm_s:.3f} s for {warm_n} batches ({res['warm_seconds_per_batch']:.3f} s/batch, "
                f"{res['warm_mb_per_s']:.0f} MB/s)")
    return res
