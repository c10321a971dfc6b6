"""The peer daemon service: home lock, host.meta, collecting data/, and exiting when idle.

Everything runs on a `MemoryReactorClock` that starts at `NOW` (a real epoch
time, since residue ages compare the clock with file mtimes).  The
host.meta, lock and idle tests use the real ``build_service`` wiring.  It
takes no HTTP client, so the collect tests wire a `PeerDaemon` by hand
(`HandWired`) around a real `PeerEngine` whose treq client is a `StubTreq`
over `Supernode`, a tiny resource that records the service-down reports.
"""

from __future__ import annotations

import json
import os
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from dfly import codes
from dfly.config import Home
from dfly.peer.hostmeta import read_host_meta
from dfly.peer.engine import PeerEngine
from dfly.peer.localapi import LocalApi
from dfly.peer.options import PeerConfig
from dfly.peer.request import DownloadRequest
from dfly.peer.tap import GC_INTERVAL, HEARTBEAT_INTERVAL, LEAVE_TIMEOUT, RESIDUE_AGE, DaemonLockHeld, PeerDaemon, PeerParts, build_service
from dfly.peer.uploader import HeldFile, UploadStore
from dfly.services import ListeningService

NOW = 1_700_000_000.0
PORT = 8123
TASK = "ab" * 32
PIECE = 1000
SUPERNODE = ("supernode.test", 8002)
CID = "127.0.0.1-1700000000-1.000"
EXPIRE = 180.0
ALIVE = 60.0


