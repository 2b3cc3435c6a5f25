"""``dinocell data check``: an S3 preflight that answers "will this run get its data?" in seconds.

A pretraining job that cannot reach its bucket, has no anonymous access or points at an empty prefix
should fail before a GPU is allocated, with one line.  The check makes few, short requests (connect
timeout a few seconds, two attempts) instead of the training client's patient retries:

1. one ``ListObjectsV2`` of the prefix: the endpoint is reachable, anonymous (or signed) access
   works, the prefix is not empty;
2. a walk down the Cell Painting Gallery layout (``<project>/<source>/images/<batch>/images/
   <plate>__<timestamp>-Measurement1/Images/``) to the first plate folder, whose fields are counted;
3. the plate's load_data folder (``<project>/<source>/workspace/load_data_csv/<batch>/<plate>/``)
   is looked up, since it names the channels and the illumination functions;
4. one field is fetched and decoded, which gives its size in bytes and hence the bandwidth that
   ``data.batch_size`` and ``data.repeats`` need at a stated steps/s.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from dinocell.data import jump
from dinocell.data.channels import resolve_channel_map
from dinocell.data.decode import read_image
from dinocell.data.field import IMAGE_SUFFIXES, LOAD_DATA_SUFFIXES
from dinocell.data.s3.config import make_client, parse_s3_uri
from dinocell.data.s3.discovery import is_plate_folder, path_metadata
from dinocell.errors import UserError

#: Short limits for the check (the training client retries patiently; a preflight must answer fast).
CONNECT_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 10.0
ATTEMPTS = 2
MAX_DEPTH = 8  # levels walked down from the prefix to a folder of images


def _client(s3cfg: Any) -> Any:
    quick = dataclasses.replace(s3cfg, max_attempts=ATTEMPTS, timeout_s=min(float(s3cfg.timeout_s), READ_TIMEOUT_S))
    client, _ = make_client(quick, pool=4)
    client.meta.config.connect_timeout = CONNECT_TIMEOUT_S  # botocore reads it per connection
    return client


def _fail(exc: BaseException, uri: str, endpoint: str, signed: bool) -> UserError:
    """One line for the first request's failure: unreachable, denied, missing bucket, other."""
    from botocore.exceptions import ClientError

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status == 403 or code in ("AccessDenied", "AllAccessDisabled"):
            how = "signed" if signed else "anonymous (unsigned)"
            hint = "check the credentials" if signed else "a private bucket needs data.s3.sign=true and credentials"
            return UserError(f"data check: access denied to {uri} with {how} requests (HTTP 403 {code}); {hint}")
        if code == "NoSuchBucket" or status == 404:
            return UserError(f"data check: bucket not found: s3://{parse_s3_uri(uri)[0]} at {endpoint}")
        return UserError(f"data check: {uri}: HTTP {status} {code}".rstrip())
    return UserError(f"data check: cannot reach {endpoint}: {type(exc).__name__}: {exc}")


def _list(client: Any, bucket: str, prefix: str, delimiter: str | None = "/", max_keys: int = 1000) -> dict[str, Any]:
    kw: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": max_keys}
    if delimiter:
        kw["Delimiter"] = delimiter
    return client.list_objects_v2(**kw)


def _find_image_folder(client: Any, bucket: str, prefix: str) -> tuple[str, list[dict[str, Any]], int]:
    """Walk down to the first folder holding images; returns (folder prefix, its image objects, number
    of sibling plate folders seen on the way)."""
    plates_seen = 0
    for _ in range(MAX_DEPTH):
        page = _list(client, bucket, prefix)
        images = [o for o in page.get("Contents", []) if o["Key"].lower().endswith(IMAGE_SUFFIXES)]
        if images:
            return prefix, images, plates_seen
        subs = [cp["Prefix"] for cp in page.get("CommonPrefixes", [])]
        if not subs:
            break
        plates = [s for s in subs if is_plate_folder(s.rstrip("/").rsplit("/", 1)[-1])]
        plates_seen = max(plates_seen, len(plates))
        images_dir = [s for s in subs if s.rstrip("/").rsplit("/", 1)[-1] == "images"]
        prefix = (plates or images_dir or subs)[0]
        if prefix.rstrip("/").endswith("Measurement1") or plates:
            inner = _list(client, bucket, prefix)
            named = [cp["Prefix"] for cp in inner.get("CommonPrefixes", []) if cp["Prefix"].endswith("Images/")]
            if named:
                prefix = named[0]
    raise UserError(f"data check: no images ({', '.join(IMAGE_SUFFIXES)}) under s3://{bucket}/{prefix} "
                    f"within {MAX_DEPTH} folder levels")


def _load_data_folder(client: Any, bucket: str, folder_key: str) -> str:
    """Where the plate's load_data should be, and what is there."""
    meta = path_metadata(folder_key + "x")
    need = ("Metadata_Project", "Metadata_Source", "Metadata_Batch", "Metadata_Plate")
    if not all(k in meta for k in need):
        return "not looked up (the prefix does not follow <project>/<source>/images/<batch>/images/<plate>__...)"
    ld = (f"{meta['Metadata_Project']}/{meta['Metadata_Source']}/workspace/load_data_csv/"
          f"{meta['Metadata_Batch']}/{meta['Metadata_Plate']}/")
    try:
        page = _list(client, bucket, ld, delimiter=None, max_keys=20)
    except Exception as e:  # noqa: BLE001 - a missing load_data folder is information, not a failure
        return f"s3://{bucket}/{ld}: cannot list ({type(e).__name__})"
    names = [o["Key"].rsplit("/", 1)[-1] for o in page.get("Contents", [])
             if o["Key"].lower().endswith(LOAD_DATA_SUFFIXES)]
    if not names:
        return f"none at s3://{bucket}/{ld} (channel names come from data.channel_map / data.source_map)"
    illum = " (has illumination functions: load_data_with_illum)" if any("illum" in n for n in names) else ""
    return f"s3://{bucket}/{ld}: {', '.join(sorted(names))}{illum}"


