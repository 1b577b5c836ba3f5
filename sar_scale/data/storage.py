"""Object storage for shards: a local directory (the default) or ``s3://bucket/prefix``.

One small interface (:class:`Storage`) so pipelines, the training loader and checkpoints never
branch on where bytes live. Keys are ``/``-separated and relative to the storage root.

Atomicity is the point: a reader must never see half an object. Locally that is write-to-temp +
``os.replace``; on S3 an object only becomes visible when its (multipart) upload completes, and we
upload through boto3's transfer manager (``upload_file``). Credentials come from the standard
AWS chain (env, profile, instance role); ``AWS_ENDPOINT_URL`` is honoured for MinIO / moto. They
are never logged or shown in a repr.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import shutil
import tempfile
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

from sar_scale.utils.atomic import TMP_MARK, atomic_path
from sar_scale.utils.redact import redact_text

logger = logging.getLogger(__name__)

# A temp object left by a crashed local write has TMP_MARK in its name (utils/atomic.py); `list` hides
# them and `clean_temp` removes them, so they are never visible to readers of shard names.


class StorageError(RuntimeError):
    """A storage operation failed for good (after retries): message names the URL and the cause."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The key does not exist."""


def _check_key(key: str) -> str:
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in key.split("/")):
        raise ValueError(f"invalid storage key {key!r}: must be a relative '/'-separated path "
                         "without '.', '..' or empty parts")
    return key


class Storage(ABC):
    """Put/get/list/delete bytes under a root URL; ``put_*`` are atomic."""

    root: str

    @abstractmethod
    def put_file(self, local: str | Path, key: str) -> None:
        """Upload a local file atomically (all or nothing visible under ``key``)."""

    @abstractmethod
    def put_bytes(self, data: bytes, key: str) -> None:
        """Write ``data`` atomically under ``key``."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Whole object; raises :class:`StorageNotFound` if absent."""

    @abstractmethod
    def get_range(self, key: str, offset: int, size: int) -> bytes:
        """``size`` bytes from ``offset`` (one Range GET on S3) - a loader reads one sample this way."""

    @abstractmethod
    def get_file(self, key: str, local: str | Path) -> Path:
        """Download to a local path."""

    @abstractmethod
    def open_read(self, key: str) -> IO[bytes]:
        """A streaming binary reader (S3: the response body, not buffered in memory)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def iter_list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` in sorted (code point) order, lazily, page by page: memory does not grow
        with the number of keys (S3: 1000 per page; local: one directory at a time)."""

    def list(self, prefix: str = "") -> list[str]:
        """Keys under ``prefix`` (relative to the root), sorted; in-flight temp objects excluded."""
        return list(self.iter_list(prefix))

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix`` (page by page); returns how many."""
        if not prefix:
            raise ValueError("delete_prefix: refusing to delete the whole storage root")
        n = 0
        for k in self.iter_list(prefix):
            self.delete(k)
            n += 1
        return n

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error (idempotent cleanup)."""

    @abstractmethod
    def url(self, key: str = "") -> str:
        """Full URL/path of ``key`` usable by ``webdataset.WebDataset`` (after register_webdataset_s3)."""

    def clean_temp(self) -> int:
        """Remove temp objects left by crashed writers; returns how many. No-op where writes are atomic."""
        return 0


