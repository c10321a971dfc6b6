"""What dfly leaves on disk for other local users, and what its errors tell a client.

A supernode caches private blobs (fetched with a caller's credentials) and a
peer home holds the local API token: neither may be readable by another user
of the host, whatever the umask (tests run under 022, the usual default).
Errors a client did not cause are a 500 ``internal error``: the exception's
text (often a path under the home) and the traceback go to the log only.

The supernode runs for real (``build_service``, sockets on 127.0.0.1) where
the files are checked; errors are forced through collaborators subclassed to
fail the way a bug or a vanished file would, never by replacing a handler.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from typing import Any

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from dfly import codes
from dfly.config import Home
from dfly.logs import open_log
from dfly.peer import resume
from dfly.peer.engine import PeerEngine
from dfly.peer.hostmeta import TOKEN_HEADER
from dfly.peer.localapi import LocalApi
from dfly.peer.uploader import UploadStore
from dfly.source import SourceClient
from dfly.supernode import tap
from dfly.supernode.cdn import CdnCache
from dfly.supernode.tasks import TaskManager
from tests.test_integration import IntegrationTestCase
from tests.test_supernode_api import ORIGIN, POLL_TIMEOUT, SupernodeApiTestCase, payload

#: The text every forced failure carries: none of it may reach a client.
SECRET = "leaked-internal-detail"
TOKEN = "s3cret-token"


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def use_umask(testcase: Any, umask: int = 0o022) -> None:
    """Run the test under ``umask`` (the usual default), restored afterwards."""
    old = os.umask(umask)
    testcase.addCleanup(os.umask, old)


def current_umask() -> int:
    value = os.umask(0)
    os.umask(value)
    return value


# --- the supernode's home ---------------------------------------------------------


class SupernodeHomeModeTests(IntegrationTestCase):
    """A real supernode with one task cached: nothing in its home is readable by others."""

    def setUp(self) -> None:
        use_umask(self)
        super().setUp()

    async def cache_one(self) -> tuple[str, str]:
        """Start the supernode, download one file through it; (data file, meta) of its cache entry."""
        served = self.serve("private.bin", os.urandom(5000))
        await self.start_supernode()
        result = await self.download(self.request(served.url))
        self.assertTrue(result.success, result.line())
        cache = CdnCache(self.supernode_home)
        tid = self.registered()["taskId"]
        return cache.data_path(tid), cache.meta_path(tid)

    async def test_home_is_0700(self) -> None:
        """The home the supernode creates is owner-only."""
        await self.cache_one()
        self.assertEqual(mode(self.supernode_home), 0o700)

    async def test_directories_inside_the_home_are_0700(self) -> None:
        """logs/, repo/, repo/download/ and the entry's prefix directory are owner-only."""
        data, _ = await self.cache_one()
        home = self.supernode_home
        dirs = [os.path.join(home, "logs"), os.path.join(home, "repo"), os.path.join(home, "repo", "download"),
                os.path.dirname(data)]
        self.assertEqual({d: mode(d) for d in dirs}, {d: 0o700 for d in dirs})

    async def test_cached_data_file_is_0600(self) -> None:
        """The cached bytes of a task are owner-only."""
        data, _ = await self.cache_one()
        self.assertEqual(mode(data), 0o600)

    async def test_cached_meta_is_0600(self) -> None:
        """The task's .meta (its URL) is owner-only."""
        _, meta = await self.cache_one()
        self.assertEqual(mode(meta), 0o600)

    async def test_supernode_log_is_0600(self) -> None:
        """logs/supernode.log is created owner-only."""
        await self.cache_one()
        self.assertEqual(mode(os.path.join(self.supernode_home, "logs", "supernode.log")), 0o600)

    async def test_existing_0755_home_is_tightened(self) -> None:
        """A home (and dfly's directories in it) left 0755 by an older dfly is 0700 after a start."""
        home = self.supernode_home
        dirs = [home, os.path.join(home, "logs"), os.path.join(home, "repo"), os.path.join(home, "repo", "download")]
        for d in dirs:
            os.makedirs(d, exist_ok=True)
            os.chmod(d, 0o755)
        await self.start_supernode()
        self.assertEqual({d: mode(d) for d in dirs}, {d: 0o700 for d in dirs})


