"""Integration tests: an origin, a real supernode and an in-process peer engine on 127.0.0.1.

Every test runs on the real reactor with real sockets (port 0, loopback
only).  The origin is a small resource that counts and records what it is
asked, so the tests can check both the bytes that arrive at ``-o`` and the
traffic the source saw.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import resource as rusage
from typing import Any, Callable, Iterable

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.protocols.basic import FileSender
from twisted.trial.unittest import TestCase
from twisted.web import http, resource, server, static
from twisted.web.iweb import IRequest

from dfly import codes
from dfly.config import Home, SupernodeFileConfig
from dfly.httpclient import make_http_client
from dfly.logs import CLIENT_NAMESPACE
from dfly.peer.engine import DownloadRequest, DownloadResult, PeerEngine
from dfly.pieces import MiB
from dfly.ratelimit import TokenBucket
from dfly.supernode.tap import SupernodeParts, build_service
from tests.loopback import ClosingFactory

# --- the origin ---------------------------------------------------------------

STATIC = "static"  # twisted.web.static.File: Content-Length, Range, Last-Modified
NO_LENGTH = "no-length"  # chunked body, no Content-Length
NO_RANGE = "no-range"  # Range ignored: always 200 with the whole body

#: Request headers the origin records.
RECORDED = ("Range", "If-None-Match", "If-Modified-Since", "Authorization")
#: Last-Modified of version 1 of every file; each new version is 100 s later.
EPOCH = 1_700_000_000


@attrs.frozen
class Seen:
    """One request the origin answered: its path, status and recorded headers."""

    name: str
    code: int
    headers: dict[str, str]

    @property
    def conditional(self) -> bool:
        return "If-None-Match" in self.headers or "If-Modified-Since" in self.headers


@attrs.frozen
class Served:
    """A file the origin serves, and what a download of it must produce."""

    url: str
    sha256: str
    length: int


class Origin(resource.Resource):
    """Serves files from ``root`` in one of three modes; records every request.

    Each ``put`` is a new version with its own ETag (``"v<n>"``) and
    Last-Modified, so conditional requests are answered 304 only while the
    file is unchanged.  Protected files need ``Authorization: Bearer good``.
    """

    isLeaf = True

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root
        self.seen: list[Seen] = []
        self._modes: dict[str, str] = {}
        self._versions: dict[str, int] = {}
        self._protected: set[str] = set()
        self._holds: dict[str, tuple[int, Deferred[None]]] = {}
        os.makedirs(root, exist_ok=True)

    def put(self, name: str, chunks: Iterable[bytes], mode: str = STATIC, auth: bool = False) -> tuple[str, int]:
        """Store a new version of ``name``; returns its (sha256, length)."""
        digest, length = hashlib.sha256(), 0
        path = os.path.join(self.root, name)
        with open(path, "wb") as f:
            for chunk in chunks:
                digest.update(chunk)
                f.write(chunk)
                length += len(chunk)
        version = self._versions.get(name, 0) + 1
        self._versions[name] = version
        os.utime(path, (EPOCH + 100 * version, EPOCH + 100 * version))
        self._modes[name] = mode
        if auth:
            self._protected.add(name)
        return digest.hexdigest(), length

    def requests(self, name: str) -> list[Seen]:
        return [seen for seen in self.seen if seen.name == name]

    def full_gets(self, name: str) -> int:
        """How many times the whole body of ``name`` was served."""
        return sum(1 for seen in self.requests(name) if seen.code == http.OK)

    def render_GET(self, request: IRequest) -> Any:
        name = b"/".join(request.postpath).decode()
        headers = {h: v for h in RECORDED if (v := request.getHeader(h)) is not None}
        body = self._render(request, name)
        # Every branch has set its status by now (static.File too).
        self.seen.append(Seen(name, request.code, headers))
        return body

    def _render(self, request: IRequest, name: str) -> Any:
        path = os.path.join(self.root, name)
        if name in self._protected and request.getHeader("Authorization") != "Bearer good":
            request.setResponseCode(http.UNAUTHORIZED)
            request.setHeader("WWW-Authenticate", 'Bearer realm="origin"')
            return b"credentials, please\n"
        if name not in self._versions or not os.path.isfile(path):
            request.setResponseCode(http.NOT_FOUND)
            return b"no such file\n"
        if request.setETag(f'"v{self._versions[name]}"'.encode()) is http.CACHED:
            return b""
        if request.getHeader("If-None-Match") is not None:
            # Another ETag: If-Modified-Since beside it must not make a 304 (RFC 9110 13.2.2).
            request.requestHeaders.removeHeader("If-Modified-Since")
        mode = self._modes[name]
        if mode == STATIC:
            return static.File(path, defaultType="application/octet-stream").render_GET(request)
        if request.setLastModified(os.path.getmtime(path)) is http.CACHED:
            return b""
        if mode == NO_RANGE:
            request.setHeader("Content-Length", str(os.path.getsize(path)))
        # NO_LENGTH: without Content-Length, HTTP/1.1 sends the body chunked.
        Deferred.fromCoroutine(self._send(request, path, self._holds.pop(name, None)))
        return server.NOT_DONE_YET

    def hold(self, name: str, at: int) -> Deferred[None]:
        """The next body of ``name`` stops after ``at`` bytes until the returned Deferred fires."""
        release: Deferred[None] = Deferred()
        self._holds[name] = (at, release)
        return release

    async def _send(self, request: IRequest, path: str, hold: tuple[int, Deferred[None]] | None) -> None:
        with open(path, "rb") as f:
            try:
                if hold is not None:
                    at, release = hold
                    await FileSender().beginFileTransfer(io.BytesIO(f.read(at)), request)
                    await release
                await FileSender().beginFileTransfer(f, request)
            except Exception:
                return  # the client went away (FileSender fails when asked to stop)
        if request.channel is not None:
            request.finish()


# --- helpers ------------------------------------------------------------------


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def distinct_mebibytes(count: int) -> Iterable[bytes]:
    """``count`` MiB of random-looking bytes, fast: one random MiB, numbered per MiB."""
    block = os.urandom(MiB)
    for n in range(count):
        yield n.to_bytes(8, "big") + block[8:]


def peak_rss() -> int:
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return rusage.getrusage(rusage.RUSAGE_SELF).ru_maxrss * 1024


_signs = itertools.count(1)


class IntegrationTestCase(TestCase):
    """An origin and a peer engine per test; supernodes on demand."""

    timeout = 60

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out)
        self.origin = Origin(os.path.join(self.work, "origin"))
        factory = ClosingFactory(server.Site(self.origin))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        self.origin_root = f"http://127.0.0.1:{port.getHost().port}/"

        http_client, pool = make_http_client(reactor)
        self.addCleanup(pool.closeCachedConnections)
        self.engine = PeerEngine(reactor, http_client, Home(os.path.join(self.work, "peer")).ensure())
        self.supernode_home = os.path.join(self.work, "supernode")
        self.nodes: tuple[tuple[str, int], ...] = ()
        self.events: list[dict[str, Any]] = []

        self.piece_failures: list[str] = []

        def watch(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == CLIENT_NAMESPACE and event.get("log_level") == LogLevel.warn:
                if str(event.get("log_format", "")).startswith("piece "):
                    self.piece_failures.append(str(event.get("error")))

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)

    # setup ---------------------------------------------------------------------

    def serve(self, name: str, data: bytes | Iterable[bytes], mode: str = STATIC, auth: bool = False) -> Served:
        chunks = [data] if isinstance(data, bytes) else data
        sha256, length = self.origin.put(name, chunks, mode, auth)
        return Served(self.origin_root + name, sha256, length)

    async def start_supernode(self) -> SupernodeParts:
        """A supernode on fresh ports over ``supernode_home``; downloads use it from now on."""
        config = SupernodeFileConfig(
            port=0, download_port=0, listen="127.0.0.1", home=self.supernode_home, advertise_ip="127.0.0.1"
        )
        parts = build_service(config, reactor)
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        api = await parts.api.listening
        await parts.cdn.listening
        self.nodes = (("127.0.0.1", api.getHost().port),)
        return parts

    async def closed_port(self) -> int:
        """A loopback port nobody listens on."""
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        await port.stopListening()
        return number

    def request(self, url: str, **changes: Any) -> DownloadRequest:
        """A download of ``url`` to a new output, with a new sign, through ``self.nodes``."""
        n = next(_signs)
        changes.setdefault("nodes", self.nodes)
        changes.setdefault("local_limit", 0)  # pacing has its own test; the rest wants speed
        output = os.path.join(self.out, f"out-{n}.bin")
        return DownloadRequest(url=url, output=output, sign=f"{os.getpid()}-{n}.000", **changes)

    async def download(
        self, req: DownloadRequest, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> DownloadResult:
        """Run ``req``; its progress events land in ``self.events`` (and ``on_event``)."""
        events: list[dict[str, Any]] = []
        self.events = events

        def emit(event: dict[str, Any]) -> None:
            events.append(event)
            if on_event is not None:
                on_event(event)

        return await self.engine.download(req, emit)

    def registered(self) -> dict[str, Any]:
        """What the supernode answered the last download's registration."""
        [event] = [e for e in self.events if e["event"] == "registered"]
        return event

    # checks --------------------------------------------------------------------

    def assertDownloaded(
        self, result: DownloadResult, req: DownloadRequest, file: Served, reason: int = codes.REASON_NONE
    ) -> None:
        """SUCCESS with ``reason``, the right bytes at -o, nothing left in data/."""
        self.assertEqual((result.success, result.reason, result.length), (True, reason, file.length), result.line())
        line = r"\Adownload SUCCESS\(0\) cost:\d+\.\d{3}s length:%d reason:%d\Z" % (file.length, reason)
        self.assertRegex(result.line(), line)
        self.assertEqual(sha256_file(req.output), file.sha256)
        self.assertEqual(os.listdir(self.engine.home.data), [])
        if reason == codes.REASON_NONE:
            self.assertEqual((result.from_supernode, result.from_source), (file.length, 0))
            self.assertEqual(self.piece_failures, [])
        else:
            self.assertEqual((result.from_supernode, result.from_source), (0, file.length))

    def assertFailed(self, result: DownloadResult, req: DownloadRequest, code: int, reason: int) -> None:
        """FAIL(code) with ``reason``; nothing at -o or beside it, nothing left in data/."""
        self.assertEqual((result.success, result.code, result.reason), (False, code, reason), result.line())
        line = r"\Adownload FAIL\(%d\) cost:\d+\.\d{3}s length:-?\d+ reason:%d error:." % (code, reason)
        self.assertRegex(result.line(), line)
        self.assertFalse(os.path.exists(req.output))
        self.assertEqual([n for n in os.listdir(self.out) if os.path.basename(req.output) in n], [])
        self.assertEqual(os.listdir(self.engine.home.data), [])