class LocalStorage(Storage):
    """A directory; atomic writes by temp file in the same directory + ``os.replace``."""

    def __init__(self, root: str | Path):
        self.path = Path(root).expanduser().resolve()
        self.path.mkdir(parents=True, exist_ok=True)
        self.root = str(self.path)

    def __repr__(self) -> str:
        return f"LocalStorage({self.root!r})"

    def _p(self, key: str) -> Path:
        return self.path / _check_key(key)

    def _atomic_write(self, key: str, writer) -> None:
        with atomic_path(self._p(key)) as tmp, open(tmp, "wb") as f:
            writer(f)

    def put_file(self, local: str | Path, key: str) -> None:
        with open(local, "rb") as src:
            self._atomic_write(key, lambda f: shutil.copyfileobj(src, f, 1 << 20))

    def put_bytes(self, data: bytes, key: str) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._p(key).read_bytes()
        except FileNotFoundError:
            raise StorageNotFound(f"{self.url(key)}: not found") from None

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"get_range({key!r}): offset and size must be >= 0, got {offset}, {size}")
        try:
            with open(self._p(key), "rb") as f:
                f.seek(offset)
                data = f.read(size)
        except FileNotFoundError:
            raise StorageNotFound(f"{self.url(key)}: not found") from None
        if len(data) != size:
            raise StorageError(f"{self.url(key)}: range {offset}+{size} beyond end of object")
        return data

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(self._p(key), local)
        except FileNotFoundError:
            raise StorageNotFound(f"{self.url(key)}: not found") from None
        return local

    def open_read(self, key: str) -> IO[bytes]:
        try:
            return open(self._p(key), "rb")
        except FileNotFoundError:
            raise StorageNotFound(f"{self.url(key)}: not found") from None

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._p(key).stat().st_size
        except FileNotFoundError:
            raise StorageNotFound(f"{self.url(key)}: not found") from None

    def _walk(self, prefix: str) -> Iterator[str]:
        for dirpath, _, files in os.walk(self.path):
            for fn in files:
                rel = os.path.relpath(os.path.join(dirpath, fn), self.path).replace(os.sep, "/")
                if rel.startswith(prefix):
                    yield rel

    def iter_list(self, prefix: str = "") -> Iterator[str]:
        # Sorted like S3 (by full key): a directory "d" sorts as "d/", so walking each level in that
        # order yields keys in global order while holding one directory listing at a time.
        def walk(d: Path, rel: str) -> Iterator[str]:
            try:
                entries = list(os.scandir(d))
            except (FileNotFoundError, NotADirectoryError):
                return
            items = sorted((e.name + "/" if e.is_dir() else e.name, e) for e in entries)
            for name, e in items:
                key = rel + name
                if name.endswith("/"):
                    if key.startswith(prefix) or prefix.startswith(key):
                        yield from walk(Path(e.path), key)
                elif key.startswith(prefix) and TMP_MARK not in key:
                    yield key

        yield from walk(self.path, "")

    def delete(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        n = super().delete_prefix(prefix)
        top = self.path / prefix.rstrip("/")
        if prefix.endswith("/") and top.is_dir():  # no empty folders left where the objects were
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True):
                if not any(d.iterdir()):
                    d.rmdir()
            if not any(top.iterdir()):
                top.rmdir()
        return n

    def url(self, key: str = "") -> str:
        return str(self._p(key)) if key else self.root

    def clean_temp(self) -> int:
        n = 0
        for k in self._walk(""):
            if TMP_MARK in k:
                (self.path / k).unlink(missing_ok=True)
                n += 1
        return n


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")`` (prefix without leading/trailing slash)."""
    pr = urlparse(url)
    if pr.scheme != "s3" or not pr.netloc:
        raise ValueError(f"not an s3 URL (want s3://bucket/prefix): {redact_text(url)!r}")
    return pr.netloc, pr.path.strip("/")


# Errors that retrying will not fix: surface them at once with a clear message.
_PERMANENT = {"NoSuchBucket", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
              "AllAccessDisabled", "InvalidBucketName", "403", "400"}


