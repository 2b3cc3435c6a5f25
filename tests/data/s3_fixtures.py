"""A real local S3 server (moto) and a fault-injecting loopback proxy, for tests and the benchmark.

Everything binds to 127.0.0.1: nothing here can reach AWS.  The proxy sits between the client and
moto and, per object path and attempt number, injects a deterministic schedule of faults:

``"500"`` InternalError, ``"503"`` SlowDown, ``"429"`` throttling, ``"slow"`` (answer after
``slow_s`` seconds: the client's read timeout fires first), ``"reset"`` (TCP RST before any byte),
``"truncate"`` (full Content-Length header, half the body, then close).  ``latency_s`` delays every
request's first byte, like S3's ~30 ms.  ``served[path]`` counts GETs answered normally with 200.
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import struct
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

DUMMY_KEY = "testing-dummy-key"
DUMMY_SECRET = "testing-dummy-secret"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "content-length"}
FAULTS = ("500", "503", "429", "slow", "reset", "truncate")


def start_moto() -> tuple[Any, str]:
    """Start moto's S3 server on 127.0.0.1 at a free port; returns (server, endpoint URL)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    return server, f"http://{host}:{port}"


def admin_client(endpoint_url: str) -> Any:
    """A signed client with dummy credentials (passed explicitly: nothing read from the environment)."""
    import boto3

    assert endpoint_url.startswith("http://127.0.0.1:")
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url, region_name="us-east-1",
        aws_access_key_id=DUMMY_KEY, aws_secret_access_key=DUMMY_SECRET)


def make_public_bucket(client: Any, bucket: str) -> None:
    """Create ``bucket`` with a public-read policy, like ``cellpainting-gallery``.

    Without it moto answers unsigned GETs with 403 (checked: it enforces bucket policies for
    anonymous requests).
    """
    client.create_bucket(Bucket=bucket)
    policy = {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject"],
         "Resource": [f"arn:aws:s3:::{bucket}/*"]},
        {"Effect": "Allow", "Principal": "*", "Action": ["s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}"]},
    ]}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def upload_tree(client: Any, bucket: str, prefix: str, folder: Path,
                suffixes: Iterable[str] = (".tiff", ".tif")) -> list[str]:
    """Upload every file under ``folder`` with one of ``suffixes`` as ``prefix + relative path``."""
    keys = []
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in tuple(suffixes):
            key = prefix + p.relative_to(folder).as_posix()
            client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
            keys.append(key)
    return keys


@dataclass
class JumpBucket:
    """A JUMP-layout bucket on the local server."""

    endpoint_url: str
    bucket: str
    prefix: str
    folder: Path  # the local copy
    keys: list[str]
    n_fields: int
    load_data_key: str
    load_data_local: Path
    admin: Any = field(repr=False, default=None)

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def fill_jump_bucket(endpoint_url: str, bucket: str, prefix: str, out_dir: Path, n_fields: int,
                     size: int, seed: int = 0, n_plates: int = 2, wells_per_plate: int = 4,
                     sites_per_well: int = 2) -> JumpBucket:
    """Synthetic JUMP fields (LZW TIFF) uploaded under ``prefix`` plus a load_data Parquet whose
    ``PathName_Orig*`` columns are ``s3://`` folders (uploaded next to them and kept locally)."""
    import pandas as pd

    from dinocell.data.synthetic import write_jump_folder

    write_jump_folder(out_dir, n_fields=n_fields, size=size, seed=seed, n_plates=n_plates,
                      wells_per_plate=wells_per_plate, sites_per_well=sites_per_well)
    admin = admin_client(endpoint_url)
    try:
        make_public_bucket(admin, bucket)
    except admin.exceptions.BucketAlreadyOwnedByYou:
        pass
    keys = upload_tree(admin, bucket, prefix, out_dir)
    df = pd.read_csv(out_dir / "load_data.csv", dtype=str)
    base = out_dir.absolute().as_posix().rstrip("/")
    for col in [c for c in df.columns if c.startswith("PathName_Orig")]:
        df[col] = [f"s3://{bucket}/{prefix}" + Path(p).as_posix()[len(base) + 1:] for p in df[col]]
    local = out_dir / "load_data_s3.parquet"
    df.to_parquet(local, index=False)
    ld_key = prefix + "load_data.parquet"
    admin.put_object(Bucket=bucket, Key=ld_key, Body=local.read_bytes())
    return JumpBucket(endpoint_url, bucket, prefix, out_dir, keys, n_fields, ld_key, local, admin)