class SupernodeTapUmaskTests(TestCase):
    """``twistd supernode`` opens its ``-l`` log after makeService: by then no new file is readable by others."""

    async def test_make_service_masks_group_and_other_bits(self) -> None:
        """After makeService the umask keeps group and other out (twistd's own log included)."""
        use_umask(self)
        config = self.mktemp()
        with open(config, "w") as f:
            f.write("")
        options = tap.Options()
        options.parseOptions(["--config", config, "--home", os.path.abspath(self.mktemp()), "--port", "0",
                              "--download-port", "0", "--listen", "127.0.0.1"])
        service = tap.makeService(options)
        service.startService()
        await service.stopService()
        self.assertEqual(current_umask() & 0o077, 0o077)


# --- the peer's home ----------------------------------------------------------------


class PeerHomeModeTests(SynchronousTestCase):
    """The peer home (``~/.small-dragonfly``): owner-only, also when it existed before."""

    def setUp(self) -> None:
        use_umask(self)

    def test_existing_0755_peer_home_is_tightened(self) -> None:
        """Home.ensure() makes an existing 0755 root, logs/, meta/ and data/ owner-only."""
        root = os.path.abspath(self.mktemp())
        dirs = [root] + [os.path.join(root, name) for name in ("logs", "meta", "data")]
        for d in dirs:
            os.makedirs(d)
            os.chmod(d, 0o755)
        Home(root).ensure()
        self.assertEqual({d: mode(d) for d in dirs}, {d: 0o700 for d in dirs})

    def test_new_log_file_is_0600(self) -> None:
        """dfly's log files (dfclient.log, dfserver.log, ...) are created owner-only."""
        home = Home(os.path.abspath(self.mktemp())).ensure()
        open_log(home.log_file("dfserver.log")).close()
        self.assertEqual(mode(home.log_file("dfserver.log")), 0o600)

    def test_log_directory_open_log_creates_is_0700(self) -> None:
        """A log directory that open_log has to create is owner-only."""
        path = os.path.join(os.path.abspath(self.mktemp()), "logs", "dfdaemon.log")
        open_log(path).close()
        self.assertEqual(mode(os.path.dirname(path)), 0o700)

    def test_resume_record_is_0600(self) -> None:
        """A download's resume record (its identity and piece digests) is owner-only."""
        home = Home(os.path.abspath(self.mktemp())).ensure()
        working = os.path.join(home.data, "f-0123456789abcdef.server")
        resume.save(working, b"{}")
        self.assertEqual(mode(resume.record_path(working)), 0o600)


# --- the peer's local API: who may ask -----------------------------------------------------


def local_api_exchange(api: LocalApi, client: str, server: str, body: bytes) -> bytes:
    """One ``POST /local/download`` with the token, from ``client`` to the daemon's address ``server``.

    A daemon listening on 0.0.0.0 sees, as its own address, the interface
    the connection arrived on; the transport stands in for that socket.
    """
    transport = StringTransport(hostAddress=IPv4Address("TCP", server, 65001),
                                peerAddress=IPv4Address("TCP", client, 40000))
    channel = Site(api.resource(), reactor=Clock()).buildProtocol(None)  # its idle timer on a clock of its own
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST /local/download HTTP/1.1\r\nHost: " + server.encode() + b"\r\n" + TOKEN_HEADER + b": "
        + TOKEN.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    answer = transport.value()
    channel.connectionLost(ConnectionDone())
    return answer


def peer_api(testcase: SynchronousTestCase, engine_class: type[PeerEngine] = PeerEngine) -> LocalApi:
    clock = Clock()
    store = UploadStore(clock)
    engine = engine_class(clock, None, Home(os.path.abspath(testcase.mktemp())).ensure(), uploads=store)
    return LocalApi(engine, TOKEN, store)


class LocalApiAddressTests(SynchronousTestCase):
    """The token is not enough from another host: the daemon writes files as its user."""

    def test_token_from_another_host_is_403(self) -> None:
        """A client on another host (daemon listening on all interfaces) is refused, token or not."""
        answer = local_api_exchange(peer_api(self), "192.0.2.99", "192.0.2.2", b"{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 403 "), answer[:200])

    def test_token_from_loopback_passes_the_check(self) -> None:
        """The same request from loopback gets past the check (its empty body is then a 400)."""
        answer = local_api_exchange(peer_api(self), "127.0.0.1", "127.0.0.1", b"{}")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer[:200])


# --- errors a client did not cause ---------------------------------------------------------


class _BuggyEngine(PeerEngine):
    """An engine with a bug: every download raises with internal detail in its text."""

    def download(self, req: Any, emit: Any) -> Any:
        raise RuntimeError(f"{SECRET} at {self.home.root}")