def make_s3_client(endpoint_url: str | None = None, region: str | None = None,
                   max_attempts: int = 8, connect_timeout: float = 10.0, read_timeout: float = 60.0):
    """A boto3 S3 client with bounded adaptive retries and timeouts (a dead endpoint fails, not hangs).

    Credentials and region come from the standard AWS chain; ``AWS_ENDPOINT_URL`` (or the explicit
    ``endpoint_url``) points it at MinIO/moto/any S3-compatible server.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    extra: dict[str, Any] = {}
    if endpoint:  # MinIO & co. on a plain host name need path-style addressing
        extra["s3"] = {"addressing_style": "path"}
    cfg = Config(retries={"mode": "adaptive", "max_attempts": max_attempts},
                 connect_timeout=connect_timeout, read_timeout=read_timeout, **extra)
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    # A fresh session per client: boto3's default session is not thread-safe to create clients from.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=cfg)


def _body_errors() -> tuple[type[BaseException], ...]:
    """Errors raised while a GET's body is streamed (after botocore's call retries have returned)."""
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError

    return ResponseStreamingError, IncompleteReadError, ReadTimeoutError


def _backoff(attempt: int) -> None:
    """Sleep before retry ``attempt`` (1-based): exponential with full jitter, capped at 20 s."""
    import random
    import time

    time.sleep(min(20.0, random.random() * 2 ** (attempt - 1)))


class _ResumableS3Body(io.RawIOBase):
    """The raw stream behind :meth:`S3Storage.open_read`.

    botocore retries whole calls, but a reset while a streamed body is read happens after its retry
    loop returned; boto3's own download_fileobj would resume, but only into a seekable file, and the
    pipeline streams tars (possibly GBs) without spooling them. So the resume is done here: count the
    bytes handed out, and on a body error (or an early EOF) issue a ranged GET from that offset.
    """

    def __init__(self, storage: S3Storage, key: str):
        super().__init__()
        self.storage, self.key = storage, key
        self.pos = 0
        self.attempts = storage.attempts
        r = storage._call("get", key, storage.client.get_object, Bucket=storage.bucket, Key=storage._k(key))
        self.etag, self.size, self.body = r.get("ETag"), int(r["ContentLength"]), r["Body"]
        self.resumes = 0

    def readable(self) -> bool:
        return True

    def _reopen(self, err: Exception | str, attempt: int) -> None:
        if attempt >= self.attempts:
            raise StorageError(f"get {self.storage.url(self.key)} failed after {attempt} body attempts at byte "
                               f"{self.pos} of {self.size}: {redact_text(str(err))}")
        logger.warning("%s: body cut at byte %d of %d (%s), resuming (%d/%d)", self.storage.url(self.key),
                       self.pos, self.size, err if isinstance(err, str) else type(err).__name__, attempt,
                       self.attempts - 1)
        _backoff(attempt)
        try:
            self.body.close()
        except Exception:  # noqa: BLE001 - the old connection is already broken
            pass
        kw = {"IfMatch": self.etag} if self.etag else {}
        st = self.storage
        r = st._call("range-get", self.key, st.client.get_object, Bucket=st.bucket, Key=st._k(self.key),
                     Range=f"bytes={self.pos}-", **kw)
        self.body = r["Body"]
        self.resumes += 1

    def readinto(self, b) -> int:
        from botocore.exceptions import IncompleteReadError
        from urllib3.exceptions import ProtocolError

        if self.pos >= self.size:
            return 0
        attempt = 0
        while True:
            try:
                data = self.body.read(len(b))
                if not data:  # an early EOF is a cut too (a proxy may close without an error)
                    raise IncompleteReadError(actual_bytes=self.pos, expected_bytes=self.size)
            except (*_body_errors(), ProtocolError, OSError) as e:
                attempt += 1
                self._reopen(e, attempt)
                continue
            n = len(data)
            b[:n] = data
            self.pos += n
            return n

    def close(self) -> None:
        if not self.closed:
            try:
                self.body.close()
            finally:
                super().close()


class S3Storage(Storage):
    """``s3://bucket/prefix`` through boto3 (retries with backoff, transfer manager uploads)."""

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 max_attempts: int = 8, connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 multipart_threshold: int = 64 << 20, multipart_chunksize: int = 16 << 20):
        self.bucket, self.prefix = parse_s3_url(url)
        self.root = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        self._client_kw = dict(endpoint_url=endpoint_url, region=region, max_attempts=max_attempts,
                               connect_timeout=connect_timeout, read_timeout=read_timeout)
        if multipart_chunksize < 5 << 20:
            raise ValueError(f"multipart_chunksize {multipart_chunksize}: S3 parts must be >= 5 MiB")
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self._local = threading.local()

    def __repr__(self) -> str:  # no credentials, ever
        ep = self._client_kw["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL") or "aws"
        return f"S3Storage({self.root!r}, endpoint={redact_text(ep)!r})"

    @property
    def attempts(self) -> int:
        """Body-read attempts, as botocore counts calls: the first one + the configured retries."""
        return int(self._client_kw["max_attempts"]) + 1

    # boto3 clients are not picklable: Ray workers rebuild theirs lazily (one per thread).
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_local", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    @property
    def client(self):
        c = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = make_s3_client(**self._client_kw)
        return c

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, op: str, key: str, err: Exception) -> StorageError:
        from botocore.exceptions import ClientError

        where = f"s3://{self.bucket}/{self._k(key)}" if key else self.root
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return StorageNotFound(f"{where}: not found")
            hint = " (permanent: check bucket name and credentials)" if code in _PERMANENT else ""
            return StorageError(f"{op} {where} failed: {code}{hint}")
        # EndpointConnectionError, ReadTimeout, ... after botocore's retries are exhausted.
        return StorageError(f"{op} {where} failed after retries: {type(err).__name__}: {redact_text(str(err))}")

    def _call(self, op: str, key: str, fn, *a, **kw):
        try:
            return fn(*a, **kw)
        except Exception as e:  # noqa: BLE001 - translated into a StorageError with context
            from botocore.exceptions import BotoCoreError, ClientError

            if isinstance(e, (BotoCoreError, ClientError)):
                raise self._fail(op, key, e) from None
            from boto3.exceptions import S3UploadFailedError

            if isinstance(e, S3UploadFailedError):  # the transfer manager's wrapper of a failed PutObject
                raise StorageError(f"{op} {self.url(key)} failed after retries: {redact_text(str(e))}") from None
            raise

    def put_file(self, local: str | Path, key: str) -> None:
        from boto3.s3.transfer import TransferConfig

        cfg = TransferConfig(multipart_threshold=self.multipart_threshold,
                             multipart_chunksize=self.multipart_chunksize, use_threads=True)
        # upload_file is the transfer manager: multipart for big files, the object appears only
        # when CompleteMultipartUpload succeeds, and a failed upload is aborted - atomic.
        try:
            self._call("upload", key, self.client.upload_file, str(local), self.bucket, self._k(key),
                       Config=cfg)
        except BaseException as upload_error:
            if os.path.getsize(local) < self.multipart_threshold:
                raise  # a single PutObject: nothing incomplete can be left
            # A lost reply to CompleteMultipartUpload: S3 made the object, the retry then finds no such
            # upload and the transfer manager reports a failure. The object's ETag tells: the same
            # parts in the same order give the same multipart ETag, so it is this file's upload.
            if isinstance(upload_error, Exception) and self._holds_upload_of(local, key):
                logger.warning("%s: the multipart upload completed though its reply was lost (%s); kept",
                               self.url(key), redact_text(str(upload_error))[:200])
                return
            # The transfer manager aborts on failure, but its abort can fail too (the same outage):
            # never leave a billed, invisible incomplete upload of this key behind.
            try:
                self.abort_uploads(key)
            except Exception as e:  # noqa: BLE001 - the upload error is the one to report
                logger.warning("%s: could not abort incomplete multipart uploads: %s", self.url(key), e)
            raise

    def _holds_upload_of(self, local: str | Path, key: str) -> bool:
        """Whether ``key`` is the multipart upload of ``local`` (size and multipart ETag match)."""
        from s3transfer.utils import ChunksizeAdjuster

        try:
            head = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._k(key))
        except StorageError:
            return False
        size = os.path.getsize(local)
        if int(head.get("ContentLength", -1)) != size:
            return False
        part = ChunksizeAdjuster().adjust_chunksize(self.multipart_chunksize, size)  # what upload_file used
        digests = []
        with open(local, "rb") as f:
            while chunk := f.read(part):
                digests.append(hashlib.md5(chunk, usedforsecurity=False).digest())
        want = f'"{hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"'
        return head.get("ETag") == want

    def abort_uploads(self, key: str | None = None) -> int:
        """Abort incomplete multipart uploads of ``key`` (every key under the prefix when None);
        returns how many. Only call for keys no live writer is uploading."""
        prefix = self._k(key) if key else (f"{self.prefix}/" if self.prefix else "")

        def run() -> int:
            n = 0
            for page in self.client.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket,
                                                                                     Prefix=prefix):
                for up in page.get("Uploads", []):
                    if key is not None and up["Key"] != prefix:
                        continue
                    try:
                        self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                           UploadId=up["UploadId"])
                    except Exception as e:  # noqa: BLE001 - already gone (aborted by s3transfer) is fine
                        from botocore.exceptions import ClientError

                        if not (isinstance(e, ClientError)
                                and e.response.get("Error", {}).get("Code") == "NoSuchUpload"):
                            raise
                    n += 1
            return n

        return self._call("abort-multipart", key or "", run)

    def put_bytes(self, data: bytes, key: str) -> None:
        self._call("put", key, self.client.put_object, Bucket=self.bucket, Key=self._k(key), Body=data)

    def _read_body(self, key: str, **kw: Any) -> bytes:
        """GET + read the whole body, retrying a body cut mid-stream.

        botocore retries failed *calls*, but a connection reset while the body is being read happens
        after its retry loop has returned (ResponseStreamingError / IncompleteReadError), so that
        case is retried here, with the same attempt budget and exponential backoff with jitter.
        """
        attempts = self.attempts
        for i in range(attempts):
            body = self.client.get_object(Bucket=self.bucket, Key=self._k(key), **kw)["Body"]
            try:
                return body.read()
            except _body_errors() as e:
                if i == attempts - 1:
                    raise
                logger.warning("%s: body read failed (%s), retrying (%d/%d)", self.url(key), type(e).__name__,
                               i + 1, attempts - 1)
                _backoff(i + 1)
        raise AssertionError("unreachable")

    def get_bytes(self, key: str) -> bytes:
        return self._call("get", key, self._read_body, key)

    def get_range(self, key: str, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError(f"get_range({key!r}): offset and size must be >= 0, got {offset}, {size}")
        if size == 0:
            return b""

        data = self._call("range-get", key, self._read_body, key, Range=f"bytes={offset}-{offset + size - 1}")
        if len(data) != size:
            raise StorageError(f"{self.url(key)}: range {offset}+{size} beyond end of object")
        return data

    def get_file(self, key: str, local: str | Path) -> Path:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        self._call("download", key, self.client.download_file, self.bucket, self._k(key), str(local))
        return local

    def open_read(self, key: str) -> IO[bytes]:
        """A buffered stream over a resumable GET: a connection cut mid-body re-opens the object at the
        byte where it stopped (``Range`` + ``If-Match`` on the first response's ETag, so a replaced object
        is an error, never a splice of two versions), with the same attempt budget as the calls."""
        return io.BufferedReader(_ResumableS3Body(self, key), buffer_size=1 << 20)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except StorageNotFound:
            return False

    def size(self, key: str) -> int:
        r = self._call("head", key, self.client.head_object, Bucket=self.bucket, Key=self._k(key))
        return int(r["ContentLength"])

    def iter_list(self, prefix: str = "") -> Iterator[str]:
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        cut = len(self.prefix) + 1 if self.prefix else 0
        pages = self._call("list", prefix, lambda: iter(self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=full)))
        while True:  # S3 lists in UTF-8 byte order = Python's code point order
            page = self._call("list", prefix, next, pages, None)
            if page is None:
                return
            for o in page.get("Contents", []):
                k = o["Key"][cut:]
                if k and TMP_MARK not in k:
                    yield k

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._k(key))

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{self._k(key)}" if key else self.root

    def delete_prefix(self, prefix: str) -> int:
        """Batched: one DeleteObjects request per listing page (up to 1000 keys)."""
        if not prefix:
            raise ValueError("delete_prefix: refusing to delete the whole storage root")
        n, batch = 0, []

        def flush() -> None:
            r = self._call("delete", prefix, self.client.delete_objects, Bucket=self.bucket,
                           Delete={"Objects": [{"Key": self._k(k)} for k in batch], "Quiet": True})
            if r.get("Errors"):
                e = r["Errors"][0]
                raise StorageError(f"delete s3://{self.bucket}/{e.get('Key')} failed: {e.get('Code')}")

        for k in self.iter_list(prefix):
            batch.append(k)
            if len(batch) == 1000:
                flush()
                n, batch = n + len(batch), []
        if batch:
            flush()
            n += len(batch)
        return n

    def clean_temp(self) -> int:
        """Abort multipart uploads under the prefix left by a crashed writer (invisible to readers,
        but they cost storage). Call only when no other writer is active on this prefix."""
        return self.abort_uploads(None)