# --------------------------------------------------------------------------------------------------
# The fault proxy
# --------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _ProxyServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _upstream(self, body: bytes | None) -> tuple[int, list[tuple[str, str]], bytes]:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            conn = getattr(self, "_up", None)
            if conn is None:
                u = urllib.parse.urlsplit(self.server.proxy.upstream)
                conn = self._up = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, resp.getheaders(), data
            except (OSError, http.client.HTTPException):
                conn.close()
                self._up = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _send_error(self, status: int, code: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                f"<Message>injected {code}</Message></Error>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        self.connection.close()

    def _handle(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        path = urllib.parse.unquote(self.path.split("?", 1)[0])
        fault = proxy.next_fault(self.command, path)
        if proxy.latency_s:
            time.sleep(proxy.latency_s)
        if fault in ("500", "503", "429"):
            code = {"500": "InternalError", "503": "SlowDown", "429": "TooManyRequests"}[fault]
            self._send_error(int(fault), code)
            return
        if fault == "reset":
            self._reset()
            return
        if fault == "slow":
            time.sleep(proxy.slow_s)
        status, headers, data = self._upstream(body)
        if fault == "truncate" and data:
            self.send_response(status)
            for k, v in headers:
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        self.send_response(status)
        content_length = str(len(data))
        for k, v in headers:
            if k.lower() == "content-length" and self.command == "HEAD":
                content_length = v
            elif k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", content_length)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        self.wfile.flush()
        if fault is None and self.command == "GET" and status == 200:
            proxy.record(path)

    def _safe(self) -> None:
        proxy = self.server.proxy
        proxy.enter(self.command, self.path, signed="authorization" in {k.lower() for k in self.headers})
        try:
            self._handle()
        except (BrokenPipeError, ConnectionResetError, ValueError, OSError):
            self.close_connection = True
        finally:
            proxy.leave()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _safe  # noqa: N815

    def finish(self) -> None:
        try:
            super().finish()
        except (OSError, ValueError):
            pass


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    proxy: FaultProxy

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients hanging up on injected faults are expected


class FaultProxy:
    """Loopback HTTP proxy in front of ``upstream`` with a deterministic fault schedule.

    ``schedule[path]`` is the fault of each successive GET of ``path`` (``None`` = pass through);
    ``fault_fn(path, attempt)`` computes it instead when given.  Only GETs are faulted.
    """

    def __init__(self, upstream: str, schedule: dict[str, list[str | None]] | None = None,
                 fault_fn: Callable[[str, int], str | None] | None = None, latency_s: float = 0.0,
                 slow_s: float = 1.0) -> None:
        assert upstream.startswith("http://127.0.0.1:")
        self.upstream = upstream
        self.schedule = dict(schedule or {})
        self.fault_fn = fault_fn
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.attempts: Counter[str] = Counter()
        self.served: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[str, str]] = []  # (method, path with query) of every request
        self.requests = 0
        self.signed = 0  # requests carrying an Authorization header
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    def next_fault(self, method: str, path: str) -> str | None:
        if method != "GET":
            return None
        with self._lock:
            attempt = self.attempts[path]
            self.attempts[path] += 1
            if self.fault_fn is not None:
                fault = self.fault_fn(path, attempt)
            else:
                plan = self.schedule.get(path, [])
                fault = plan[attempt] if attempt < len(plan) else None
            if fault is not None:
                assert fault in FAULTS, fault
                self.injected[fault] += 1
            return fault

    def enter(self, method: str, path: str, signed: bool) -> None:
        with self._lock:
            self.log.append((method, path))
            self.requests += 1
            self.signed += int(signed)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def record(self, path: str) -> None:
        with self._lock:
            self.served[path] += 1

    def reset_counts(self) -> None:
        with self._lock:
            self.attempts.clear()
            self.served.clear()
            self.injected.clear()
            self.requests = self.signed = self.max_in_flight = 0
            self.log.clear()

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FaultProxy:
        self._server = _ProxyServer(("127.0.0.1", 0), _Handler)
        self._server.proxy = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True, name="fault-proxy")
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