# --- through the supernode ---------------------------------------------------------


class SizeTests(IntegrationTestCase):
    """Files of edge-case sizes arrive intact through the supernode."""

    async def check_size(self, length: int) -> None:
        file = self.serve("f.bin", os.urandom(length))
        await self.start_supernode()
        req = self.request(file.url)
        result = await self.download(req)
        self.assertDownloaded(result, req, file)
        self.assertEqual((self.registered()["fileLength"], self.registered()["pieceSize"]), (length, 4 * MiB))
        self.assertEqual(self.origin.full_gets("f.bin"), 1)

    async def test_empty_file(self) -> None:
        """An empty file: SUCCESS with length 0 and an empty output."""
        await self.check_size(0)

    async def test_one_byte(self) -> None:
        """A one-byte file arrives intact."""
        await self.check_size(1)

    async def test_exactly_one_piece(self) -> None:
        """A file of exactly one 4 MiB piece arrives intact."""
        await self.check_size(4 * MiB)

    async def test_one_piece_and_one_byte(self) -> None:
        """One piece and one byte: the second, one-byte piece arrives too."""
        await self.check_size(4 * MiB + 1)

    async def test_300_mib_uses_5_mib_pieces_in_flat_memory(self) -> None:
        """300 MiB: 5 MiB pieces, right bytes, and memory does not grow with the file."""
        file = self.serve("big.bin", distinct_mebibytes(300))  # 300 MiB: 4 + (3 - 2) MiB pieces
        parts = await self.start_supernode()
        before = peak_rss()
        req = self.request(file.url)
        result = await self.download(req)
        grown = peak_rss() - before
        self.assertDownloaded(result, req, file)
        self.assertEqual(self.registered()["pieceSize"], 5 * MiB)
        self.assertEqual(parts.tasks.task(self.registered()["taskId"]).ready, 60)
        self.assertLess(grown, 64 * MiB, "peak memory grew with the file")