def open_storage(url: str | Path, **kwargs: Any) -> Storage:
    """``s3://bucket/prefix`` -> :class:`S3Storage`; anything else (path, ``file://``) -> local."""
    s = str(url)
    if s.startswith("s3://"):
        return S3Storage(s, **kwargs)
    if s.startswith("file://"):
        s = urlparse(s).path
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
        raise ValueError(f"unsupported storage URL {redact_text(s)!r}: use a local path or s3://bucket/prefix")
    return LocalStorage(s)


class _S3Writer(io.RawIOBase):
    """Spool to a local temp file; upload atomically on close (used for ``gopen(s3://..., "wb")``)."""

    def __init__(self, url: str):
        self.bucket, self.key = parse_s3_url(url)
        self._tmp = tempfile.NamedTemporaryFile(prefix="sar-s3-", suffix=".part", delete=False)  # noqa: SIM115

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return self._tmp.write(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._tmp.close()
            S3Storage(f"s3://{self.bucket}").put_file(self._tmp.name, self.key)
        finally:
            os.unlink(self._tmp.name)
            super().close()


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any) -> IO[bytes]:
    """webdataset opener for ``s3://``: streams the object body (no local copy)."""
    bucket, key = parse_s3_url(url)
    if mode == "rb":
        return S3Storage(f"s3://{bucket}").open_read(key)
    if mode == "wb":
        return _S3Writer(url)
    raise ValueError(f"gopen_s3: unsupported mode {mode!r}")


def register_webdataset_s3() -> None:
    """Teach ``webdataset`` the ``s3://`` scheme (it has none built in); idempotent."""
    import webdataset

    webdataset.gopen_schemes["s3"] = gopen_s3
