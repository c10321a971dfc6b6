"""Item 8 of the trust-boundary issue: what an unauthenticated client can hold is bounded.

- a client that opens a range on the uploader or the CDN port and never
  reads is cut off after ``writeIdleTimeout`` (60 s) without one written
  byte: its fd, its upload slot and its buffers are freed;
- a client address holds at most ``maxUploadsPerClient`` (32) uploads at
  once on either port; more are 503 with a JSON reason and ``Retry-After``,
  and other clients are served as before;
- a blind CONNECT tunnel with no traffic either way for
  ``tunnelIdleTimeout`` (5 min) is closed at both ends.

(Request bodies and headers are bounded by `dfly.webbounds`, see
tests/test_bad_input.py.)
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from dfly import codes
from dfly.config import (
    MAX_UPLOADS_PER_CLIENT,
    TUNNEL_IDLE_TIMEOUT,
    WRITE_IDLE_TIMEOUT,
    load_dfdaemon_config,
    load_dfget_config,
    load_supernode_config,
)
from dfly.dfdaemon.tunnel import ESTABLISHED, tunnel_pair
from dfly.peer.fetchslots import PER_HOST_FETCHES, HostFetchSlots
from dfly.peer.localapi import LocalApi
from dfly.peer.uploader import HeldFile, UploadStore
from dfly.ratelimit import FileRangeProducer, WriteStalled
from dfly.supernode.cdn import CdnCache, CdnFiles
from dfly.supernode.policy import SchedulerPolicy
from dfly.webbounds import BoundedSite
from tests.loopback import ClosingFactory
from tests.test_dfdaemon import DfdaemonTestCase, Echo

TASK = "ab" * 32
LENGTH = 4 << 20


class NeverReads(StringTransport):
    """A consumer (or a connection's transport) whose buffer is full after the first write and never drains.

    Like a TCP transport, it pauses its producer once, when the buffer fills.
    """

    full = False
    aborted = False

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and not self.full:
            self.full = True
            self.producer.pauseProducing()

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


def aborted() -> Failure:
    """What a connection's loss looks like after abortConnection."""
    return Failure(ConnectionAborted())


def data_file(testcase: SynchronousTestCase, length: int = LENGTH) -> str:
    path = os.path.abspath(testcase.mktemp())
    with open(path, "wb") as f:
        f.write(os.urandom(length))
    return path


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class WriteIdleProducerTests(SynchronousTestCase):
    """`FileRangeProducer` gives up on a consumer that stays paused for ``write_idle`` seconds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.fd = os.open(data_file(self), os.O_RDONLY)
        self.consumer = NeverReads()
        self.producer = FileRangeProducer(self.consumer, self.fd, 0, LENGTH, self.clock, write_idle=60.0)
        self.done = self.producer.start()

    def test_a_consumer_that_never_resumes_is_given_up_after_the_timeout(self) -> None:
        """60 s paused by the consumer: ``done`` fails with WriteStalled and the file is closed."""
        self.clock.advance(59)
        self.assertNoResult(self.done)
        self.clock.advance(1)
        self.failureResultOf(self.done, WriteStalled)
        self.assertFalse(fd_is_open(self.fd))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_slow_reader_is_not_cut_off(self) -> None:
        """Each resume restarts the count: a client that reads every 30 s keeps its transfer."""
        for _ in range(5):
            self.clock.advance(30)
            self.consumer.full = False
            self.producer.resumeProducing()
        self.assertNoResult(self.done)

    def test_without_write_idle_a_stall_waits_forever(self) -> None:
        """``write_idle=0`` keeps the old behaviour (tests of pacing alone)."""
        fd = os.open(data_file(self), os.O_RDONLY)
        self.addCleanup(lambda: fd_is_open(fd) and os.close(fd))
        done = FileRangeProducer(NeverReads(), fd, 0, LENGTH, Clock(), write_idle=0).start()
        self.assertNoResult(done)


def channel_for(site: Site, client: str, port: int = 40000, stalls: bool = False) -> tuple[Any, NeverReads]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 8001))
    transport = NeverReads(hostAddress=IPv4Address("TCP", "127.0.0.1", 8001),
                           peerAddress=IPv4Address("TCP", client, port))
    transport.full = not stalls  # a client that reads: its transport never pauses anything
    channel.makeConnection(transport)
    return channel, transport


def response_of(transport: StringTransport) -> tuple[int, dict[bytes, bytes], bytes]:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
    return int(status.split()[1]), headers, body


class _PortTests:
    """Shared by the uploader and the CDN: the stalled client and the per-client cap, over HTTPChannel."""

    clock: Clock
    site: Site
    path: bytes

    def active(self) -> int:
        raise NotImplementedError

    def ask(self, client: str, port: int = 40000) -> tuple[Any, StringTransport]:
        channel, transport = channel_for(self.site, client, port)
        channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-%d\r\n%s\r\n"
                             % (self.path, LENGTH - 1, self.key_header()))
        return channel, transport

    def key_header(self) -> bytes:
        return b""

    def stalled(self, client: str, port: int = 40000) -> tuple[Any, StringTransport]:
        """A request whose client reads nothing: its transport's buffer is full after the first write."""
        channel, transport = channel_for(self.site, client, port, stalls=True)
        channel.dataReceived(b"GET %s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-%d\r\n%s\r\n"
                             % (self.path, LENGTH - 1, self.key_header()))
        return channel, transport

    def test_a_client_that_never_reads_is_aborted(self) -> None:
        """After writeIdleTimeout without a write the connection is aborted and the upload ends."""
        test: Any = self
        channel, transport = self.stalled("10.0.0.1")
        test.assertEqual(self.active(), 1)
        self.clock.advance(WRITE_IDLE_TIMEOUT)
        test.assertTrue(transport.aborted)
        channel.connectionLost(aborted())
        test.assertEqual(self.active(), 0)

    def test_a_pipelined_range_behind_an_unread_response_is_not_buffered(self) -> None:
        """A second request behind a response the client never read waits paused, and is aborted in time."""
        test: Any = self
        channel, transport = channel_for(self.site, "10.0.0.1", stalls=True)
        small = b"GET %s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n%s\r\n" % (self.path, self.key_header())
        large = b"GET %s HTTP/1.1\r\nHost: x\r\nRange: bytes=0-%d\r\n%s\r\n" % (
            self.path, LENGTH - 1, self.key_header())
        channel.dataReceived(small + large)
        test.assertEqual(self.active(), 1)  # the small one finished; the large one runs
        test.assertLess(len(transport.value()), LENGTH // 2)
        self.clock.advance(WRITE_IDLE_TIMEOUT)
        test.assertTrue(transport.aborted)
        channel.connectionLost(aborted())
        test.assertEqual(self.active(), 0)

    def test_the_cap_refuses_one_client_past_it_with_503_json(self) -> None:
        """Past maxUploadsPerClient uploads from one address: 503, a JSON reason and Retry-After."""
        test: Any = self
        for n in range(MAX_UPLOADS_PER_CLIENT):
            self.stalled("10.0.0.1", 40000 + n)
        test.assertEqual(self.active(), MAX_UPLOADS_PER_CLIENT)
        _, transport = self.ask("10.0.0.1", 50000)
        status, headers, body = response_of(transport)
        test.assertEqual(status, 503)
        test.assertEqual(headers[b"content-type"], b"application/json")
        test.assertIn(b"retry-after", headers)
        answer = json.loads(body)
        test.assertEqual(answer["code"], codes.SYSTEM_ERROR)
        test.assertIn("uploads", answer["msg"])
        test.assertEqual(self.active(), MAX_UPLOADS_PER_CLIENT)

    def test_another_client_is_served_while_one_is_capped(self) -> None:
        """The cap is per client address: a second address gets its 206."""
        test: Any = self
        for n in range(MAX_UPLOADS_PER_CLIENT):
            self.stalled("10.0.0.1", 40000 + n)
        _, transport = self.ask("10.0.0.2")
        test.assertEqual(response_of(transport)[0], 206)

    def test_an_aborted_stall_frees_its_slot(self) -> None:
        """Once the stalled uploads are cut off, the same client is served again."""
        test: Any = self
        channels = [self.stalled("10.0.0.1", 40000 + n)[0] for n in range(MAX_UPLOADS_PER_CLIENT)]
        self.clock.advance(WRITE_IDLE_TIMEOUT)
        for channel in channels:
            channel.connectionLost(aborted())
        _, transport = self.ask("10.0.0.1", 50000)
        test.assertEqual(response_of(transport)[0], 206)


class UploaderBoundsTests(_PortTests, SynchronousTestCase):
    """The peer's uploader (``GET /peer/file/<taskId>``)."""

    path = f"/peer/file/{TASK}".encode()

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = UploadStore(self.clock)
        self.store.add(HeldFile(TASK, data_file(self), LENGTH, length=LENGTH, pieces={0: (0, LENGTH - 1)},
                                finished=True))
        self.site = BoundedSite(LocalApi(None, "token", self.store).resource(), reactor=self.clock)  # type: ignore[arg-type]

    def active(self) -> int:
        return self.store.active


class CdnBoundsTests(_PortTests, SynchronousTestCase):
    """The supernode's CDN port (``GET /download/<id[:3]>/<id>``)."""

    path = CdnCache.url_path(TASK).encode()

    def setUp(self) -> None:
        self.clock = Clock()
        cache = CdnCache(self.mktemp()).ensure()
        os.makedirs(os.path.dirname(cache.data_path(TASK)))
        os.rename(data_file(self), cache.data_path(TASK))
        self.files = CdnFiles(cache, self.clock, keys=lambda task_id: "k" * 32)
        self.site = BoundedSite(self.files, reactor=self.clock)

    def key_header(self) -> bytes:
        return b"X-Dfly-Task-Key: " + b"k" * 32 + b"\r\n"

    def active(self) -> int:
        return self.files.slots.total()


class PerHostFetchTests(SynchronousTestCase):
    """The peer engine itself stays well under the cap towards one host, whatever the supernode hands out."""

    def test_the_default_cap_is_comfortably_above_what_one_peer_fetches(self) -> None:
        """Per download the scheduler runs maxRunning pieces; the engine caps a host at PER_HOST_FETCHES."""
        self.assertLessEqual(SchedulerPolicy().max_running, PER_HOST_FETCHES)
        self.assertLessEqual(2 * PER_HOST_FETCHES, MAX_UPLOADS_PER_CLIENT)

    def test_fetches_to_one_host_past_the_limit_wait(self) -> None:
        """The 17th fetch to one host waits for a slot; another host is not held up."""
        slots = HostFetchSlots()
        held = [self.successResultOf(slots.acquire(("10.0.0.1", 8001))) for _ in range(PER_HOST_FETCHES)]
        waiting = slots.acquire(("10.0.0.1", 8001))
        self.assertNoResult(waiting)
        self.successResultOf(slots.acquire(("10.0.0.2", 8001)))
        held[0].release()
        self.successResultOf(waiting)

    def test_a_cancelled_wait_takes_no_slot(self) -> None:
        """Cancelling a waiting fetch leaves the slots as they were."""
        slots = HostFetchSlots()
        held = [self.successResultOf(slots.acquire(("h", 1))) for _ in range(PER_HOST_FETCHES)]
        waiting = slots.acquire(("h", 1))
        waiting.cancel()
        self.failureResultOf(waiting)
        for semaphore in held:
            semaphore.release()
        self.assertEqual(slots.busy(), {})


class TunnelIdleTests(SynchronousTestCase):
    """A blind tunnel's idle timer, with a Clock and two StringTransports."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.client, self.server = tunnel_pair(self.clock, TUNNEL_IDLE_TIMEOUT)
        self.server_transport, self.client_transport = NeverReads(), NeverReads()
        self.server.makeConnection(self.server_transport)
        self.client.makeConnection(self.client_transport)

    def test_a_silent_tunnel_is_closed_at_both_ends(self) -> None:
        """tunnelIdleTimeout without a byte either way aborts both connections."""
        self.clock.advance(TUNNEL_IDLE_TIMEOUT - 1)
        self.assertFalse(self.client_transport.aborted or self.server_transport.aborted)
        self.clock.advance(1)
        self.assertTrue(self.client_transport.aborted)
        self.assertTrue(self.server_transport.aborted)

    def test_traffic_either_way_keeps_it_open(self) -> None:
        """Bytes from the client, then from the target, each restart the count."""
        self.clock.advance(TUNNEL_IDLE_TIMEOUT - 1)
        self.client.dataReceived(b"ping")
        self.clock.advance(TUNNEL_IDLE_TIMEOUT - 1)
        self.server.dataReceived(b"pong")
        self.clock.advance(TUNNEL_IDLE_TIMEOUT - 1)
        self.assertFalse(self.client_transport.aborted or self.server_transport.aborted)
        self.assertEqual((self.server_transport.value(), self.client_transport.value()), (b"ping", b"pong"))

    def test_a_closed_tunnel_leaves_no_timer(self) -> None:
        """When either end goes, the timer goes too."""
        self.client.connectionLost(aborted())
        self.server.connectionLost(aborted())
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ConfigTests(SynchronousTestCase):
    """The bounds have keys in each YAML file; the defaults are the documented ones."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self) -> None:
        """60 s, 32 uploads per client, 5 min."""
        self.assertEqual((WRITE_IDLE_TIMEOUT, MAX_UPLOADS_PER_CLIENT, TUNNEL_IDLE_TIMEOUT), (60.0, 32, 300.0))

    def test_supernode_keys(self) -> None:
        """supernode.yml: writeIdleTimeout and maxUploadsPerClient."""
        config = load_supernode_config(self.write("writeIdleTimeout: 90s\nmaxUploadsPerClient: 64\n"), True)
        self.assertEqual((config.write_idle_timeout, config.max_uploads_per_client), (90.0, 64))

    def test_dfget_keys(self) -> None:
        """dfget.yml: the same keys, for the peer daemon's uploader."""
        config = load_dfget_config(self.write("writeIdleTimeout: 2m\nmaxUploadsPerClient: 10\n"), True)
        self.assertEqual((config.write_idle_timeout, config.max_uploads_per_client), (120.0, 10))

    def test_dfdaemon_keys(self) -> None:
        """dfdaemon.yml: tunnelIdleTimeout, and the uploader's two."""
        config = load_dfdaemon_config(self.write(
            "tunnelIdleTimeout: 10m\nwriteIdleTimeout: 30s\nmaxUploadsPerClient: 8\n"), True)
        self.assertEqual((config.tunnel_idle_timeout, config.write_idle_timeout, config.max_uploads_per_client),
                         (600.0, 30.0, 8))

    def test_supernode_flags_win_over_the_file(self) -> None:
        """``twistd supernode --write-idle-timeout 2m --max-uploads-per-client 100``."""
        from dfly.supernode.tap import Options as SupernodeOptions

        options = SupernodeOptions()
        options.parseOptions(["--config", self.write("maxUploadsPerClient: 64\n"), "--home", self.mktemp(),
                              "--write-idle-timeout", "2m", "--max-uploads-per-client", "100"])
        config = options["config_obj"]
        self.assertEqual((config.write_idle_timeout, config.max_uploads_per_client), (120.0, 100))

    def test_peer_daemon_flags_win_over_the_file(self) -> None:
        """``dfget server --writeidletimeout 30s`` over dfget.yml; maxUploadsPerClient from the file."""
        from dfly.peer.options import Options as DaemonOptions

        options = DaemonOptions()
        options.parseOptions(["--config", self.write("writeIdleTimeout: 2m\nmaxUploadsPerClient: 8\n"),
                              "--home", self.mktemp(), "--writeidletimeout", "30s"])
        config = options["config_obj"]
        self.assertEqual((config.write_idle_timeout, config.max_uploads_per_client), (30.0, 8))

    def test_a_bad_flag_is_a_usage_error(self) -> None:
        """``--maxuploadsperclient 0`` is a one-line UsageError."""
        from twisted.python.usage import UsageError

        from dfly.peer.options import Options as DaemonOptions

        error = self.assertRaises(UsageError, DaemonOptions().parseOptions,
                                  ["--config", self.write(""), "--maxuploadsperclient", "0"])
        self.assertIn("--maxuploadsperclient", str(error))

    def test_zero_timeout_is_refused(self) -> None:
        """A timeout of 0 would cut every transfer off: a one-line error."""
        with self.assertRaises(ValueError):
            load_supernode_config(self.write("writeIdleTimeout: 0\n"), True)


# --- real sockets ----------------------------------------------------------------------


def stalled_socket(port: int, request: bytes) -> socket.socket:
    """A client with a tiny receive buffer that sends ``request`` and then never reads."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


class Collect(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(None)


async def until(condition: Any, seconds: float) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await deferLater(reactor, 0.05, lambda: None)
    return bool(condition())


class UploaderOverSocketsTests(TestCase):
    """The uploader on 127.0.0.1: a client that stops reading is aborted; others are served meanwhile."""

    timeout = 20
    length = 32 << 20  # far more than both sockets' buffers hold

    def serve(self, **bounds: Any) -> None:
        self.store = UploadStore(reactor, **bounds)
        path = os.path.abspath(self.mktemp())
        with open(path, "wb") as f:
            f.truncate(self.length)
        self.store.add(HeldFile(TASK, path, self.length, length=self.length,
                                pieces={0: (0, self.length - 1)}, finished=True))
        self.connections = ClosingFactory(BoundedSite(LocalApi(None, "token", self.store).resource()))  # type: ignore[arg-type]
        listening: Any = reactor.listenTCP(0, self.connections, interface="127.0.0.1")
        self.addCleanup(self.connections.close_all)
        self.addCleanup(listening.stopListening)
        self.port = listening.getHost().port

    def request(self, last: int) -> bytes:
        return b"GET /peer/file/%s HTTP/1.1\r\nHost: peer\r\nRange: bytes=0-%d\r\nConnection: close\r\n\r\n" % (
            TASK.encode(), last)

    async def fetch(self, last: int, source: str = "127.0.0.1") -> bytes:
        client = Collect()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port, bindAddress=(source, 0))
        await connectProtocol(endpoint, client)
        client.transport.write(self.request(last))  # type: ignore[attr-defined]
        await client.closed
        return client.data

    def stalled(self) -> socket.socket:
        sock = stalled_socket(self.port, self.request(self.length - 1))
        self.addCleanup(sock.close)
        return sock

    async def test_a_client_that_stops_reading_is_aborted_and_others_are_served(self) -> None:
        """The stalled upload ends within the timeout; the count returns to zero; a second client got its range."""
        self.serve(write_idle=0.5)
        self.stalled()
        self.assertTrue(await until(lambda: self.store.active == 1, 5))
        answer = await self.fetch(99_999)
        self.assertTrue(answer.startswith(b"HTTP/1.1 206 "), answer[:80])
        self.assertEqual(len(answer.partition(b"\r\n\r\n")[2]), 100_000)
        self.assertTrue(await until(lambda: self.store.active == 0, 10), "the stalled upload was never aborted")
        self.assertTrue(await until(lambda: not self.connections.protocols, 5))

    async def test_a_client_past_the_cap_is_refused_and_another_is_served(self) -> None:
        """Four stalled ranges from 127.0.0.1 under a cap of 4 make its next one a 503; 127.0.0.2 gets 206."""
        self.serve(write_idle=30.0, per_client=4)
        socks = [self.stalled() for _ in range(4)]
        self.assertTrue(await until(lambda: self.store.active == 4, 5))
        refused = await self.fetch(99)
        self.assertTrue(refused.startswith(b"HTTP/1.1 503 "), refused[:80])
        self.assertEqual(json.loads(refused.partition(b"\r\n\r\n")[2])["code"], codes.SYSTEM_ERROR)
        other = await self.fetch(99, source="127.0.0.2")
        self.assertTrue(other.startswith(b"HTTP/1.1 206 "), other[:80])
        for sock in socks:
            sock.close()
        self.assertTrue(await until(lambda: self.store.active == 0, 5))


class TunnelOverSocketsTests(DfdaemonTestCase):
    """A real CONNECT tunnel through dfdaemon closes when it has been silent for tunnelIdleTimeout."""

    async def test_a_silent_tunnel_is_closed_at_both_ends(self) -> None:
        """Bytes both ways, then silence: the client's and the target's connections both close."""
        targets = ClosingFactory(Factory.forProtocol(Echo))
        listening: Any = reactor.listenTCP(0, targets, interface="127.0.0.1")
        self.addCleanup(targets.close_all)
        self.addCleanup(listening.stopListening)
        echo = listening.getHost().port
        daemon = await self.start_dfdaemon(connect_ports=(echo,), tunnel_idle_timeout=0.5)
        client = await self.raw(daemon.port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % echo)
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.transport.write(b"hello")
        await client.until(b"hello")
        self.assertEqual(len(targets.protocols), 1)
        await client.closed
        self.assertTrue(await until(lambda: not targets.protocols, 5), "the target's end stayed open")