class SourceShapeTests(IntegrationTestCase):
    """Origins that omit Content-Length or Range still work through the supernode."""

    async def test_source_without_content_length(self) -> None:
        """A chunked source of unknown length: pieces are offered as they come, every one right first time."""
        file = self.serve("chunked.bin", os.urandom(2 * 4 * MiB + 17), mode=NO_LENGTH)
        await self.start_supernode()
        req = self.request(file.url)
        result = await self.download(req)
        self.assertDownloaded(result, req, file)
        self.assertEqual(self.registered()["fileLength"], -1)
        self.assertEqual(self.origin.full_gets("chunked.bin"), 1)

    async def test_unknown_length_pieces_are_pulled_while_the_source_streams(self) -> None:
        """Unknown length, pieces pulled mid-stream: the short last piece is offered with its real range."""
        file = self.serve("chunked.bin", os.urandom(2 * 4 * MiB + 17), mode=NO_LENGTH)
        # The last 17 bytes reach the supernode only once the peer holds the first two pieces,
        # so the peer's next pull is waiting when the short last piece appears.
        release = self.origin.hold("chunked.bin", at=2 * 4 * MiB)

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "progress" and event["done"] == 2 * 4 * MiB:
                release.callback(None)

        await self.start_supernode()
        req = self.request(file.url)
        result = await self.download(req, on_event)
        self.assertTrue(release.called)
        self.assertDownloaded(result, req, file)

    async def test_source_without_range_support(self) -> None:
        """A source that ignores Range: the access probe of a second caller gets 200 and both succeed."""
        file = self.serve("norange.bin", os.urandom(4 * MiB + 5), mode=NO_RANGE)
        await self.start_supernode()
        first = self.request(file.url)
        self.assertDownloaded(await self.download(first), first, file)
        # Other headers make the supernode ask the source whether this caller may read it.
        second = self.request(file.url, headers={"X-Caller": "two"})
        self.assertDownloaded(await self.download(second), second, file)
        probes = [seen for seen in self.origin.requests("norange.bin") if "Range" in seen.headers]
        self.assertEqual([(p.code, p.headers["Range"]) for p in probes], [(200, "bytes=0-0")])


