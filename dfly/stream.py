"""A response-body sink that writes in place and hashes piece by piece.

Used for every byte that moves: the supernode cutting a source stream into
cached pieces, a peer receiving one piece, a peer going back to source.

Invariants:

- bytes are written at ``offset + position``; memory holds at most
  `MAX_QUEUED` bytes of a body (the transport is paused above it);
- hashing and writing run through ``run_blocking`` (a worker thread in the
  services, inline in unit tests), one batch at a time and in order, so the
  reactor thread only receives; a batch is handed over when it reaches
  `BATCH` bytes or completes a piece;
- each complete piece is reported once, with its sha256, after its bytes
  are written, and never when the body turns out short or long;
- ``done`` fires after the last write (so a retry can never race a stale
  write), except when cancelled: the writer owns a duplicate of the file
  descriptor, so late writes land in the file it was given and nowhere else,
  and ``closed`` fires once that duplicate is closed (after the last write);
- a step that raises (the worker, a piece callback) fails ``done``: a body
  is never reported written when part of it was not;
- the stream fails if it carries more or fewer bytes than expected, more
  than ``max_length``, or goes quiet for ``idle_timeout``;
- with a ``bucket``, every read is charged to it (and its parents) and the
  transport stays paused until the debt is repaid: that is how download
  limits pace the sender, through TCP's own flow control.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss

from dfly.ratelimit import TokenBucket

log = Logger()

#: Bytes handed to the worker at once.
BATCH = 1 << 20
#: Bytes received but not yet written above which the transport is paused.
MAX_QUEUED = 4 << 20

T = TypeVar("T")
#: Runs a blocking call somewhere and fires with its result.
RunBlocking = Callable[[Callable[[], T]], "Deferred[T]"]
#: Called with (index of the piece within this stream, its length, its hex sha256).
PieceCallback = Callable[[int, int, str], None]


def run_inline(f: Callable[[], T]) -> Deferred[T]:
    return maybeDeferred(f)


def thread_runner(reactor: Any) -> RunBlocking:
    """Blocking work in the reactor's thread pool."""
    from twisted.internet.threads import deferToThreadPool

    return lambda f: deferToThreadPool(reactor, reactor.getThreadPool(), f)


class StreamError(Exception):
    """The body was short, long, stalled or could not be written."""