class Supernode(Resource):
    """Answers every GET with success and records (path, query)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict[str, str]]] = []

    def render_GET(self, request: Any) -> bytes:
        query = {k.decode(): v[0].decode() for k, v in request.args.items()}
        self.calls.append((request.path.decode(), query))
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"code": codes.SUCCESS, "msg": "ok"}).encode()


def put_file(path: str, size: int = 3 * PIECE, age: float | None = None) -> str:
    """A real file; with ``age``, its mtime is that many seconds before NOW."""
    with open(path, "wb") as f:
        f.write(b"x" * size)
    if age is not None:
        os.utime(path, (NOW - age, NOW - age))
    return path


def make_held(home: Home, name: str = "file-s1.server", finished: bool = True) -> HeldFile:
    path = put_file(os.path.join(home.data, name))
    return HeldFile(TASK, path, PIECE, length=3 * PIECE, pieces={0: (0, PIECE - 1)}, finished=finished,
                    node=SUPERNODE, cid=CID, heartbeat=NOW)


class PeerRequest:
    """A request from a peer that reads nothing until `pull_all`: its upload stays in progress."""

    def __init__(self, byte_range: bytes) -> None:
        self.byte_range = byte_range
        self.code: int | None = None
        self.writes: list[bytes] = []
        self.producer: Any = None
        self.args: dict[bytes, list[bytes]] = {}

    def getHeader(self, name: bytes) -> bytes | None:
        return self.byte_range if name.lower() == b"range" else None

    def getClientAddress(self) -> IPv4Address:
        return IPv4Address("TCP", "10.0.0.7", 40000)

    def setResponseCode(self, code: int) -> None:
        self.code = code

    def setHeader(self, name: bytes, value: bytes) -> None:
        pass

    def notifyFinish(self) -> Deferred[None]:
        return Deferred()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        producer.pauseProducing()  # the peer's socket buffer is full

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def pull_all(self) -> None:
        """The peer reads: the rest of the range is sent and the upload ends."""
        self.producer.resumeProducing()
        assert self.producer is None, "the upload did not finish"


def start_upload(store: UploadStore) -> PeerRequest:
    """Begin serving piece 0 to a peer that has not read it yet."""
    request = PeerRequest(b"bytes=0-999")
    store.serve(request, TASK)  # type: ignore[arg-type]
    assert request.code == 206, request.code
    return request


class HandWired:
    """A PeerDaemon built like build_service does, but with a StubTreq to a fake supernode."""

    def __init__(self, testcase: SynchronousTestCase, alivetime: float = 0.0, expiretime: float = EXPIRE) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(NOW)
        self.home = Home(testcase.mktemp()).ensure()
        self.supernode = Supernode()
        self.http = StubTreq(self.supernode)
        self.uploads = UploadStore(self.reactor)
        self.engine = PeerEngine(self.reactor, self.http, self.home, uploads=self.uploads)
        listener = ListeningService(
            TCP4ServerEndpoint(self.reactor, PORT, interface="127.0.0.1"),
            Site(LocalApi(self.engine, "token", self.uploads).resource()),
            "peer server",
        )
        config = PeerConfig(home=self.home.root, port=PORT, listen="127.0.0.1", alivetime=alivetime, expiretime=expiretime)
        self.idle: list[float] = []
        self.daemon = PeerDaemon(self.home, self.engine, self.uploads, listener, "token", config, self.reactor,
                                 lambda: self.idle.append(self.reactor.seconds()), HTTPConnectionPool(self.reactor))

    def hold(self, name: str = "file-s1.server", finished: bool = True) -> HeldFile:
        held = make_held(self.home, name, finished)
        self.uploads.add(held)
        return held

    def collect(self) -> None:
        self.daemon.collect()
        self.http.flush()


def built(testcase: SynchronousTestCase, alivetime: float = 0.0, home: str | None = None) -> tuple[PeerParts, list[float]]:
    """The real build_service wiring, started, on a MemoryReactorClock; stopped at cleanup."""
    reactor = MemoryReactorClock()
    reactor.advance(NOW)
    idle: list[float] = []
    config = PeerConfig(home=home or testcase.mktemp(), port=PORT, listen="127.0.0.1", alivetime=alivetime, expiretime=EXPIRE)
    parts = build_service(config, reactor, on_idle=lambda: idle.append(reactor.seconds()))
    parts.service.startService()

    def stop() -> None:
        if parts.service.running:
            stopped = parts.service.stopService()
            reactor.advance(LEAVE_TIMEOUT)  # service-down reports to no supernode time out
            testcase.successResultOf(stopped)

    testcase.addCleanup(stop)
    return parts, idle


def read_meta(home: str) -> dict[str, Any]:
    with open(Home(home).host_meta) as f:
        return json.load(f)  # type: ignore[no-any-return]


class HostMetaTests(SynchronousTestCase):
    """host.meta announces the listening port and the token while the daemon runs."""

    def test_host_meta_names_the_port(self) -> None:
        """Once listening, host.meta holds the port the server listens on."""
        parts, idle = built(self)
        self.assertEqual(read_meta(parts.daemon.home.root)["servicePort"], PORT)

    def test_host_meta_holds_the_token(self) -> None:
        """host.meta carries the token the local API checks."""
        parts, idle = built(self)
        self.assertEqual(read_meta(parts.daemon.home.root)["token"], parts.daemon.token)

    def test_host_meta_holds_our_pid(self) -> None:
        """host.meta names this process, so only it removes the file."""
        parts, idle = built(self)
        self.assertEqual(read_meta(parts.daemon.home.root)["pid"], os.getpid())

    def test_deeply_nested_host_meta_is_no_daemon(self) -> None:
        """A host.meta of ``[[[[...`` reads as none (dfget starts a daemon), not a RecursionError."""
        home = Home(self.mktemp()).ensure()
        with open(home.host_meta, "w") as f:
            f.write("[" * 100_000)
        self.assertIsNone(read_host_meta(home))

    def test_host_meta_is_owner_only(self) -> None:
        """host.meta is mode 0600: the token is for the owner alone."""
        parts, idle = built(self)
        self.assertEqual(os.stat(parts.daemon.home.host_meta).st_mode & 0o777, 0o600)

    def test_engine_learns_the_port(self) -> None:
        """The engine registers with the port the server really listens on."""
        parts, idle = built(self)
        self.assertEqual(parts.engine.port, PORT)

    def test_host_meta_removed_on_stop(self) -> None:
        """Stopping the daemon removes host.meta."""
        parts, idle = built(self)
        self.successResultOf(parts.service.stopService())
        self.assertFalse(os.path.exists(parts.daemon.home.host_meta))


class LockTests(SynchronousTestCase):
    """One daemon per home."""

    def test_second_daemon_refuses_to_start(self) -> None:
        """A second daemon on the same home raises DaemonLockHeld."""
        parts, idle = built(self)
        second = build_service(PeerConfig(home=parts.daemon.home.root, port=PORT + 1), MemoryReactorClock())
        self.addCleanup(second.service.stopService)
        self.assertRaises(DaemonLockHeld, second.service.startService)

    def test_refused_daemon_leaves_host_meta_alone(self) -> None:
        """The refused daemon, even once stopped, leaves the running one's host.meta."""
        parts, idle = built(self)
        second = build_service(PeerConfig(home=parts.daemon.home.root, port=PORT + 1), MemoryReactorClock())
        self.assertRaises(DaemonLockHeld, second.service.startService)
        self.successResultOf(second.service.stopService())
        self.assertEqual(read_meta(parts.daemon.home.root)["servicePort"], PORT)

    def test_lock_is_released_on_stop(self) -> None:
        """After the first daemon stops, another may start on the same home."""
        first, idle = built(self)
        self.successResultOf(first.service.stopService())
        second, idle = built(self, home=first.daemon.home.root)
        self.assertTrue(second.daemon.running)

    def test_lock_file_names_the_pid(self) -> None:
        """meta/daemon.lock holds the daemon's pid."""
        parts, idle = built(self)
        with open(parts.daemon.home.daemon_lock) as f:
            self.assertEqual(f.read(), str(os.getpid()))


class ExpireTests(SynchronousTestCase):
    """collect() stops serving finished files nobody asked for in --expiretime."""

    def setUp(self) -> None:
        self.wired = HandWired(self)

    def test_finished_file_is_dropped_after_expiretime(self) -> None:
        """A finished file untouched for --expiretime is no longer served."""
        self.wired.hold()
        self.wired.reactor.advance(EXPIRE)
        self.wired.collect()
        self.assertEqual(self.wired.uploads.held(), [])

    def test_expired_file_is_removed_from_disk(self) -> None:
        """The expired file is deleted from data/."""
        held = self.wired.hold()
        self.wired.reactor.advance(EXPIRE)
        self.wired.collect()
        self.assertFalse(os.path.exists(held.path))

    def test_expiry_reports_service_down(self) -> None:
        """Expiring a file tells its supernode, with the task id and cid it registered."""
        self.wired.hold()
        self.wired.reactor.advance(EXPIRE)
        self.wired.collect()
        self.assertEqual(self.wired.supernode.calls, [("/peer/service/down", {"taskId": TASK, "cid": CID})])

    def test_file_is_kept_before_expiretime(self) -> None:
        """One second short of --expiretime the file is still served."""
        held = self.wired.hold()
        self.wired.reactor.advance(EXPIRE - 1)
        self.wired.collect()
        self.assertEqual((self.wired.uploads.held(), os.path.exists(held.path)), ([held], True))

    def test_no_service_down_before_expiretime(self) -> None:
        """No service down reaches the supernode while the file is kept."""
        self.wired.hold()
        self.wired.reactor.advance(EXPIRE - 1)
        self.wired.collect()
        self.assertEqual([path for path, _ in self.wired.supernode.calls if path == "/peer/service/down"], [])


class HeartbeatTests(SynchronousTestCase):
    """collect() tells the supernode every HEARTBEAT_INTERVAL that a kept file is still served."""

    def setUp(self) -> None:
        self.wired = HandWired(self)

    def pulls(self) -> list[dict[str, str]]:
        return [query for path, query in self.wired.supernode.calls if path == "/peer/task"]

    def test_kept_file_sends_a_pull_as_heartbeat(self) -> None:
        """HEARTBEAT_INTERVAL after the last one, collect pulls the task with the file's cid."""
        held = self.wired.hold()
        held.heartbeat = self.wired.reactor.seconds()
        self.wired.reactor.advance(HEARTBEAT_INTERVAL)
        self.wired.collect()
        self.assertEqual(self.pulls(), [{"taskId": TASK, "srcCid": CID}])

    def test_no_heartbeat_before_the_interval(self) -> None:
        """Just short of HEARTBEAT_INTERVAL nothing is sent."""
        held = self.wired.hold()
        held.heartbeat = self.wired.reactor.seconds()
        self.wired.reactor.advance(HEARTBEAT_INTERVAL - 1)
        self.wired.collect()
        self.assertEqual(self.pulls(), [])

    def test_one_heartbeat_per_interval(self) -> None:
        """Two collects in one interval send one heartbeat."""
        self.wired.hold()
        self.wired.reactor.advance(HEARTBEAT_INTERVAL)
        self.wired.collect()
        self.wired.collect()
        self.assertEqual(len(self.pulls()), 1)

    def test_unfinished_file_sends_no_heartbeat(self) -> None:
        """A download still running pulls anyway: no heartbeat for it."""
        self.wired.hold(finished=False)
        self.wired.reactor.advance(HEARTBEAT_INTERVAL * 3)
        self.wired.collect()
        self.assertEqual(self.pulls(), [])

    def test_heartbeats_fit_the_supernodes_finished_silence(self) -> None:
        """Two heartbeats fit in the supernode's default finishedSilence, so one lost is harmless."""
        from dfly.supernode.policy import SchedulerPolicy

        self.assertLessEqual(2 * HEARTBEAT_INTERVAL + GC_INTERVAL, SchedulerPolicy().finished_silence)

    def test_file_is_kept_while_an_upload_runs(self) -> None:
        """A file being uploaded is not expired, however long the upload takes."""
        held = self.wired.hold()
        start_upload(self.wired.uploads)
        self.wired.reactor.advance(EXPIRE * 10)
        self.wired.collect()
        self.assertEqual(self.wired.uploads.held(), [held])

    def test_recent_upload_postpones_expiry(self) -> None:
        """--expiretime counts from the last upload, not from the download."""
        held = self.wired.hold()
        self.wired.reactor.advance(100)
        start_upload(self.wired.uploads).pull_all()
        self.wired.reactor.advance(EXPIRE - 1)
        self.wired.collect()
        self.assertEqual(self.wired.uploads.held(), [held])

    def test_unfinished_download_is_not_expired(self) -> None:
        """A download still running keeps its file, whatever its last access."""
        held = self.wired.hold(finished=False)
        self.wired.reactor.advance(EXPIRE * 10)
        self.wired.collect()
        self.assertEqual(self.wired.uploads.held(), [held])

    def test_gc_runs_every_interval(self) -> None:
        """Once started, the daemon collects every GC_INTERVAL seconds by itself."""
        wired = HandWired(self, expiretime=1.0)
        wired.hold()
        wired.daemon.startService()
        self.addCleanup(wired.daemon.stopService)
        wired.reactor.advance(GC_INTERVAL)
        self.assertEqual(wired.uploads.held(), [])

    def test_stop_expires_finished_files(self) -> None:
        """Stopping the daemon removes the files it served."""
        held = self.wired.hold()
        self.wired.daemon.startService()
        stopped = self.wired.daemon.stopService()
        self.wired.http.flush()
        self.successResultOf(stopped)
        self.assertFalse(os.path.exists(held.path))

    def test_stop_reports_service_down(self) -> None:
        """Stopping the daemon tells the supernode its files are gone."""
        self.wired.hold()
        self.wired.daemon.startService()
        stopped = self.wired.daemon.stopService()
        self.wired.http.flush()
        self.successResultOf(stopped)
        self.assertEqual(self.wired.supernode.calls, [("/peer/service/down", {"taskId": TASK, "cid": CID})])


class ResidueTests(SynchronousTestCase):
    """collect() removes files in data/ that no download holds and are older than an hour."""

    def setUp(self) -> None:
        self.wired = HandWired(self)
        self.data = self.wired.home.data

    def test_old_residual_file_is_removed(self) -> None:
        """A file nobody holds, older than an hour, is removed."""
        path = put_file(os.path.join(self.data, "old.server"), age=RESIDUE_AGE + 1)
        self.wired.collect()
        self.assertFalse(os.path.exists(path))

    def test_young_residual_file_is_kept(self) -> None:
        """A file nobody holds but younger than an hour stays (a download may be starting)."""
        path = put_file(os.path.join(self.data, "young.server"), age=RESIDUE_AGE - 1)
        self.wired.collect()
        self.assertTrue(os.path.exists(path))

    def test_old_file_of_held_download_is_kept(self) -> None:
        """A file a download holds stays, however old its mtime."""
        held = self.wired.hold(finished=False)
        os.utime(held.path, (NOW - 10 * RESIDUE_AGE, NOW - 10 * RESIDUE_AGE))
        self.wired.collect()
        self.assertTrue(os.path.exists(held.path))

    def test_old_residual_directory_is_removed(self) -> None:
        """An old directory nobody holds is removed with its contents."""
        path = os.path.join(self.data, "stray")
        os.mkdir(path)
        put_file(os.path.join(path, "inner"))
        os.utime(path, (NOW - RESIDUE_AGE - 1, NOW - RESIDUE_AGE - 1))
        self.wired.collect()
        self.assertFalse(os.path.exists(path))

    def test_old_symlink_is_removed_without_its_target(self) -> None:
        """An old symlink in data/ goes, but what it points at outside data/ stays."""
        target = self.mktemp()
        os.mkdir(target)
        put_file(os.path.join(target, "precious"))
        link = os.path.join(self.data, "link")
        os.symlink(target, link)
        os.utime(link, (NOW - RESIDUE_AGE - 1, NOW - RESIDUE_AGE - 1), follow_symlinks=False)
        self.wired.collect()
        self.assertEqual((os.path.lexists(link), os.path.exists(os.path.join(target, "precious"))), (False, True))

    def test_missing_data_directory_is_no_error(self) -> None:
        """collect() copes with data/ having been removed."""
        os.rmdir(self.data)
        self.wired.collect()
        self.assertFalse(os.path.exists(self.data))


def quick_download(parts: PeerParts, sign: str) -> None:
    """A download that starts and ends at once (no supernode, no back-to-source)."""
    req = DownloadRequest("http://origin.test/f", os.path.join(parts.daemon.home.root, "out"), sign, back_source=False)
    result = parts.engine.download(req)
    assert result.called


class IdleTests(SynchronousTestCase):
    """The daemon calls on_idle after --alivetime without downloads or uploads."""

    def test_idle_daemon_exits_after_alivetime(self) -> None:
        """With nothing to do, on_idle is called --alivetime after the start."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.daemon.clock.advance(ALIVE)
        self.assertEqual(idle, [NOW + ALIVE])

    def test_idle_daemon_waits_for_alivetime(self) -> None:
        """One second short of --alivetime the daemon stays."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.daemon.clock.advance(ALIVE - 1)
        self.assertEqual(idle, [])

    def test_on_idle_is_called_once(self) -> None:
        """on_idle is called once, not at every later check."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.daemon.clock.advance(ALIVE * 10)
        self.assertEqual(len(idle), 1)

    def test_zero_alivetime_never_exits(self) -> None:
        """--alivetime 0 keeps the daemon forever."""
        parts, idle = built(self, alivetime=0)
        parts.daemon.clock.advance(ALIVE * 100)
        self.assertEqual(idle, [])

    def test_running_upload_keeps_daemon(self) -> None:
        """While an upload is in progress the daemon does not exit."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.uploads.add(make_held(parts.daemon.home, finished=False))
        start_upload(parts.uploads)
        parts.daemon.clock.advance(ALIVE * 10)
        self.assertEqual(idle, [])

    def test_recent_upload_keeps_daemon(self) -> None:
        """An upload shortly before the deadline postpones the exit."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.uploads.add(make_held(parts.daemon.home, finished=False))
        parts.daemon.clock.advance(50)
        start_upload(parts.uploads).pull_all()
        parts.daemon.clock.advance(ALIVE - 1)
        self.assertEqual(idle, [])

    def test_idle_counts_from_the_last_upload(self) -> None:
        """The daemon exits once --alivetime has passed since the last upload."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.uploads.add(make_held(parts.daemon.home, finished=False))
        parts.daemon.clock.advance(50)
        start_upload(parts.uploads).pull_all()
        parts.daemon.clock.advance(ALIVE + 15)  # the next check after 50 + alivetime
        self.assertEqual(len(idle), 1)

    def test_running_download_keeps_daemon(self) -> None:
        """While a download runs the daemon does not exit."""
        parts, idle = built(self, alivetime=ALIVE)
        req = DownloadRequest("http://origin.test/f", os.path.join(parts.daemon.home.root, "out"), "s-1", timeout=1e6)
        download = parts.engine.download(req)  # the source connection never completes
        self.addCleanup(lambda: download.addErrback(lambda failure: None).cancel())
        parts.daemon.clock.advance(ALIVE * 10)
        self.assertEqual(idle, [])

    def test_download_between_checks_keeps_daemon(self) -> None:
        """A download that starts and ends between two idle checks still postpones the exit."""
        parts, idle = built(self, alivetime=ALIVE)
        parts.daemon.clock.advance(50)
        quick_download(parts, "s-1")
        parts.daemon.clock.advance(10)  # the check at alivetime, ten seconds after the download
        self.assertEqual(idle, [])