def _field_from_listing(client: Any, bucket: str, prefix: str, data_cfg: Any, endpoint: str,
                        lines: list[str]) -> tuple[Any, list[Any], int, float]:
    """Walk to a plate folder, count its fields, fetch and decode the first one."""
    folder, objects, n_plates = _find_image_folder(client, bucket, prefix)
    cmap, origin = resolve_channel_map(f"s3://{bucket}/{folder}", data_cfg.source_map, data_cfg.channel_map)
    index, _ = jump.group_files([f"s3://{bucket}/{o['Key']}" for o in objects], cmap)
    if not len(index):
        raise UserError(f"data check: no JUMP-named images (rRRcCCfFFp01-chK...) in s3://{bucket}/{folder}")
    rec = index[0]
    more = " (first page)" if len(objects) >= 1000 else ""
    lines.append(f"fields:      {len(index)} in s3://{bucket}/{folder}{more}"
                 + (f"; {n_plates} plate folder(s) at that level" if n_plates else ""))
    lines.append(f"channels:    {', '.join(f'{k} -> {v}' for k, v in sorted(cmap.items()))} ({origin})")
    lines.append(f"load_data:   {_load_data_folder(client, bucket, folder)}")
    t0 = time.perf_counter()
    planes, nbytes = [], 0
    for ch in sorted(rec.channels):
        b, key = parse_s3_uri(rec.channels[ch])
        try:
            body = client.get_object(Bucket=b, Key=key)["Body"].read()
        except Exception as e:  # noqa: BLE001
            raise _fail(e, f"s3://{b}/{key}", endpoint, bool(data_cfg.s3.sign)) from None
        nbytes += len(body)
        planes.append(read_image(body))
    return rec, planes, nbytes, max(time.perf_counter() - t0, 1e-6)


def _field_from_table(uri: str, data_cfg: Any, lines: list[str]) -> tuple[Any, list[Any], int, float]:
    """The fields a load_data table lists (no listing), and its first field fetched and decoded."""
    from dinocell.data.s3.source import S3FieldSource

    quick = dataclasses.replace(data_cfg, s3=dataclasses.replace(
        data_cfg.s3, max_attempts=ATTEMPTS, timeout_s=min(float(data_cfg.s3.timeout_s), READ_TIMEOUT_S)))
    src = S3FieldSource(uri, quick)
    try:
        lines.append(f"fields:      {len(src)} listed by {data_cfg.load_data or uri}")
        lines.append(f"channels:    {', '.join(src.channels)} (load_data)")
        rec = src.records[0]
        t0 = time.perf_counter()
        raw = src.load_raw(rec)
        dt = max(time.perf_counter() - t0, 1e-6)
        return rec, list(raw), int(src.metrics()["s3/bytes"]), dt
    finally:
        src.close()


def check_s3(uri: str, data_cfg: Any, steps_per_s: float = 1.0) -> list[str]:
    """Run the preflight; returns the verdict lines, raises :class:`UserError` (one line) on failure."""
    s3cfg = data_cfg.s3
    bucket, prefix = parse_s3_uri(uri)
    endpoint = s3cfg.endpoint_url or "https://s3.amazonaws.com"
    client = _client(s3cfg)
    try:
        first = _list(client, bucket, prefix, delimiter=None, max_keys=1)
    except Exception as e:  # noqa: BLE001 - every failure of the first request becomes one line
        raise _fail(e, uri, endpoint, bool(s3cfg.sign)) from None
    if not first.get("KeyCount", len(first.get("Contents", []))):
        raise UserError(f"data check: no objects under {uri} (empty or wrong prefix)")
    lines = [f"reachable:   {endpoint}",
             f"access:      {'signed' if s3cfg.sign else 'anonymous (unsigned requests)'}: listing allowed"]
    try:
        if data_cfg.load_data or uri.lower().endswith(LOAD_DATA_SUFFIXES):
            rec, planes, nbytes, dt = _field_from_table(uri, data_cfg, lines)
        else:
            rec, planes, nbytes, dt = _field_from_listing(client, bucket, prefix, data_cfg, endpoint, lines)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - a failure half-way is still one line
        raise _fail(e, uri, endpoint, bool(s3cfg.sign)) from None
    shape = planes[0].shape
    lines.append(f"decoded:     {rec.key}: {len(planes)} channels of {shape[0]}x{shape[1]} {planes[0].dtype}, "
                 f"{nbytes / 1e6:.2f} MB in {dt:.2f} s ({nbytes / 1e6 / dt:.1f} MB/s on one connection)")
    fields_per_step = data_cfg.batch_size / max(1, int(data_cfg.repeats))
    need = nbytes / 1e6 * fields_per_step * steps_per_s
    lines.append(f"bandwidth:   {need:.1f} MB/s needed at {steps_per_s:g} steps/s (batch_size "
                 f"{data_cfg.batch_size} / repeats {data_cfg.repeats} = {fields_per_step:g} fields per step "
                 f"x {nbytes / 1e6:.2f} MB)")
    lines.append("verdict:     ok")
    return lines


__all__ = ["check_s3"]
