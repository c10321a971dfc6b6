"""Tests for dfly.stream.BodyWriter, driven by hand the way Twisted's Response drives it."""

from __future__ import annotations

import hashlib
import itertools
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss

from dfly.stream import BodyWriter, StreamError, WriteError

IDLE = 10.0
DONE = Failure(ResponseDone())
DATA_LOSS = Failure(PotentialDataLoss())


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def expected_pieces(body: bytes, piece_size: int) -> list[tuple[int, int, str]]:
    """What on_piece should report for ``body``, computed independently."""
    chunks = [body[i : i + piece_size] for i in range(0, len(body), piece_size)]
    return [(n, len(chunk), sha(chunk)) for n, chunk in enumerate(chunks)]


class BodyWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.addCleanup(os.close, self.fd)
        self.clock = Clock()
        self.pieces: list[tuple[int, int, str]] = []
        self.transport = StringTransport()

    def connect(self, expected: int, piece_size: int = 4, offset: int = 0, fd: int | None = None) -> BodyWriter:
        """A writer connected to a StringTransport, as Response.deliverBody does."""
        writer = BodyWriter(
            self.fd if fd is None else fd,
            offset,
            piece_size,
            expected,
            lambda index, length, digest: self.pieces.append((index, length, digest)),
            self.clock,
            IDLE,
        )
        writer.makeConnection(self.transport)
        return writer

    def contents(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def prefill(self, data: bytes) -> None:
        os.pwrite(self.fd, data, 0)

    # --- complete bodies --------------------------------------------------------

    def test_bytes_land_at_offset(self) -> None:
        """Bytes are written at offset + position, leaving the rest of the file alone."""
        self.prefill(b"x" * 16)
        writer = self.connect(6, offset=5)
        writer.dataReceived(b"abc")
        writer.dataReceived(b"def")
        writer.connectionLost(DONE)
        self.assertEqual(self.contents(), b"xxxxxabcdefxxxxx")

    def test_complete_body_fires_with_length(self) -> None:
        """A body of exactly the expected length fires done with its length."""
        writer = self.connect(10)
        writer.dataReceived(b"0123456789")
        writer.connectionLost(DONE)
        self.assertEqual(self.successResultOf(writer.done), 10)

    def test_pieces_reported_with_short_last_piece(self) -> None:
        """Each piece is reported once with index, length and sha256; the last may be short."""
        body = b"0123456789"
        writer = self.connect(len(body), piece_size=4)
        writer.dataReceived(body)
        writer.connectionLost(DONE)
        self.assertEqual(
            self.pieces,
            [(0, 4, sha(b"0123")), (1, 4, sha(b"4567")), (2, 2, sha(b"89"))],
        )

    def test_exact_multiple_has_no_empty_piece(self) -> None:
        """A body that ends on a piece boundary reports no empty trailing piece."""
        writer = self.connect(8, piece_size=4)
        writer.dataReceived(b"01234567")
        writer.connectionLost(DONE)
        self.assertEqual([length for _, length, _ in self.pieces], [4, 4])

    def test_full_piece_reported_before_end(self) -> None:
        """A piece is reported as soon as its last byte arrives, not at the end."""
        writer = self.connect(10, piece_size=4)
        writer.dataReceived(b"01234")
        self.assertEqual(self.pieces, [(0, 4, sha(b"0123"))])

    def test_chunk_straddling_pieces(self) -> None:
        """A chunk spanning a piece boundary is split between the two pieces."""
        writer = self.connect(8, piece_size=4)
        writer.dataReceived(b"01")
        writer.dataReceived(b"2345")
        writer.dataReceived(b"67")
        writer.connectionLost(DONE)
        self.assertEqual(self.pieces, expected_pieces(b"01234567", 4))

    def test_empty_body(self) -> None:
        """An expected empty body succeeds with no pieces."""
        writer = self.connect(0)
        writer.connectionLost(DONE)
        self.assertEqual((self.successResultOf(writer.done), self.pieces), (0, []))

    def test_known_length_with_potential_data_loss_succeeds(self) -> None:
        """PotentialDataLoss is fine when the byte count matches."""
        writer = self.connect(5)
        writer.dataReceived(b"hello")
        writer.connectionLost(DATA_LOSS)
        self.assertEqual(self.successResultOf(writer.done), 5)

    def test_unknown_length_with_potential_data_loss_succeeds(self) -> None:
        """With length -1 the body ends when the connection does."""
        writer = self.connect(-1, piece_size=4)
        writer.dataReceived(b"hello")
        writer.connectionLost(DATA_LOSS)
        self.assertEqual(self.successResultOf(writer.done), 5)

    def test_unknown_length_reports_last_piece(self) -> None:
        """With length -1 the trailing short piece is reported at the end."""
        writer = self.connect(-1, piece_size=4)
        writer.dataReceived(b"hello")
        writer.connectionLost(DATA_LOSS)
        self.assertEqual(self.pieces, expected_pieces(b"hello", 4))

    def test_finishing_cancels_idle_timer(self) -> None:
        """No delayed call is left behind once the body is complete."""
        writer = self.connect(2)
        writer.dataReceived(b"ok")
        writer.connectionLost(DONE)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    @settings(max_examples=150, deadline=None)
    @given(
        body=st.binary(max_size=64),
        piece_size=st.integers(min_value=1, max_value=16),
        offset=st.integers(min_value=0, max_value=32),
        known_length=st.booleans(),
        data=st.data(),
    )
    def test_result_does_not_depend_on_chunking(
        self, body: bytes, piece_size: int, offset: int, known_length: bool, data: st.DataObject
    ) -> None:
        """However the body is chunked, the pieces and the file bytes are the same."""
        cuts = sorted(set(data.draw(st.lists(st.integers(min_value=0, max_value=len(body))), label="cuts")))
        bounds = [0, *cuts, len(body)]
        chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]
        os.ftruncate(self.fd, 0)
        self.pieces = []
        self.transport = StringTransport()
        writer = self.connect(len(body) if known_length else -1, piece_size=piece_size, offset=offset)
        for chunk in chunks:
            writer.dataReceived(chunk)
        writer.connectionLost(DONE if known_length else DATA_LOSS)
        self.assertEqual(self.successResultOf(writer.done), len(body))
        self.assertEqual(self.pieces, expected_pieces(body, piece_size))
        self.assertEqual(os.pread(self.fd, len(body) + 1, offset), body)

    # --- bodies of the wrong length ------------------------------------------------

    def test_short_body_fails(self) -> None:
        """Fewer bytes than expected fail with StreamError."""
        writer = self.connect(10)
        writer.dataReceived(b"01234")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, StreamError)

    def test_short_body_reports_no_partial_piece(self) -> None:
        """A truncated trailing piece is not reported as if it were complete."""
        writer = self.connect(10, piece_size=4)
        writer.dataReceived(b"012345")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, StreamError)
        self.assertEqual(self.pieces, [(0, 4, sha(b"0123"))])

    def test_long_body_stops_the_transport(self) -> None:
        """More bytes than expected make the writer stop the producer at once."""
        writer = self.connect(4)
        writer.dataReceived(b"012345")
        self.assertEqual(self.transport.producerState, "stopped")

    def test_long_body_fails(self) -> None:
        """More bytes than expected fail with StreamError once the connection is lost."""
        writer = self.connect(4)
        writer.dataReceived(b"012345")
        writer.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(writer.done, StreamError)

    def test_long_body_fails_even_if_response_ends_cleanly(self) -> None:
        """A clean end after an overlong chunk is still a failure."""
        writer = self.connect(4)
        writer.dataReceived(b"012345")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, StreamError)

    def test_long_body_writes_nothing_past_its_range(self) -> None:
        """Overflowing bytes never reach the file (they would clobber the next piece)."""
        self.prefill(b"x" * 8)
        writer = self.connect(4)
        writer.dataReceived(b"012345")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, StreamError)
        self.assertEqual(self.contents()[4:], b"xxxx")

    def test_data_after_failure_is_ignored(self) -> None:
        """Once failed, further chunks are neither written nor hashed into pieces."""
        self.prefill(b"x" * 8)
        writer = self.connect(4, piece_size=2)
        writer.dataReceived(b"012345")
        writer.dataReceived(b"ab")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, StreamError)
        self.assertEqual((self.contents(), self.pieces), (b"x" * 8, []))

    def test_connection_lost_mid_body_fails(self) -> None:
        """A dropped connection is a StreamError, not a success."""
        writer = self.connect(-1)
        writer.dataReceived(b"abc")
        writer.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(writer.done, StreamError)

    # --- stalls and cancellation -------------------------------------------------------

    def test_idle_timeout_stops_the_transport(self) -> None:
        """No data for idle_timeout stops the producer."""
        writer = self.connect(10)
        writer.dataReceived(b"abc")
        self.clock.advance(IDLE)
        self.assertEqual(self.transport.producerState, "stopped")

    def test_idle_timeout_fails(self) -> None:
        """A stalled body fails with StreamError when the connection goes."""
        writer = self.connect(10)
        writer.dataReceived(b"abc")
        self.clock.advance(IDLE)
        writer.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        failure = self.failureResultOf(writer.done, StreamError)
        self.assertIn("no data", failure.getErrorMessage())

    def test_data_resets_idle_timer(self) -> None:
        """Steady data, each chunk within idle_timeout, never times out."""
        writer = self.connect(10)
        for _ in range(5):
            self.clock.advance(IDLE - 1)
            writer.dataReceived(b"ab")
        self.assertEqual(self.transport.producerState, "producing")

    def test_cancel_stops_the_transport(self) -> None:
        """Cancelling done stops the producer."""
        writer = self.connect(10)
        writer.done.cancel()
        self.failureResultOf(writer.done, CancelledError)
        self.assertEqual(self.transport.producerState, "stopped")

    def test_cancel_errbacks_cancelled_error(self) -> None:
        """Cancelling done fires it with CancelledError at once."""
        writer = self.connect(10)
        writer.dataReceived(b"abc")
        writer.done.cancel()
        self.failureResultOf(writer.done, CancelledError)

    def test_connection_lost_after_cancel_is_ignored(self) -> None:
        """The connectionLost that follows a cancel neither raises nor changes the result."""
        writer = self.connect(10)
        writer.done.cancel()
        writer.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(writer.done, CancelledError)

    def test_cancel_stops_idle_timer(self) -> None:
        """Cancelling leaves no delayed call behind."""
        writer = self.connect(10)
        writer.done.cancel()
        self.failureResultOf(writer.done, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # --- the disk ---------------------------------------------------------------------------

    def test_write_error_fails_with_write_error(self) -> None:
        """A file that refuses bytes fails the stream with WriteError."""
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        writer = self.connect(4, fd=fd)
        writer.dataReceived(b"abcd")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, WriteError)

    def test_write_error_stops_the_transport(self) -> None:
        """After a write error no more bytes are wanted."""
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        writer = self.connect(4, fd=fd)
        writer.dataReceived(b"abcd")
        self.assertEqual(self.transport.producerState, "stopped")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, WriteError)


