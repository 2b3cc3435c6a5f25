from __future__ import annotations

import pickle

import numpy as np
import pytest
import tensorstore as ts
import torch

from dinocell.errors import DataError
from dinocell.extract.dataset import (
    FeatureVolumeDataset,
    bench_load,
    collate_feature_batch,
    create_feature_dataloader,
    drop_page_cache,
    feature_context,
)
from dinocell.extract.volumes import volume_paths


def _read(path):
    return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}).result().read().result()


def test_items_match_written_arrays(extracted_dir):
    ds = FeatureVolumeDataset(extracted_dir, return_metadata=True)
    assert len(ds) == 2 and ds.indices == [0, 1]
    feats, gt, mask, meta = ds[1]
    assert feats.dtype == torch.float16 and feats.shape == (32, 16, 16, 16)
    assert gt.dtype == torch.int32 and gt.shape == (3, 16, 16, 16)
    assert mask.dtype == torch.bool and mask.shape == (1, 16, 16, 16)
    assert meta["volume_index"] == 1
    paths = volume_paths(extracted_dir, 1)
    np.testing.assert_array_equal(feats.numpy(), _read(paths["features"]))
    np.testing.assert_array_equal(gt.numpy(), _read(paths["gt"]).astype(np.int32))
    np.testing.assert_array_equal(mask.numpy(), _read(paths["mask"]).astype(bool))
    assert not gt[:, ~mask[0]].any()
    assert ds.nbytes(1) == 32 * 16**3 * 2 + 3 * 16**3 * 4 + 16**3


def test_getitems_equals_getitem(extracted_dir):
    ds = FeatureVolumeDataset(extracted_dir)
    batch = ds.__getitems__([1, 0])
    for got, i in zip(batch, [1, 0], strict=True):
        for a, b in zip(got, ds[i], strict=True):
            assert torch.equal(a, b)


def test_dataloader_batches_and_shuffle(extracted_dir):
    loader = create_feature_dataloader(extracted_dir, batch_size=2, return_metadata=True)
    (feats, gt, mask, metas), = list(loader)
    assert feats.shape == (2, 32, 16, 16, 16) and gt.shape == (2, 3, 16, 16, 16) and mask.shape == (2, 1, 16, 16, 16)
    assert [m["volume_index"] for m in metas] == [0, 1]

    def order(seed):
        loader = create_feature_dataloader(extracted_dir, batch_size=1, shuffle=True, seed=seed, return_metadata=True)
        return [b[3][0]["volume_index"] for b in loader]

    assert sorted(order(3)) == [0, 1] and order(3) == order(3)  # a permutation, reproducible by seed


def test_worker_processes(extracted_dir):
    ds = FeatureVolumeDataset(extracted_dir)
    _ = ds[0]  # open handles in this process; pickling must drop them
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._stores == {} and torch.equal(clone[0][0], ds[0][0])
    loader = create_feature_dataloader(extracted_dir, batch_size=1, num_workers=1)
    assert sum(b[0].shape[0] for b in loader) == 2


def test_selection_and_errors(extracted_dir, tmp_path):
    assert FeatureVolumeDataset(extracted_dir, volume_indices=[1]).indices == [1]
    with pytest.raises(DataError, match=r"volumes not complete .*\[7\]"):
        FeatureVolumeDataset(extracted_dir, volume_indices=[0, 7])
    with pytest.raises(DataError, match="no completed volumes"):
        FeatureVolumeDataset(tmp_path)
    with pytest.raises(DataError, match="not found"):
        FeatureVolumeDataset(tmp_path / "nope")


def test_collate_rejects_mixed_shapes():
    a = (torch.zeros(2, 4, 4, 4), torch.zeros(1, 4, 4, 4, dtype=torch.int32), torch.zeros(1, 4, 4, 4, dtype=torch.bool))
    b = (torch.zeros(2, 8, 8, 8), torch.zeros(1, 8, 8, 8, dtype=torch.int32), torch.zeros(1, 8, 8, 8, dtype=torch.bool))
    with pytest.raises(DataError, match="batch_size=1"):
        collate_feature_batch([a, b])


def test_context_and_page_cache(extracted_dir):
    ctx = feature_context(num_threads=3)
    assert ctx["data_copy_concurrency"].to_json() == {"limit": 3}
    assert ctx["file_io_mode"].to_json() == {"mode": "memmap"}
    assert drop_page_cache(extracted_dir) > 6


def test_bench_load(extracted_dir):
    lines = []
    res = bench_load(extracted_dir, batch_size=1, num_batches=3, num_threads=2, printer=lines.append)
    assert res["cold_batches"] == 2 and res["warm_batches"] == 3  # cold = one epoch of 2 volumes
    assert res["cold_seconds"] > 0 and res["warm_mb_per_s"] > 0
    assert lines[1].startswith("cold:") and lines[2].startswith("warm:")
