"""Cell Painting fields streamed from S3 (the public ``cellpainting-gallery`` bucket, MinIO, local S3).

``config`` (URI, ``data.s3`` checks, the boto3 client and its retries), ``caches`` (decoded-field LRU,
disk cache), ``discovery`` (concurrent listing, load_data tables, the cached index) and ``source``
(:class:`S3FieldSource`: fetch, metrics).  Importing this package does not import boto3.
"""

from dinocell.data.s3.caches import ByteLRU, DiskCache
from dinocell.data.s3.config import S3FetchError, S3MissingError, make_client, parse_s3_uri
from dinocell.data.s3.discovery import path_metadata
from dinocell.data.s3.source import S3FieldSource

__all__ = ["ByteLRU", "DiskCache", "S3FetchError", "S3MissingError", "S3FieldSource", "make_client",
           "parse_s3_uri", "path_metadata"]
