"""S3 source against a real local S3 server (moto) behind a fault-injecting loopback proxy."""

from __future__ import annotations

import json
import logging
import pickle
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest
from s3_fixtures import FaultProxy, JumpBucket, admin_client

from dinocell.config import load_config
from dinocell.data.s3 import ByteLRU, DiskCache, S3FieldSource, parse_s3_uri, path_metadata
from dinocell.data.s3.discovery import pick_tables
from dinocell.data.sources import FieldDataset, open_source
from dinocell.errors import ConfigError, DataError


def data_cfg(endpoint: str, tmp_path: Path, *overrides: str):
    """A DataConfig for the local server; the index goes to ``tmp_path`` unless overridden."""
    base = [f"data.s3.endpoint_url={endpoint}", f"data.s3.index_cache={tmp_path / 'index.parquet'}"]
    return load_config(None, base + list(overrides)).data


def copy_prefix(jb: JumpBucket, new_prefix: str) -> list[str]:
    """Server-side copy of the JUMP images to ``new_prefix`` (tests that damage objects get their own)."""
    keys = []
    for k in jb.keys:
        nk = new_prefix + k[len(jb.prefix):]
        jb.admin.copy_object(Bucket=jb.bucket, Key=nk, CopySource={"Bucket": jb.bucket, "Key": k})
        keys.append(nk)
    return keys


def obj_path(uri: str) -> str:
    """The proxy's path of an s3:// URI (path-style addressing)."""
    b, k = parse_s3_uri(uri)
    return f"/{b}/{k}"


# -------------------------------------------------------------------------------------------------
# Units
# -------------------------------------------------------------------------------------------------


def test_parse_uri_and_path_metadata() -> None:
    assert parse_s3_uri("s3://cellpainting-gallery/cpg0016-jump/source_4/") == (
        "cellpainting-gallery", "cpg0016-jump/source_4/")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(DataError, match="not an s3:// URI"):
        parse_s3_uri("http://x/y")
    with pytest.raises(DataError, match="bad S3 bucket name"):
        parse_s3_uri("s3:///key")
    key = ("cpg0016-jump/source_4/images/2021_04_26_Batch1/images/BR00117035__2021-05-02T16_02_51-"
           "Measurement1/Images/r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert path_metadata(key) == {"Metadata_Project": "cpg0016-jump", "Metadata_Source": "source_4",
                                  "Metadata_Batch": "2021_04_26_Batch1", "Metadata_Plate": "BR00117035"}
    assert path_metadata("x/r01c01f01p01-ch1sk1fk1fl1.tiff") == {}


@pytest.mark.parametrize("override, message", [
    ("data.s3.disk_cache_dir=/tmp/x", "disk_cache_bytes"),
    ("data.s3.max_in_flight=0", "max_in_flight"),
    ("data.s3.filters={colour: red}", "unknown key 'colour' in 'data.s3.filters'"),
    ("data.s3.endpoint_url=127.0.0.1:9000", "must start with http"),
])
def test_bad_s3_config(override: str, message: str, tmp_path: Path) -> None:
    cfg = load_config(None, [override]).data
    with pytest.raises(ConfigError, match=message):
        S3FieldSource("s3://bucket/prefix/", cfg)


def test_byte_lru_bounds_and_order() -> None:
    a, b, c, d = (np.zeros(100, np.float32) + i for i in range(4))  # 400 bytes each
    lru = ByteLRU(1200)
    for k, v in zip("abc", (a, b, c), strict=True):
        lru.put(k, v)
    assert lru.nbytes == 1200 and len(lru) == 3
    assert lru.get("a") is a  # a is now the most recent
    lru.put("d", d)  # evicts b, the least recently used
    assert "b" not in lru and {"a", "c", "d"} <= {k for k in "acd" if k in lru}
    assert lru.nbytes == 1200
    lru.put("huge", np.zeros(1000, np.float32))  # larger than the budget: not stored
    assert "huge" not in lru and lru.nbytes == 1200
    assert lru.get("zzz") is None and lru.hits == 1 and lru.misses == 1
    assert ByteLRU(0).get("a") is None


