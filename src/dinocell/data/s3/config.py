"""S3 client and configuration: URI parsing, ``data.s3`` validation, the boto3 client, error kinds.

boto3 is an optional extra (``pip install 'dinocell[s3]'``): it is imported only when a client is
made, so ``import dinocell.data`` works without it.

Retries are botocore's (``retries={"mode": "adaptive", "total_max_attempts": data.s3.max_attempts}``; botocore's
``max_attempts`` would count retries only):
exponential backoff with jitter on 5xx, throttling, timeouts and connection errors, plus client-side
rate limiting after throttling.  Every HTTP attempt passes a ``before-send`` hook that counts it, so
``s3/retries`` still reports every retry.  The one retry botocore cannot do -- a body cut short after
the headers arrived -- is done by the fetch code (:mod:`dinocell.data.s3.source`).
"""

from __future__ import annotations

import http.client
import re
import threading
from typing import Any

from dinocell.errors import ConfigError, DataError, require_extra

#: Keys of ``data.s3.filters``.
FILTER_KEYS = ("project", "source", "batch", "plate", "well", "site", "channel")
_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "TooManyRequests",
                   "RequestLimitExceeded", "ProvisionedThroughputExceededException"}


class S3MissingError(DataError):
    """The object does not exist (404 / NoSuchKey): retrying cannot help."""


class S3FetchError(DataError):
    """The object could not be fetched (permanent error, or every attempt failed)."""


class Truncated(Exception):
    """The body was shorter than its Content-Length (a connection dropped mid-transfer)."""


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    if not uri.startswith("s3://"):
        raise DataError(f"not an s3:// URI: {uri}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-_]{1,254}", bucket or ""):
        raise DataError(f"bad S3 bucket name in {uri!r}")
    return bucket, key


def validate_s3_config(c: Any) -> None:
    """Fail with one line on a bad ``data.s3`` value."""
    checks = (("max_in_flight", c.max_in_flight >= 1), ("max_attempts", c.max_attempts >= 1),
              ("timeout_s", c.timeout_s > 0), ("cache_bytes", c.cache_bytes >= 0),
              ("disk_cache_bytes", c.disk_cache_bytes >= 0), ("shuffle_buffer", c.shuffle_buffer >= 1),
              ("list_workers", c.list_workers >= 1))
    for name, ok in checks:
        if not ok:
            raise ConfigError(f"config key 'data.s3.{name}' has an invalid value: {getattr(c, name)!r}")
    if c.disk_cache_dir and c.disk_cache_bytes <= 0:
        raise ConfigError("config key 'data.s3.disk_cache_dir' is set but 'data.s3.disk_cache_bytes' is 0; "
                          "give the cache a size in bytes")
    if c.endpoint_url and not re.match(r"^https?://", str(c.endpoint_url)):
        raise ConfigError(f"config key 'data.s3.endpoint_url' must start with http:// or https://; "
                          f"got {c.endpoint_url!r}")
    if c.endpoint_url:
        _check_endpoint(str(c.endpoint_url))
    unknown = sorted(set(c.filters or {}) - set(FILTER_KEYS))
    if unknown:
        raise ConfigError(f"unknown key '{unknown[0]}' in 'data.s3.filters' (known: {', '.join(FILTER_KEYS)})")


def _check_endpoint(url: str) -> None:
    """A URL botocore can connect to: a host, a valid port, brackets closed (``http://[::1`` used to end
    in a ValueError traceback from urllib deep inside the client)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is the check
        ok = bool(parts.hostname)
    except ValueError as e:
        raise ConfigError(f"config key 'data.s3.endpoint_url' is not a valid URL ({e}): {url!r}") from None
    if not ok:
        raise ConfigError(f"config key 'data.s3.endpoint_url' names no host: {url!r}")


class AttemptCounter:
    """Counts HTTP attempts per thread (botocore's ``before-send`` event fires once per attempt)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, **_: Any) -> None:
        self._local.n = getattr(self._local, "n", 0) + 1

    @property
    def value(self) -> int:
        return getattr(self._local, "n", 0)


def make_client(s3cfg: Any, pool: int | None = None) -> tuple[Any, AttemptCounter]:
    """A boto3 S3 client (unsigned unless ``sign``; adaptive retries) and its attempt counter."""
    require_extra("s3", ("boto3", "botocore"), "reading s3:// sources")
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config as BotoConfig

    kwargs: dict[str, Any] = {
        "region_name": s3cfg.region,
        "connect_timeout": s3cfg.timeout_s,
        "read_timeout": s3cfg.timeout_s,
        "retries": {"mode": "adaptive", "total_max_attempts": int(s3cfg.max_attempts)},  # incl. the first
        "max_pool_connections": int(pool or s3cfg.max_in_flight) + 4,
    }
    validate_s3_config(s3cfg)  # every client, whichever command built the config (data check did not)
    if s3cfg.endpoint_url:
        kwargs["s3"] = {"addressing_style": "path"}  # MinIO / local servers have no bucket DNS names
    if not s3cfg.sign:
        kwargs["signature_version"] = UNSIGNED
    session = boto3.session.Session()  # sessions are not thread-safe: one per client
    client = session.client("s3", endpoint_url=s3cfg.endpoint_url or None, config=BotoConfig(**kwargs))
    counter = AttemptCounter()
    client.meta.events.register("before-send.s3", counter)
    return client, counter


def classify(exc: BaseException) -> str:
    """``missing`` (404), ``retry`` (transient: worth another try), ``fatal`` or ``raise`` (not ours)."""
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(exc, Truncated):
        return "retry"
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if code in _MISSING_CODES or status == 404:
            return "missing"
        if status >= 500 or status in (408, 429) or code in _THROTTLE_CODES:
            return "retry"
        return "fatal"
    try:
        from urllib3.exceptions import HTTPError as Urllib3Error
    except ImportError:  # pragma: no cover - urllib3 ships with botocore
        Urllib3Error = OSError  # noqa: N806
    if isinstance(exc, (BotoCoreError, Urllib3Error, http.client.HTTPException, OSError)):
        return "retry"  # connection reset/closed, timeouts, streaming errors, incomplete reads
    return "raise"


def describe(exc: BaseException) -> str:
    """One short line for an S3 error."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"HTTP {status} {err.get('Code', '')}".strip()
    return f"{type(exc).__name__}: {exc}"


def permanent_error(exc: BaseException, what: str, missing: str, signed: bool) -> DataError | None:
    """The :class:`DataError` for a permanent S3 error (404 -> ``missing``, 403, bad request), or None
    when ``exc`` is transient (worth another try).  Exceptions that are not S3's are re-raised."""
    kind = classify(exc)
    if kind == "raise":
        raise exc
    if kind == "missing":
        return S3MissingError(missing)
    if kind == "fatal":
        msg = describe(exc)
        if "403" in msg and not signed:
            msg += " (a private bucket needs data.s3.sign=true)"
        return S3FetchError(f"{what}: {msg}")
    return None
