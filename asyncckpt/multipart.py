"""Multipart uploads in parallel and in bounded memory, over any S3-style client call.

``storage.py`` hands this module one function, ``call(method, **params)``,
that sends an S3 API request (s3fs's ``call_s3``) and returns the parsed
reply, and a ``retry(fn, what)`` that retries transient failures; nothing
here knows URLs, fsspec or credentials.

``MultipartWriter`` is a file that cuts what is written into parts of
``Upload.part_bytes`` and uploads up to ``Upload.concurrency`` of them at a
time on its own threads.  Call order: ``write`` any number of times, then
``commit`` (publishes the object) or ``abort`` (publishes nothing and
releases the parts already uploaded).  A file smaller than one part is a
single PUT.  ``write`` blocks while ``concurrency`` parts are in flight, so a
file holds at most about ``(concurrency + 1) * part_bytes`` of memory.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_PART_BYTES = 5 << 20
MAX_PART_BYTES = 5 << 30
MAX_PARTS = 10_000


class S3Call(Protocol):
    """Sends one S3 API request (``"upload_part"``, ...) and returns the parsed reply."""

    def __call__(self, method: str, **params: Any) -> dict[str, Any]: ...


RetryCall = Callable[[Callable[[], Any], str], Any]
"""``retry(fn, what)``: ``fn()`` retried on transient errors; ``what`` names it in logs."""


@dataclass(frozen=True, kw_only=True)
class Upload:
    """How files go up to an object store that takes multipart uploads (S3)."""

    part_bytes: int = 16 << 20
    """Size of every part but the last (5 MiB to 5 GiB); a smaller file is a single PUT.
    S3 allows 10,000 parts, so one file may hold up to 10,000 * part_bytes."""
    concurrency: int = 4
    """Parts of one file uploading at once; a file being written holds at most
    about ``(concurrency + 1) * part_bytes`` of memory."""

    def __post_init__(self) -> None:
        p = self.part_bytes
        if isinstance(p, bool) or not isinstance(p, int) or not MIN_PART_BYTES <= p <= MAX_PART_BYTES:
            raise ConfigError.field("Upload.part_bytes", p,
                                    f"an integer in [{MIN_PART_BYTES}, {MAX_PART_BYTES}] (5 MiB to 5 GiB)")
        c = self.concurrency
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ConfigError.field("Upload.concurrency", c, "an integer >= 1")


class MultipartWriter:
    """One object being written: parts upload in parallel; see the module docstring."""

    def __init__(self, call: S3Call, retry: RetryCall, *, bucket: str, key: str, url: str,
                 upload: Upload) -> None:
        self._send, self._retry, self._url = call, retry, url
        self._bucket, self._key = bucket, key
        self._part_bytes, self._concurrency = upload.part_bytes, upload.concurrency
        self._slots = threading.BoundedSemaphore(self._concurrency)
        self._pool: ThreadPoolExecutor | None = None
        self._parts: list[Future[dict[str, Any]]] = []
        self._failed: BaseException | None = None
        self._upload_id: str | None = None
        self._buf = bytearray()

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        n = view.nbytes
        while view.nbytes:
            take = min(view.nbytes, self._part_bytes - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) >= self._part_bytes:
                self._send_part()
        return n

    def flush(self) -> None:
        """Parts go up as they fill; the rest goes up on ``commit``."""

    @property
    def parts_started(self) -> int:
        return len(self._parts)

    def _call(self, method: str, what: str, **params: Any) -> dict[str, Any]:
        return self._retry(lambda: self._send(method, Bucket=self._bucket, Key=self._key, **params),
                           f"{what} {self._url}")

    def _send_part(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._upload_id is None:
            self._upload_id = self._call("create_multipart_upload", "start upload of")["UploadId"]
            self._pool = ThreadPoolExecutor(self._concurrency, thread_name_prefix="asyncckpt-part")
        number = len(self._parts) + 1
        if number > MAX_PARTS:
            raise ConfigError(f"{self._url} needs more than {MAX_PARTS} parts of "
                              f"{self._part_bytes} bytes: raise Upload.part_bytes")
        self._slots.acquire()  # at most `concurrency` parts in flight: bounded memory
        data, self._buf = self._buf, bytearray()  # handed over, not copied
        assert self._pool is not None
        fut = self._pool.submit(self._put_part, number, data)
        fut.add_done_callback(self._part_done)
        self._parts.append(fut)

    def _put_part(self, number: int, data: bytearray) -> dict[str, Any]:
        out = self._call("upload_part", f"upload part {number} of", PartNumber=number,
                         UploadId=self._upload_id, Body=data)
        checksums = {k: v for k, v in out.items() if k.startswith("Checksum") and k != "ChecksumType"}
        return {"PartNumber": number, "ETag": out["ETag"], **checksums}

    def _part_done(self, fut: Future[dict[str, Any]]) -> None:
        self._slots.release()
        if not fut.cancelled() and fut.exception() is not None and self._failed is None:
            self._failed = fut.exception()

    def commit(self) -> None:
        """Publish the object: one PUT, or the last part and the completion of the upload."""
        if self._upload_id is None:
            self._call("put_object", "put", Body=self._buf)
            self._buf = bytearray()
            return
        if self._buf:
            self._send_part()
        parts = [f.result() for f in self._parts]
        self._call("complete_multipart_upload", "complete upload of", UploadId=self._upload_id,
                   MultipartUpload={"Parts": parts})
        self._upload_id = None
        self._shutdown()

    def abort(self) -> None:
        """Publish nothing: stop queued parts, wait for running ones, abort the upload."""
        for f in self._parts:
            f.cancel()
        self._shutdown()
        upload_id, self._upload_id = self._upload_id, None
        if upload_id is not None:
            self._call("abort_multipart_upload", "abort upload of", UploadId=upload_id)
            log.debug("aborted the multipart upload of %s", self._url)

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._buf = bytearray()


def abort_unfinished(call: S3Call, retry: RetryCall, *, bucket: str, prefix: str, url: str) -> int:
    """Abort every unfinished multipart upload whose key starts with ``prefix``; how many.

    Without permission to list them it warns and returns 0: a bucket lifecycle
    rule (``AbortIncompleteMultipartUpload``) is then the safety net.
    """
    uploads: list[dict[str, Any]] = []
    marker: dict[str, str] = {}
    try:
        while True:
            out = retry(lambda: call("list_multipart_uploads", Bucket=bucket, Prefix=prefix, **marker),
                        f"list unfinished uploads of {url}")
            uploads += out.get("Uploads") or []
            if not out.get("IsTruncated"):
                break
            marker = {"KeyMarker": out["NextKeyMarker"], "UploadIdMarker": out["NextUploadIdMarker"]}
    except PermissionError as e:
        log.warning("cannot list unfinished uploads under %s (%s); a bucket lifecycle rule "
                    "(AbortIncompleteMultipartUpload) will clean them up", url, type(e).__name__)
        return 0
    for u in uploads:
        retry(lambda u=u: call("abort_multipart_upload", Bucket=bucket, Key=u["Key"],
                               UploadId=u["UploadId"]), f"abort upload of {bucket}/{u['Key']}")
    if uploads:
        log.warning("aborted %d unfinished multipart upload(s) under %s", len(uploads), url)
    return len(uploads)