def test_byte_lru_thread_safe() -> None:
    lru = ByteLRU(10 * 800)
    rng_seeds = range(8)

    def hammer(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            k = str(rng.integers(40))
            if rng.random() < 0.5:
                lru.put(k, np.zeros(int(rng.integers(50, 200)), np.float32))
            else:
                lru.get(k)

    threads = [threading.Thread(target=hammer, args=(s,)) for s in rng_seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lru.nbytes <= lru.max_bytes
    assert lru.nbytes == sum(v.nbytes for v in lru._items.values())


@pytest.mark.parametrize("uri", [
    "s3://b/../../../etc/passwd", "s3://b//etc/passwd", "/etc/passwd", "../../x", "s3://b/" + "../" * 20,
    "s3://b/a/..", "s3://b/.hidden", "s3://b/" + "x" * 3000,
])
def test_disk_cache_keys_cannot_escape(tmp_path: Path, uri: str) -> None:
    root = tmp_path / "cache"
    dc = DiskCache(root, 10_000_000)
    payload = bytes(range(256)) * 200  # large enough to live in its own file, not in SQLite
    dc.put(uri, payload)
    assert dc.get(uri) == payload
    outside = [f for f in tmp_path.rglob("*") if f.is_file() and not f.resolve().is_relative_to(root.resolve())]
    assert outside == []


def test_disk_cache_is_bounded_lru(tmp_path: Path) -> None:
    limit = 2_000_000
    dc = DiskCache(tmp_path, limit)
    blob = bytes(100_000)
    for i in range(60):  # 6 MB through a 2 MB cache
        dc.put(f"s3://b/k{i}", blob)
        if i % 5 == 0:
            assert dc.get("s3://b/k0") == blob  # k0 stays recently used
    assert dc.nbytes <= limit + 200_000
    assert dc.get("s3://b/k0") == blob and dc.get("s3://b/k59") == blob
    assert dc.get("s3://b/k1") is None  # the oldest untouched objects went first
    dc.put("s3://b/big", bytes(limit + 1))  # larger than the budget: never stored
    assert dc.get("s3://b/big") is None


# -------------------------------------------------------------------------------------------------
# Discovery
# -------------------------------------------------------------------------------------------------


def test_listing_discovery_and_index_cache(jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    cfg = data_cfg(proxy.url, tmp_path)
    src = S3FieldSource(jump_bucket.uri, cfg)
    info = src.describe()
    assert info["fields"] == jump_bucket.n_fields
    assert info["channels"] == ["DNA", "RNA", "ER", "AGP", "Mito"]
    assert info["plates"] == ["SYNTH-P01", "SYNTH-P02"] and info["skipped"] == []
    rec = src.records[0]
    assert rec.metadata["Metadata_Batch"] == "2021_04_26_Batch1"
    assert rec.metadata["Metadata_Source"] == "source_4"
    assert all(u.startswith(f"s3://{jump_bucket.bucket}/{jump_bucket.prefix}") for u in rec.channels.values())
    assert rec.channels["DNA"].endswith("-ch5sk1fk1fl1.tiff")  # source_4: ch5 is DNA
    assert Path(info["index"]).is_file()
    lists = sum(1 for m, p in proxy.log if m == "GET" and "list-type" in p)
    assert lists >= 1
    # A restart reads the local index: no listing at all.
    proxy.reset_counts()
    again = S3FieldSource(jump_bucket.uri, cfg)
    assert [r.key for r in again.records] == [r.key for r in src.records]
    assert proxy.requests == 0
    # Another source (different prefix) does not reuse the wrong index: it is rebuilt.
    other = S3FieldSource(f"s3://{jump_bucket.bucket}/{jump_bucket.prefix}SYNTH-P01__", cfg)
    assert {r.plate for r in other.records} == {"SYNTH-P01"}
    assert proxy.requests > 0


def test_default_index_location_is_keyed_by_endpoint_and_uri(jump_bucket: JumpBucket, s3_safe_env: Path) -> None:
    cfg = load_config(None, [f"data.s3.endpoint_url={jump_bucket.endpoint_url}"]).data
    a = S3FieldSource(jump_bucket.uri, cfg)
    b = S3FieldSource(jump_bucket.uri + "SYNTH-P02__", cfg)
    assert a.index_path is not None and b.index_path is not None
    assert a.index_path.parent == s3_safe_env / "dinocell" and a.index_path != b.index_path
    assert a.index_path.is_file() and b.index_path.is_file()


def test_filters(jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    plate = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.filters={plate: SYNTH-P02}"))
    assert {r.plate for r in plate.records} == {"SYNTH-P02"} and len(plate) == jump_bucket.n_fields // 2
    # The plate filter prunes the listing: the other plate's folder is never listed.
    listed = [p for m, p in proxy.log if "list-type" in p]
    assert listed and not any("SYNTH-P01" in p for p in listed)
    well = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.filters={well: 'A01,A02', site: 1}"))
    assert {(r.well, r.site) for r in well.records} == {("A01", 1), ("A02", 1)}
    assert len(well) == 4  # 2 wells x 2 plates x site 1
    chans = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.filters={channel: [Mito, DNA], batch: 2021_04_26_Batch1}"))
    assert chans.channels == ["Mito", "DNA"] and len(chans) == jump_bucket.n_fields
    with pytest.raises(DataError, match="matches data.s3.filters"):
        S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.filters={batch: nope}"))


def test_a_filter_change_reuses_the_index(jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    full = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path))
    proxy.reset_counts()
    well = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.filters={well: A01}"))
    plate = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.filters={plate: SYNTH-P01}"))
    assert proxy.requests == 0, "filters select from the saved index: no relisting"
    assert full.index_path == well.index_path == plate.index_path
    assert {r.well for r in well.records} == {"A01"} and {r.plate for r in plate.records} == {"SYNTH-P01"}


def test_load_data_discovery_local_and_s3(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    listing = S3FieldSource(jump_bucket.uri, data_cfg(jump_bucket.endpoint_url, tmp_path / "a"))
    local = S3FieldSource(jump_bucket.uri, data_cfg(jump_bucket.endpoint_url, tmp_path / "b",
                                                    f"data.load_data={jump_bucket.load_data_local}"))
    remote_uri = f"s3://{jump_bucket.bucket}/{jump_bucket.load_data_key}"
    remote = S3FieldSource(remote_uri, data_cfg(jump_bucket.endpoint_url, tmp_path / "c"))
    want = {r.key: r.channels for r in listing.records}
    for src in (local, remote):
        assert {r.key: r.channels for r in src.records} == want
        assert src.records[0].metadata["Metadata_Label"]  # load_data metadata is kept
        assert src.records[0].metadata["Metadata_Batch"] == "2021_04_26_Batch1"
    x = remote.load(remote.records[0])
    assert x.shape == (5, 64, 64) and x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0


def test_load_data_with_local_folders_is_refused(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    cfg = data_cfg(jump_bucket.endpoint_url, tmp_path, f"data.load_data={jump_bucket.folder / 'load_data.csv'}")
    with pytest.raises(DataError, match="is a local folder"):
        S3FieldSource(jump_bucket.uri, cfg)


def test_discovery_errors(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    url = jump_bucket.endpoint_url
    with pytest.raises(DataError, match="bucket not found"):
        S3FieldSource("s3://no-such-bucket/x/", data_cfg(url, tmp_path))
    with pytest.raises(DataError, match="no JUMP-named images"):
        S3FieldSource(f"s3://{jump_bucket.bucket}/nothing-here/", data_cfg(url, tmp_path))
    # A bucket without the public-read policy refuses unsigned GETs (403; moto still lists it).
    private = f"private-{uuid.uuid4().hex[:8]}"
    jump_bucket.admin.create_bucket(Bucket=private)
    jump_bucket.admin.put_object(Bucket=private, Key="p/r01c01f01p01-ch1sk1fk1fl1.tiff", Body=b"x")
    src = S3FieldSource(f"s3://{private}/p/", data_cfg(url, tmp_path))
    with pytest.raises(DataError, match="HTTP 403.*sign=true"):
        src.load(src.records[0])
    assert src.metrics()["s3/retries"] == 0  # a permanent error is not retried


def test_requests_are_unsigned_by_default_and_signed_on_request(
        jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path / "u"))
    src.load(src.records[0])
    assert proxy.requests > 0 and proxy.signed == 0
    proxy.reset_counts()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-dummy-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-dummy-secret")
    signed = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path / "s", "data.s3.sign=true"))
    signed.load(signed.records[0])
    assert proxy.requests > 0 and proxy.signed == proxy.requests


def test_open_source_and_cli_data_ls(jump_bucket: JumpBucket, capsys: pytest.CaptureFixture[str]) -> None:
    from dinocell.cli import main

    cfg = load_config(None, [f"data.source={jump_bucket.uri}",
                             f"data.s3.endpoint_url={jump_bucket.endpoint_url}"]).data
    assert isinstance(open_source(cfg), S3FieldSource)
    code = main(["data", "ls", jump_bucket.uri, "--endpoint-url", jump_bucket.endpoint_url, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    info = json.loads(out)
    assert info["fields"] == jump_bucket.n_fields and info["plates"] == ["SYNTH-P01", "SYNTH-P02"]


# -------------------------------------------------------------------------------------------------
# Fetching, faults, caches
# -------------------------------------------------------------------------------------------------


def test_concurrent_fetch_is_bounded_and_matches_local_files(
        jump_bucket: JumpBucket, moto_url: str, tmp_path: Path) -> None:
    from dinocell.data.decode import scale_field

    with FaultProxy(moto_url, latency_s=0.03) as slow_proxy:
        cfg = data_cfg(slow_proxy.url, tmp_path, "data.s3.max_in_flight=3")
        src = S3FieldSource(jump_bucket.uri, cfg)
        slow_proxy.reset_counts()
        out = list(src.iter_loaded(src.records))
        assert slow_proxy.max_in_flight <= 3
        assert slow_proxy.max_in_flight >= 2  # it is concurrent
    assert [r.key for r, _ in out] == [r.key for r in src.records]  # ordered
    rec, arr = out[3]
    local = np.stack([__import__("tifffile").imread(jump_bucket.folder / u.split(jump_bucket.prefix, 1)[1])
                      for u in (rec.channels[c] for c in src.channels)])
    np.testing.assert_array_equal(arr, scale_field(local, cfg.scaling))
    raw = src.load_raw(rec)
    assert raw.dtype == np.uint16 and np.array_equal(raw, local)


def test_faults_are_retried_and_bad_fields_skipped(jump_bucket: JumpBucket, proxy: FaultProxy,
                                                   tmp_path: Path) -> None:
    prefix = f"faulty-{uuid.uuid4().hex[:8]}/"
    keys = copy_prefix(jump_bucket, prefix)
    uri = f"s3://{jump_bucket.bucket}/{prefix}"
    # Timeouts leave headroom for a loaded machine (moto answers a GET in well under a second at
    # rest, but several seconds under heavy CPU contention); 6 attempts leave spare retries beyond
    # the longest fault plan (3), so only the corrupt and the missing field may fail.
    proxy.slow_s = 5.0
    proxy.schedule[f"/{jump_bucket.bucket}"] = ["500", "503"]  # the listing is retried too
    cfg = data_cfg(proxy.url, tmp_path, "data.s3.timeout_s=2.5", "data.s3.max_attempts=6",
                   "data.s3.cache_bytes=0")
    src = S3FieldSource(uri, cfg)
    recs = src.records
    faults = {
        obj_path(recs[0].channels["DNA"]): ["500", "503"],
        obj_path(recs[1].channels["AGP"]): ["429", "500", "500"],
        obj_path(recs[2].channels["RNA"]): ["slow"],
        obj_path(recs[3].channels["ER"]): ["reset", "truncate"],
        obj_path(recs[4].channels["Mito"]): ["truncate"],
    }
    proxy.schedule.update(faults)
    # A corrupt TIFF and a key deleted after discovery (a stale index).
    corrupt = recs[5].channels["RNA"]
    jump_bucket.admin.put_object(Bucket=jump_bucket.bucket, Key=parse_s3_uri(corrupt)[1], Body=b"II*\x00junk")
    missing = recs[6].channels["DNA"]
    jump_bucket.admin.delete_object(Bucket=jump_bucket.bucket, Key=parse_s3_uri(missing)[1])
    assert len(keys) == 5 * len(recs)

    out = list(src.iter_loaded(recs))
    bad = {recs[5].key, recs[6].key}
    assert [r.key for r, _ in out] == [r.key for r in recs]
    assert {r.key for r, a in out if a is None} == bad
    good_paths = [obj_path(u) for r in recs if r.key not in bad for u in r.channels.values()]
    assert all(proxy.served[p] == 1 for p in good_paths), "every good object is delivered exactly once"
    for path, plan in faults.items():
        assert proxy.attempts[path] >= len(plan) + 1
    m = src.metrics()
    assert m["s3/skipped"] == 2
    assert m["s3/retries"] >= sum(len(p) for p in faults.values())
    assert m["s3/fields"] == len(recs) - 2
    assert set(m) >= {"s3/cache_hit_rate", "s3/download_time", "s3/bandwidth_mbps", "s3/skipped", "s3/bytes"}
    assert m["s3/bytes"] > 0 and m["s3/download_time"] > 0 and m["s3/bandwidth_mbps"] > 0
    assert any("not found (404)" in s for s in src.skipped)
    assert any("cannot decode" in s for s in src.skipped)
    # The map-style dataset path skips (and counts) the same way.
    ds = FieldDataset(src, None)
    sample = ds[6]  # field 6 is missing: the next field is served instead
    assert sample["index"] == 7 and recs[6].key in ds.skipped
    assert src.metrics()["s3/skipped"] == 2  # counted once per field


def test_retries_are_bounded(jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    src = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.max_attempts=3"))
    rec = src.records[2]
    path = obj_path(rec.channels["ER"])
    proxy.schedule[path] = ["500"] * 10
    with pytest.raises(DataError, match="gave up after 3 attempts: HTTP 500 InternalError"):
        src.load(rec)
    assert proxy.attempts[path] == 3  # botocore retries, bounded by max_attempts; each one counted
    assert src.metrics()["s3/retries"] == 2 and src.metrics()["s3/skipped"] == 1
    one = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path, "data.s3.max_attempts=1"))
    other = one.records[3]
    proxy.schedule[obj_path(other.channels["DNA"])] = ["503"]
    with pytest.raises(DataError, match="gave up after 1 attempts: HTTP 503 SlowDown"):
        one.load_raw(other)
    assert proxy.attempts[obj_path(other.channels["DNA"])] == 1


def test_decoded_lru_and_disk_cache(jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    cfg = data_cfg(proxy.url, tmp_path, f"data.s3.disk_cache_dir={disk}", "data.s3.disk_cache_bytes=10000000")
    src = S3FieldSource(jump_bucket.uri, cfg)
    proxy.reset_counts()
    a = src.load(src.records[0])
    b = src.load(src.records[0])
    assert a is b and proxy.requests == 5
    assert src.metrics()["s3/cache_hit_rate"] == 0.5
    list(src.iter_loaded(src.records))  # field 0 hits the LRU, the rest is fetched
    assert proxy.requests == 5 * len(src.records)
    assert len(src._state().disk) == 5 * len(src.records)  # every raw object, stored by diskcache
    assert all(f.resolve().is_relative_to(disk.resolve()) for f in tmp_path.rglob("*") if "disk" in f.parts)
    # A new source (a restart) with an empty LRU is served from disk: no GET at all.
    proxy.reset_counts()
    again = S3FieldSource(jump_bucket.uri, cfg)
    out = list(again.iter_loaded(again.records))
    assert proxy.requests == 0 and all(x is not None for _, x in out)
    assert again.metrics()["s3/disk_cache_hits"] == 5 * len(src.records)
    np.testing.assert_array_equal(out[0][1], a)


def test_lru_is_byte_bounded(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    field_bytes = 5 * 64 * 64 * 4
    cfg = data_cfg(jump_bucket.endpoint_url, tmp_path, f"data.s3.cache_bytes={3 * field_bytes}")
    src = S3FieldSource(jump_bucket.uri, cfg)
    for rec in src.records:  # one at a time, so the last three are the most recently used (iter_loaded's
        src.load(rec)        # fetch threads finish in any order on a loaded machine)
    assert src.metrics()["s3/cache_bytes"] == 3 * field_bytes
    list(src.iter_loaded(src.records[-3:]))
    assert src.metrics()["s3/cache_hit_rate"] == pytest.approx(3 / (len(src.records) + 3))


def test_pickles_for_dataloader_workers(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    src = S3FieldSource(jump_bucket.uri, data_cfg(jump_bucket.endpoint_url, tmp_path))
    first = src.load(src.records[1])
    clone = pickle.loads(pickle.dumps(src))
    assert clone._proc is None
    np.testing.assert_array_equal(clone.load(clone.records[1]), first)
    src.close()
    clone.close()


def test_unordered_iteration_yields_everything(jump_bucket: JumpBucket, tmp_path: Path) -> None:
    src = S3FieldSource(jump_bucket.uri, data_cfg(jump_bucket.endpoint_url, tmp_path, "data.s3.cache_bytes=0"))
    got = [r.key for r, a in src.iter_loaded(src.records, ordered=False) if a is not None]
    assert sorted(got) == sorted(r.key for r in src.records)
    # Stopping early cancels the rest without hanging.
    it = src.iter_loaded(src.records)
    next(it)
    it.close()
    assert admin_client(jump_bucket.endpoint_url) is not None


# -------------------------------------------------------------------------------------------------
# Real JUMP data (../shared; skipped when absent) -- served by the local server, never by AWS
# -------------------------------------------------------------------------------------------------


def test_real_cpg0016_load_data_layout(cpg0016_load_data: Path, moto_url: str, tmp_path: Path) -> None:
    """Discovery from a real load_data file: s3:// folders of the real bucket, no request made."""
    cfg = data_cfg(moto_url, tmp_path, f"data.load_data={cpg0016_load_data}",
                   "data.s3.filters={batch: 2021_08_23_Batch12, source: source_4}")
    src = S3FieldSource("s3://cellpainting-gallery/cpg0016-jump/source_4/", cfg)
    assert len(src) == 2 and src.records[0].plate == "BR00126114"
    assert src.records[0].metadata["Metadata_Project"] == "cpg0016-jump"
    dna = src.records[0].channels["DNA"]
    assert dna.startswith("s3://cellpainting-gallery/cpg0016-jump/source_4/images/2021_08_23_Batch12/images/"
                          "BR00126114__2021-09-01T15_39_48-Measurement1/Images/")
    assert dna.endswith("-ch5sk1fk1fl1.tiff")


def test_real_cpg0000_site_streams_from_local_server(cpg0000_site: Path, moto_url: str, tmp_path: Path) -> None:
    """Real 1080x1080 LZW TIFFs at their gallery path in a local bucket named like the real one."""
    from s3_fixtures import make_public_bucket, upload_tree

    admin = admin_client(moto_url)
    try:
        make_public_bucket(admin, "cellpainting-gallery")
    except admin.exceptions.BucketAlreadyOwnedByYou:
        pass
    prefix = ("cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/images/"
              "BR00117006__2020-11-05T00_00_00-Measurement1/Images/")
    keys = upload_tree(admin, "cellpainting-gallery", prefix, cpg0000_site)
    assert len(keys) == 3
    src = S3FieldSource("s3://cellpainting-gallery/cpg0000-jump-pilot/source_4/images/2020_11_04_CPJUMP1/",
                        data_cfg(moto_url, tmp_path))
    assert src.describe()["plates"] == ["BR00117006"] and sorted(src.channels) == ["AGP", "DNA", "RNA"]
    [(rec, x)] = list(src.iter_loaded(src.records))
    assert x is not None and x.shape == (3, 1080, 1080)
    assert rec.metadata["Metadata_Batch"] == "2020_11_04_CPJUMP1"
    assert src.metrics()["s3/bytes"] == sum(p.stat().st_size for p in cpg0000_site.glob("*.tiff"))


class _Trap:
    """Unpickling this creates ``path``: a stand-in for any code a planted pickle could run."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


@pytest.mark.parametrize("size", [10, 100_000])  # in SQLite, and in its own file
def test_disk_cache_never_unpickles(tmp_path: Path, size: int) -> None:
    import diskcache

    root, marker = tmp_path / "cache", tmp_path / "ran-code"
    planted = diskcache.Cache(str(root))  # the stock Disk pickles any non-bytes value
    planted.set("s3://b/field.tiff", [_Trap(marker), bytes(size)])
    planted.set("s3://b/text.tiff", "a str is not an object's bytes")
    planted.close()
    dc = DiskCache(root, 10_000_000)
    assert dc.get("s3://b/field.tiff") is None and dc.get("s3://b/text.tiff") is None
    assert not marker.exists(), "a cached pickle was loaded"
    assert dc.refused == 2 and len(dc) == 0  # both entries dropped
    dc.put("s3://b/field.tiff", b"refetched")  # the caller's refetch lands as raw bytes
    assert dc.get("s3://b/field.tiff") == b"refetched" and not marker.exists()
    with pytest.raises(TypeError, match="bytes only"):
        dc._cache.set("s3://b/x", _Trap(marker))
    assert not marker.exists()


def test_disk_cache_refuses_files_outside_its_folder(tmp_path: Path) -> None:
    import sqlite3

    root, victim = tmp_path / "cache", tmp_path / "victim.txt"
    victim.write_text("keep me")
    dc = DiskCache(root, 10_000_000)
    dc.put("s3://b/big", bytes(100_000))
    con = sqlite3.connect(root / "cache.db")
    con.execute("UPDATE Cache SET filename = ?", (str(Path("..") / victim.name),))
    con.commit()
    con.close()
    assert dc.get("s3://b/big") is None and dc.refused == 1
    assert victim.read_text() == "keep me", "dropping the entry removed a file outside the cache"


def test_field_index_with_junk_header_is_rebuilt(jump_bucket: JumpBucket, proxy: FaultProxy, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    cfg = data_cfg(proxy.url, tmp_path)
    first = S3FieldSource(jump_bucket.uri, cfg)
    path = Path(first.index_path)
    for junk in (b"{not json", b"[1, 2, 3]", b'"a string"', json.dumps({"version": None}).encode()):
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata({b"dinocell": junk}), path)
        proxy.reset_counts()
        again = S3FieldSource(jump_bucket.uri, cfg)
        assert [r.key for r in again.records] == [r.key for r in first.records]
        assert proxy.requests > 0, f"header {junk!r} was not rebuilt"
        assert pq.read_schema(path).metadata[b"dinocell"] != junk
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated: rebuilt the same way
    proxy.reset_counts()
    assert len(S3FieldSource(jump_bucket.uri, cfg).records) == len(first.records) and proxy.requests > 0


def test_published_load_data_tables_replace_listing(jump_bucket: JumpBucket, proxy: FaultProxy,
                                                    tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Issue 24: a prefix whose per-plate load_data tables the gallery publishes is not listed."""
    import urllib.parse

    import pandas as pd

    root = f"tables-{uuid.uuid4().hex[:8]}/cpg0016-jump/source_4/"
    images = root + "images/2021_04_26_Batch1/images/"
    copy_prefix(jump_bucket, images)
    df = pd.read_parquet(jump_bucket.load_data_local)
    old, new = f"s3://{jump_bucket.bucket}/{jump_bucket.prefix}", f"s3://{jump_bucket.bucket}/{images}"
    for col in [c for c in df.columns if c.startswith("PathName_")]:
        df[col] = df[col].str.replace(old, new, regex=False)
    tables = root + "workspace/load_data_csv/2021_04_26_Batch1/"
    put = jump_bucket.admin.put_object
    for plate, rows in df.groupby("Metadata_Plate"):
        if plate == "SYNTH-P01":  # csv.gz, plus a decoy row of another prefix that must be left out
            decoy = rows.head(1).copy()
            for col in [c for c in df.columns if c.startswith("PathName_")]:
                decoy[col] = f"s3://{jump_bucket.bucket}/elsewhere/"
            put(Bucket=jump_bucket.bucket, Key=f"{tables}{plate}/load_data.csv.gz",
                Body=_gzip_csv(pd.concat([rows, decoy])))
        else:  # data.illum=off takes the plain table, not the one with illumination columns next to it
            path = tmp_path / "p2.parquet"
            rows.to_parquet(path, index=False)
            put(Bucket=jump_bucket.bucket, Key=f"{tables}{plate}/load_data.parquet", Body=path.read_bytes())
            put(Bucket=jump_bucket.bucket, Key=f"{tables}{plate}/load_data_with_illum.csv", Body=b"junk,\n1,")

    listed = S3FieldSource(jump_bucket.uri, data_cfg(proxy.url, tmp_path / "a"))
    assert listed.channel_map_origin != "load_data"  # no tables for that prefix: it is listed
    want = {r.key: {c: u.replace(old, new) for c, u in r.channels.items()} for r in listed.records}

    def lists() -> list[str]:
        return [urllib.parse.unquote(p) for m, p in proxy.log if m == "GET" and "list-type" in p]

    proxy.reset_counts()
    src = S3FieldSource(f"s3://{jump_bucket.bucket}/{images}", data_cfg(proxy.url, tmp_path / "b", "data.illum=off"))
    assert src.channel_map_origin == "load_data" and {r.key: r.channels for r in src.records} == want
    assert lists() and all("workspace/load_data_csv/2021_04_26_Batch1/" in p for p in lists())
    assert src.load(src.records[0]).shape == (5, 64, 64)
    proxy.reset_counts()  # a warm start lists nothing (it reads the two tables again)
    again = S3FieldSource(f"s3://{jump_bucket.bucket}/{images}", data_cfg(proxy.url, tmp_path / "b", "data.illum=off"))
    assert not lists() and [r.key for r in again.records] == [r.key for r in src.records]
    one = S3FieldSource(f"s3://{jump_bucket.bucket}/{root}",
                        data_cfg(proxy.url, tmp_path / "c", "data.s3.filters={plate: SYNTH-P01}", "data.illum=off"))
    assert {r.plate for r in one.records} == {"SYNTH-P01"} and one.channel_map_origin == "load_data"
    assert {r.key for r in one.records} == {k for k in want if k.startswith("SYNTH-P01/")}
    listed_tables = [f"{tables}SYNTH-P01/load_data.csv.gz", f"{tables}SYNTH-P02/load_data.parquet",
                     f"{tables}SYNTH-P02/load_data_with_illum.csv"]
    assert pick_tables(listed_tables, None) == listed_tables[:2]
    assert pick_tables(listed_tables, ["SYNTH-P02"], illum=True) == listed_tables[2:]
    with caplog.at_level(logging.WARNING):  # the default (illum=auto) takes the table with illumination columns
        auto = S3FieldSource(f"s3://{jump_bucket.bucket}/{images}", data_cfg(proxy.url, tmp_path / "d"))
    assert {r.plate for r in auto.records} == {"SYNTH-P01"}  # SYNTH-P02's is junk: left out, and said so
    assert "SYNTH-P02/load_data_with_illum.csv names no image" in caplog.text


def _gzip_csv(df: object) -> bytes:
    import gzip

    return gzip.compress(df.to_csv(index=False).encode(), mtime=0)  # type: ignore[attr-defined]
