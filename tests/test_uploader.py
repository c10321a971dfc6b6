"""The uploader: `UploadStore.find`, and serving through the real klein resource.

``find`` is tested on its own with real files.  Serving goes through
``LocalApi(...).resource()`` with `StubTreq`; the producer that sends the
bytes (`dfly.ratelimit.FileRangeProducer`) has its own tests in
tests/test_ratelimit.py.
"""

from __future__ import annotations

import os
import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Site

from dfly.codes import TASK_KEY_HEADER
from dfly.config import Home
from dfly.peer.engine import PeerEngine
from dfly.peer.hostmeta import TOKEN_HEADER
from dfly.peer.localapi import LocalApi
from dfly.peer.uploader import HeldFile, UploadError, UploadStore
from dfly.ratelimit import TokenBucket

TASK = "ab" * 32
OTHER_TASK = "cd" * 32
PIECE = 100_000
LENGTH = 3 * PIECE  # three pieces; tests verify 0 and 1, never 2
TOKEN = "s3cret-token"


def payload(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def write_file(testcase: SynchronousTestCase, data: bytes) -> str:
    path = testcase.mktemp()
    with open(path, "wb") as f:
        f.write(data)
    return path


def held_file(path: str, verified: tuple[int, ...] = (0, 1), length: int = LENGTH, task_id: str = TASK) -> HeldFile:
    pieces = {n: (n * PIECE, (n + 1) * PIECE - 1) for n in verified}
    return HeldFile(task_id, path, PIECE, length=length, pieces=pieces, finished=True)


class FindTests(SynchronousTestCase):
    """`UploadStore.find` picks the file and range to serve, or refuses with a status."""

    def setUp(self) -> None:
        self.store = UploadStore(Clock())
        self.held = held_file(write_file(self, payload(LENGTH)))
        self.store.add(self.held)

    def status_of(self, task_id: str, range_header: bytes | None) -> int:
        return self.assertRaises(UploadError, self.store.find, task_id, range_header).status

    def test_unknown_task_is_404(self) -> None:
        """A well-formed task id this peer does not hold is 404."""
        self.assertEqual(self.status_of(OTHER_TASK, b"bytes=0-9"), 404)

    def test_non_task_id_is_404_even_when_held_under_that_name(self) -> None:
        """Only 64-hex task ids are looked up, whatever the store holds."""
        self.store.add(held_file(self.held.path, task_id="AB" * 32))
        self.assertEqual(self.status_of("AB" * 32, b"bytes=0-9"), 404)

    def test_missing_range_is_400(self) -> None:
        """Without a Range header there is nothing to serve."""
        self.assertEqual(self.status_of(TASK, None), 400)

    def test_open_ended_range_is_400(self) -> None:
        """'bytes=0-' is not the single closed range peers send."""
        self.assertEqual(self.status_of(TASK, b"bytes=0-"), 400)

    def test_suffix_range_is_400(self) -> None:
        """'bytes=-10' (the last ten bytes) is refused."""
        self.assertEqual(self.status_of(TASK, b"bytes=-10"), 400)

    def test_other_unit_is_400(self) -> None:
        """Only the 'bytes' unit is understood."""
        self.assertEqual(self.status_of(TASK, b"items=0-9"), 400)

    def test_non_numeric_range_is_400(self) -> None:
        """Garbage in the range is 400, not a crash."""
        self.assertEqual(self.status_of(TASK, b"bytes=a-b"), 400)

    def test_multi_range_is_400(self) -> None:
        """Several ranges in one request are refused."""
        self.assertEqual(self.status_of(TASK, b"bytes=0-9,20-29"), 400)

    def test_end_before_start_is_400(self) -> None:
        """A range whose end comes before its start is 400."""
        self.assertEqual(self.status_of(TASK, b"bytes=10-5"), 400)

    def test_range_past_end_is_416(self) -> None:
        """A range starting at or after the known length is 416."""
        self.assertEqual(self.status_of(TASK, b"bytes=300000-300009"), 416)

    def test_range_past_end_of_unknown_length_is_404(self) -> None:
        """While the length is unknown, a far range is merely not held (404)."""
        self.store.remove(self.held)
        self.store.add(held_file(self.held.path, length=-1))
        self.assertEqual(self.status_of(TASK, b"bytes=300000-300009"), 404)

    def test_range_in_unverified_piece_is_404(self) -> None:
        """Bytes of a piece whose digest was not checked are never served."""
        self.assertEqual(self.status_of(TASK, b"bytes=200000-200009"), 404)

    def test_range_spanning_two_verified_pieces_is_404(self) -> None:
        """A range must lie inside one verified piece, even if both are verified."""
        self.assertEqual(self.status_of(TASK, b"bytes=99990-100009"), 404)

    def test_range_inside_verified_piece_is_found(self) -> None:
        """A range inside a verified piece gives the file and the inclusive bounds."""
        self.assertEqual(self.store.find(TASK, b"bytes=100010-100019"), (self.held, 100010, 100019))

    def test_whole_verified_piece_is_found(self) -> None:
        """The exact range of a verified piece is served."""
        self.assertEqual(self.store.find(TASK, b"bytes=0-99999"), (self.held, 0, 99999))

    def test_range_is_found_in_whichever_download_verified_it(self) -> None:
        """With two downloads of one task, the one holding the piece serves it."""
        second = held_file(self.held.path, verified=(2,))
        self.store.add(second)
        self.assertIs(self.store.find(TASK, b"bytes=200000-200009")[0], second)

    @given(st.integers(min_value=0, max_value=LENGTH + PIECE), st.integers(min_value=0, max_value=LENGTH + PIECE))
    def test_found_ranges_lie_inside_one_verified_piece(self, start: int, end: int) -> None:
        """Whatever the range, find returns it only if one verified piece contains it."""
        inside = end >= start and any(s <= start and end <= e for s, e in self.held.pieces.values())
        try:
            found = self.store.find(TASK, f"bytes={start}-{end}".encode())
        except UploadError:
            found = None
        self.assertEqual(found is not None, inside)


class Served:
    """The real klein resource of the peer daemon over a `StubTreq`."""

    def __init__(self, testcase: SynchronousTestCase) -> None:
        self.testcase = testcase
        self.clock = Clock()
        self.home = Home(testcase.mktemp()).ensure()
        self.store = UploadStore(self.clock)
        engine = PeerEngine(self.clock, None, self.home, uploads=self.store)
        self.resource = LocalApi(engine, TOKEN, self.store).resource()
        self.stub = StubTreq(self.resource)
        self.data = payload(LENGTH)
        path = os.path.join(self.home.data, "file-1.server")
        with open(path, "wb") as f:
            f.write(self.data)
        self.held = held_file(path)
        self.store.add(self.held)

    def pump(self) -> None:
        """Move bytes until the connections have no work (and paced uploads no credit to wait for)."""
        for _ in range(10_000):
            self.stub.flush()
            calls = self.clock.getDelayedCalls()
            if not calls:
                return
            self.clock.advance(min(call.getTime() for call in calls) - self.clock.seconds())
        raise AssertionError("the response never finished")

    def get(self, path: str, byte_range: str | None = None, key: str | None = None) -> tuple[Any, bytes]:
        headers = {"Range": byte_range} if byte_range is not None else {}
        if key is not None:
            headers[TASK_KEY_HEADER] = key
        return self.finish(self.stub.get("http://peer.test:65001" + path, headers=headers))

    def finish(self, d: Deferred[Any]) -> tuple[Any, bytes]:
        """The response and its whole body."""
        self.pump()
        response = self.testcase.successResultOf(d)
        body = self.stub.content(response)
        self.pump()
        return response, self.testcase.successResultOf(body)


FILE = f"/peer/file/{TASK}"


class ServeTests(SynchronousTestCase):
    """GET /peer/file/<taskId> through the real klein resource."""

    def setUp(self) -> None:
        self.served = Served(self)

    def test_verified_range_is_206(self) -> None:
        """A range inside a verified piece is answered 206 Partial Content."""
        response, body = self.served.get(FILE, "bytes=100000-199999")
        self.assertEqual(response.code, 206)

    def test_verified_range_body_is_exact(self) -> None:
        """The body is exactly the requested bytes of the file."""
        response, body = self.served.get(FILE, "bytes=100005-199990")
        self.assertEqual(body, self.served.data[100005:199991])

    def test_verified_range_has_content_range(self) -> None:
        """Content-Range names the range and the file length."""
        response, body = self.served.get(FILE, "bytes=100000-199999")
        self.assertEqual(response.headers.getRawHeaders("content-range"), ["bytes 100000-199999/300000"])

    def test_content_range_total_is_star_while_length_unknown(self) -> None:
        """Before the length is known the total in Content-Range is '*'."""
        self.served.held.length = -1
        response, body = self.served.get(FILE, "bytes=0-9")
        self.assertEqual(response.headers.getRawHeaders("content-range"), ["bytes 0-9/*"])

    def test_verified_range_has_content_length(self) -> None:
        """Content-Length is the size of the range."""
        response, body = self.served.get(FILE, "bytes=100000-199999")
        self.assertEqual(response.length, 100000)

    def test_past_end_is_416(self) -> None:
        """A range past the end of a file of known length is 416."""
        response, body = self.served.get(FILE, "bytes=300000-300009")
        self.assertEqual(response.code, 416)

    def test_416_names_the_length(self) -> None:
        """A 416 carries 'Content-Range: bytes */length'."""
        response, body = self.served.get(FILE, "bytes=300000-300009")
        self.assertEqual(response.headers.getRawHeaders("content-range"), ["bytes */300000"])

    def test_unverified_piece_is_404(self) -> None:
        """A range of a piece not yet verified is 404."""
        response, body = self.served.get(FILE, "bytes=200000-200009")
        self.assertEqual(response.code, 404)

    def test_unverified_piece_sends_no_file_bytes(self) -> None:
        """The 404 for an unverified piece carries none of the file's bytes."""
        response, body = self.served.get(FILE, "bytes=200000-200009")
        self.assertNotIn(self.served.data[200000:200010], body)

    def test_missing_range_is_400(self) -> None:
        """A GET without Range is 400."""
        response, body = self.served.get(FILE)
        self.assertEqual(response.code, 400)

    def test_multi_range_is_400(self) -> None:
        """A multi-range request is 400."""
        response, body = self.served.get(FILE, "bytes=0-9,20-29")
        self.assertEqual(response.code, 400)

    def test_unknown_task_is_404(self) -> None:
        """A task this peer does not hold is 404."""
        response, body = self.served.get(f"/peer/file/{OTHER_TASK}", "bytes=0-9")
        self.assertEqual(response.code, 404)

    def test_file_gone_from_disk_is_404(self) -> None:
        """A held file removed from disk is 404, not a 500."""
        os.unlink(self.served.held.path)
        response, body = self.served.get(FILE, "bytes=0-9")
        self.assertEqual(response.code, 404)

    def test_uploader_needs_no_token(self) -> None:
        """Other peers fetch pieces without the local API token."""
        response, body = self.served.get(FILE, "bytes=0-9")
        self.assertEqual((response.code, body), (206, self.served.data[:10]))

    def test_local_download_without_token_is_403(self) -> None:
        """The local download API refuses a loopback client without the token."""
        d = self.served.stub.post("http://peer.test:65001/local/download", data=b"{}")
        response, body = self.served.finish(d)
        self.assertEqual(response.code, 403)

    def test_local_download_with_wrong_token_is_403(self) -> None:
        """The local download API refuses a wrong token."""
        d = self.served.stub.post(
            "http://peer.test:65001/local/download", data=b"{}", headers={TOKEN_HEADER: b"not-the-token"}
        )
        response, body = self.served.finish(d)
        self.assertEqual(response.code, 403)

    def test_dot_dot_path_is_404(self) -> None:
        """/peer/file/../../etc/passwd reaches no file."""
        response, body = self.served.get("/peer/file/../../etc/passwd", "bytes=0-9")
        self.assertEqual(response.code, 404)

    def test_encoded_dot_dot_path_is_404(self) -> None:
        """Percent-encoded '..' segments reach no file."""
        response, body = self.served.get("/peer/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "bytes=0-9")
        self.assertEqual(response.code, 404)

    def test_encoded_dot_dot_task_id_is_404(self) -> None:
        """A task id of '%2e%2e' is not a task id: 404."""
        response, body = self.served.get("/peer/file/%2e%2e", "bytes=0-9")
        self.assertEqual(response.code, 404)

    def test_file_path_as_task_id_is_404(self) -> None:
        """The held file's own path as the task id serves nothing."""
        response, body = self.served.get("/peer/file/" + self.served.held.path.replace("/", "%2f"), "bytes=0-9")
        self.assertEqual(response.code, 404)

    def slow_uploads(self, rate: float) -> None:
        """Pace uploads through an empty bucket, so a response takes clock time."""
        self.served.store.bucket = TokenBucket(rate, self.served.clock)
        self.served.store.bucket.charge(int(self.served.store.bucket.burst))

    def test_upload_in_progress_counts_as_active(self) -> None:
        """While the body is being sent the store counts one active upload."""
        self.slow_uploads(1000)
        self.served.stub.get("http://peer.test:65001" + FILE, headers={"Range": "bytes=0-99999"})
        self.served.stub.flush()
        self.assertEqual((self.served.held.uploads, self.served.store.active), (1, 1))

    def test_upload_count_returns_to_zero(self) -> None:
        """After the response the file's upload count is back to 0."""
        self.served.get(FILE, "bytes=0-99999")
        self.assertEqual(self.served.held.uploads, 0)

    def test_active_uploads_return_to_zero(self) -> None:
        """After the response the store has no active upload."""
        self.served.get(FILE, "bytes=0-99999")
        self.assertEqual(self.served.store.active, 0)

    def test_upload_moves_last_access_forward(self) -> None:
        """Serving a range records the time as the file's last access."""
        self.served.clock.advance(42)
        self.served.get(FILE, "bytes=0-99999")
        self.assertEqual(self.served.held.last_access, 42)

    def test_upload_records_last_upload(self) -> None:
        """Serving a range records the time as the store's last upload."""
        self.served.clock.advance(42)
        self.served.get(FILE, "bytes=0-99999")
        self.assertEqual(self.served.store.last_upload, 42)

    def test_last_access_is_when_the_upload_ended(self) -> None:
        """A long upload counts as an access at its end, not only at its start."""
        self.slow_uploads(100_000 / 30)
        self.served.get(FILE, "bytes=0-99999")
        self.assertAlmostEqual(self.served.held.last_access, 30, places=6)

    def test_upload_is_paced_by_the_store_bucket(self) -> None:
        """With an upload limit, the bytes after the burst leave at the bucket's rate."""
        self.slow_uploads(10_000)
        response, body = self.served.get(FILE, "bytes=0-99999")
        self.assertEqual((body, round(self.served.clock.seconds(), 6)), (self.served.data[:100_000], 10.0))

    def test_refused_range_does_not_count_as_access(self) -> None:
        """A refused request does not keep a file from expiring."""
        self.served.clock.advance(42)
        self.served.get(FILE, "bytes=200000-200009")
        self.assertEqual(self.served.held.last_access, 0)


class TcpLikeTransport(StringTransport):
    """A StringTransport that, like a TCP transport, still sends what is written after loseConnection.

    (`StubTreq`'s iosim transport silently drops such writes, so it cannot
    show what a real peer would receive.)
    """

    def resumeProducing(self) -> None:
        if not self.disconnecting:
            super().resumeProducing()


class TruncatedOverHttpTests(SynchronousTestCase):
    """A file truncated on disk, served through a real HTTPChannel."""

    def test_truncated_file_response_is_not_padded(self) -> None:
        """The bytes after the headers are exactly what the file still holds."""
        served = Served(self)
        os.truncate(served.held.path, 150_000)  # piece 1 is "verified" but half gone
        site = Site(served.resource, reactor=served.clock)
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 65001))
        transport = TcpLikeTransport(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 65001), peerAddress=IPv4Address("TCP", "127.0.0.1", 40000)
        )
        channel.makeConnection(transport)
        channel.dataReceived(f"GET {FILE} HTTP/1.1\r\nHost: peer\r\nRange: bytes=100000-199999\r\n\r\n".encode())
        self.flushLoggedErrors(CancelledError)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        kept = served.data[100_000:150_000]
        self.assertEqual((body[: len(kept)] == kept, body[len(kept):]), (True, b""))


class KeyTests(SynchronousTestCase):
    """A file registered with a task key is served only to requests carrying it."""

    def setUp(self) -> None:
        self.served = Served(self)
        self.served.held.key = "0123456789abcdef0123456789abcdef"

    def test_without_the_key_is_404(self) -> None:
        """Knowing the task id reads nothing."""
        response, body = self.served.get(FILE, "bytes=0-9")
        self.assertEqual((response.code, self.served.data[:10] in body), (404, False))

    def test_with_another_key_is_404(self) -> None:
        """A wrong key is the same as none."""
        response, body = self.served.get(FILE, "bytes=0-9", key="f" * 32)
        self.assertEqual(response.code, 404)
        response, body = self.served.get(FILE + "?k=" + self.served.held.key, "bytes=0-9")
        self.assertEqual(response.code, 404)  # the old query form: keys stay out of URLs (and access logs)

    def test_with_the_key_is_206(self) -> None:
        """The task's own key reads the verified range."""
        response, body = self.served.get(FILE, "bytes=0-9", key=self.served.held.key)
        self.assertEqual((response.code, body), (206, self.served.data[:10]))
