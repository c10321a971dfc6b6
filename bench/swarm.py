"""The supernode's control plane at fleet scale: N simulated peers on one task, then many short tasks.

``python3 bench/swarm.py`` runs it all with the defaults (1,000, 3,000 and
10,000 peers on one 64-piece task, then 10,000 one-piece tasks that come and
go).  Try ``--peers 50,200 --churn 200`` first.

Why.  Real peers spend their time moving piece bytes; the supernode only
answers pulls and reports.  Its cost per report and the memory it keeps
must not grow with the size of the fleet, or a big fleet stalls on the one
process every peer talks to.  Here no piece byte moves (except the
supernode's own fetch of the file from the origin, once), so the run
measures the register API alone, at a fleet size no real test rig has.

Method, swarm phase (one fresh supernode per N, ``--peers 1000,3000,10000``):

- A real ``twistd supernode`` on 127.0.0.1 (port 0, a temporary ``--home``,
  RLIMIT_NOFILE raised as far as the hard limit allows: 20,000 here, which
  holds 10,000 long-polls on each side) and an origin on 127.0.0.1 (a thread of this script)
  serving ``--pieces`` x 4 MiB (the same zero block repeated; piece contents
  do not matter to the control plane), with a strong ETag so revalidations
  are cheap 304s.
- Unless ``--cold``, one warm-up peer (port 0: it serves nobody) pulls every
  piece before the clock starts, so the CDN fetch (receiving, hashing and
  writing the file) is not in the CPU figures.  With ``--cold`` the N peers
  register at once and the first one's registration starts the fetch.
- N simulated peers, split over ``--workers`` client processes.  Each opens
  its own persistent HTTP/1.1 connection, registers (a unique cid, ip
  127.0.0.1, a fake nonzero port so it counts as a source) and runs the
  engine's pull loop: exactly one ``GET /peer/task`` outstanding at a time,
  pulled again right after each answer (602: at once; 600: finished); for
  each piece of a 601 it waits ``--delay`` and then reports
  ``/peer/piece/suc`` with the piece's range and source cid.  Reports go
  through a shared pool of ``--report-connections`` connections per worker
  (ten thousand more connections would not fit RLIMIT_NOFILE here); peers
  start (connect and register) at most ``--start-at-once`` at a time per
  worker, and at most 64 connections are being opened at once.
  The client is a minimal HTTP/1.1 protocol on Twisted (one request at a
  time per connection, Content-Length and chunked answers), not
  treq/Agent, whose Deferreds and objects per request would make the
  client compete with the supernode for the two cores.  It costs about
  80-120 us of CPU per request, kernel included: measured, 1-13 % of a
  core while the supernode (one reactor thread) was at 85-100 %, and
  about 0.5 core projected for 10,000 peers x 64 pieces at the aimed
  0.3 ms per report.  So one client process is the default; a second
  one (``--workers 2``) helps only when a worker is near 100 % while the
  supernode has CPU to spare (a warning says so).
- A peer the supernode forgot (404 to a pull: dropped as silent) registers
  again, at most 3 times; a broken connection is reopened, at most 10 times;
  each peer pulls at most 50 x pieces + 100 times.  After ``--deadline``
  seconds the workers stop and the peers that had not finished are counted.

Reading a swarm row:

- ``wall s``: from the start signal to the last peer's 600 (or the deadline);
- ``done``: peers that got 600, of N;
- ``CPU ms/rep``: the supernode's user+system CPU (all its threads, from
  /proc/PID/stat) over the run (pulls, registrations and all), divided
  by the success reports it answered (``reports``);
- ``pulls/rep``: pull answers per report; ``wait p50/p99``: client-side
  time of the requests whose answer gave work (pulls that answered 601 and
  reports answered with the peer's next pieces: how long a peer waited);
  ``pull p50/p99``: the same over every pull;
- ``wake/rep``, ``assign/rep``: from the supernode's ``GET /metrics``
  (``dfly_supernode_pull_wakeups_total``: held pulls resumed by an event;
  ``dfly_supernode_assign_calls_total``), scraped before and after; ``n/a``
  when the supernode has no /metrics;
- ``peak MiB``: the supernode's ``VmHWM`` (a fresh process per N, so it is
  this run's peak);
- ``client CPU``: the workers' CPU seconds, and the busiest worker's share
  of one core (near 100 % means the client, not the supernode, set the pace);
- a note follows when the supernode plus the client used >= 1.8 of the 2
  cores (they competed for CPUs), and the machine's own busy share (other
  jobs on a shared machine count too).

Churn phase (``--churn K``, 0 to skip): one fresh supernode (with
``--task-expire-time`` when it has that flag); K distinct 1 KiB URLs
(``/churn/<i>`` on the origin), one simulated peer each, ``--churn-at-once``
at a time: register, pull until 600, report, ``/peer/service/down``.  It
prints the supernode's ``VmRSS`` after the first 100 tasks, after all K,
and after waiting for task expiry (``--expire-wait``; by default twice the
expiry time, or until /metrics shows no task in memory), with each as a
ratio to the first-100 level: a supernode that forgets finished tasks stays
flat.

Measured here against the supernode of c102ec1 (before the long-poll
rework), the 2-core machine shared with other jobs: 50 peers 1.4-2.1 ms
CPU per report, all done in 6-9 s; 200 peers 7-9 ms per report (every
report wakes every held pull), done in 127 s; 1,000 peers 45 ms per
report and none of them finished within the 900 s deadline (20,413 of
64,000 reports, 6.8 pulls per report, most of them 602); 10,000 peers:
a 60 s smoke run only (44 ms per report, 1,312 registered by then).  Churn of 10,000 tasks: 96 s, RSS 61 -> 125 MiB (2.05x,
that supernode forgets no task).  Peak RSS stayed under 80 MiB.

With one request per report (``next=1``), pulls and reports outside
klein, lazy free views and held pulls as callbacks (``python3
bench/swarm.py``, same machine): 1,000 / 3,000 / 10,000 peers 0.222 /
0.227 / 0.261 ms per report (flat: 1.17x), all finished in 15 / 45 /
194 s, 0.05-0.08 pulls per report, peak RSS 81 / 126 / 240 MiB; the
supernode's one reactor thread was the pace-setter throughout (86-98 %
of a core).  Churn of 10,000 tasks: 45 s, RSS 63 -> 84 MiB (1.33x), 0
tasks left after expiry.  Figures move by about +-30 % with the other
jobs on the machine: compare runs made side by side.

Aims (marked PASS or MISS for information; the exit status is 1 only when
the bench itself could not run): supernode CPU <= 0.3 ms per report at
every N and flat within 1.5x from the smallest to the largest N; every
simulated peer finishes; peak RSS <= 500 MiB at 10,000 peers; churn RSS
after expiry <= 1.5 x the first-100 level.  Everything runs on 127.0.0.1;
every child process and the temporary directory are removed at the end,
on errors, Ctrl-C and SIGTERM too (children also get SIGTERM if this
script dies).
"""

from __future__ import annotations

import argparse
import array
import collections
import ctypes
import functools
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import attrs

#: The checkout this script belongs to: by default its dfly is the one measured.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import Children, process_cpu, read_text  # noqa: E402

