from __future__ import annotations

import pytest
import torch

from dinocell.config import load_config
from dinocell.data.sources import open_source
from dinocell.data.stream import StreamSampler
from dinocell.engine.trainer import resolve_precision
from dinocell.train.datamodule import build_loader, steps_per_epoch
from tests_tiny import TINY


def test_stream_is_deterministic_and_resumable() -> None:
    full = list(StreamSampler(10, 2, samples_per_epoch=16, total_samples=48, seed=3))
    assert full == list(StreamSampler(10, 2, samples_per_epoch=16, total_samples=48, seed=3))
    assert len(full) == 48
    resumed = list(StreamSampler(10, 2, samples_per_epoch=16, total_samples=48, seed=3, start=20))
    assert resumed == full[20:]
    n = 20  # 10 fields x 2 repeats
    positions = [s // n for s in full]
    assert positions == list(range(48))
    # each virtual epoch draws distinct samples
    epoch0 = [s % n for s in full[:16]]
    assert len(set(epoch0)) == 16


@pytest.mark.parametrize("n_fields, batch, world", [(10, 4, 1), (37, 8, 1), (37, 4, 2), (64, 16, 1)])
def test_repeats_never_share_a_batch_but_stay_close(n_fields: int, batch: int, world: int) -> None:
    """KoLeo pushes the samples of one batch apart: two views of one field must not meet there."""
    repeats = 3
    n = n_fields * repeats
    spe = n // (batch * world)
    kw = dict(samples_per_epoch=spe * batch * world, total_samples=2 * spe * batch * world, seed=5,
              batch_size=batch, world_size=world)
    for rank in range(world):
        ids = [s % n for s in StreamSampler(n_fields, repeats, rank=rank, **kw)]
        for b in range(0, len(ids), batch):
            fields = [i // repeats for i in ids[b:b + batch]]
            assert len(set(fields)) == len(fields), (rank, b, fields)
    # every field's repeats come back within two groups of batches (decode reuse in the LRU)
    full = [s % n for s in StreamSampler(n_fields, repeats, **{**kw, "world_size": 1,
                                                               "batch_size": batch * world})]
    first: dict[int, int] = {}
    for pos, i in enumerate(full[: spe * batch * world]):
        f = i // repeats
        first.setdefault(f, pos)
        assert pos - first[f] < 2 * batch * world * repeats


def test_long_epochs_continue_with_a_new_shuffle() -> None:
    """train.steps_per_epoch larger than one pass used to hang (an empty slice that never advanced)."""
    s = StreamSampler(8, 1, samples_per_epoch=20, total_samples=40, seed=0, batch_size=4)
    ids = list(s)
    assert len(ids) == 40
    assert sorted(i % 8 for i in ids[:8]) == list(range(8))  # each pass is a full shuffle


def test_ranks_split_global_batches_disjointly() -> None:
    kw = dict(n_fields=12, repeats=1, samples_per_epoch=12, total_samples=24, seed=0, batch_size=3, world_size=2)
    r0 = list(StreamSampler(**kw, rank=0))
    r1 = list(StreamSampler(**kw, rank=1))
    single = list(StreamSampler(**{**kw, "world_size": 1, "batch_size": 6}, rank=0))
    assert len(r0) == len(r1) == 12 and not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(single)
    assert r0[:3] == single[:3] and r1[:3] == single[3:6]


def test_loader_yields_collated_multiview_batches() -> None:
    cfg = load_config(None, TINY)
    src = open_source(cfg.data)
    spe = steps_per_epoch(cfg, len(src))
    assert spe == 16 // 4
    loader = build_loader(cfg, src, total_steps=2, spe=spe)
    batch = next(iter(loader))
    assert batch["global_crops"].shape == (8, 1, 32, 32)
    assert batch["local_crops"].shape == (2 * 4, 1, 16, 16)
    assert batch["masks"].shape == (8, 16) and batch["masks"].any()
    assert (batch["global_channels"][:4] == -1).all()  # global 0 = mean of fluorescent channels
    assert len(loader) == 2


def test_high_res_stage_switches_crop_size() -> None:
    cfg = load_config(None, TINY + ["train.epochs=2", "train.run_high_res_stage=true", "train.high_res_epochs=1",
                                    "train.high_global_crop_size=48", "train.high_local_crop_size=24"])
    src = open_source(cfg.data)
    spe = steps_per_epoch(cfg, len(src))
    sizes = [b["global_crops"].shape[-1] for b in build_loader(cfg, src, total_steps=2 * spe, spe=spe)]
    assert sizes == [32] * spe + [48] * spe


def test_same_position_same_crops() -> None:
    cfg = load_config(None, TINY)
    src = open_source(cfg.data)
    a = next(iter(build_loader(cfg, src, total_steps=4, spe=4, start_step=2)))
    b = list(build_loader(cfg, src, total_steps=4, spe=4))[2]
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(a["masks"], b["masks"])


def test_precision_auto_on_cpu() -> None:
    if not torch.cuda.is_available():
        assert resolve_precision("auto") == "32-true"
    assert resolve_precision("bf16-mixed") == "bf16-mixed" and resolve_precision("32") == "32-true"


def test_datamodule_owns_split_and_horizon() -> None:
    from dinocell.data.holdout import well_key
    from dinocell.train.datamodule import DinoCellDataModule

    cfg = load_config(None, TINY + ["data.synthetic.n_fields=64", "train.epochs=3", "train.max_steps=2"])
    dm = DinoCellDataModule(cfg, open_source(cfg.data), world_size=1)
    assert len(dm.train_source) + len(dm.heldout) == 64 and len(dm.heldout) > 0
    assert {well_key(r) for r in dm.train_source.records}.isdisjoint(dm.heldout_wells)
    assert dm.steps_per_epoch == len(dm.train_source) // 4
    assert dm.total_steps == 3 * dm.steps_per_epoch  # max_steps stops the Trainer, not the schedules
    loader = dm.train_dataloader()
    held = {r.key for r in dm.heldout.records}
    seen = {dm.train_source.records[int(i)].key for b in loader for i in b["index"]}
    assert seen and not seen & held and len(loader) == dm.stop_step == 2
    assert DinoCellDataModule(cfg, open_source(cfg.data), world_size=2).steps_per_epoch == dm.steps_per_epoch // 2


def test_repeats_in_real_batches_are_distinct_fields() -> None:
    from dinocell.train.datamodule import DinoCellDataModule

    cfg = load_config(None, TINY + ["data.synthetic.n_fields=32", "data.repeats=3", "train.epochs=1"])
    dm = DinoCellDataModule(cfg, open_source(cfg.data), world_size=1)
    batches = [b["index"].tolist() for b in dm.train_dataloader()]
    assert len(batches) == dm.total_steps == len(dm.train_source) * 3 // 4
    assert all(len(set(b)) == len(b) for b in batches), batches
    counts: dict[int, int] = {}
    for b in batches:
        for i in b:
            counts[i] = counts.get(i, 0) + 1
    assert set(counts.values()) == {3}  # every field drawn `repeats` times, never twice in a batch


def _reference_stream(n_fields: int, repeats: int, spe: int, total: int, seed: int, start: int, bs: int,
                      rank: int, world: int) -> list[int]:
    """The list-of-ints sampler this module had before issue 24 (the numpy one must match it)."""

    def one_pass(epoch: int, k: int) -> list[int]:
        g = torch.Generator().manual_seed(seed * 7919 + epoch + 1_000_003 * k)
        order = torch.randperm(n_fields, generator=g).tolist()
        if repeats == 1:
            return order
        group = bs * world
        n_groups = max(1, len(order) // group)
        bounds = [i * group for i in range(n_groups)] + [len(order)]
        groups = [order[bounds[i]:bounds[i + 1]] for i in range(n_groups)]
        return [f * repeats + r for grp in groups for r in range(repeats) for f in grp]

    out, n, k = [], n_fields * repeats, start
    while k < total:
        epoch, pos = divmod(k, spe)
        ids: list[int] = []
        p = 0
        while len(ids) < spe:
            ids += one_pass(epoch, p)
            p += 1
        for i in ids[:spe][pos:]:
            if k >= total:
                break
            if (k % (bs * world)) // bs == rank:
                out.append(k * n + i)
            k += 1
    return out


@pytest.mark.parametrize("n_fields, repeats, bs, world, start", [(10, 1, 2, 1, 0), (37, 3, 4, 2, 9),
                                                                  (13, 2, 8, 1, 5), (5, 4, 2, 3, 0)])
def test_numpy_sampler_matches_the_list_one(n_fields: int, repeats: int, bs: int, world: int,
                                            start: int) -> None:
    """Issue 24: one integer array per epoch, the exact stream of the former Python-list sampler."""
    spe = max(bs * world, (n_fields * repeats * 3 // 2) // (bs * world) * bs * world)  # > one pass
    total = 3 * spe + bs * world
    for rank in range(world):
        got = list(StreamSampler(n_fields, repeats, spe, total, seed=4, start=start, batch_size=bs, rank=rank,
                                 world_size=world))
        assert got == _reference_stream(n_fields, repeats, spe, total, 4, start, bs, rank, world)
        assert all(type(i) is int for i in got[:3])


def test_datamodule_keeps_one_copy_of_the_index(tmp_path) -> None:
    """Once split, the whole source's index is not kept: a rank holds the two subsets only (issue #24)."""
    import gc
    import weakref

    from dinocell.data.synthetic.folder import write_jump_folder
    from dinocell.train.datamodule import DinoCellDataModule

    write_jump_folder(tmp_path / "plate", n_fields=16, size=32, seed=0, n_plates=1, wells_per_plate=8,
                      sites_per_well=2)
    cfg = load_config(None, TINY + [f"data.source={tmp_path / 'plate'}", "data.holdout.fraction=0.25"])
    source = open_source(cfg.data)
    whole = weakref.ref(source.records)
    dm = DinoCellDataModule(cfg, source, world_size=1)
    del source
    gc.collect()
    assert whole() is None  # the full index is freed: no second copy beside the training subset
    assert len(dm.train_source) + len(dm.heldout) == 16 and len(dm.heldout) > 0
    assert dm.skipped_fields() == 0


def test_datamodule_shares_the_heldout_decision_of_a_source_with_an_index_file(tmp_path) -> None:
    from dinocell.train.datamodule import DinoCellDataModule

    cfg = load_config(None, TINY + ["data.synthetic.n_fields=64"])
    source = open_source(cfg.data)
    source.index_path = tmp_path / "index.parquet"  # what an S3 source carries
    dm = DinoCellDataModule(cfg, source, world_size=1)
    (saved,) = tmp_path.glob("index.parquet.holdout-*.txt")
    assert saved.read_text().split() == dm.heldout_wells and dm.heldout_wells