class MissingSourceTests(IntegrationTestCase):
    async def test_missing_source_fails_after_back_to_source(self) -> None:
        """404: registration fails (reason 1), back to source fails too: FAIL, nothing at -o."""
        await self.start_supernode()
        req = self.request(self.origin_root + "missing.bin")
        result = await self.download(req)
        self.assertEqual([e["reason"] for e in self.events if e["event"] == "source"], [codes.REASON_REGISTER_FAILED])
        self.assertIn("404", result.error)
        self.assertEqual([seen.code for seen in self.origin.requests("missing.bin")], [404, 404])
        self.assertFailed(result, req, codes.ERR_DOWNLOAD, codes.REASON_REGISTER_FAILED)

    async def test_missing_source_without_back_source_is_reason_1001(self) -> None:
        """404 and back_source=False: FAIL(1103) reason 1001, the source asked once, nothing at -o."""
        await self.start_supernode()
        req = self.request(self.origin_root + "missing.bin", back_source=False)
        result = await self.download(req)
        self.assertFailed(result, req, codes.ERR_REGISTER, codes.REASON_REGISTER_FAILED + codes.REASON_NO_BACK_SOURCE)
        self.assertIn("404", result.error)
        self.assertEqual(len(self.origin.requests("missing.bin")), 1)


