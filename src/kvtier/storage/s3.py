"""S3-compatible remote tier: ``remote_url: s3://bucket/optional/prefix``.

One object per chunk (body = the stored chunk format: header + payload). An S3 PUT, and the completion of a
multipart upload, is atomic, so readers see a whole chunk or none. Writes are conditional (``If-None-Match: *``)
so a chunk is stored once however many engines race to write it; a server that does not implement conditional
writes gets plain ones (harmless: a key's bytes never change).

Large objects move in parts of :data:`PART_SIZE` in parallel (multipart uploads, ranged GETs into one buffer),
because one HTTP stream rarely fills a link to an object store. Existence checks are parallel HEADs (S3 has no
batched HEAD). Only standard S3 calls are used, so any S3-compatible server works (AWS, SeaweedFS, MinIO, Ceph).

Endpoint, region and credentials come from the ``s3_*`` configuration keys when set, else from boto3's standard
chain (``AWS_ENDPOINT_URL``, ``AWS_REGION``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, ...).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import re
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import boto3
import numpy as np
from botocore.config import Config
from botocore.exceptions import ClientError

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError, StorageError
from kvtier.metrics import CacheMetrics
from kvtier.storage.remote import RemoteStore, RemoteTier, Value, value_size
from kvtier.tokens.keys import Namespace

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20
#: Size of a multipart upload part and of a ranged GET. S3 parts must be >= 5 MiB (except the last); 8 MiB
#: parts give a 32 MiB chunk four parallel streams.
PART_SIZE = 8 * MiB
#: Objects larger than this are uploaded in parts.
MULTIPART_THRESHOLD = PART_SIZE
#: Most keys one DeleteObjects request may name.
DELETE_BATCH = 1000
#: Attempts per S3 request (botocore's standard retry mode: jittered backoff of at most 50 ms before a retry
#: of a transient error). One retry rides out a dropped connection; more would delay the circuit breaker.
ATTEMPTS = 2

_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_MISSING_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
# A conditional write lost to another writer: 412 once the object exists, 409 while another write of it runs.
_EXISTS_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict", "412", "409"})


@dataclass(frozen=True, slots=True)
class S3Location:
    """Where chunks go: a bucket and a key prefix (no leading or trailing slash; may be empty)."""

    bucket: str
    prefix: str


def parse_s3_url(url: str) -> S3Location:
    """``s3://bucket[/prefix]``; ConfigError if it is not one, or the bucket name is not a valid S3 name."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise ConfigError(f"remote_url {url!r}: expected s3://bucket[/prefix]")
    if parts.query or parts.fragment:
        raise ConfigError(f"remote_url {url!r}: s3:// URLs take no query or fragment (use the s3_* keys)")
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ConfigError(
            f"remote_url {url!r}: no credentials or port in an s3:// URL; set s3_endpoint_url and "
            "s3_access_key_id/s3_secret_access_key (or the AWS_* variables)"
        )
    bucket = parts.netloc
    if not bucket:
        raise ConfigError(f"remote_url {url!r}: no bucket (expected s3://bucket[/prefix])")
    if not _valid_bucket_name(bucket):
        raise ConfigError(
            f"remote_url {url!r}: {bucket!r} is not a valid S3 bucket name "
            "(3-63 characters: lowercase letters, digits, '.' and '-', starting and ending with a letter or digit)"
        )
    return S3Location(bucket, parts.path.strip("/"))


def _valid_bucket_name(name: str) -> bool:
    if not _BUCKET_NAME.fullmatch(name) or ".." in name:
        return False
    try:
        ipaddress.IPv4Address(name)  # "192.168.0.1" is not a bucket name
    except ValueError:
        return True
    return False


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _is_missing(exc: ClientError) -> bool:
    # A HEAD answer has no body, hence no error code: botocore reports the bare status ("404").
    return _code(exc) in _MISSING_CODES


