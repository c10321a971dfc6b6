"""The supernode's on-disk piece cache and the file server on the CDN port.

Layout: ``<home>/repo/download/<id[:3]>/<id>`` holds the raw bytes of a task
(piece n at offset n * pieceSize) and ``<id>.meta`` a JSON record of where
they came from.  The download port serves only those data files, by Range,
so nginx pointed at ``<home>/repo`` could do the same job at scale (but
without ``--max-upload-bandwidth``: here every response draws from one upload
bucket, so the CDN's egress has a limit, which Dragonfly's nginx never had;
nor had it a cap on the sends one client holds, ``maxUploadsPerClient``, or
``writeIdleTimeout`` for a client that stops reading).
"""

from __future__ import annotations

import enum
import hmac
import json
import os
import re
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web import resource
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET

from dfly.codes import TASK_KEY_HEADER
from dfly.config import MAX_UPLOADS_PER_CLIENT, WRITE_IDLE_TIMEOUT
from dfly.pieces import is_task_id, piece_count, piece_digest
from dfly.private import make_private_dirs, open_private, private_dir
from dfly.ratelimit import TokenBucket, send_range
from dfly.refusals import RefusalLog
from dfly.uploadslots import UploadSlots, client_of, refuse_busy

META_VERSION = 1


class FetchState(str, enum.Enum):
    """Where a task's bytes are; the same words in memory and in ``.meta``."""

    OPENING = "opening"  # asking the source
    FETCHING = "fetching"  # the body streams into the cache
    VERIFYING = "verifying"  # every byte is in; checking the whole-file digest
    DONE = "done"  # complete and checked: a cache entry
    FAILED = "failed"  # nothing of it is served (and nothing stays cached)


#: What a ``.meta`` of an older dfly said for a fetch in progress.
_OLD_STATES = {"running": FetchState.FETCHING}


def _state(value: str | FetchState) -> FetchState:
    """A state from memory or from a ``.meta`` (ValueError: not one of ours)."""
    if isinstance(value, FetchState):
        return value
    return _OLD_STATES.get(value) or FetchState(value)


@attrs.frozen
class CacheMeta:
    """What the cache knows about one task's bytes; persisted as ``<id>.meta``."""

    task_id: str
    url: str
    length: int
    piece_size: int
    piece_digests: tuple[str, ...] = ()
    etag: str | None = None
    last_modified: str | None = None
    state: FetchState = attrs.field(default=FetchState.FETCHING, converter=_state)
    md5: str | None = None
    identifier: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "version": META_VERSION,
            "taskId": self.task_id,
            "url": self.url,
            "length": self.length,
            "pieceSize": self.piece_size,
            "pieceDigests": list(self.piece_digests),
            "etag": self.etag,
            "lastModified": self.last_modified,
            "state": self.state.value,
            "md5": self.md5,
            "identifier": self.identifier,
        }

    @classmethod
    def from_json(cls, data: Any) -> "CacheMeta":
        if not isinstance(data, dict):
            raise ValueError("meta is not a JSON object")
        if data.get("version") != META_VERSION:
            raise ValueError(f"unsupported meta version {data.get('version')!r}")
        return cls(
            task_id=str(data["taskId"]),
            url=str(data["url"]),
            length=int(data["length"]),
            piece_size=int(data["pieceSize"]),
            piece_digests=tuple(str(d) for d in data["pieceDigests"]),
            etag=data.get("etag"),
            last_modified=data.get("lastModified"),
            state=str(data["state"]),
            md5=data.get("md5"),
            identifier=data.get("identifier"),
        )


