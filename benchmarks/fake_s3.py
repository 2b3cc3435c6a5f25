"""A light fake S3 server for listing benchmarks and tests: ListObjectsV2 only, 127.0.0.1 only.

moto renders a 1000-key page in ~1.4 s of CPU on this machine, so a listing benchmark against it
measures moto.  This server pre-renders every key's ``<Contents>`` element once into one byte buffer;
a page is a bisect into the sorted keys and one slice of that buffer (well under 1 ms of CPU per
request, :attr:`FakeS3.cpu_per_request`).  It answers ``prefix``, ``delimiter``, ``start-after``,
``continuation-token`` and ``max-keys``, waits a fixed ``latency_s`` per request with a sleep that
blocks only that connection's thread (threaded server, HTTP/1.1 keep-alive), and stops by itself
after ``idle_s`` without a request.
"""

from __future__ import annotations

import bisect
import html
import threading
import time
import urllib.parse
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

_END = "\U0010ffff"
_NS = 'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"'


def _contents(key: str) -> bytes:
    return (f"<Contents><Key>{html.escape(key, quote=False)}</Key><LastModified>2021-05-02T16:02:51.000Z"
            f"</LastModified><ETag>&quot;0&quot;</ETag><Size>1</Size><StorageClass>STANDARD</StorageClass>"
            f"</Contents>").encode()


class FakeS3:
    """One bucket of ``keys`` served at :attr:`url` (``with FakeS3(...) as s3:`` starts and stops it)."""

    def __init__(self, bucket: str, keys: Iterable[str], latency_s: float = 0.03, max_keys: int = 1000,
                 idle_s: float = 60.0) -> None:
        self.bucket = bucket
        self.keys = sorted(set(keys))
        frags = [_contents(k) for k in self.keys]
        self.offsets = np.zeros(len(frags) + 1, dtype=np.int64)
        np.cumsum([len(f) for f in frags], out=self.offsets[1:])
        self.buf = b"".join(frags)
        self.latency_s, self.max_keys, self.idle_s = float(latency_s), int(max_keys), float(idle_s)
        self.requests = 0
        self.cpu_s = 0.0  # CPU of request handling (thread time, latency sleep excluded)
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._server: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # -- pages ---------------------------------------------------------------------------------------
    def render(self, query: dict[str, str]) -> tuple[int, bytes]:
        """(HTTP status, body) of one ListObjectsV2 request."""
        prefix = query.get("prefix", "")
        delim = query.get("delimiter") or None
        max_keys = max(1, min(self.max_keys, int(query.get("max-keys", self.max_keys))))
        lo = bisect.bisect_left(self.keys, prefix)
        hi = bisect.bisect_left(self.keys, prefix + _END, lo)
        token = query.get("continuation-token")
        if token:
            i = int(token)
        elif query.get("start-after"):
            i = max(lo, bisect.bisect_right(self.keys, query["start-after"], lo, hi))
        else:
            i = lo
        parts: list[bytes] = []
        prefixes: list[str] = []
        if delim is None:
            j = min(hi, i + max_keys)
            parts.append(self.buf[self.offsets[i]:self.offsets[j]])
            count = j - i
        else:
            j, count = i, 0
            while j < hi and count < max_keys:
                rest = self.keys[j][len(prefix):]
                d = rest.find(delim)
                if d < 0:
                    parts.append(self.buf[self.offsets[j]:self.offsets[j + 1]])
                    j += 1
                else:
                    cp = prefix + rest[:d + len(delim)]
                    prefixes.append(cp)
                    j = bisect.bisect_left(self.keys, cp + _END, j, hi)
                count += 1
        truncated = j < hi
        head = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult {_NS}><Name>{self.bucket}</Name>'
                f"<Prefix>{html.escape(prefix, quote=False)}</Prefix><KeyCount>{count}</KeyCount>"
                f"<MaxKeys>{max_keys}</MaxKeys><IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if delim is not None:
            head += f"<Delimiter>{html.escape(delim, quote=False)}</Delimiter>"
        if token:
            head += f"<ContinuationToken>{token}</ContinuationToken>"
        if truncated:
            head += f"<NextContinuationToken>{j}</NextContinuationToken>"
        tail = "".join(f"<CommonPrefixes><Prefix>{html.escape(p, quote=False)}</Prefix></CommonPrefixes>"
                       for p in prefixes) + "</ListBucketResult>"
        return 200, head.encode() + b"".join(parts) + tail.encode()

    def error(self, status: int, code: str) -> tuple[int, bytes]:
        return status, (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                        f"<Message>{code}</Message></Error>").encode()

    def handle(self, path: str) -> tuple[int, bytes]:
        """Route one GET: ``/<bucket>?list-type=2&...`` (path-style addressing)."""
        url = urllib.parse.urlsplit(path)
        bucket = url.path.strip("/").split("/", 1)[0]
        if bucket != self.bucket:
            return self.error(404, "NoSuchBucket")
        query = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        if "/" in url.path.strip("/") or query.get("list-type") != "2":
            return self.error(501, "NotImplemented")
        return self.render(query)

    # -- server --------------------------------------------------------------------------------------
    def start(self) -> FakeS3:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                t0 = time.thread_time()
                status, body = fake.handle(self.path)
                used = time.thread_time() - t0
                time.sleep(fake.latency_s)  # blocks this connection only
                t1 = time.thread_time()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                used += time.thread_time() - t1
                with fake._lock:
                    fake.requests += 1
                    fake.cpu_s += used
                    fake._last = time.monotonic()

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._last = time.monotonic()
        serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        watch = threading.Thread(target=self._watchdog, daemon=True)
        self._threads = [serve, watch]
        serve.start()
        watch.start()
        return self

    def _watchdog(self) -> None:
        while self._server is not None:
            time.sleep(0.2)
            if time.monotonic() - self._last > self.idle_s:
                self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "not started"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def cpu_per_request(self) -> float:
        """Seconds of CPU per request (excludes the latency sleep)."""
        return self.cpu_s / max(1, self.requests)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FakeS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