class WriteError(StreamError):
    """The local disk refused the bytes (full, read-only, removed)."""


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
        run_blocking: RunBlocking = run_inline,
        bucket: TokenBucket | None = None,
        max_length: int = -1,
    ) -> None:
        self._fd = os.dup(fd)
        self._max = max_length  # -1: no cap (a body of unknown length may be endless)
        self._offset = offset
        self._piece_size = piece_size
        self._expected = expected_length
        self._on_piece = on_piece
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._run = run_blocking
        self._idle: IDelayedCall | None = None
        self._bucket = bucket
        self._credit: IDelayedCall | None = None
        # Reactor side: what has arrived and not yet been handed over.
        self._batch: list[bytes] = []
        self._batch_bytes = 0
        self._batch_start = 0
        self._since_boundary = 0
        self._queued = 0
        self._paused: set[str] = set()
        self._tail: Deferred[Any] = succeed(None)
        self._closing = False
        # Worker side: touched only by _write_batch, which runs one at a time.
        self._hash = hashlib.sha256()
        self._in_piece = 0
        self._pieces = 0
        self._error: Failure | None = None
        self.received = 0
        self.done: Deferred[int] = Deferred(self._cancel)
        #: Fires once the writer's descriptor is closed: no write of it can land after that.
        self.closed: Deferred[None] = Deferred()

    # IProtocol -----------------------------------------------------------------

    def connectionMade(self) -> None:
        self._idle = self._clock.callLater(self._idle_timeout, self._stalled)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None or self.done.called:
            return
        if self._expected >= 0 and self.received + len(data) > self._expected:
            self._fail(StreamError(f"body longer than the expected {self._expected} bytes"))
            return
        if self._max >= 0 and self.received + len(data) > self._max:
            self._fail(StreamError(f"body longer than the limit of {self._max} bytes"))
            return
        self.received += len(data)
        self._batch.append(data)
        self._batch_bytes += len(data)
        self._since_boundary += len(data)
        if self._since_boundary >= self._piece_size or self._batch_bytes >= BATCH:
            self._since_boundary %= self._piece_size
            self._hand_over()
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout)
        self._charge(len(data))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._stop_timer()
        if self._closing:
            return
        self._closing = True
        if self.done.called:  # cancelled: only wait for queued writes, then close
            self._tail.addBoth(self._finish)
            return
        if self._error is None and reason is not None and not reason.check(ResponseDone, PotentialDataLoss):
            self._error = Failure(StreamError(f"connection lost after {self.received} bytes: {reason.getErrorMessage()}"))
        if self._error is None and self._expected >= 0 and self.received != self._expected:
            # Decided before the last piece is reported: a truncated piece must
            # never be announced with a digest.
            self._error = Failure(StreamError(f"short body: got {self.received} of {self._expected} bytes"))
        if self._error is None:
            self._hand_over()
            self._tail.addCallback(lambda _: self._run(self._last_piece)).addCallback(self._report)
        self._tail.addBoth(self._finish)

    # reactor side ------------------------------------------------------------------

    def _hand_over(self) -> None:
        """Queue the batch for the worker; pause the transport if too much waits."""
        if not self._batch:
            return
        chunks, start = self._batch, self._batch_start
        size = self._batch_bytes
        self._batch, self._batch_bytes, self._batch_start = [], 0, start + size
        self._queued += size

        def written(pieces: list[tuple[int, int, str]]) -> None:
            self._queued -= size
            self._report(pieces)
            if self._queued <= MAX_QUEUED // 4:
                self._resume("queue")

        self._tail.addCallback(lambda _: self._run(lambda: self._write_batch(chunks, start))).addCallbacks(
            written, self._write_failed
        )
        if self._queued > MAX_QUEUED:
            self._pause("queue")

    def _charge(self, n: int) -> None:
        if self._bucket is None or self._error is not None or self.done.called:
            return  # a failed stream has stopped its transport: nothing to pace
        wait = self._bucket.charge(n)
        if wait <= 0:
            return
        self._pause("rate")
        if self._idle is not None and self._idle.active():
            self._idle.reset(self._idle_timeout + wait)  # a paced pause is not silence
        if self._credit is None:
            self._credit = self._clock.callLater(wait, self._credit_back)
        elif self._credit.getTime() < self._clock.seconds() + wait:
            self._credit.reset(wait)

    def _credit_back(self) -> None:
        self._credit = None
        self._resume("rate")

    def _report(self, pieces: list[tuple[int, int, str]]) -> None:
        if self._error is None:
            for piece in pieces:
                self._on_piece(*piece)

    def _write_failed(self, failure: Failure) -> None:
        error = failure.value
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        self._fail(WriteError(f"cannot write: {reason}"))

    def _finish(self, result: object) -> None:
        if isinstance(result, Failure) and self._error is None:
            # A step of the tail raised (the worker, or a piece callback): the
            # body is not written as it should be, so it must not count as done.
            log.failure("writing a body failed", result)
            # A bug's text is for the log above, not for whoever is told of the failure.
            self._error = Failure(StreamError("writing failed: internal error"))
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.closed.callback(None)
        if self.done.called:
            return
        if self._error is not None:
            self.done.errback(self._error)
        else:
            self.done.callback(self.received)

    def _pause(self, reason: str) -> None:
        if self._error is not None:
            return  # _fail stopped the transport for good
        if not self._paused and self.transport is not None:
            self.transport.pauseProducing()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason in self._paused:
            self._paused.discard(reason)
            if not self._paused and self.transport is not None and self._error is None:
                self.transport.resumeProducing()

    def _stalled(self) -> None:
        self._idle = None
        self._fail(StreamError(f"no data for {self._idle_timeout:g}s after {self.received} bytes"))

    def _fail(self, error: Exception) -> None:
        """Remember the first error and drop the connection; connectionLost reports it."""
        if self._error is None:
            self._error = Failure(error)
        self._stop_timer()
        self._batch, self._batch_bytes = [], 0
        if self.transport is not None:
            self.transport.stopProducing()
        elif not self._closing:
            self._closing = True
            self._tail.addBoth(self._finish)

    def _cancel(self, d: Deferred[Any]) -> None:
        self._error = Failure(CancelledError())
        self._stop_timer()
        self._batch, self._batch_bytes = [], 0
        if self.transport is not None:
            self.transport.stopProducing()
        elif not self._closing:
            self._closing = True
            self._tail.addBoth(self._finish)
        if not d.called:
            d.errback(self._error)

    def _stop_timer(self) -> None:
        for timer in (self._idle, self._credit):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle = self._credit = None

    # worker side -------------------------------------------------------------------

    def _write_batch(self, chunks: list[bytes], start: int) -> list[tuple[int, int, str]]:
        """Hash and write one batch; the pieces it completed, in order."""
        completed: list[tuple[int, int, str]] = []
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                take = min(len(view), self._piece_size - self._in_piece)
                self._hash.update(view[:take])
                self._in_piece += take
                view = view[take:]
                if self._in_piece == self._piece_size:
                    completed.append(self._close_piece())
        _pwritev_all(self._fd, chunks, self._offset + start)
        return completed

    def _last_piece(self) -> list[tuple[int, int, str]]:
        return [self._close_piece()] if self._in_piece else []

    def _close_piece(self) -> tuple[int, int, str]:
        piece = (self._pieces, self._in_piece, self._hash.hexdigest())
        self._pieces += 1
        self._in_piece = 0
        self._hash = hashlib.sha256()
        return piece


def _pwritev_all(fd: int, chunks: list[bytes], offset: int) -> None:
    views = [memoryview(c) for c in chunks if c]
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
