"""Object storage as a place for data: `s3://bucket/key` on AWS S3 or any S3-compatible store (MinIO,
Ceph RGW, SeaweedFS, Cloudflare R2, GCS's XML API), read as a stream that survives the network.

The client is boto3's (botocore): the standard AWS environment and files choose the endpoint
(`AWS_ENDPOINT_URL` or `AWS_ENDPOINT_URL_S3`, e.g. http://127.0.0.1:8333 for a local store),
region, profile and credentials; without credentials requests go unsigned (a public bucket, or a
local store without identities). It is made once per process (each DataLoader worker makes its
own: a client does not survive a fork). Cost, measured on a 2-core CPU machine: `import boto3`
0.35 s, a client 0.5-1.5 s (botocore loads its service model), then one HTTP request per ranged GET.
Botocore's own retries are off: they cannot resume a response body cut in the middle, so one policy,
this module's, covers both the requests and the bodies they stream.

A read is a GET from the current byte to the object's end, pinned to the object's ETag once known.
A transient error - a refused, reset or cut connection, a body that ends short, no byte for
`timeout_s` (a stall), HTTP 5xx, 408, 429 or SlowDown - closes it and, after an exponential backoff
with jitter, a new GET resumes at the byte where it stopped: the bytes delivered are exactly those of
an uninterrupted read. Bounded per object by `tries` and by `give_up_s` of time spent failing (from
each error until bytes flow again); past either, ObjectStoreError names the URL, the last error and
the tries. Not transient, at once: 403, 404, a missing bucket, an object that changed while being
read (412 on the pinned ETag), a request the store refuses as malformed.
"""

from __future__ import annotations

import io
import logging
import os
import random
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

log = logging.getLogger(__name__)

SCHEME = "s3://"
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                   "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests"}


class ObjectStoreError(OSError):
    """A read or write of `s3://...` that failed for good; the message names the URL, the error (its
    HTTP status or S3 code) and, after retries, how many tries and how long. (`message` keeps it as
    raised: a tar reader that re-raises an error adds its own arguments to it.)"""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class Retries:
    """How hard a read or write tries (data.read_timeout_s, data.read_tries, data.read_retry_s).
    The defaults ride out a store that is away for a minute or more, and give up before the
    watchdog's floor for a step (faults.watchdog.floor_s, 120 s): a run never hangs on the network."""
    timeout_s: float = 20.0  # no byte for this long: a stall, retried
    tries: int = 30  # transient errors per object before it fails
    give_up_s: float = 100.0  # time spent failing per object (each error until bytes flow again)
    backoff_s: float = 0.5  # the first wait; doubles each time, up to max_backoff_s
    max_backoff_s: float = 10.0


@dataclass
class Counters:
    """What the reads of one reader cost: transient errors retried, seconds in requests and reads from
    the store, bytes read. Saved with the reader's state, so a resumed run counts on."""
    retries: int = 0
    seconds: float = 0.0
    bytes: int = 0

    def state(self) -> dict:
        return {"retries": self.retries, "seconds": self.seconds, "bytes": self.bytes}

    @classmethod
    def from_state(cls, state: dict | None) -> "Counters":
        return cls(**(state or {}))

    @classmethod
    def total(cls, states) -> "Counters":
        """The sum of several readers' states (None for a reader that has none)."""
        out = cls()
        for c in map(cls.from_state, states):
            out.retries, out.seconds, out.bytes = out.retries + c.retries, out.seconds + c.seconds, out.bytes + c.bytes
        return out


@dataclass
class _Clients:
    pid: int = -1
    made: dict = field(default_factory=dict)  # (timeout, endpoint) -> client


_clients = _Clients()


def is_url(path: str) -> bool:
    return str(path).startswith(SCHEME)


def split(url: str) -> tuple[str, str]:
    """s3://bucket/some/key -> (bucket, some/key)."""
    parsed = urlparse(url)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ObjectStoreError(f"{url}: not an s3://bucket/key URL")
    return parsed.netloc, parsed.path.lstrip("/")