class DeferredRunner:
    """Runs blocking work only when the test says so, like a slow worker thread."""

    def __init__(self) -> None:
        self.pending: list[tuple[object, object]] = []

    def __call__(self, f):  # type: ignore[no-untyped-def]
        from twisted.internet.defer import Deferred

        d: Deferred[object] = Deferred()
        self.pending.append((f, d))
        return d

    def run_one(self) -> None:
        f, d = self.pending.pop(0)
        d.callback(f())  # type: ignore[operator,attr-defined]


class WorkerFlowControlTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.addCleanup(os.close, self.fd)
        self.pieces: list[tuple[int, int, str]] = []
        self.runner = DeferredRunner()
        self.transport = StringTransport()
        self.writer = BodyWriter(self.fd, 0, 1 << 20, 8 << 20, lambda *p: self.pieces.append(p), Clock(), IDLE,
                                 self.runner)
        self.writer.makeConnection(self.transport)

    def feed(self, mib: int) -> bytes:
        data = b""
        for n in range(mib):
            chunk = bytes([n]) * (1 << 20)
            self.writer.dataReceived(chunk)
            data += chunk
        return data

    def test_transport_paused_when_too_much_waits_for_the_worker(self) -> None:
        """More than 4 MiB queued for a slow worker pauses the transport."""
        self.feed(5)
        self.assertEqual(self.transport.producerState, "paused")

    def test_transport_resumed_when_the_worker_catches_up(self) -> None:
        """Once the worker drains the queue the transport produces again."""
        self.feed(5)
        while self.runner.pending:
            self.runner.run_one()
        self.assertEqual(self.transport.producerState, "producing")

    def test_piece_reported_only_after_its_bytes_are_written(self) -> None:
        """No piece is announced while its batch still waits for the worker."""
        data = self.feed(1)
        self.assertEqual(self.pieces, [])
        self.runner.run_one()
        self.assertEqual(self.pieces, [(0, 1 << 20, sha(data))])
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), data)

    def test_done_waits_for_queued_writes(self) -> None:
        """The body ending does not fire done before the worker wrote everything."""
        self.feed(8)
        self.writer.connectionLost(DONE)
        self.assertNoResult(self.writer.done)
        while self.runner.pending:
            self.runner.run_one()
        self.assertEqual(self.successResultOf(self.writer.done), 8 << 20)