class AuthTests(IntegrationTestCase):
    """A source that answers 401 without ``Authorization: Bearer good``."""

    async def test_without_credentials_fails_at_registration(self) -> None:
        """401: FAIL(1103) reason 1, no back-to-source attempt, nothing at -o."""
        file = self.serve("secret.bin", os.urandom(1000), auth=True)
        await self.start_supernode()
        req = self.request(file.url)
        result = await self.download(req)
        self.assertFailed(result, req, codes.ERR_REGISTER, codes.REASON_REGISTER_FAILED)
        self.assertEqual([seen.code for seen in self.origin.requests("secret.bin")], [401])

    async def test_with_credentials_succeeds(self) -> None:
        """The caller's Authorization header reaches the source and the download succeeds."""
        file = self.serve("secret.bin", os.urandom(4 * MiB + 3), auth=True)
        await self.start_supernode()
        req = self.request(file.url, headers={"Authorization": "Bearer good"})
        self.assertDownloaded(await self.download(req), req, file)
        self.assertEqual(
            [(seen.code, seen.headers.get("Authorization")) for seen in self.origin.requests("secret.bin")],
            [(200, "Bearer good")],
        )

    async def test_cached_bytes_are_refused_without_credentials(self) -> None:
        """Once cached for an authorised caller, the bytes are still refused to one without credentials."""
        file = self.serve("secret.bin", os.urandom(1000), auth=True)
        await self.start_supernode()
        good = self.request(file.url, headers={"Authorization": "Bearer good"})
        self.assertDownloaded(await self.download(good), good, file)
        bad = self.request(file.url)
        self.assertFailed(await self.download(bad), bad, codes.ERR_REGISTER, codes.REASON_REGISTER_FAILED)
        self.assertEqual([seen.code for seen in self.origin.requests("secret.bin")], [200, 401])


class CacheTests(IntegrationTestCase):
    """The supernode fetches a source once and revalidates its cache after a restart."""

    async def restart(self, parts: SupernodeParts) -> SupernodeParts:
        await parts.service.stopService()
        return await self.start_supernode()

    async def test_two_downloads_share_one_source_fetch(self) -> None:
        """Two concurrent downloads of one URL: the origin serves the body once."""
        file = self.serve("shared.bin", os.urandom(3 * 4 * MiB + 9))
        await self.start_supernode()
        first, second = self.request(file.url), self.request(file.url)
        results = await gatherResults([self.engine.download(first), self.engine.download(second)])
        self.assertDownloaded(results[0], first, file)
        self.assertDownloaded(results[1], second, file)
        self.assertEqual(len(self.origin.requests("shared.bin")), 1)
        self.assertEqual(self.origin.full_gets("shared.bin"), 1)

    async def test_restart_reuses_revalidated_cache(self) -> None:
        """After a restart on the same home, a 304 revalidates the cache: no second full GET."""
        file = self.serve("cached.bin", os.urandom(4 * MiB + 100))
        parts = await self.start_supernode()
        first = self.request(file.url)
        self.assertDownloaded(await self.download(first), first, file)
        await self.restart(parts)
        second = self.request(file.url)
        self.assertDownloaded(await self.download(second), second, file)
        seen = self.origin.requests("cached.bin")
        self.assertEqual([(s.code, s.conditional) for s in seen], [(200, False), (304, True)])
        self.assertEqual(seen[1].headers.get("If-None-Match"), '"v1"')

    async def test_changed_source_is_fetched_again_after_restart(self) -> None:
        """A new ETag after a restart: the conditional GET gets 200 and the new bytes arrive."""
        old = self.serve("changing.bin", os.urandom(4 * MiB + 100))
        parts = await self.start_supernode()
        first = self.request(old.url)
        self.assertDownloaded(await self.download(first), first, old)
        new = self.serve("changing.bin", os.urandom(4 * MiB + 100))  # same length, new bytes and ETag
        await self.restart(parts)
        second = self.request(new.url)
        self.assertDownloaded(await self.download(second), second, new)
        seen = self.origin.requests("changing.bin")
        self.assertEqual([(s.code, s.conditional) for s in seen], [(200, False), (200, True)])
        self.assertEqual(self.origin.full_gets("changing.bin"), 2)
        self.assertEqual(sha256_file(first.output), old.sha256)


