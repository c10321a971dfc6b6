"""The uploader: serves verified pieces of the tasks this peer holds.

``GET /peer/file/<taskId>`` with ``Range: bytes=s-e``.  Files are found by
task id in `UploadStore`, never by a client-supplied path, and only ranges
inside pieces whose sha256 matched are served, so a peer never passes on
bytes it has not verified.  Bytes leave through `FileRangeProducer`, 64 KiB
at a time and paced by the host's upload bucket (``--totallimit``), so memory
stays flat however many peers pull.  A client holds at most
``maxUploadsPerClient`` uploads at once (more are 503, `dfly.uploadslots`),
and one that reads nothing for ``writeIdleTimeout`` is cut off.
"""

from __future__ import annotations

import hmac
import os
import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dfly.codes import TASK_KEY_HEADER
from dfly.config import MAX_UPLOADS_PER_CLIENT, WRITE_IDLE_TIMEOUT
from dfly.pieces import is_task_id
from dfly.ratelimit import TokenBucket, send_range
from dfly.refusals import RefusalLog
from dfly.uploadslots import UploadSlots, client_of, refuse_busy

log = Logger(namespace="dfly.peer.uploader")

#: Any number of digits: a start past every file is a 416 like any other start
#: past this one (a cap of 19 digits made ``bytes=99999999999999999999-...`` a 400).
_RANGE = re.compile(r"\Abytes=(\d+)-(\d+)\Z")
#: Beyond any file's length; what a position of more than 19 digits means.
_PAST_ANY_FILE = 1 << 63


def _position(digits: str) -> int:
    """A byte position from its digits, without int()'s cost (or its 4300-digit limit) on huge ones."""
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else _PAST_ANY_FILE


@attrs.define(eq=False)
class HeldFile:
    """One local download's file, as far as other peers may see it."""

    task_id: str
    path: str
    piece_size: int
    length: int = -1  # -1 until known
    pieces: dict[int, tuple[int, int]] = attrs.Factory(dict)  # verified piece -> (start, end)
    finished: bool = False
    last_access: float = 0.0
    uploads: int = 0
    # Where it was registered, for the service-down when it expires.
    node: tuple[str, int] = ("", 0)
    cid: str = ""
    secret: str = ""  # the registration's peer secret, which the heartbeat and service-down carry
    heartbeat: float = 0.0  # when the supernode last heard that this finished peer still serves
    # The task's key from the supernode: requests must carry it (header X-Dfly-Task-Key), so
    # knowing a task id reads nothing.  None: served without one.
    key: str | None = None

    def admits(self, key: bytes | None) -> bool:
        return self.key is None or (key is not None and hmac.compare_digest(key, self.key.encode()))

    def covering(self, start: int, end: int) -> bool:
        span = self.pieces.get(start // self.piece_size)
        return span is not None and span[0] <= start and end <= span[1]


class UploadError(Exception):
    def __init__(self, status: int, msg: str, length: int = -1) -> None:
        super().__init__(msg)
        self.status = status
        self.msg = msg
        self.length = length  # the file's length, for a 416's Content-Range


@attrs.define(eq=False)
class UploadStore:
    """The files this peer serves, by task id."""

    clock: IReactorTime
    bucket: TokenBucket | None = None  # the host's upload limit
    files: dict[str, list[HeldFile]] = attrs.Factory(dict)
    active: int = 0  # uploads in progress
    last_upload: float = 0.0
    write_idle: float = WRITE_IDLE_TIMEOUT  # an upload whose client reads nothing this long is aborted
    per_client: int = MAX_UPLOADS_PER_CLIENT  # uploads one client address holds at once
    slots: UploadSlots = attrs.field(init=False)
    refusals: RefusalLog = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.slots = UploadSlots(self.per_client)
        self.refusals = RefusalLog(self.clock)

    def add(self, held: HeldFile) -> None:
        held.last_access = self.clock.seconds()
        self.files.setdefault(held.task_id, []).append(held)

    def remove(self, held: HeldFile) -> None:
        entries = self.files.get(held.task_id, [])
        if held in entries:
            entries.remove(held)
        if not entries:
            self.files.pop(held.task_id, None)

    def held(self) -> list[HeldFile]:
        return [held for entries in self.files.values() for held in entries]

    def paths(self) -> set[str]:
        return {held.path for held in self.held()}

    def find(self, task_id: str, range_header: bytes | None, key: bytes | None = None) -> tuple[HeldFile, int, int]:
        """The file and byte range to serve, or `UploadError` with its status."""
        entries = [held for held in self.files.get(task_id, []) if held.admits(key)] if is_task_id(task_id) else []
        if not entries:
            raise UploadError(404, f"task {task_id} is not held here")
        match = _RANGE.match((range_header or b"").decode("latin-1").strip())
        if match is None:
            raise UploadError(400, "a single 'Range: bytes=start-end' is required")
        start, end = _position(match.group(1)), _position(match.group(2))
        if end < start:
            raise UploadError(400, "range end before its start")
        for held in entries:
            if held.covering(start, end):
                return held, start, end
        length = max(held.length for held in entries)  # -1 until some download knows it
        if 0 <= length <= start:
            raise UploadError(416, f"range {start}-{end} is past the end of the file", length)
        raise UploadError(404, f"range {start}-{end} is not in a verified piece here")

    def serve(self, request: IRequest, task_id: str) -> Deferred[bytes] | bytes:
        try:
            held, start, end = self.find(task_id, request.getHeader(b"range"), request.getHeader(TASK_KEY_HEADER.encode()))
        except UploadError as e:
            request.setResponseCode(e.status)
            request.setHeader(b"content-type", b"text/plain")
            if e.status == 416:
                request.setHeader(b"content-range", f"bytes */{e.length}".encode())
            return e.msg.encode() + b"\n"
        client = client_of(request)
        if not self.slots.take(client):
            return refuse_busy(request, self.slots, self.refusals)
        try:
            fd = os.open(held.path, os.O_RDONLY)
        except OSError as e:
            self.slots.release(client)
            request.setResponseCode(404)
            return f"task file is gone: {e.strerror}\n".encode()
        total = f"{held.length}" if held.length >= 0 else "*"
        request.setResponseCode(206)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-range", f"bytes {start}-{end}/{total}".encode())
        request.setHeader(b"content-length", str(end - start + 1).encode())
        held.uploads += 1
        self.active += 1
        now = self.clock.seconds()
        held.last_access = self.last_upload = now

        def finished(result: Any) -> Any:
            held.uploads -= 1
            self.active -= 1
            self.slots.release(client)
            self.last_upload = held.last_access = self.clock.seconds()
            return result

        # klein finishes the response with b""; after a failure the connection
        # is already dropped (the client sees a short body), never an error text.
        sent = send_range(request, fd, start, end - start + 1, self.clock, self.bucket,
                          write_idle=self.write_idle, refusals=self.refusals)
        return sent.addBoth(finished).addBoth(lambda _: b"")