class S3Store(RemoteStore):
    """Chunks as objects in one bucket, through a thread-safe boto3 client and a pool of ``workers`` threads
    (one request in flight per thread; give the client at least as many connections)."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        workers: int = 16,
        part_size: int = PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        if part_size < 5 * MiB:
            raise ValueError("S3 multipart parts must be at least 5 MiB")
        self.client = client
        self.bucket = bucket
        self.part_size = part_size
        self.workers = workers
        self.multipart_threshold = max(multipart_threshold, part_size)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kvtier-s3")
        self._conditional_writes = True  # cleared if the server rejects If-None-Match

    # -- reads --------------------------------------------------------------------------------------
    def get_many(self, names: Sequence[str]) -> list[Value | None]:
        """One GET per object in parallel. When the batch has fewer objects than connections, each GET asks for
        the first part only, and a larger object continues as parallel ranged GETs into one buffer, started as
        soon as the first part's headers tell its size; a batch that fills every connection by itself gets
        whole objects (ranges would only add requests)."""
        values: list[Value | None] = [None] * len(names)
        first_part = self.part_size if len(names) < self.workers else None
        first = {self._pool.submit(self._get_first, name, first_part): i for i, name in enumerate(names)}
        rest: list[tuple[Future[bool], int]] = []
        try:
            for future in as_completed(first):
                i = first[future]
                got = future.result()
                if got is not None:
                    values[i] = got[0]
                    rest += [(f, i) for f in got[1]]
            for future, i in rest:
                if not future.result():  # deleted or replaced between the first part and this one
                    values[i] = None
        except BaseException:
            for future in (*first, *(f for f, _ in rest)):
                future.cancel()
            raise
        return values

    def _get_first(self, name: str, part: int | None) -> tuple[Value, list[Future[bool]]] | None:
        """GET ``name`` (its first ``part`` bytes, if given): the object's buffer and the reads of its other parts
        (filling the buffer); None if it does not exist."""
        try:
            ranged = {"Range": f"bytes=0-{part - 1}"} if part else {}
            response = self.client.get_object(Bucket=self.bucket, Key=name, **ranged)
        except ClientError as exc:
            if _is_missing(exc):
                return None
            if _code(exc) == "InvalidRange":  # an empty object has no byte 0 (a damaged chunk, never ours)
                return b"", []
            raise
        received = int(response["ContentLength"])
        total = _object_size(response.get("ContentRange"), received)
        if received == total:  # all of it: the body's own buffer, no copy
            with response["Body"] as body:
                return body.read(), []
        download = _Download(_buffer(total), response.get("ETag", ""))
        rest = [
            self._pool.submit(self._get_range, name, download, start)
            for start in range(received, total, self.part_size)
        ]
        try:
            _read_into(response["Body"], download.buffer[:received])
        except BaseException:
            for future in rest:
                future.cancel()
            raise
        return download.buffer, rest

    def _get_range(self, name: str, download: _Download, start: int) -> bool:
        """Read one more part of ``download``; False if the object is gone or was replaced meanwhile."""
        end = min(start + self.part_size, len(download.buffer))
        try:
            response = self.client.get_object(
                Bucket=self.bucket, Key=name, Range=f"bytes={start}-{end - 1}", IfMatch=download.etag
            )
        except ClientError as exc:
            if _is_missing(exc) or _code(exc) in ("PreconditionFailed", "412"):
                return False
            raise
        if int(response["ContentLength"]) != end - start:
            raise StorageError(f"S3 object {name}: asked for {end - start} bytes at {start}, got a different range")
        _read_into(response["Body"], download.buffer[start:end])
        return True

    def exists_many(self, names: Sequence[str]) -> list[bool]:
        return self._map(self._exists, names)

    def _exists(self, name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=name)
        except ClientError as exc:
            if _is_missing(exc):
                return False
            raise
        return True

    # -- writes -------------------------------------------------------------------------------------
    def put(self, name: str, parts: Sequence[Value], ttl_sec: float | None, namespace: Namespace | None = None) -> bool:
        """Store ``parts`` as one object unless ``name`` exists (False then). The bucket is created on the first
        write that finds it missing. ``ttl_sec`` is not applied: S3 expires objects by bucket lifecycle rules."""
        size = value_size(parts)
        write = self._put_single if size <= self.multipart_threshold else self._put_multipart
        try:
            return self._conditional(lambda condition: write(name, parts, size, condition))
        except ClientError as exc:
            if _code(exc) != "NoSuchBucket":
                raise
        self._create_bucket()
        return self._conditional(lambda condition: write(name, parts, size, condition))

    def _conditional(self, write: Callable[[dict[str, str]], None]) -> bool:
        """Run ``write`` with ``If-None-Match: *``; False if the object already existed."""
        condition = {"IfNoneMatch": "*"} if self._conditional_writes else {}
        try:
            write(condition)
        except ClientError as exc:
            if condition and _code(exc) in _EXISTS_CODES:
                return False
            if not condition or _code(exc) not in ("NotImplemented", "501"):
                raise
            log.warning("S3 server rejects conditional writes (%s); writing unconditionally from now on", exc)
            self._conditional_writes = False
            write({})
        return True

    def _put_single(self, name: str, parts: Sequence[Value], size: int, condition: dict[str, str]) -> None:
        # A bytearray body goes to the socket as it is (bytes would be wrapped in a file and sent 16 KiB at a time).
        self.client.put_object(Bucket=self.bucket, Key=name, Body=_concat(parts, 0, size), **condition)

    def _put_multipart(self, name: str, parts: Sequence[Value], size: int, condition: dict[str, str]) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]
        try:
            starts = range(0, size, self.part_size)
            etags = self._map(lambda start: self._upload_part(name, upload, parts, start, size), starts)
            self.client.complete_multipart_upload(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload,
                MultipartUpload={"Parts": [{"ETag": e, "PartNumber": n} for n, e in enumerate(etags, 1)]},
                **condition,
            )
        except BaseException:
            self._abort(name, upload)
            raise

    def _upload_part(self, name: str, upload: str, parts: Sequence[Value], start: int, size: int) -> str:
        body = _concat(parts, start, min(start + self.part_size, size))
        number = start // self.part_size + 1
        response = self.client.upload_part(Bucket=self.bucket, Key=name, UploadId=upload, PartNumber=number, Body=body)
        return str(response["ETag"])

    def _abort(self, name: str, upload: str) -> None:
        """Best effort: a failed upload's parts would otherwise be kept (and billed) until a lifecycle rule
        aborts them; the original error is what the caller must see."""
        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
        except Exception as exc:
            log.debug("abort of multipart upload %s of %s failed: %s", upload, name, exc)

    def _create_bucket(self) -> None:
        """Create the bucket; another writer (thread or process) creating it first is fine."""
        region = self.client.meta.region_name
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if region and region not in ("us-east-1", "aws-global"):  # AWS wants other regions named
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self.client.create_bucket(**kwargs)
        except ClientError as exc:
            if _code(exc) != "BucketAlreadyOwnedByYou":
                raise StorageError(
                    f"S3 bucket {self.bucket!r} does not exist and creating it failed ({_code(exc)}: {exc}); "
                    "create it, or allow these credentials s3:CreateBucket"
                ) from exc
        else:
            log.info("created S3 bucket %s", self.bucket)

    # -- deletes ------------------------------------------------------------------------------------
    def delete_many(self, names: Sequence[str]) -> int:
        # DeleteObjects reports keys that never existed as deleted: ask first, to count what was there.
        present = [n for n, found in zip(names, self.exists_many(names), strict=True) if found]
        for start in range(0, len(present), DELETE_BATCH):
            self._delete_batch(present[start : start + DELETE_BATCH])
        return len(present)

    def clear(self, prefix: str) -> int:
        deleted = 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                names = [item["Key"] for item in page.get("Contents", [])]
                if names:  # a page holds at most 1000 keys, one DeleteObjects batch
                    self._delete_batch(names)
                    deleted += len(names)
        except ClientError as exc:
            if _code(exc) != "NoSuchBucket":
                raise
        return deleted

    def _delete_batch(self, names: Sequence[str]) -> None:
        response = self.client.delete_objects(
            Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in names], "Quiet": True}
        )
        errors = response.get("Errors", [])
        if errors:
            first = errors[0]
            raise StorageError(f"S3 delete of {len(errors)} objects failed, e.g. {first.get('Key')}: {first}")

    # -- plumbing -----------------------------------------------------------------------------------
    def _map(self, fn: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
        """``fn`` over ``items`` on the pool; a single item on the calling thread (no hand-off latency)."""
        if len(items) == 1:
            return [fn(items[0])]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


@dataclass(frozen=True, slots=True)
class _Download:
    buffer: memoryview  # the whole object, filled part by part
    etag: str  # pins the later ranges to the version the first one came from


def _buffer(size: int) -> memoryview:
    """Uninitialised memory for an object assembled from ranges. numpy's allocator (malloc, huge pages advised
    for large arrays) costs a few ms per 32 MiB; a zero-filled bytearray ~30 (a memset and 8192 page faults)."""
    return memoryview(np.empty(size, np.uint8))


def _object_size(content_range: str | None, received: int) -> int:
    """Total size from ``Content-Range: bytes a-b/total``; a server that ignored the range sent everything."""
    if not content_range:
        return received
    total = content_range.rpartition("/")[2]
    if not total.isdigit():
        raise StorageError(f"S3 answered a ranged GET with an unusable Content-Range {content_range!r}")
    return int(total)


def _read_into(body: Any, view: memoryview) -> None:
    """Fill ``view`` from a response body, or raise: a short body is a failed transfer, not a short chunk."""
    with body:  # closes the connection unless it was read to the end and went back to the pool
        readinto, release = _socket_reader(body) or (body.readinto, None)
        filled = 0
        while filled < len(view):
            n = readinto(view[filled:])
            if not n:
                raise StorageError(f"S3 response body ended after {filled} of {len(view)} bytes")
            filled += n
        if release is not None:
            release()


def _socket_reader(body: Any) -> tuple[Callable[[memoryview], int], Callable[[], None]] | None:
    """``readinto`` of the ``http.client`` response under botocore's and urllib3's wrappers, and what returns its
    connection to the pool once the body is read. urllib3's own ``readinto`` reads into temporary bytes and
    copies them (twice, with http.client's ``read``): half the speed of the socket for large bodies. None where
    the wrappers are not the expected ones (then the public, slower ``readinto`` is used)."""
    raw = getattr(body, "_raw_stream", None)
    response = getattr(raw, "_fp", None)
    release = getattr(raw, "release_conn", None)
    if not isinstance(response, http.client.HTTPResponse) or release is None or raw.headers.get("Content-Encoding"):
        return None
    return response.readinto, release


def _concat(parts: Sequence[Value], start: int, end: int) -> bytearray:
    """Bytes ``[start, end)`` of the concatenation of ``parts``, copied once into a new buffer (``join``: no
    zero-filling first, which on fresh pages costs more than the copy)."""
    pieces = []
    offset = 0
    for part in parts:
        view = memoryview(part).cast("B")
        lo, hi = max(start, offset), min(end, offset + len(view))
        if lo < hi:
            pieces.append(view[lo - offset : hi - offset])
        offset += len(view)
    return bytearray().join(pieces)


def create_s3_tier(url: str, config: KVTierConfig, metrics: CacheMetrics) -> RemoteTier:
    """The registry's factory for ``s3://`` URLs (see the module docstring)."""
    location = parse_s3_url(url)
    if (config.s3_access_key_id is None) != (config.s3_secret_access_key is None):
        raise ConfigError("s3_access_key_id and s3_secret_access_key must be set together (or neither)")
    if config.remote_ttl_sec:
        log.warning(
            "remote_ttl_sec is not applied to S3 (no per-object expiry): add a lifecycle rule to bucket %s instead",
            location.bucket,
        )
    store = S3Store(make_client(config), location.bucket, workers=config.remote_max_connections)
    prefix = "/".join(p for p in (location.prefix, config.remote_prefix.strip("/")) if p)
    return RemoteTier.from_config("s3", store, config, metrics, prefix=prefix, applies_ttl=False)


def make_client(config: KVTierConfig) -> Any:
    """A boto3 S3 client: settings from ``config`` where given, else boto3's standard chain."""
    session = boto3.session.Session(
        aws_access_key_id=config.s3_access_key_id,
        aws_secret_access_key=config.s3_secret_access_key,
        region_name=config.s3_region,
    )
    return session.client("s3", endpoint_url=config.s3_endpoint_url, config=client_config(config))


def client_config(config: KVTierConfig) -> Config:
    """Timeouts, pool size and retries for a cache: a failing store must turn into misses quickly."""
    timeout = config.remote_timeout_sec or 60.0  # 0: botocore's default
    return Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        max_pool_connections=config.remote_max_connections,
        retries={"mode": "standard", "total_max_attempts": ATTEMPTS},
        # Chunks carry their own CRC-32s (checked on every read), so transport checksums and payload signing
        # would only spend CPU hashing every byte once more.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        s3={"payload_signing_enabled": False},
    )