class DigestTests(IntegrationTestCase):
    async def test_wrong_md5_fails_and_removes_working_file(self) -> None:
        """A wrong md5: FAIL(1104) reason 2, nothing at -o, data/ empty."""
        file = self.serve("f.bin", os.urandom(4 * MiB + 1))
        await self.start_supernode()
        req = self.request(file.url, md5="0" * 32)
        result = await self.download(req)
        self.assertFailed(result, req, codes.ERR_DOWNLOAD, codes.REASON_DIGEST_MISMATCH)
        self.assertIn("md5 mismatch", result.error)

    async def test_right_md5_succeeds(self) -> None:
        """The right md5: SUCCESS, the file is verified and placed."""
        data = os.urandom(4 * MiB + 1)
        file = self.serve("f.bin", data)
        await self.start_supernode()
        req = self.request(file.url, md5=hashlib.md5(data).hexdigest())
        self.assertDownloaded(await self.download(req), req, file)


class ContentAddressedTests(IntegrationTestCase):
    """With --digest and a URL that names it, the task is the content: one fetch at any such URL."""

    async def test_same_digest_at_two_urls_that_name_it_is_one_task_and_one_fetch(self) -> None:
        """Two repositories' URLs of one blob, both asked with its sha256: the origin sends it once."""
        data = os.urandom(4 * MiB + 3)
        digest = ("sha256", hashlib.sha256(data).hexdigest())
        names = [f"{repository}/sha256:{digest[1]}" for repository in ("a", "b")]
        for name in names:
            os.makedirs(os.path.join(self.origin.root, os.path.dirname(name)), exist_ok=True)
        first, second = self.serve(names[0], data), self.serve(names[1], data)
        await self.start_supernode()
        req_a = self.request(first.url, digest=digest)
        self.assertDownloaded(await self.download(req_a), req_a, first)
        task_a = self.registered()["taskId"]
        req_b = self.request(second.url, digest=digest)
        self.assertDownloaded(await self.download(req_b), req_b, second)
        self.assertEqual(self.registered()["taskId"], task_a)
        self.assertEqual(self.origin.full_gets(names[0]) + self.origin.full_gets(names[1]), 1)

    async def test_same_digest_at_urls_that_do_not_name_it_is_two_tasks(self) -> None:
        """A digest the path does not name only checks the bytes (see tests/adversarial/test_digest_alias.py)."""
        data = os.urandom(MiB + 3)
        first, second = self.serve("a.bin", data), self.serve("b.bin", data)
        await self.start_supernode()
        digest = ("sha256", hashlib.sha256(data).hexdigest())
        req_a = self.request(first.url, digest=digest)
        self.assertDownloaded(await self.download(req_a), req_a, first)
        task_a = self.registered()["taskId"]
        req_b = self.request(second.url, digest=digest)
        self.assertDownloaded(await self.download(req_b), req_b, second)
        self.assertNotEqual(self.registered()["taskId"], task_a)
        self.assertEqual((self.origin.full_gets("a.bin"), self.origin.full_gets("b.bin")), (1, 1))

    async def test_source_not_matching_the_digest_leaves_no_cache(self) -> None:
        """The supernode checks the whole file against the digest; a mismatch is a FAIL and nothing stays cached."""
        file = self.serve("f.bin", os.urandom(4 * MiB + 3))
        parts = await self.start_supernode()
        req = self.request(file.url, digest=("sha256", "0" * 64))
        result = await self.download(req)
        self.assertFailed(result, req, codes.ERR_DOWNLOAD, codes.REASON_DIGEST_MISMATCH)
        task = parts.tasks.tasks[self.registered()["taskId"]]
        self.assertEqual((task.state, task.fetch.running), ("failed", False))
        cached = [name for _, _, names in os.walk(os.path.join(self.supernode_home, "repo")) for name in names]
        self.assertEqual(cached, [])


# --- without a usable supernode ---------------------------------------------------