def client(timeout_s: float = Retries.timeout_s):
    """This process's S3 client (made at first use, again after a fork or for another endpoint)."""
    if _clients.pid != os.getpid():
        _clients.pid, _clients.made = os.getpid(), {}
    key = (timeout_s, os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    if key not in _clients.made:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config

        session = boto3.session.Session()
        signed = session.get_credentials() is not None
        config = Config(connect_timeout=min(timeout_s, 10.0), read_timeout=timeout_s,
                        retries={"total_max_attempts": 1}, **({} if signed else {"signature_version": UNSIGNED}))
        _clients.made[key] = session.client("s3", config=config)
    return _clients.made[key]


def _status(e: BaseException) -> tuple[int | None, str]:
    response = getattr(e, "response", None) or {}
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode"), response.get("Error", {}).get("Code", "")


def transient(e: BaseException) -> bool:
    """Whether trying again may succeed: the network, a stall, the store's own trouble or throttling."""
    from botocore.exceptions import (ClientError, ConnectionError as BotoConnectionError, HTTPClientError,
                                     IncompleteReadError)

    if isinstance(e, ClientError):
        status, code = _status(e)
        return status in TRANSIENT_STATUS or code in TRANSIENT_CODES
    if isinstance(e, (BotoConnectionError, HTTPClientError, IncompleteReadError, _ShortBody)):
        return True
    return isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.startswith("urllib3")


def describe(e: BaseException) -> str:
    """One line: the HTTP status and S3 code for an answer, the error itself for the rest."""
    status, code = _status(e)
    if status or code:
        message = (getattr(e, "response", {}) or {}).get("Error", {}).get("Message", "")
        return f"HTTP {status} {code}".strip() + (f": {message}" if message else "")
    text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{type(e).__name__}" + (f": {text}" if text else "")


class _ShortBody(Exception):
    """A response body that ended before the bytes it announced (a cut connection, closed cleanly)."""


class Attempts:
    """One object's transient errors: waits with backoff between tries, raises ObjectStoreError past the
    bounds. `ok()` once bytes flow again ends the time being counted."""

    def __init__(self, url: str, retries: Retries, counters: Counters | None, what: str = "read"):
        self.url, self.retries, self.counters, self.what = url, retries, counters, what
        self.tries, self.failing_s, self.since = 0, 0.0, None

    def failed(self, e: BaseException, where: str = "") -> None:
        """After a failed attempt: raise at once if `e` is not transient or a bound is passed; else wait."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
        if not transient(e):
            raise ObjectStoreError(f"{self.url}: {describe(e)} ({self.what}{where})") from None
        self.tries += 1
        spent = self.failing_s + now - self.since
        r = self.retries
        if self.tries >= r.tries or spent >= r.give_up_s:
            raise ObjectStoreError(f"{self.url}: {describe(e)} ({self.what}{where}); gave up after {self.tries} "
                                   f"tries in {spent:.0f} s (data.read_tries={r.tries}, "
                                   f"data.read_retry_s={r.give_up_s:g})") from None
        if self.counters is not None:
            self.counters.retries += 1
        wait = min(r.max_backoff_s, r.backoff_s * 2 ** (self.tries - 1)) * random.uniform(0.5, 1.0)
        wait = min(wait, max(0.0, r.give_up_s - spent))
        level = logging.INFO if self.tries == 1 else logging.WARNING
        log.log(level, "%s: %s (%s%s); try %d of %d in %.1f s", self.url, describe(e), self.what, where,
                self.tries + 1, r.tries, wait)
        time.sleep(wait)

    def ok(self) -> None:
        if self.since is not None:
            self.failing_s += time.monotonic() - self.since
            self.since = None


class ObjectReader(io.RawIOBase):
    """An object read from its start to its end, resuming at the byte where a transient error cut it."""

    def __init__(self, url: str, retries: Retries = Retries(), counters: Counters | None = None):
        super().__init__()
        self.url, self.retries, self.counters = url, retries, counters
        self.bucket, self.key = split(url)
        self.pos, self.size, self.etag, self.body = 0, None, None, None
        self.attempts = Attempts(url, retries, counters)

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        args = {"Bucket": self.bucket, "Key": self.key}
        if self.pos:
            args["Range"] = f"bytes={self.pos}-"
        if self.etag:
            args["IfMatch"] = self.etag
        try:
            response = client(self.retries.timeout_s).get_object(**args)
        except ClientError as e:
            if _status(e)[0] == 412 or _status(e)[1] == "PreconditionFailed":
                raise ObjectStoreError(f"{self.url}: changed while it was being read (its ETag is no longer "
                                       f"{self.etag}); read again from its start") from None
            raise
        if self.size is None:
            self.size = response["ContentLength"]
        self.etag = self.etag or response.get("ETag")
        self.body = response["Body"]

    def _close_body(self) -> None:
        if self.body is not None:
            try:
                self.body.close()
            except Exception:  # noqa: BLE001 (a broken connection may fail to close: it is dropped)
                pass
            self.body = None

    def readinto(self, buffer) -> int:
        want = len(buffer)
        while True:
            if self.size is not None and self.pos >= self.size or want == 0:
                return 0
            started = time.perf_counter()
            try:
                if self.body is None:
                    self._open()
                    if self.pos >= self.size:
                        return 0
                chunk = self.body.read(min(want, self.size - self.pos))
                if not chunk:
                    raise _ShortBody(f"the body ended at byte {self.pos:,} of {self.size:,}")
            except ObjectStoreError:
                raise
            except Exception as e:  # noqa: BLE001 (sorted by `transient`)
                self._close_body()
                if self.counters is not None:
                    self.counters.seconds += time.perf_counter() - started
                self.attempts.failed(e, f" at byte {self.pos:,}" + (f" of {self.size:,}" if self.size else ""))
                continue
            self.attempts.ok()
            n = len(chunk)
            buffer[:n] = chunk
            self.pos += n
            if self.counters is not None:
                self.counters.seconds += time.perf_counter() - started
                self.counters.bytes += n
            return n

    def close(self) -> None:
        self._close_body()
        super().close()


def open_read(url: str, retries: Retries = Retries(), counters: Counters | None = None) -> io.BufferedReader:
    """A buffered file object over ObjectReader (1 MiB reads)."""
    return io.BufferedReader(ObjectReader(url, retries, counters), buffer_size=1 << 20)


def read_bytes(url: str, retries: Retries = Retries(), counters: Counters | None = None) -> bytes:
    with open_read(url, retries, counters) as f:
        return f.read()


def _call(url: str, what: str, retries: Retries, fn):
    """fn() with this module's retries (a request without a body to resume)."""
    attempts = Attempts(url, retries, None, what)
    while True:
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 (sorted by `transient`)
            attempts.failed(e)
            continue
        attempts.ok()
        return out


def exists(url: str, retries: Retries = Retries()) -> bool:
    """Whether the object exists (404 is an answer here, not an error)."""
    from botocore.exceptions import ClientError

    bucket, key = split(url)

    def head():
        try:
            client(retries.timeout_s).head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as e:
            if _status(e)[0] == 404:
                return False
            raise
    return _call(url, "HEAD", retries, head)


def size(url: str, retries: Retries = Retries()) -> int:
    """The object's size in bytes."""
    bucket, key = split(url)
    return _call(url, "HEAD", retries, lambda: client(retries.timeout_s).head_object(Bucket=bucket, Key=key))[
        "ContentLength"]


def list_objects(prefix_url: str, retries: Retries = Retries()) -> list[tuple[str, int]]:
    """(URL, size) of every object under a prefix (s3://bucket/some/prefix/), in key order."""
    bucket, prefix = split(prefix_url)
    out, token = [], None
    while True:
        args = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
        page = _call(prefix_url, "LIST", retries, lambda: client(retries.timeout_s).list_objects_v2(**args))
        out += [(f"{SCHEME}{bucket}/{o['Key']}", o["Size"]) for o in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return sorted(out)
        token = page["NextContinuationToken"]


def list_keys(prefix_url: str, retries: Retries = Retries()) -> list[str]:
    """Every object URL under a prefix, in key order."""
    return [url for url, _ in list_objects(prefix_url, retries)]


def upload(path: str | os.PathLike, url: str, retries: Retries = Retries()) -> None:
    """A local file to `url` as one object (a single PUT below 64 MiB, a multipart upload above, each
    part retried; a failed upload leaves no object under `url`)."""
    bucket, key = split(url)
    size = os.path.getsize(path)
    part = 64 << 20
    c = client(retries.timeout_s)
    if size <= part:
        def put():
            with open(path, "rb") as f:
                c.put_object(Bucket=bucket, Key=key, Body=f)
        _call(url, "PUT", retries, put)
        return
    upload_id = _call(url, "PUT (multipart start)", retries,
                      lambda: c.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"])
    try:
        parts = []
        with open(path, "rb") as f:
            for number, offset in enumerate(range(0, size, part), start=1):
                def put_part(offset=offset, number=number):
                    f.seek(offset)
                    data = f.read(part)
                    return c.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number,
                                         Body=data)["ETag"]
                parts.append({"PartNumber": number, "ETag": _call(url, f"PUT part {number}", retries, put_part)})
        _call(url, "PUT (multipart end)", retries, lambda: c.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
    except BaseException:
        try:
            c.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 (the store's lifecycle rules clear what is left)
            pass
        raise


def put_bytes(data: bytes, url: str, retries: Retries = Retries()) -> None:
    bucket, key = split(url)
    _call(url, "PUT", retries, lambda: client(retries.timeout_s).put_object(Bucket=bucket, Key=key, Body=data))


def delete(urls: list[str], retries: Retries = Retries()) -> None:
    """Objects removed, a thousand per request."""
    by_bucket: dict[str, list[str]] = {}
    for u in urls:
        bucket, key = split(u)
        by_bucket.setdefault(bucket, []).append(key)
    for bucket, keys in by_bucket.items():
        for i in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
            _call(f"{SCHEME}{bucket}/", "DELETE", retries,
                  lambda batch=batch: client(retries.timeout_s).delete_objects(Bucket=bucket, Delete=batch))