class LocalApiErrorTests(SynchronousTestCase):
    """An unexpected failure of a download ends the stream with a FAIL that says no more than that."""

    def test_unexpected_download_error_has_no_exception_text(self) -> None:
        """The result line says "internal error"; the exception's text and the home's path stay in the log."""
        api = peer_api(self, _BuggyEngine)
        body = json.dumps({"url": "http://origin.test/f", "output": "/tmp/out.bin", "sign": "1-1.000"}).encode()
        answer = local_api_exchange(api, "127.0.0.1", "127.0.0.1", body)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn(b"internal error", answer)
        for leak in (SECRET.encode(), api.engine.home.root.encode(), b"Traceback"):
            self.assertNotIn(leak, answer)


class _BuggyCache(CdnCache):
    """A cache whose meta reading has a bug (one that names a path under the home)."""

    def load_meta(self, task_id: str) -> Any:
        raise RuntimeError(f"{SECRET}: cannot parse {self.meta_path(task_id)}")


class _BuggyTasks(TaskManager):
    """Task state whose pull has a bug."""

    def pull(self, task_id: str, cid: str, cdn_ip: str, cdn_port: int, wait: float | None = None) -> Any:
        raise RuntimeError(f"{SECRET} in {self.cache.repo}")

    def authorize(self, task_id: str, cid: str, secret: bytes | None) -> None:
        pass  # any caller: the bug under the pull is what is tested


class _VanishingCache(CdnCache):
    """The data file is removed (by hand, by a cleanup script) while its fetch writes it."""

    def open_for_write(self, task_id: str) -> int:
        fd = super().open_for_write(task_id)
        os.unlink(self.data_path(task_id))
        return fd


class _SupernodeWithBrokenParts(SupernodeApiTestCase):
    """The real register API over a cache and task state of the subclass's choice."""

    cache_class: type[CdnCache] = CdnCache
    tasks_class: type[TaskManager] = TaskManager

    def start_supernode(self, advertise_ip: str | None = "10.0.0.9") -> None:
        self.home = os.path.abspath(self.home)
        self.cache = self.cache_class(self.home)
        source = SourceClient(http=self.origin_http, clock=self.clock)
        self.tasks = self.tasks_class(self.cache, source, self.clock, poll_timeout=POLL_TIMEOUT)
        self.addCleanup(self.tasks.stop)
        self.http = StubTreq(self.api(advertise_ip, 8001).resource())

    def assertNoLeak(self, body: bytes) -> None:
        for leak in (SECRET.encode(), self.home.encode(), b"Traceback"):
            self.assertNotIn(leak, body)


class RegistrationErrorTests(_SupernodeWithBrokenParts):
    """The register API answers a bug under a registration with a bare 500."""

    cache_class = _BuggyCache

    def test_unexpected_registration_error_is_500_internal_error(self) -> None:
        """A bug under a registration is 500 with code 500 and the reason "internal error"."""
        answer = self.register()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((answer.status, answer.code, answer.json()["msg"]), (500, codes.SYSTEM_ERROR, "internal error"))

    def test_unexpected_registration_error_has_no_exception_text(self) -> None:
        """The exception's text and the home's path stay out of the body."""
        answer = self.register()
        self.flushLoggedErrors(RuntimeError)
        self.assertNoLeak(answer.body)


class PullErrorTests(_SupernodeWithBrokenParts):
    """The same on the routes served outside klein (pulls and reports)."""

    tasks_class = _BuggyTasks

    def test_unexpected_pull_error_is_500_without_its_text(self) -> None:
        """A bug under a pull is a 500 "internal error" with none of the exception's text."""
        answer = self.pull("a" * 64)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual((answer.status, answer.json()["msg"]), (500, "internal error"))
        self.assertNoLeak(answer.body)


class FetchErrorTests(_SupernodeWithBrokenParts):
    """A fetch that fails inside the supernode tells the task's peers so, not where or how."""

    cache_class = _VanishingCache

    def test_fetch_failing_on_the_supernode_s_disk_names_no_path(self) -> None:
        """The cache file vanished before the digest check: the peers' 502 carries no path under the home."""
        self.origin.files[b"/file"] = payload(5000)
        digest = "sha256:" + hashlib.sha256(payload(5000)).hexdigest()
        tid = self.register_ok(f"{ORIGIN}/file", digest=digest)
        self.pump()
        answer = self.pull(tid)
        self.flushLoggedErrors(FileNotFoundError)
        self.assertEqual(answer.status, 502)
        self.assertNoLeak(answer.body)