class BackToSourceTests(IntegrationTestCase):
    async def test_unreachable_supernode_goes_back_to_source(self) -> None:
        """A closed supernode port: SUCCESS from the source with reason 1."""
        file = self.serve("f.bin", os.urandom(4 * MiB + 7))
        req = self.request(file.url, nodes=(("127.0.0.1", await self.closed_port()),))
        self.assertDownloaded(await self.download(req), req, file, reason=codes.REASON_REGISTER_FAILED)
        self.assertEqual(self.origin.full_gets("f.bin"), 1)

    async def test_unreachable_supernode_without_back_source_is_reason_1001(self) -> None:
        """A closed supernode port and back_source=False: FAIL(1103) reason 1001, the source untouched."""
        file = self.serve("f.bin", os.urandom(1000))
        req = self.request(file.url, nodes=(("127.0.0.1", await self.closed_port()),), back_source=False)
        result = await self.download(req)
        self.assertFailed(result, req, codes.ERR_REGISTER, codes.REASON_REGISTER_FAILED + codes.REASON_NO_BACK_SOURCE)
        self.assertEqual(self.origin.seen, [])

    async def test_no_nodes_goes_back_to_source_with_reason_8(self) -> None:
        """No supernode at all: SUCCESS from the source with reason 8."""
        file = self.serve("f.bin", os.urandom(4 * MiB + 7))
        req = self.request(file.url, nodes=())
        self.assertDownloaded(await self.download(req), req, file, reason=codes.REASON_NO_NODE)


class LimitTests(IntegrationTestCase):
    """Limited downloads are paced by their buckets on real sockets.

    The checks are lower bounds that follow from the bucket's arithmetic (a
    bucket cannot release more than its burst plus rate x elapsed), so a slow
    machine cannot fail them; only a download that was not paced can.
    """

    RATE = 1 << 20
    SIZE = 2 << 20

    async def timed_download(self, req: DownloadRequest, file: Served) -> float:
        started = reactor.seconds()
        result = await self.download(req)
        self.assertDownloaded(result, req, file)
        return reactor.seconds() - started

    async def test_locallimit_paces_the_download(self) -> None:
        """At --locallimit 1M a 2 MiB download takes at least (2 MiB - burst) / 1 MiB/s."""
        file = self.serve("f.bin", os.urandom(self.SIZE))
        await self.start_supernode()
        elapsed = await self.timed_download(self.request(file.url, local_limit=self.RATE), file)
        burst = TokenBucket(self.RATE, reactor).burst
        self.assertGreaterEqual(elapsed, (self.SIZE - burst) / self.RATE)

    async def test_totallimit_paces_an_unlimited_download_and_stays_set(self) -> None:
        """A request's --totallimit becomes the host's limit, which paces even an unlimited download."""
        file = self.serve("f.bin", os.urandom(self.SIZE))
        await self.start_supernode()
        elapsed = await self.timed_download(self.request(file.url, local_limit=0, total_limit=self.RATE), file)
        burst = TokenBucket(self.RATE, reactor).burst
        self.assertGreaterEqual(elapsed, (self.SIZE - burst) / self.RATE)
        self.assertEqual((self.engine.limit.rx.rate, self.engine.limit.tx.rate), (self.RATE, self.RATE))

    async def test_back_to_source_is_paced_too(self) -> None:
        """Without a supernode the source download is paced by the same --locallimit."""
        file = self.serve("f.bin", os.urandom(self.SIZE))
        req = self.request(file.url, nodes=(), local_limit=self.RATE)
        started = reactor.seconds()
        result = await self.download(req)
        self.assertDownloaded(result, req, file, codes.REASON_NO_NODE)
        burst = TokenBucket(self.RATE, reactor).burst
        self.assertGreaterEqual(reactor.seconds() - started, (self.SIZE - burst) / self.RATE)

    async def test_concurrent_downloads_share_the_host_limit(self) -> None:
        """Two unlimited downloads under one 1 MiB/s host limit take as long as both files at that rate."""
        first, second = self.serve("a.bin", os.urandom(self.SIZE // 2)), self.serve("b.bin", os.urandom(self.SIZE // 2))
        await self.start_supernode()
        self.engine.limit.set_rate(self.RATE)
        reqs = [self.request(file.url, local_limit=0) for file in (first, second)]
        started = reactor.seconds()
        results = await gatherResults([self.engine.download(req) for req in reqs])
        for result, req, file in zip(results, reqs, (first, second)):
            self.assertEqual((result.success, sha256_file(req.output)), (True, file.sha256), result.line())
        burst = self.engine.limit.rx.burst
        self.assertGreaterEqual(reactor.seconds() - started, (self.SIZE - burst) / self.RATE)
