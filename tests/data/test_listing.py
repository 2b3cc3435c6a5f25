"""The lean S3 listing client and the light fake S3 server of the listing benchmark (issue 24)."""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dinocell.data import jump
from dinocell.data.field import format_name
from dinocell.data.s3 import discovery
from dinocell.data.s3.config import S3FetchError, S3MissingError
from dinocell.data.s3.discovery import Lister, index_from_listing
from dinocell.data.s3.listing import HttpPager, parse_page

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from fake_s3 import FakeS3  # noqa: E402

PRE = "cpg/source_4/images/B1/images/"


def _keys(plates: int = 3, rows: int = 17, cols: int = 2) -> list[str]:
    out = []
    for p in range(plates):
        f = f"{PRE}P{p:03d}__2021-Measurement1/Images/"
        out += [f + format_name(r, c, s, ch) for r in range(1, rows + 1) for c in range(1, cols + 1)
                for s in (1, 2) for ch in range(1, 6)]
    return out + [f"{PRE}notes & more.txt", "cpg/other/x.tiff"]


def _all(pager: HttpPager, prefix: str, **kw: str) -> list[str]:
    keys, token = [], None
    while True:
        page = pager.page(prefix, token, **kw)
        keys += page.keys + page.prefixes
        if page.token is None:
            return keys
        token = page.token


def test_fake_server_pages_like_s3_and_boto3_reads_them() -> None:
    keys = _keys()
    with FakeS3("bench", keys, latency_s=0.0, max_keys=100) as s3:
        pager = HttpPager(s3.url, "bench")
        assert _all(pager, "cpg/") == sorted(keys)  # 11 pages, continuation tokens
        assert _all(pager, PRE, delimiter="/") == [f"{PRE}notes & more.txt"] + [
            f"{PRE}P{p:03d}__2021-Measurement1/" for p in range(3)]
        after = sorted(keys)[250]
        assert pager.page("cpg/", None, None, after).keys[0] == sorted(keys)[251]
        assert _all(pager, "nothing/") == []
        boto3 = pytest.importorskip("boto3")
        from botocore import UNSIGNED
        from botocore.config import Config

        client = boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1",
                              config=Config(signature_version=UNSIGNED, s3={"addressing_style": "path"}))
        r = client.list_objects_v2(Bucket="bench", Prefix=PRE, Delimiter="/")
        assert [c["Prefix"] for c in r["CommonPrefixes"]][0].endswith("P000__2021-Measurement1/")
        assert [o["Key"] for o in r["Contents"]] == [f"{PRE}notes & more.txt"]
        with pytest.raises(S3MissingError, match="bucket not found"):
            HttpPager(s3.url, "other").page("x/")
        assert s3.requests >= 15 and s3.cpu_per_request < 0.01


def test_fake_server_stops_by_itself() -> None:
    s3 = FakeS3("bench", ["a"], latency_s=0.0, idle_s=0.3).start()
    url = s3.url
    urllib.request.urlopen(f"{url}/bench?list-type=2", timeout=5).read()
    time.sleep(1.0)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        urllib.request.urlopen(f"{url}/bench?list-type=2", timeout=2).read()


def test_walk_with_row_ranges_and_a_bounded_queue_lists_every_field(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _keys()
    ref, _ = jump.group_files([k for k in keys if k.endswith(".tiff") and k.startswith(PRE)], "source_4",
                              plate_of=lambda f: f.rsplit("/", 2)[-2].split("__")[0])
    monkeypatch.setattr(discovery, "QUEUE_BATCHES", 1)  # listing threads wait for the grouping thread
    with FakeS3("bench", keys, latency_s=0.005, max_keys=50) as s3:
        lister = Lister(HttpPager(s3.url, "bench"), "bench", workers=6)
        assert len(lister.ranges(f"{PRE}P000__2021-Measurement1/")) == 16
        idx, skipped = index_from_listing(lister, PRE, None, jump.channel_map("source_4"))
        assert [r.key for r in idx] == [r.key for r in ref] and skipped == []
        assert {tuple(sorted(r.channels)) for r in idx} == {("AGP", "DNA", "ER", "Mito", "RNA")}
        one, _ = index_from_listing(lister, PRE, ["P001"], jump.channel_map("source_4"))
        assert {r.plate for r in one} == {"P001"} and len(one) == 17 * 2 * 2


def test_transient_errors_are_retried_and_permanent_ones_are_one_line() -> None:
    class Flaky(FakeS3):
        fails = 2

        def handle(self, path: str) -> tuple[int, bytes]:
            if self.fails > 0:
                self.fails -= 1
                return self.error(503, "SlowDown")
            if "forbidden" in path:
                return self.error(403, "AccessDenied")
            return super().handle(path)

    retries: list[int] = []
    with Flaky("bench", ["a/1", "a/2"], latency_s=0.0) as s3:
        pager = HttpPager(s3.url, "bench", max_attempts=4, on_retries=retries.append)
        assert pager.page("a/").keys == ["a/1", "a/2"] and retries == [2]
        with pytest.raises(S3FetchError, match="403 AccessDenied.*data.s3.sign=true"):
            pager.page("forbidden/")
        s3.fails = 10
        with pytest.raises(S3FetchError, match="gave up after 4 attempts: HTTP 503 SlowDown"):
            pager.page("a/")


def test_page_parser_unescapes_entities_and_ignores_tokens_of_last_pages() -> None:
    body = (b"<ListBucketResult><IsTruncated>false</IsTruncated><NextContinuationToken>x</NextContinuationToken>"
            b"<Contents><Key>a &amp; b</Key></Contents><Contents><Key>c</Key></Contents>"
            b"<CommonPrefixes><Prefix>d/</Prefix></CommonPrefixes></ListBucketResult>")
    assert parse_page(body) == (["a & b", "c"], ["d/"], None)