MIB = 1 << 20
PIECE = 4 * MIB
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
#: File descriptors asked for, for ourselves and the supernode (10,000 long-polls each side).
NOFILE = 65536
AIM_CPU_MS = 0.3  # supernode CPU per report
AIM_FLAT = 1.5  # largest N's CPU per report / smallest N's
AIM_RSS_MIB = 500  # supernode peak RSS at 10,000 peers
AIM_CHURN = 1.5  # churn RSS after expiry / after the first 100 tasks
SATURATED = 1.8  # supernode + client CPU-seconds per wall second on 2 cores
CHURN_CHECKPOINT = 100
CHURN_SIZE = 1024
MAX_REGISTRATIONS = 3  # a peer the supernode dropped registers again at most this often
MAX_RECONNECTS = 10
#: What a simulated peer asks its held pull's budget to be (``wait``), as the engine does.
PULL_WAIT = 30.0
REQUEST_TIMEOUT = 120.0  # client side, per request (pulls are held for up to PULL_WAIT)


def log(message: str) -> None:
    print(f"swarm: {message}", file=sys.stderr, flush=True)


# --- the origin (a thread of this process) -------------------------------------------


class OriginHandler(BaseHTTPRequestHandler):
    """``/file``: ``pieces`` x 4 MiB of zeros; ``/churn/<i>``: 1 KiB.  Strong ETags, 304s, one-range GETs."""

    protocol_version = "HTTP/1.1"
    pieces = 64
    block = bytes(PIECE)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the supernode's log has the requests

    def do_GET(self) -> None:
        if self.path == "/file":
            size, etag, make = self.pieces * PIECE, f'"swarm-{self.pieces}"', None
        elif (m := re.fullmatch(r"/churn/(\d+)", self.path)) is not None:
            size, etag = CHURN_SIZE, f'"churn-{m.group(1)}"'
            make = (m.group(1).encode() * CHURN_SIZE)[:CHURN_SIZE]
        else:
            self.send_error(404)
            return
        if self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = 0, size - 1
        ranged = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
        if ranged and int(ranged.group(1)) < size:
            start = int(ranged.group(1))
            end = min(int(ranged.group(2) or size - 1), size - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("ETag", etag)
        self.end_headers()
        if make is not None:
            self.wfile.write(make[start:end + 1])
            return
        view = memoryview(self.block)
        at = start
        try:
            while at <= end:
                offset = at % PIECE
                n = min(PIECE - offset, end + 1 - at)
                self.wfile.write(view[offset:offset + n])
                at += n
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the supernode dropped a body it did not need


def start_origin(pieces: int) -> tuple[ThreadingHTTPServer, str]:
    handler = type("Origin", (OriginHandler,), {"pieces": pieces})
    server_class = type("OriginServer", (ThreadingHTTPServer,), {
        "request_queue_size": 1024,  # socketserver's 5 drops the SYNs of 50 fetches at once (1 s retries)
        "daemon_threads": True,
    })
    origin = server_class(("127.0.0.1", 0), handler)
    threading.Thread(target=origin.serve_forever, name="origin", daemon=True).start()
    return origin, f"http://127.0.0.1:{origin.server_address[1]}"


# --- the client: a minimal HTTP/1.1 connection (runs in the worker processes) ----------


def parse_response(buf: bytes) -> tuple[int, bytes, int, bool] | None:
    """(status, body, bytes used, server closes) of the first whole response in ``buf``, or None."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    status = int(buf[9:12])
    head = buf[:end].lower()
    closes = b"\r\nconnection: close" in head
    pos = end + 4
    if b"\r\ntransfer-encoding: chunked" in head:
        parts = []
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                return None
            size = int(buf[pos:line_end].split(b";", 1)[0], 16)
            if size == 0:
                # Trailer lines, then an empty line.
                pos = line_end + 2
                while True:
                    line_end = buf.find(b"\r\n", pos)
                    if line_end < 0:
                        return None
                    if line_end == pos:
                        return status, b"".join(parts), line_end + 2, closes
                    pos = line_end + 2
            if len(buf) < line_end + 2 + size + 2:
                return None
            parts.append(buf[line_end + 2:line_end + 2 + size])
            pos = line_end + 2 + size + 2
    length = 0
    at = head.find(b"\r\ncontent-length:")
    if at >= 0:
        line_end = head.find(b"\r\n", at + 2)
        length = int(head[at + 17:line_end if line_end >= 0 else len(head)])
    if len(buf) < pos + length:
        return None
    return status, buf[pos:pos + length], pos + length, closes


Answer = Callable[[int, bytes], None]
Failed = Callable[[str], None]


def make_connection_classes() -> tuple[type, type]:
    """`HttpConnection` and its factory, defined once Twisted is imported (only the workers import it)."""
    from twisted.internet.protocol import ClientFactory, Protocol

    class HttpConnection(Protocol):
        """One persistent HTTP/1.1 connection carrying one request at a time.

        Invariant: ``waiting`` is set from ``request`` until its answer (or
        the connection's loss) calls back exactly one of its two callables.
        """

        def __init__(self, worker: "Worker", ready: Callable[["HttpConnection"], None]) -> None:
            self.worker = worker
            self.ready = ready
            self.buf = b""
            self.waiting: tuple[Answer, Failed] | None = None
            self.sent_at = 0.0
            self.open = False
            self.pooled = False

        def connectionMade(self) -> None:
            self.open = True
            self.transport.setTcpNoDelay(True)
            self.worker.connected(self)
            self.ready(self)

        def request(self, data: bytes, answer: Answer, failed: Failed) -> None:
            assert self.waiting is None and self.open
            self.waiting = (answer, failed)
            self.sent_at = self.worker.reactor.seconds()
            # Straight to the socket: Twisted's write() would register the
            # socket for writing and unregister it after one send, two epoll
            # calls per request, about a third of this client's CPU.  Safe
            # because one request at a time means Twisted's buffer is empty
            # here (an answer came, so the last request was all sent).
            try:
                sent = self.transport.socket.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # Twisted's own write below meets the error and closes the connection
            if sent < len(data):
                self.transport.write(data[sent:])

        def dataReceived(self, data: bytes) -> None:
            self.buf += data
            while self.waiting is not None:
                parsed = parse_response(self.buf)
                if parsed is None:
                    return
                status, body, used, closes = parsed
                self.buf = self.buf[used:]
                answer, _ = self.waiting
                self.waiting = None
                if closes:
                    self.open = False
                    self.transport.loseConnection()
                answer(status, body)

        def connectionLost(self, reason: Any = None) -> None:
            self.open = False
            waiting, self.waiting = self.waiting, None
            if waiting is not None:
                waiting[1](reason.getErrorMessage() if reason is not None else "connection lost")
            self.worker.lost(self)

    class ConnectionFactory(ClientFactory):
        def __init__(self, worker: "Worker", ready: Callable[[HttpConnection], None], failed: Failed) -> None:
            self.worker, self.ready, self.failed = worker, ready, failed

        def buildProtocol(self, addr: Any) -> HttpConnection:
            return HttpConnection(self.worker, self.ready)

        def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
            self.worker.connected(None)
            self.failed(reason.getErrorMessage())

    return HttpConnection, ConnectionFactory


def error_kind(message: str) -> str:
    """An error message without what differs per peer (quoted cids, task ids), so that like errors add up."""
    return re.sub(r"[0-9a-f]{64}", "<taskId>", re.sub(r"'[^']*'", "'..'", message)).strip()[:160]


class ErrorCounts(collections.Counter):  # type: ignore[type-arg]
    """Counts error messages by `error_kind`."""

    def __getitem__(self, key: str) -> int:
        return super().__getitem__(error_kind(key))

    def __setitem__(self, key: str, value: int) -> None:
        super().__setitem__(error_kind(key), value)


@attrs.define(eq=False)
class Worker:
    """The client side of one worker process: a connector, a report pool, stats and a watchdog."""

    reactor: Any
    host: str
    port: int
    factory_class: type
    connect_limit: int = 64
    connecting: int = 0
    connect_queue: collections.deque[Callable[[], None]] = attrs.Factory(collections.deque)
    start_limit: int = 500
    starting: int = 0
    start_queue: collections.deque[Callable[[], None]] = attrs.Factory(collections.deque)
    live: set[Any] = attrs.Factory(set)
    pool_idle: list[Any] = attrs.Factory(list)
    pool_queue: collections.deque[tuple[bytes, Answer, Failed, int]] = attrs.Factory(collections.deque)
    pool_size: int = 0
    stats: collections.Counter[str] = attrs.Factory(collections.Counter)
    errors: ErrorCounts = attrs.Factory(ErrorCounts)

    # --- connections ---------------------------------------------------------------

    def connect(self, ready: Callable[[Any], None], failed: Failed) -> None:
        """Open a connection (at most ``connect_limit`` being opened at once); ``ready(conn)`` when up.

        Bounded so that 10,000 peers starting together do not overflow the
        supernode's listen backlog (dropped SYNs are retried only after 1 s).
        """
        def start() -> None:
            self.connecting += 1
            self.reactor.connectTCP(self.host, self.port, self.factory_class(self, ready, failed), timeout=30)

        if self.connecting < self.connect_limit:
            start()
        else:
            self.connect_queue.append(start)

    def connected(self, conn: Any) -> None:
        """A connection attempt ended: up (``conn``) or failed (None)."""
        if conn is not None:
            self.live.add(conn)
        self.connecting -= 1
        if self.connect_queue and self.connecting < self.connect_limit:
            self.connect_queue.popleft()()

    def admit(self, start: Callable[[], None]) -> None:
        """Run ``start`` when fewer than ``start_limit`` peers are between starting and registered.

        The supernode's listen backlog is 50 and a busy reactor accepts
        late; a connection the kernel cannot queue costs a 1 s SYN retry, so
        peers come up a bounded number at a time (``--start-at-once``).
        """
        if self.starting < self.start_limit:
            self.starting += 1
            start()
        else:
            self.start_queue.append(start)

    def admitted(self) -> None:
        """One starting peer registered (or gave up): let the next one start."""
        self.starting -= 1
        if self.start_queue:
            self.starting += 1
            self.start_queue.popleft()()

    def lost(self, conn: Any) -> None:
        self.live.discard(conn)
        if conn in self.pool_idle:
            self.pool_idle.remove(conn)
        if conn.pooled:
            self.stats["pool reconnects"] += 1
            self.reactor.callLater(0.1, self._add_pool_connection)

    def watchdog(self) -> None:
        """Abort connections whose request is older than REQUEST_TIMEOUT (their callers retry)."""
        now = self.reactor.seconds()
        for conn in list(self.live):
            if conn.waiting is not None and now - conn.sent_at > REQUEST_TIMEOUT:
                self.errors["request timed out"] += 1
                conn.transport.abortConnection()

    # --- the shared pool (reports) ----------------------------------------------------

    def start_pool(self, size: int) -> None:
        for _ in range(size):
            self._add_pool_connection()

    def _add_pool_connection(self) -> None:
        def ready(conn: Any) -> None:
            conn.pooled = True
            self._pool_free(conn)

        def failed(reason: str) -> None:
            self.errors[f"pool connect: {reason}"] += 1
            self.reactor.callLater(1.0, self._add_pool_connection)

        self.connect(ready, failed)

    def pooled(self, data: bytes, answer: Answer, failed: Failed, tries: int = 3) -> None:
        """Send ``data`` on a free pool connection; a lost connection resends it (``tries`` in all)."""
        if self.pool_idle:
            self._send(self.pool_idle.pop(), data, answer, failed, tries)
        else:
            self.pool_queue.append((data, answer, failed, tries))

    def _send(self, conn: Any, data: bytes, answer: Answer, failed: Failed, tries: int) -> None:
        def answered(status: int, body: bytes) -> None:
            if conn.open:
                self._pool_free(conn)
            answer(status, body)

        def lost(reason: str) -> None:
            if tries > 1:
                self.pooled(data, answer, failed, tries - 1)
            else:
                failed(reason)

        conn.request(data, answered, lost)

    def _pool_free(self, conn: Any) -> None:
        if self.pool_queue:
            data, answer, failed, tries = self.pool_queue.popleft()
            self._send(conn, data, answer, failed, tries)
        else:
            self.pool_idle.append(conn)


def get_request(host: str, port: int, path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


def registration_request(host: str, port: int, url: str, cid: str, peer_port: int) -> bytes:
    body = json.dumps({"url": url, "cid": cid, "ip": "127.0.0.1", "port": peer_port, "hostName": cid,
                       "version": "swarm"}).encode()
    return (f"POST /peer/registry HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@functools.lru_cache(maxsize=1 << 16)
def quote(text: str) -> str:
    """A cid for a query string; cached: each peer's own cid and its sources' recur in every request."""
    return urllib.parse.quote(text, safe="")


@attrs.define(eq=False)
class SimulatedPeer:
    """One peer of the swarm: its own pull connection, the engine's pull loop, reports through the pool."""

    worker: Worker
    spec: dict[str, Any]
    cid: str
    peer_port: int
    on_end: Callable[["SimulatedPeer"], None]
    conn: Any = None
    task_id: str = ""
    pull_data: bytes = b""
    pulls: int = 0
    registrations: int = 0
    reconnects: int = 0
    finished: bool = False
    ended: bool = False
    starting: bool = True  # admitted by the worker, not registered yet
    registered: bool = False  # the supernode knows this cid (as far as we know)
    lat_wait: array.array = attrs.Factory(lambda: array.array("f"))
    lat_all: array.array = attrs.Factory(lambda: array.array("f"))

    def start(self) -> None:
        self.worker.connect(self._connected, self._connect_failed)

    def _connected(self, conn: Any) -> None:
        self.conn = conn
        if self.registered:
            self._pull()
        else:
            self._register()

    def _connect_failed(self, reason: str) -> None:
        self.worker.errors[f"connect: {reason}"] += 1
        self._retry_connection()

    def _retry_connection(self) -> None:
        self.conn = None
        self.reconnects += 1
        if self.reconnects > MAX_RECONNECTS:
            self._end("too many broken connections")
            return
        self.worker.reactor.callLater(0.5, self.start)

    def _register(self) -> None:
        """On the peer's own connection, as a real peer does (not queued behind others' reports)."""
        self.registered = False
        if self.conn is None or not self.conn.open:
            self._retry_connection()
            return
        self.registrations += 1
        if self.registrations > MAX_REGISTRATIONS:
            self._end("registered too often")
            return
        w, s = self.worker, self.spec
        w.stats["registrations"] += 1
        self.conn.request(registration_request(w.host, w.port, s["url"], self.cid, self.peer_port),
                          self._registered, self._pull_lost)

    def _registered(self, status: int, body: bytes) -> None:
        self._started()
        if status != 200:
            self.worker.errors[f"registration {status}: {body.decode(errors='replace')}"] += 1
            self._end("registration refused")
            return
        self.task_id = json.loads(body)["data"]["taskId"]
        self.registered = True
        w = self.worker
        w.stats["registered"] += 1
        self.pull_data = get_request(
            w.host, w.port, f"/peer/task?taskId={self.task_id}&srcCid={quote(self.cid)}&wait={PULL_WAIT:g}")
        if self.conn is not None and self.conn.open:
            self._pull()
        else:
            self._retry_connection()

    def _pull(self) -> None:
        if self.ended:
            return
        self.pulls += 1
        if self.pulls > self.spec["max_pulls"]:
            self._end("too many pulls")
            return
        if not self.conn.open:  # the server closed it after its last answer
            self._retry_connection()
            return
        self.conn.request(self.pull_data, self._pulled, self._pull_lost)

    def _pull_lost(self, reason: str) -> None:
        self.worker.errors[f"{'pull' if self.registered else 'registration'}: {reason}"] += 1
        if not self.ended:
            self._retry_connection()

    def _pulled(self, status: int, body: bytes) -> None:
        w = self.worker
        latency = w.reactor.seconds() - self.conn.sent_at
        self.lat_all.append(latency)
        try:
            answer = json.loads(body)
            code = answer["code"]
        except (ValueError, KeyError, TypeError):
            w.errors[f"pull {status}: not JSON"] += 1
            self._end("bad pull answer")
            return
        w.stats[f"pull {code}"] += 1
        if code == 601:
            self.lat_wait.append(latency)
            self._run(answer.get("data") or [])
            self._pull()
        elif code == 602:
            self._pull()
        elif code == 600:
            self.finished = True
            self._end(None)
        elif status == 404:
            # Dropped (went silent in the supernode's eyes): register again.
            w.errors[f"pull 404: {answer.get('msg', '')}"] += 1
            self._register()
        else:
            w.errors[f"pull {status}/{code}: {answer.get('msg', '')}"] += 1
            self._end("pull failed")

    def _run(self, pieces: list[dict[str, Any]]) -> None:
        """"Fetch" each piece: report it after the spec's delay."""
        for piece in pieces:
            self.worker.reactor.callLater(self.spec["delay"], self._report, piece)

    def _report(self, piece: dict[str, Any]) -> None:
        """As the engine reports: ``next=1``, so the answer carries this peer's next pieces."""
        if self.ended:
            return
        w = self.worker
        path = (f"/peer/piece/suc?taskId={self.task_id}&cid={quote(self.cid)}&dstCid={quote(str(piece.get('cid')))}"
                f"&pieceRange={piece.get('range')}&next=1")
        w.stats["reports sent"] += 1
        sent = w.reactor.seconds()
        w.pooled(get_request(w.host, w.port, path), lambda status, body: self._reported(sent, status, body),
                 self._report_lost)

    def _reported(self, sent: float, status: int, body: bytes) -> None:
        w = self.worker
        if status != 200:
            w.stats["reports refused"] += 1
            w.errors[f"report {status}: {body.decode(errors='replace')}"] += 1
            return
        w.stats["reports ok"] += 1
        try:
            pieces = json.loads(body).get("data") or []
        except (ValueError, AttributeError):
            w.errors["report 200: not JSON"] += 1
            return
        if pieces and not self.ended:
            self.lat_wait.append(w.reactor.seconds() - sent)
            self._run(pieces)

    def _report_lost(self, reason: str) -> None:
        self.worker.stats["reports lost"] += 1
        self.worker.errors[f"report: {reason}"] += 1

    def _started(self) -> None:
        if self.starting:
            self.starting = False
            self.worker.admitted()

    def _end(self, why: str | None) -> None:
        if self.ended:
            return
        self.ended = True
        self._started()
        if why is not None:
            self.worker.errors[f"gave up: {why}"] += 1
        if self.conn is not None and self.conn.open and self.conn.waiting is None:
            self.conn.transport.loseConnection()  # a finished peer goes away
        self.on_end(self)


@attrs.define(eq=False)
class ChurnSlot:
    """One of ``--churn-at-once`` slots: takes the next URL, runs one peer on it to the end, repeats."""

    worker: Worker
    spec: dict[str, Any]
    next_index: Callable[[], int | None]
    on_task_done: Callable[[], None]
    on_idle: Callable[[], None]
    conn: Any = None
    index: int = -1
    cid: str = ""
    task_id: str = ""
    pulls: int = 0
    connections: int = 0

    def start(self) -> None:
        self._next()

    def _send(self, data: bytes, answer: Answer) -> None:
        """On this slot's connection, reopened first if the server closed it."""
        if self.conn is not None and self.conn.open:
            self.conn.request(data, answer, self._lost)
            return
        self.connections += 1
        if self.connections > MAX_RECONNECTS + 1:
            self.worker.errors["churn: too many broken connections"] += 1
            self.on_idle()  # this slot stops; the others go on
            return

        def ready(conn: Any) -> None:
            self.conn = conn
            conn.request(data, answer, self._lost)

        def failed(reason: str) -> None:
            self.worker.errors[f"connect: {reason}"] += 1
            self._task_over(False)

        self.worker.connect(ready, failed)

    def _lost(self, reason: str) -> None:
        self.worker.errors[f"churn: {reason}"] += 1
        self.conn = None
        self._task_over(False)

    def _next(self) -> None:
        index = self.next_index()
        if index is None:
            self.on_idle()
            return
        w = self.worker
        self.index, self.pulls = index, 0
        self.cid = f"127.0.0.1-churn-{index}-{self.spec['run']}"
        w.stats["registrations"] += 1
        self._send(registration_request(w.host, w.port, f"{self.spec['url']}/churn/{index}", self.cid,
                                        20000 + index % 40000), self._registered)

    def _registered(self, status: int, body: bytes) -> None:
        if status != 200:
            self.worker.errors[f"registration {status}: {body.decode(errors='replace')}"] += 1
            self._task_over(False)
            return
        self.task_id = json.loads(body)["data"]["taskId"]
        self._pull()

    def _pull(self) -> None:
        self.pulls += 1
        if self.pulls > 100:
            self.worker.errors["churn: too many pulls"] += 1
            self._task_over(False)
            return
        w = self.worker
        self._send(get_request(w.host, w.port, f"/peer/task?taskId={self.task_id}&srcCid={quote(self.cid)}"),
                   self._pulled)

    def _pulled(self, status: int, body: bytes) -> None:
        w = self.worker
        try:
            answer = json.loads(body)
            code = answer["code"]
        except (ValueError, KeyError, TypeError):
            w.errors[f"churn pull {status}: not JSON"] += 1
            self._task_over(False)
            return
        w.stats[f"pull {code}"] += 1
        if code == 601:
            pieces = list(answer.get("data") or [])
            self._report_all(pieces)
        elif code == 602:
            self._pull()
        elif code == 600:
            self._send(get_request(w.host, w.port, f"/peer/service/down?taskId={self.task_id}&cid={quote(self.cid)}"),
                       self._down)
        else:
            w.errors[f"churn pull {status}/{code}: {answer.get('msg', '')}"] += 1
            self._task_over(False)

    def _report_all(self, pieces: list[dict[str, Any]]) -> None:
        if not pieces:
            self._pull()
            return
        piece, rest = pieces[0], pieces[1:]
        w = self.worker
        path = (f"/peer/piece/suc?taskId={self.task_id}&cid={quote(self.cid)}&dstCid={quote(str(piece.get('cid')))}"
                f"&pieceRange={piece.get('range')}")
        w.stats["reports sent"] += 1

        def reported(status: int, body: bytes) -> None:
            w.stats["reports ok" if status == 200 else "reports refused"] += 1
            if status != 200:
                w.errors[f"report {status}: {body.decode(errors='replace')}"] += 1
            self._report_all(rest)

        self._send(get_request(w.host, w.port, path), reported)

    def _down(self, status: int, body: bytes) -> None:
        if status != 200:
            self.worker.errors[f"service/down {status}: {body.decode(errors='replace')}"] += 1
        self._task_over(status == 200)

    def _task_over(self, ok: bool) -> None:
        self.worker.stats["tasks ok" if ok else "tasks failed"] += 1
        self.on_task_done()
        self._next()


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(spec: dict[str, Any]) -> None:
    """A client process: wait for ``go`` on stdin, run the peers or churn slots, write ``spec['result']``."""
    raise_nofile()
    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall

    worker = Worker(reactor, spec["host"], spec["port"], make_connection_classes()[1],
                    start_limit=spec.get("start_at_once", 500))
    result: dict[str, Any] = {}
    print(json.dumps({"event": "ready"}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    started, cpu_started = time.monotonic(), cpu_self()
    finish_times = array.array("f")
    peers: list[SimulatedPeer] = []

    def finish() -> None:
        if result:
            return
        elapsed = time.monotonic() - started
        result.update(elapsed=elapsed, cpu=cpu_self() - cpu_started, stats=dict(worker.stats),
                      errors=dict(worker.errors.most_common(12)), error_kinds=len(worker.errors),
                      finished=sum(p.finished for p in peers), peers=len(peers))
        print(json.dumps({"event": "done", "elapsed": elapsed}), flush=True)
        if spec["mode"] == "swarm":
            for name, field in (("lat_wait", "lat_wait"), ("lat_all", "lat_all")):
                values = array.array("f")
                for p in peers:
                    values.extend(getattr(p, field))
                with open(f"{spec['result']}.{name}", "wb") as f:
                    values.tofile(f)
            with open(f"{spec['result']}.finish", "wb") as f:
                finish_times.tofile(f)
        with open(spec["result"], "w") as f:
            json.dump(result, f)
        if reactor.running:
            reactor.stop()

    LoopingCall(worker.watchdog).start(5.0, now=False)
    reactor.callLater(spec["deadline"], finish)
    if spec["mode"] == "swarm":
        remaining = [spec["count"]]

        def peer_ended(peer: SimulatedPeer) -> None:
            if peer.finished:
                finish_times.append(time.monotonic() - started)
            remaining[0] -= 1
            if remaining[0] == 0:
                finish()

        worker.start_pool(spec["pool"])
        for n in range(spec["first"], spec["first"] + spec["count"]):
            port = spec["peer_port"] if spec["peer_port"] is not None else 20000 + n % 40000
            peers.append(SimulatedPeer(worker, spec, f"127.0.0.1-{spec['prefix']}-{n}-{spec['run']}", port, peer_ended))
        for p in peers:
            reactor.callWhenRunning(worker.admit, p.start)
    else:
        indices = iter(range(spec["count"]))
        done = [0]
        idle = [0]
        slots = min(spec["at_once"], spec["count"])

        def next_index() -> int | None:
            return next(indices, None)

        def task_done() -> None:
            done[0] += 1
            if done[0] == CHURN_CHECKPOINT:
                print(json.dumps({"event": "checkpoint", "done": done[0]}), flush=True)

        def slot_idle() -> None:
            idle[0] += 1
            if idle[0] == slots:
                finish()

        for _ in range(slots):
            reactor.callWhenRunning(ChurnSlot(worker, spec, next_index, task_done, slot_idle).start)
    reactor.run()
    if not result:  # stopped by a signal
        sys.exit(1)


# --- processes and /proc -----------------------------------------------------------------


def raise_nofile() -> None:
    """As many file descriptors as NOFILE, or the hard limit (only CAP_SYS_RESOURCE may raise that)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limits in ((NOFILE, max(NOFILE, hard)), (min(NOFILE, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            return
        except (ValueError, OSError):
            continue


def child_setup() -> None:
    """In each child before exec: more file descriptors, and SIGTERM when this script dies."""
    raise_nofile()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def status_mib(pid: int, field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", read_text(f"/proc/{pid}/status"), re.M)
    return int(match.group(1)) / 1024 if match else float("nan")


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot (steal counts as busy)."""
    values = [int(v) for v in read_text("/proc/stat").split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / hz, sum(values) / hz


@attrs.define
class Supernode:
    process: subprocess.Popen[bytes]
    port: int
    home: str
    log: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def get(self, path: str, timeout: float = 60.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def metrics(self) -> dict[str, float] | None:
        """The /metrics samples by name (labels kept in the name), or None when it has none."""
        try:
            status, body = self.get("/metrics")
        except OSError:
            return None
        if status != 200:
            return None
        samples = {}
        for line in body.decode(errors="replace").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                try:
                    samples[name] = float(value)
                except ValueError:
                    pass
        return samples


def supernode_flags(env: dict[str, str]) -> str:
    done = subprocess.run([*TWISTD, "-n", "supernode", "--help"], env=env, capture_output=True, text=True,
                          timeout=120, cwd="/")
    return done.stdout + done.stderr


def start_supernode(children: Children, env: dict[str, str], home: str, extra: list[str],
                    twistd_args: list[str] = []) -> Supernode:
    """A fresh supernode on 127.0.0.1, its API answering /_ping; retried once a minute later if it fails to start."""
    for attempt in (1, 2):
        os.makedirs(home, exist_ok=True)
        log_path = os.path.join(home, f"twistd-{attempt}.log")
        process = children.start([*TWISTD, "-n", "--pidfile=", *twistd_args, "-l", "-", "supernode", "--port", "0",
                                  "--download-port", "0", "--listen", "127.0.0.1", "--home", home, *extra],
                                 log=log_path, preexec_fn=child_setup, cwd=home)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and process.poll() is None:
            match = re.search(r"register API listening on [\d.]+:(\d+)", read_text(log_path))
            if match:
                node = Supernode(process, int(match.group(1)), home, log_path)
                try:
                    if node.get("/_ping", timeout=5)[0] == 200:
                        return node
                except OSError:
                    pass
            time.sleep(0.1)
        if process.poll() is None:
            process.kill()
        tail = read_text(log_path)[-1500:]
        if attempt == 1:
            log(f"the supernode did not start (it may be being edited); retrying in 60 s. Its log ends:\n{tail}")
            time.sleep(60)
    raise SystemExit(f"swarm: the supernode did not start twice, see {log_path}")


@attrs.define
class WorkerProcess:
    process: subprocess.Popen[bytes]
    result_path: str
    lines: queue.Queue[dict[str, Any] | None] = attrs.Factory(queue.Queue)

    def read_lines(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.lines.put(json.loads(line))
            except ValueError:
                log(f"worker said: {line.decode(errors='replace').rstrip()}")
        self.lines.put(None)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        self.process.stdin.flush()

    def result(self) -> dict[str, Any]:
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
        text = read_text(self.result_path)
        return json.loads(text) if text else {}


def wait_for_done(workers: list[WorkerProcess], end_by: float) -> None:
    """Until each worker said ``done`` (or exited, or ``end_by`` passed)."""
    for w in workers:
        while True:
            event = w.next_event(max(0.1, min(1.0, end_by - time.monotonic())))
            if event is not None and event.get("event") == "done":
                break
            if event is None and (w.process.poll() is not None or time.monotonic() > end_by):
                break


def start_workers(children: Children, specs: list[dict[str, Any]]) -> list[WorkerProcess]:
    """Start the client processes and wait until each is ready for ``go``."""
    workers = []
    for spec in specs:
        process = children.start([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=child_setup)
        w = WorkerProcess(process, spec["result"])
        threading.Thread(target=w.read_lines, daemon=True).start()
        workers.append(w)
    for w in workers:
        event = w.next_event(120)
        if not event or event.get("event") != "ready":
            raise SystemExit(f"swarm: a client process did not start (exit {w.process.poll()})")
    return workers


# --- the phases ----------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


def load_floats(path: str) -> list[float]:
    values = array.array("f")
    try:
        with open(path, "rb") as f:
            values.frombytes(f.read())
    except OSError:
        pass
    return list(values)


@attrs.define
class SwarmRow:
    peers: int
    wall: float
    finished: int
    reports: int
    supernode_cpu: float
    pulls: int
    wait: list[float]  # sorted, seconds
    pull_all: list[float]
    peak_mib: float
    wakeups: float | None
    assigns: float | None
    client_cpu: float
    busiest_worker: float  # its CPU seconds / its wall seconds
    machine_busy: float  # share of the machine's CPUs busy during the run
    stats: dict[str, int]
    errors: dict[str, int]
    finish_p50: float
    warmup: float

    @property
    def cpu_ms_per_report(self) -> float:
        return 1000 * self.supernode_cpu / self.reports if self.reports else float("nan")


def merge_counts(dicts: list[dict[str, int]]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for d in dicts:
        total.update(d)
    return dict(total)


def swarm_specs(args: argparse.Namespace, api_port: int, url: str, peers: int, work: str, prefix: str,
                workers: int, deadline: float, delay: float, peer_port: int | None) -> list[dict[str, Any]]:
    run = f"{time.time():.3f}"
    workers = min(workers, peers)
    specs = []
    first = 0
    for w in range(workers):
        count = peers // workers + (1 if w < peers % workers else 0)
        specs.append({"mode": "swarm", "host": "127.0.0.1", "port": api_port, "url": url, "first": first,
                      "count": count, "delay": delay, "deadline": deadline, "pool": args.report_connections,
                      "max_pulls": 50 * args.pieces + 100, "start_at_once": args.start_at_once, "prefix": prefix, "run": run, "peer_port": peer_port,
                      "result": os.path.join(work, f"{prefix}-{peers}-{w}.json")})
        first += count
    return specs


def run_swarm(args: argparse.Namespace, env: dict[str, str], url: str, peers: int, work: str) -> SwarmRow:
    home = os.path.join(work, f"supernode-{peers}")
    with Children(env) as children:
        profile = ["--profiler=cprofile", "--savestats", f"--profile={args.profile}-{peers}.prof"] if args.profile else []
        node = start_supernode(children, env, home, [], profile)
        warmup = 0.0
        if not args.cold:
            started = time.monotonic()
            [w] = start_workers(children, swarm_specs(args, node.port, url, 1, work, "warmup", 1, 300, 0.0, 0))
            w.go()
            w.next_event(330)
            result = w.result()
            warmup = time.monotonic() - started
            if result.get("finished") != 1:
                raise SystemExit(f"swarm: the warm-up peer did not finish: {result.get('errors')}; see {node.log}")
        workers = start_workers(children, swarm_specs(args, node.port, url, peers, work, "peer", args.workers,
                                                      args.deadline, args.delay, None))
        before = node.metrics()
        cpu_before, machine_before = sum(process_cpu(node.pid)), machine_busy()
        started = time.monotonic()
        for w in workers:
            w.go()
        wait_for_done(workers, started + args.deadline + 120)
        wall_all = time.monotonic() - started
        cpu_after, machine_after = sum(process_cpu(node.pid)), machine_busy()
        peak = status_mib(node.pid, "VmHWM")
        after = node.metrics()
        results = [w.result() for w in workers]
    stats = merge_counts([r.get("stats", {}) for r in results])
    errors = merge_counts([r.get("errors", {}) for r in results])
    wait: list[float] = []
    pull_all: list[float] = []
    finish: list[float] = []
    for spec_result in (w.result_path for w in workers):
        wait += load_floats(spec_result + ".lat_wait")
        pull_all += load_floats(spec_result + ".lat_all")
        finish += load_floats(spec_result + ".finish")
    wait.sort()
    pull_all.sort()
    finish.sort()

    def per(name: str) -> float | None:
        if before is None or after is None or name not in after:
            return None
        return after[name] - before.get(name, 0.0)

    busy = (machine_after[0] - machine_before[0]) / max(1e-9, machine_after[1] - machine_before[1])
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return SwarmRow(
        peers=peers,
        wall=max((r.get("elapsed", wall_all) for r in results), default=wall_all),
        finished=sum(r.get("finished", 0) for r in results),
        reports=stats.get("reports ok", 0) + stats.get("reports refused", 0),
        supernode_cpu=cpu_after - cpu_before,
        pulls=sum(v for k, v in stats.items() if k.startswith("pull ")),
        wait=wait,
        pull_all=pull_all,
        peak_mib=peak,
        wakeups=per("dfly_supernode_pull_wakeups_total"),
        assigns=per("dfly_supernode_assign_calls_total"),
        client_cpu=sum(r.get("cpu", 0.0) for r in results),
        busiest_worker=max((r.get("cpu", 0.0) / max(1e-9, r.get("elapsed", 1.0)) for r in results), default=0.0),
        machine_busy=busy,
        stats=stats,
        errors=errors,
        finish_p50=finish[peers // 2] if len(finish) > peers // 2 else float("nan"),
        warmup=warmup,
    )


@attrs.define
class ChurnResult:
    tasks: int
    ok: int
    wall: float
    rss_first: float
    rss_all: float
    rss_expired: float | None
    waited: float
    tasks_left: float | None
    supernode_cpu: float
    expire_flag: bool
    stats: dict[str, int]
    errors: dict[str, int]


def run_churn(args: argparse.Namespace, env: dict[str, str], url: str, work: str, expire_flag: bool) -> ChurnResult:
    home = os.path.join(work, "supernode-churn")
    extra = ["--task-expire-time", args.task_expire_time] if expire_flag else []
    wait = args.expire_wait
    if wait <= 0 and expire_flag:
        wait = 2 * parse_seconds(args.task_expire_time) + 5  # + the supernode's sweep interval
    with Children(env) as children:
        node = start_supernode(children, env, home, extra)
        spec = {"mode": "churn", "host": "127.0.0.1", "port": node.port, "url": url, "count": args.churn,
                "at_once": args.churn_at_once, "deadline": args.deadline, "run": f"{time.time():.3f}",
                "result": os.path.join(work, "churn.json")}
        [w] = start_workers(children, [spec])
        cpu_before = sum(process_cpu(node.pid))
        started = time.monotonic()
        w.go()
        rss_first = float("nan")
        while True:
            event = w.next_event(1.0)
            if event is None:
                if w.process.poll() is not None or time.monotonic() - started > args.deadline + 120:
                    break
                continue
            if event.get("event") == "checkpoint":
                rss_first = status_mib(node.pid, "VmRSS")
            elif event.get("event") == "done":
                break
        wall = time.monotonic() - started
        rss_all = status_mib(node.pid, "VmRSS")
        if rss_first != rss_first:  # fewer than CHURN_CHECKPOINT tasks
            rss_first = rss_all
        result = w.result()
        rss_expired = None
        tasks_left = None
        waited = 0.0
        if wait > 0:
            waited_from = time.monotonic()
            while time.monotonic() - waited_from < wait:
                time.sleep(1.0)
                samples = node.metrics()
                if samples is not None:
                    tasks_left = sum(v for k, v in samples.items() if k.startswith("dfly_supernode_tasks{"))
                    if tasks_left == 0:
                        break
            waited = time.monotonic() - waited_from
            rss_expired = status_mib(node.pid, "VmRSS")
        cpu = sum(process_cpu(node.pid)) - cpu_before
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    stats = result.get("stats", {})
    return ChurnResult(args.churn, stats.get("tasks ok", 0), wall, rss_first, rss_all, rss_expired, waited,
                       tasks_left, cpu, expire_flag, stats, result.get("errors", {}))


def parse_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected e.g. 5s")
    return float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[match.group(2)]


# --- output ----------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f}" if seconds == seconds else "-"


def ratio(value: float | None, reports: int) -> str:
    return f"{value / reports:.2f}" if value is not None and reports else "n/a"


HEADER = (f"{'peers':>6} {'wall s':>7} {'done':>11} {'reports':>8} {'CPU ms/rep':>10} {'pulls/rep':>9} "
          f"{'wait p50/p99 ms':>16} {'pull p50/p99 ms':>16} {'peak MiB':>8} {'wake/rep':>8} {'assign/rep':>10} "
          f"{'client CPU':>14}")


def format_row(r: SwarmRow) -> str:
    return (f"{r.peers:>6} {r.wall:>7.1f} {f'{r.finished}/{r.peers}':>11} {r.reports:>8} "
            f"{r.cpu_ms_per_report:>10.3f} {r.pulls / r.reports if r.reports else float('nan'):>9.2f} "
            f"{ms(quantile(r.wait, 0.5)) + '/' + ms(quantile(r.wait, 0.99)):>16} "
            f"{ms(quantile(r.pull_all, 0.5)) + '/' + ms(quantile(r.pull_all, 0.99)):>16} {r.peak_mib:>8.1f} "
            f"{ratio(r.wakeups, r.reports):>8} {ratio(r.assigns, r.reports):>10} "
            f"{f'{r.client_cpu:.1f}s {r.busiest_worker:.0%}':>14}")


def describe_row(r: SwarmRow, workers: int) -> list[str]:
    lines = []
    share = (r.supernode_cpu + r.client_cpu) / r.wall if r.wall else 0.0
    half = f"half the peers done by {r.finish_p50:.1f} s" if r.finish_p50 == r.finish_p50 else \
        "fewer than half the peers done"
    note = (f"  {r.peers}: supernode {r.supernode_cpu:.1f} CPU-s + client {r.client_cpu:.1f} CPU-s in {r.wall:.1f} s "
            f"= {share:.2f} cores; the machine's CPUs {r.machine_busy:.0%} busy (other jobs included); {half}")
    if r.warmup:
        note += f"; warm-up (fetch + one peer) took {r.warmup:.1f} s before the clock"
    lines.append(note)
    core = r.supernode_cpu / r.wall if r.wall else 0.0
    if core >= 0.85:
        lines.append(f"  {r.peers}: the supernode used {core:.0%} of a core (its reactor is one thread): it set "
                     "the pace")
    if r.finished < r.peers:
        never = r.peers - min(r.peers, r.stats.get("registered", 0))
        lines.append(f"  {r.peers}: DEADLINE: {r.peers - r.finished} of {r.peers} peers had not finished after "
                     f"{r.wall:.0f} s ({never} had not even registered)")
    if share >= SATURATED:
        lines.append(f"  {r.peers}: WARNING the 2 cores were saturated (>= {SATURATED} CPU-s per s between the "
                     "supernode and the client): the client competed with the supernode, wall times and latencies "
                     "are pessimistic")
    if r.busiest_worker >= 0.9:
        lines.append(f"  {r.peers}: WARNING a client process used {r.busiest_worker:.0%} of a core: the client may "
                     f"have set the pace (--workers {workers} now)")
    counts = {k: v for k, v in sorted(r.stats.items())}
    lines.append(f"  {r.peers}: counts {counts}")
    if r.errors:
        lines.append(f"  {r.peers}: errors {r.errors}")
    return lines


def report_aims(rows: list[SwarmRow], churn: ChurnResult | None) -> None:
    print("aims:")
    for r in rows:
        print(f"  {mark(r.cpu_ms_per_report <= AIM_CPU_MS)} supernode CPU per report at {r.peers} peers "
              f"{r.cpu_ms_per_report:.3f} ms <= {AIM_CPU_MS} ms")
    if len(rows) >= 2:
        low, high = rows[0], rows[-1]
        growth = high.cpu_ms_per_report / low.cpu_ms_per_report if low.cpu_ms_per_report else float("inf")
        print(f"  {mark(growth <= AIM_FLAT)} CPU per report flat: {high.peers} peers / {low.peers} peers = "
              f"{growth:.2f} <= {AIM_FLAT}")
    if rows:
        all_done = all(r.finished == r.peers for r in rows)
        print(f"  {mark(all_done)} every simulated peer finishes: "
              + ", ".join(f"{r.finished}/{r.peers}" for r in rows))
        top = rows[-1]
        caveat = "" if top.peers >= 10000 else f" (measured at {top.peers} peers; the aim is for 10,000)"
        print(f"  {mark(top.peak_mib <= AIM_RSS_MIB)} supernode peak RSS {top.peak_mib:.1f} MiB <= "
              f"{AIM_RSS_MIB} MiB{caveat}")
    if churn is not None:
        level = churn.rss_expired if churn.rss_expired is not None else churn.rss_all
        when = "after expiry" if churn.rss_expired is not None else "after all tasks (no expiry waited)"
        print(f"  {mark(level / churn.rss_first <= AIM_CHURN)} churn RSS {when} {level:.1f} MiB = "
              f"{level / churn.rss_first:.2f} x the first-{CHURN_CHECKPOINT} level <= {AIM_CHURN}")


def report_churn(c: ChurnResult) -> None:
    print(f"churn: {c.ok}/{c.tasks} tasks ok in {c.wall:.1f} s ({c.tasks / c.wall:.0f} tasks/s), supernode "
          f"{1000 * c.supernode_cpu / max(1, c.tasks):.2f} CPU ms per task"
          + ("" if c.expire_flag else "; the supernode has no --task-expire-time flag"))
    line = (f"churn: supernode RSS after {CHURN_CHECKPOINT} tasks {c.rss_first:.1f} MiB, after all {c.rss_all:.1f} "
            f"MiB ({c.rss_all / c.rss_first:.2f}x)")
    if c.rss_expired is not None:
        left = "" if c.tasks_left is None else f", {c.tasks_left:.0f} tasks left in memory"
        line += f", after waiting {c.waited:.0f} s for expiry {c.rss_expired:.1f} MiB ({c.rss_expired / c.rss_first:.2f}x{left})"
    print(line)
    print(f"churn: counts {dict(sorted(c.stats.items()))}")
    if c.errors:
        print(f"churn: errors {c.errors}")


# --- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="The module docstring (python3 -m pydoc bench/swarm.py) explains every "
                                            "column of the output.")
    parser.add_argument("--peers", default="1000,3000,10000",
                        help="comma-separated peer counts, one fresh supernode each [1000,3000,10000]")
    parser.add_argument("--pieces", type=int, default=64, help="pieces of 4 MiB in the swarm's file [64 = 256 MiB]")
    parser.add_argument("--delay", type=float, default=0.05,
                        help="seconds a simulated peer takes per piece before reporting it [0.05]")
    parser.add_argument("--deadline", type=float, default=900.0,
                        help="seconds each N (and the churn phase) may run; then the unfinished peers are "
                             "counted [900]")
    parser.add_argument("--workers", type=int, default=1,
                        help="client processes the peers are split over [1: see the module docstring]")
    parser.add_argument("--report-connections", type=int, default=32,
                        help="persistent connections per client process shared by the reports [32]")
    parser.add_argument("--start-at-once", type=int, default=500,
                        help="peers per client process between starting and registered, so that the "
                             "supernode's listen backlog (50) does not overflow into 1 s SYN retries [500]")
    parser.add_argument("--cold", action="store_true",
                        help="no warm-up: the peers' first registration starts the supernode's fetch, whose CPU "
                             "then counts too")
    parser.add_argument("--churn", type=int, default=10000,
                        help="distinct one-piece tasks in the churn phase; 0 skips it [10000]")
    parser.add_argument("--churn-at-once", type=int, default=50, help="churn tasks running at once [50]")
    parser.add_argument("--task-expire-time", default="5s",
                        help="passed to the churn supernode when it has --task-expire-time [5s]")
    parser.add_argument("--expire-wait", type=float, default=0.0,
                        help="seconds to wait for task expiry after the churn, or until /metrics shows no task; "
                             "0 = twice --task-expire-time + 5 when the supernode has that flag, else none [0]")
    parser.add_argument("--dfly", default=REPO,
                        help="checkout whose supernode runs (put first on the children's PYTHONPATH), e.g. a "
                             "git worktree of HEAD [this script's]")
    parser.add_argument("--tmpdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the supernodes' homes and logs go [/dev/shm]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (supernode logs)")
    parser.add_argument("--profile", metavar="PREFIX", default="",
                        help="run each swarm supernode under twistd's cProfile, stats saved to PREFIX-<N>.prof "
                             "(read with python3 -m pstats; profiling roughly doubles the CPU per report)")
    args = parser.parse_args()
    try:
        args.peer_counts = [int(p) for p in args.peers.split(",") if p.strip()]
    except ValueError:
        parser.error(f"--peers: expected comma-separated numbers, got {args.peers!r}")
    if any(n < 1 for n in args.peer_counts) or args.pieces < 1 or args.workers < 1 or args.churn < 0:
        parser.error("--peers, --pieces and --workers must be >= 1, --churn >= 0")
    try:
        parse_seconds(args.task_expire_time)
    except argparse.ArgumentTypeError as e:
        parser.error(str(e))
    return args


def stopped(signum: int, frame: object) -> None:
    """SIGTERM: leave through the finally blocks and context managers."""
    log("terminated, cleaning up")
    sys.exit(128 + signum)


def describe_checkout(path: str) -> str:
    done = subprocess.run(["git", "-C", path, "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", path, "status", "--porcelain", "--untracked-files=no", "dfly"],
                           capture_output=True, text=True)
    state = " + uncommitted changes under dfly/" if dirty.stdout.strip() else ""
    return f"{path} at {done.stdout.strip()[:70] or '?'}{state}"


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, stopped)
    raise_nofile()
    started = time.monotonic()
    dfly = os.path.abspath(args.dfly)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [dfly, os.environ.get("PYTHONPATH")]))}
    flags = supernode_flags(env)
    if "Usage: twistd [options] supernode" not in flags:
        raise SystemExit(f"swarm: twistd has no supernode with PYTHONPATH={dfly}:\n{flags[-1000:]}")
    expire_flag = "--task-expire-time" in flags
    print(f"swarm: supernode from {describe_checkout(dfly)}")
    print(f"swarm: {args.pieces} pieces x 4 MiB, --delay {args.delay * 1000:g} ms per piece, {args.workers} client "
          f"process(es), {'cold' if args.cold else 'warm (fetched before the clock)'}, deadline {args.deadline:g} s "
          f"per N, {os.cpu_count()} CPUs, RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    origin, base = start_origin(args.pieces)
    work = tempfile.mkdtemp(prefix="dfly-swarm-", dir=args.tmpdir)
    rows: list[SwarmRow] = []
    churn = None
    try:
        for peers in args.peer_counts:
            log(f"{peers} peers ...")
            row = run_swarm(args, env, f"{base}/file", peers, work)
            rows.append(row)
            log(f"{peers} peers: {row.wall:.1f} s, {row.finished}/{peers} finished, "
                f"{row.cpu_ms_per_report:.3f} CPU ms per report")
        if rows:
            print(HEADER)
            for row in rows:
                print(format_row(row))
            for row in rows:
                for line in describe_row(row, args.workers):
                    print(line)
        if args.churn:
            log(f"churn of {args.churn} tasks ...")
            churn = run_churn(args, env, base, work, expire_flag)
            report_churn(churn)
        report_aims(rows, churn)
    finally:
        origin.shutdown()
        if args.keep:
            print(f"swarm: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"swarm: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        run_worker(json.loads(sys.argv[2]))
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:  # the context managers and finally blocks have cleaned up by now
            sys.exit("swarm: interrupted")