@attrs.define(eq=False)
class CdnCache:
    """Paths and metadata of cached tasks under ``<home>/repo``."""

    home: str

    @property
    def repo(self) -> str:
        return os.path.join(self.home, "repo")

    def data_path(self, task_id: str) -> str:
        return os.path.join(self.repo, "download", task_id[:3], task_id)

    def meta_path(self, task_id: str) -> str:
        return self.data_path(task_id) + ".meta"

    @staticmethod
    def url_path(task_id: str) -> str:
        """The path a peer GETs on the download port."""
        return f"/download/{task_id[:3]}/{task_id}"

    def ensure(self) -> "CdnCache":
        """Create ``repo/download`` (or tighten it, and the home): owner-only, as everything under it.

        The cache holds blobs fetched with callers' credentials.  Only the
        directories are tightened: an older dfly's 0644 entries sit behind
        them (see `dfly.private`).
        """
        for path in (self.home, self.repo, os.path.join(self.repo, "download")):
            private_dir(path)
        return self

    def open_for_write(self, task_id: str) -> int:
        """A fresh, empty data file (0600, in a 0700 directory); returns its descriptor."""
        path = self.data_path(task_id)
        make_private_dirs(os.path.dirname(path))
        return open_private(path, os.O_WRONLY | os.O_TRUNC)

    def load_meta(self, task_id: str) -> CacheMeta | None:
        """The stored meta of a complete, intact cache entry, or None.

        A meta that is unreadable, for another task, not finished, or whose data
        file has the wrong size is no cache hit: the task is fetched again.
        """
        try:
            with open(self.meta_path(task_id), encoding="utf-8") as f:
                meta = CacheMeta.from_json(json.load(f))
            size = os.path.getsize(self.data_path(task_id))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: ``[[[[...``
            return None
        if meta.task_id != task_id or meta.state != FetchState.DONE or size != meta.length:
            return None
        if meta.piece_size <= 0 or len(meta.piece_digests) != piece_count(meta.length, meta.piece_size):
            return None
        return meta

    def load_partial(self, task_id: str) -> CacheMeta | None:
        """The meta of a fetch that was cut off (a restart), if it can be resumed.

        Resuming needs the length, a validator to send as ``If-Range`` and at
        least one full piece recorded; the pieces themselves are checked
        again against their digests before they count (`verified_prefix`).
        """
        try:
            with open(self.meta_path(task_id), encoding="utf-8") as f:
                meta = CacheMeta.from_json(json.load(f))
        except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: ``[[[[...``
            return None
        if meta.task_id != task_id or meta.state != FetchState.FETCHING or meta.length <= 0:
            return None
        if meta.piece_size <= 0 or not meta.piece_digests or not (meta.etag or meta.last_modified):
            return None
        if len(meta.piece_digests) >= piece_count(meta.length, meta.piece_size):
            return None
        return meta

    def verified_prefix(self, meta: CacheMeta) -> int:
        """How many leading pieces of the data file still match ``meta``'s digests (blocking)."""
        good = 0
        try:
            with open(self.data_path(meta.task_id), "rb") as f:
                for digest in meta.piece_digests:
                    data = f.read(meta.piece_size)
                    if len(data) != meta.piece_size or piece_digest(data) != digest:
                        break
                    good += 1
        except OSError:
            return 0
        return good

    def open_for_resume(self, task_id: str) -> int:
        """The existing data file, for writing after its verified prefix."""
        return os.open(self.data_path(task_id), os.O_WRONLY)

    def remove(self, task_id: str) -> None:
        """Forget a task's bytes and meta (a failed or wrong fetch)."""
        for path in (self.data_path(task_id), self.meta_path(task_id)):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def save_meta(self, meta: CacheMeta) -> None:
        """Write the meta atomically, so a crash never leaves half a record."""
        path = self.meta_path(meta.task_id)
        make_private_dirs(os.path.dirname(path))
        tmp = path + ".tmp"
        with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as f:
            json.dump(meta.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


_PREFIX = re.compile(r"\A[0-9a-f]{3}\Z")
_RANGE = re.compile(r"\Abytes=(\d+)?-(\d+)?\Z")


def parse_byte_range(header: bytes | None, size: int) -> tuple[int, int] | None:
    """The (start, end) a single ``Range`` asks for, clipped to ``size``.

    None means "send the whole file": no header, or one we may ignore
    (several ranges, or not valid syntax).  A range that starts at or after
    the end raises `ValueError` (416).
    """
    match = _RANGE.match((header or b"").decode("latin-1").strip())
    if match is None or (match.group(1) is None and match.group(2) is None):
        return None
    first, last = match.group(1), match.group(2)
    if first is None:  # suffix: the last N bytes
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(size - suffix, 0), size - 1
    start = int(first)
    end = size - 1 if last is None else min(int(last), size - 1)
    if last is not None and int(last) < start:
        return None  # invalid syntax: ignored
    if start >= size:
        raise ValueError("range starts past the end")
    return start, end


def _other_method(request: IRequest) -> bytes | None:
    """The 405 body for a method other than GET and HEAD, or None.

    twisted.web answers a method outside GET, HEAD and POST (``PUT``,
    ``DELETE``, an unknown token) with ``501 Not Implemented``: a 5xx that
    anyone can provoke.
    """
    if request.method in (b"GET", b"HEAD"):
        return None
    request.setResponseCode(405)
    request.setHeader(b"allow", b"GET, HEAD")
    request.setHeader(b"content-type", b"text/plain")
    return b"dfly CDN: GET or HEAD only\n"


class CdnFiles(resource.Resource):
    """``GET /download/<id[:3]>/<id>`` (optionally with one Range), nothing else.

    Meta files and directory listings are never served: only paths shaped
    like a task's data file resolve, so no request can walk the disk.
    """

    def __init__(self, cache: CdnCache, clock: IReactorTime | None = None, bucket: TokenBucket | None = None,
                 keys: Callable[[str], str | None] | None = None,
                 on_missing: Callable[[str], None] = lambda task_id: None,
                 read: Callable[[Callable[[], bytes]], Any] | None = None,
                 write_idle: float = WRITE_IDLE_TIMEOUT, per_client: int = MAX_UPLOADS_PER_CLIENT) -> None:
        super().__init__()
        self._cache = cache
        self._keys = keys  # task id -> its key; None: no key needed (tests of the file serving alone)
        self._on_missing = on_missing  # a known task's file is gone (removed by hand)
        self._read = read  # where piece reads run (the disk pool); None: on the reactor thread
        self._bucket = bucket
        self._clock = clock if clock is not None else (bucket.clock if bucket is not None else None)
        self.write_idle = write_idle if self._clock is not None else 0.0  # no clock: no timer (file tests)
        self.slots = UploadSlots(per_client)
        self.refusals = RefusalLog(self._clock) if self._clock is not None else None

    def getChild(self, path: bytes, request: IRequest) -> resource.Resource:
        rest = [path] + list(request.postpath)
        request.postpath = []
        try:
            parts = [p.decode("ascii") for p in rest]
        except UnicodeDecodeError:
            return resource.NoResource()
        if len(parts) != 3 or parts[0] != "download" or not _PREFIX.match(parts[1]):
            return resource.NoResource()
        task_id = parts[2]
        if not is_task_id(task_id) or task_id[:3] != parts[1]:
            return resource.NoResource()
        if self._keys is not None:
            expected = self._keys(task_id)
            given = request.getHeader(TASK_KEY_HEADER.encode()) or b""
            if expected is None or not hmac.compare_digest(given, expected.encode()):
                return resource.NoResource("no such task")  # the same answer as a missing task
        path = self._cache.data_path(task_id)
        if not os.path.isfile(path):
            if self._keys is not None:
                self._on_missing(task_id)
            return resource.NoResource("no such task")
        return _CachedFile(path, self._clock, self._bucket, self._read, self)

    def render_GET(self, request: IRequest) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain")
        return b"dfly CDN: GET /download/<id[:3]>/<id> with a Range header\n"


class _CachedFile(resource.Resource):
    """One data file: the whole of it or one range, sent through the CDN's upload bucket."""

    isLeaf = True

    def __init__(self, path: str, clock: IReactorTime | None, bucket: TokenBucket | None, read: Any = None,
                 files: CdnFiles | None = None) -> None:
        super().__init__()
        self._path = path
        self._clock = clock
        self._bucket = bucket
        self._read = read
        self._files = files  # the port's slots, refusal log and write-idle timeout

    def render(self, request: IRequest) -> Any:
        return _other_method(request) or super().render(request)

    def render_HEAD(self, request: IRequest) -> bytes:
        opened = self._open(request)
        if isinstance(opened, tuple):
            os.close(opened[0])
        return b""

    def render_GET(self, request: IRequest) -> bytes | int:
        files = self._files
        client = client_of(request)
        if files is not None and not files.slots.take(client):
            return refuse_busy(request, files.slots, files.refusals)
        opened = self._open(request)
        if not isinstance(opened, tuple):
            if files is not None:
                files.slots.release(client)
            return opened
        fd, start, length = opened
        sent = send_range(request, fd, start, length, self._clock, self._bucket, self._read,
                          write_idle=files.write_idle if files is not None else 0.0,
                          refusals=files.refusals if files is not None else None)
        if files is not None:
            sent.addBoth(lambda result: files.slots.release(client) or result)
        sent.addCallbacks(
            lambda _: request.finish(), lambda _: None  # a failure already dropped the connection
        )
        return NOT_DONE_YET

    def _open(self, request: IRequest) -> tuple[int, int, int] | bytes:
        """Set status and headers; (fd, start, length) to send, or the body of a refusal."""
        request.setHeader(b"accept-ranges", b"bytes")
        try:
            fd = os.open(self._path, os.O_RDONLY)
        except OSError:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain")
            return b"task file is gone\n"
        size = os.fstat(fd).st_size
        try:
            span = parse_byte_range(request.getHeader(b"range"), size)
        except ValueError:
            os.close(fd)
            request.setResponseCode(416)
            request.setHeader(b"content-range", f"bytes */{size}".encode())
            return b""
        request.setHeader(b"content-type", b"application/octet-stream")
        if span is None:
            request.setResponseCode(200)
            start, length = 0, size
        else:
            request.setResponseCode(206)
            request.setHeader(b"content-range", f"bytes {span[0]}-{span[1]}/{size}".encode())
            start, length = span[0], span[1] - span[0] + 1
        request.setHeader(b"content-length", str(length).encode())
        return fd, start, length
