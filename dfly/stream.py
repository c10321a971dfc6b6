"""A response-body sink that writes in place and hashes piece by piece.

Used for every byte that moves: the supernode cutting a source stream into
cached pieces, a peer receiving one piece, a peer going back to source.
Invariants: bytes are written at ``offset + position`` as they arrive (memory
stays flat whatever the file size); each complete piece is reported once with
its sha256; the stream fails if it carries more or fewer bytes than expected
or goes quiet for ``idle_timeout``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss


class StreamError(Exception):
    """The body was short, long, stalled or could not be written."""


class WriteError(StreamError):
    """The local disk refused the bytes (full, read-only, removed)."""


#: Called with (index of the piece within this stream, its length, its hex sha256).
PieceCallback = Callable[[int, int, str], None]


class BodyWriter(Protocol):
    def __init__(
        self,
        fd: int,
        offset: int,
        piece_size: int,
        expected_length: int,
        on_piece: PieceCallback,
        clock: IReactorTime,
        idle_timeout: float = 30.0,
    ) -> None:
        self._fd = fd
        self._offset = offset
        self._piece_size = piece_size
        self._expected = expected_length
        self._on_piece = on_piece
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._idle: IDelayedCall | None = None
        self._hash = hashlib.sha256()
        self._in_piece = 0
        self._pieces = 0
        self._error: Failure | None = None
        self.received = 0
        self.done: Deferred[int] = Deferred(self._cancel)

    # IProtocol -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self._idle = self._clock.callLater(self._idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        if self._expected >= 0 and self.received + len(data) > self._expected:
            self._fail(StreamError(f"body longer than the expected {self._expected} bytes"))
            return
        view = memoryview(data)
        try:
            while view:
                take = min(len(view), self._piece_size - self._in_piece)
                chunk = view[:take]
                self._hash.update(chunk)
                _pwrite_all(self._fd, chunk, self._offset + self.received)
                self.received += take
                self._in_piece += take
                view = view[take:]
                if self._in_piece == self._piece_size:
                    self._emit_piece()
        except OSError as e:
            self._fail(WriteError(f"cannot write: {e.strerror or e}"))
            return
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_timer()
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
            return
        if reason is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self.done.errback(StreamError(f"connection lost after {self.received} bytes: {reason.getErrorMessage()}"))
            return
        if self._expected >= 0 and self.received != self._expected:
            # Checked before the last piece is reported: a truncated piece must
            # never be announced with a digest.
            self.done.errback(StreamError(f"short body: got {self.received} of {self._expected} bytes"))
            return
        if self._in_piece:
            self._emit_piece()
        self.done.callback(self.received)

    # internals -------------------------------------------------------------------

    def _emit_piece(self) -> None:
        index, length, digest = self._pieces, self._in_piece, self._hash.hexdigest()
        self._pieces += 1
        self._in_piece = 0
        self._hash = hashlib.sha256()
        self._on_piece(index, length, digest)

    def _stalled(self) -> None:
        self._idle = None
        self._fail(StreamError(f"no data for {self._idle_timeout:g}s after {self.received} bytes"))

    def _fail(self, error: Exception) -> None:
        """Remember the first error and drop the connection; connectionLost reports it."""
        if self._error is None:
            self._error = Failure(error)
        self._stop_timer()
        if self.transport is not None:
            self.transport.stopProducing()
        else:
            self.done.errback(self._error)

    def _cancel(self, d: Deferred[Any]) -> None:
        self._error = Failure(CancelledError())
        self._stop_timer()
        if self.transport is not None:
            self.transport.stopProducing()
        # Fire now: a canceller must leave the Deferred called.
        if not d.called:
            d.errback(self._error)

    def _stop_timer(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.cancel()
        self._idle = None


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written
