"""P2P integration tests: several peer daemons share one file through a real supernode.

Every host is a full peer daemon (``dfly.peer.tap.build_service``) with its own
home, listening on 127.0.0.1 port 0, in this process on the real reactor.  The
origin, the supernode's CDN port and every peer's server port count the bytes
they write, so the tests can say where bytes came from; the ``DownloadResult``
counts (piece bytes by source) are checked beside them.  Downloads that do not
end in time fail the test with the scheduler's view of what is stuck.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.protocols.policies import ProtocolWrapper
from twisted.trial.unittest import TestCase
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from dfly.config import Home, SupernodeFileConfig
from dfly.httpclient import make_http_client
from dfly.logs import CLIENT_NAMESPACE
from dfly.peer import resume
from dfly.peer.engine import DownloadRequest, DownloadResult, PeerEngine
from dfly.peer.options import PeerConfig
from dfly.peer.tap import PeerParts
from dfly.peer.tap import build_service as build_peer
from dfly.pieces import MiB
from dfly.source import SourceClient
from dfly.supernode import scheduler
from dfly.supernode.tap import SupernodeParts
from dfly.supernode.tap import build_service as build_supernode
from dfly.supernode.tasks import CDN, Task
from tests.loopback import ClosingFactory
from tests.test_integration import Origin, Served, distinct_mebibytes, sha256_file

log = Logger(namespace="tests.test_p2p")

#: How long a group of downloads may take on loopback (they need 1-2 s).
SETTLE = 30.0
#: How long the others may take to finish after a peer is killed.  They need
#: 1-2 s; a dead peer's claims must not hold the swarm up much longer.
AFTER_KILL = 15.0


# --- byte counting and misbehaving servers ----------------------------------------


class _CountingProtocol(ProtocolWrapper):
    """Counts every byte the server writes (headers included) into its factory."""

    def write(self, data: bytes) -> None:
        self.factory.count(len(data))
        super().write(data)

    def writeSequence(self, data: Iterable[bytes]) -> None:
        data = list(data)
        self.factory.count(sum(len(d) for d in data))
        super().writeSequence(data)


class CountingFactory(ClosingFactory):
    """A server factory that counts the bytes it sends and can close or cut every connection."""

    protocol = _CountingProtocol

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self.sent = 0

    def count(self, n: int) -> None:
        self.sent += n

    def abort_all(self) -> None:
        """Cut every connection now, unsent bytes dropped, as when the process dies."""
        for p in list(self.protocols):
            p.transport.abortConnection()


class CorruptingRequest(server.Request):
    """Flips the first byte of every body chunk of a 206 (piece) answer: right length, wrong bytes."""

    def write(self, data: bytes) -> None:
        if self.code == 206 and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        super().write(data)


class BlackHole:
    """An HTTP client whose requests never leave: all a dead host says from now on."""

    def request(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()

    def get(self, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return Deferred()


# --- hosts --------------------------------------------------------------------------


@attrs.define(eq=False)
class Host:
    """One peer daemon (one "host") with its own home and a counted server port."""

    name: str
    home: str
    parts: PeerParts
    factory: CountingFactory
    runs: list[Run] = attrs.Factory(list)

    @property
    def data_files(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.home, "data")))


@attrs.define(eq=False)
class Run:
    """One download on one host."""

    host: Host
    req: DownloadRequest
    d: Deferred[DownloadResult]

    @property
    def cid(self) -> str:
        return f"127.0.0.1-{self.req.sign}"


@attrs.frozen
class PieceLine:
    """One ``downloading piece:{...}`` line: which run fetches which piece from whom."""

    sign: str
    num: int
    dst: str


_signs = itertools.count(1001)


class P2PTestCase(TestCase):
    """An origin, a supernode and any number of peer daemons, all on 127.0.0.1."""

    timeout = 120
    #: More fields of every supernode's and every host's config (clusterToken, TLS).
    supernode_config: dict[str, Any] = {}
    host_config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        self.out = os.path.join(self.work, "out")
        os.makedirs(self.out)
        self.origin = Origin(os.path.join(self.work, "origin"))
        self.origin_factory = CountingFactory(server.Site(self.origin))
        port = reactor.listenTCP(0, self.origin_factory, interface="127.0.0.1")
        self.addCleanup(self.origin_factory.close_all)
        self.addCleanup(port.stopListening)
        self.origin_root = f"http://127.0.0.1:{port.getHost().port}/"
        self.hosts: list[Host] = []
        self.supernode: SupernodeParts | None = None
        self.cdn_factory: CountingFactory | None = None
        self.nodes: tuple[tuple[str, int], ...] = ()

        self.pieces: list[PieceLine] = []  # every "downloading piece" line
        self.piece_failures: list[dict[str, Any]] = []  # every "piece N from X failed" warning of a peer
        self.error_reports: list[dict[str, Any]] = []  # every piece/error report the supernode got

        def watch(event: dict[str, Any]) -> None:
            namespace = event.get("log_namespace")
            fmt = str(event.get("log_format", ""))
            if namespace == CLIENT_NAMESPACE:
                if fmt.startswith("downloading piece:"):
                    piece = json.loads(event["piece"])
                    self.pieces.append(PieceLine(str(event.get("sign")), piece["pieceNum"], piece["dstCid"]))
                elif event.get("log_level") == LogLevel.warn and fmt.startswith("piece "):
                    self.piece_failures.append(
                        {"sign": event.get("sign"), "num": event.get("num"), "dst": event.get("dst"),
                         "error": str(event.get("error"))}
                    )
            elif namespace == "dfly.supernode.api" and fmt.startswith("piece {piece}"):
                self.error_reports.append({"cid": event.get("cid"), "dst": event.get("dst"), "kind": event.get("kind")})

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)

    # setup ---------------------------------------------------------------------

    def serve(self, name: str, mebibytes: int) -> Served:
        sha256, length = self.origin.put(name, distinct_mebibytes(mebibytes))
        return Served(self.origin_root + name, sha256, length)

    def start_supernode(self) -> SupernodeParts:
        config = SupernodeFileConfig(
            port=0, download_port=0, listen="127.0.0.1", home=os.path.join(self.work, "supernode"),
            advertise_ip="127.0.0.1", **self.supernode_config,
        )
        parts = build_supernode(config, reactor)
        api_factory = parts.api.factory = ClosingFactory(parts.api.factory)
        cdn_factory = self.cdn_factory = parts.cdn.factory = CountingFactory(parts.cdn.factory)
        parts.service.startService()

        async def stop() -> None:
            if parts.service.running:
                await parts.service.stopService()
            await api_factory.close_all()
            await cdn_factory.close_all()

        # Registered before any host's, so it runs after every host has left.
        self.addCleanup(stop)
        assert parts.api.port is not None
        self.nodes = (("127.0.0.1", parts.api.port.getHost().port),)
        self.supernode = parts
        return parts

    def start_host(self, expiretime: float = 180.0, corrupt: bool = False, **more: Any) -> Host:
        """A peer daemon with its own home; ``corrupt``: its uploader sends wrong bytes."""
        name = f"host{len(self.hosts)}"
        home = os.path.join(self.work, name)
        config = PeerConfig(home=home, port=0, listen="127.0.0.1", ip="127.0.0.1", alivetime=0, expiretime=expiretime,
                            **{**self.host_config, **more})
        parts = build_peer(config, reactor, on_idle=lambda: None)
        site = parts.listener.factory
        if corrupt:
            site.requestFactory = CorruptingRequest
        factory = parts.listener.factory = CountingFactory(site)
        host = Host(name, home, parts, factory)
        parts.service.startService()

        async def stop() -> None:
            pending = [run.d for run in host.runs if not run.d.called]
            for d in pending:
                d.cancel()
            for run in host.runs:
                run.d.addErrback(lambda _: None)  # a test that failed early left it unread
            if pending:
                # A cancelled download may take a moment to wind down (or, while
                # a cancel turns into back-to-source, to fetch from the origin).
                await gatherResults(pending).addTimeout(SETTLE, reactor).addErrback(lambda _: None)
            if parts.service.running:
                await parts.service.stopService()
            await factory.close_all()

        self.addCleanup(stop)
        self.hosts.append(host)
        return host

    def download(self, host: Host, file: Served, **more: Any) -> Run:
        """Start a download of ``file`` on ``host`` with a new sign and output."""
        n = next(_signs)
        req = DownloadRequest(
            url=file.url, output=os.path.join(self.out, f"{host.name}-{n}.bin"), sign=f"{os.getpid()}-{n}.000",
            nodes=self.nodes, local_limit=0, **more,
        )
        run = Run(host, req, host.parts.engine.download(req))
        host.runs.append(run)
        return run

    async def wait_until(self, predicate: Callable[[], bool], within: float, what: str) -> None:
        deadline = reactor.seconds() + within
        while not predicate():
            if reactor.seconds() > deadline:
                self.fail(f"{what} did not happen within {within:g}s")
            await deferLater(reactor, 0.01, lambda: None)

    async def settle(self, runs: list[Run], deadline: float) -> list[DownloadResult]:
        """The results of ``runs``; fails with what the scheduler holds if one is still going at ``deadline``."""
        while not all(run.d.called for run in runs):
            if reactor.seconds() > deadline:
                self.fail(f"{sum(1 for run in runs if not run.d.called)} downloads stuck: {self.scheduler_view()}")
            await deferLater(reactor, 0.05, lambda: None)
        return [await run.d for run in runs]

    def task(self) -> Task:
        assert self.supernode is not None
        [task] = self.supernode.tasks.tasks.values()
        return task

    def scheduler_view(self) -> str:
        """The task's running pieces by cid, for failure messages."""
        if self.supernode is None or not self.supernode.tasks.tasks:
            return "no task"
        task = self.task()
        running = {
            cid.rsplit("-", 2)[-1]: {"have": len(peer.have), "running": peer.running}
            for cid, peer in task.peers.items() if peer.running
        }
        return (
            f"the CDN is sending pieces {sorted(task.schedule.cdn_pieces)} ({task.schedule.cdn_uploads} uploads); "
            f"running by cid: {running}"
        )

    # checks --------------------------------------------------------------------

    def assertDownloaded(self, result: DownloadResult, run: Run, file: Served) -> None:
        """P2P SUCCESS, the right bytes at -o, nothing from the source."""
        self.assertTrue(result.success, result.line())
        self.assertEqual((result.length, result.reason, result.from_source), (file.length, 0, 0), result.line())
        self.assertEqual(result.from_peers + result.from_supernode, file.length)
        self.assertEqual(sha256_file(run.req.output), file.sha256)

    def from_peers(self) -> list[PieceLine]:
        """The piece lines whose source is another peer, not the CDN."""
        return [p for p in self.pieces if not p.dst.startswith(CDN)]


# --- the tests --------------------------------------------------------------------


class SwarmTests(P2PTestCase):
    async def test_eight_peers_share_one_source_fetch(self) -> None:
        """8 peers fetch 64 MiB at once: right bytes, the origin sends it once, peers carry most pieces."""
        file = self.serve("swarm.bin", 64)
        self.start_supernode()
        hosts = [self.start_host() for _ in range(8)]
        started = reactor.seconds()
        runs = [self.download(host, file) for host in hosts]
        results = await self.settle(runs, started + SETTLE)
        for run, result in zip(runs, results):
            self.assertDownloaded(result, run, file)
        self.assertEqual(self.piece_failures, [])

        origin = self.origin_factory.sent
        self.assertLessEqual(origin, 1.02 * file.length, f"the origin sent {origin / file.length:.3f} x the file")

        # Piece bytes by source, as the peers count them, and as the sockets saw them.
        from_cdn = sum(r.from_supernode for r in results)
        from_peers = sum(r.from_peers for r in results)
        total = from_cdn + from_peers
        self.assertEqual(total, 8 * file.length)
        self.assertLess(from_cdn, total / 2, f"the CDN carried {from_cdn / total:.0%} of the piece bytes")
        assert self.cdn_factory is not None
        self.assertGreaterEqual(self.cdn_factory.sent, from_cdn)
        self.assertLess(self.cdn_factory.sent, total / 2)
        uploaded = sum(host.factory.sent for host in hosts)
        self.assertGreaterEqual(uploaded, from_peers)
        self.assertLess(uploaded, from_peers + MiB)  # headers only on top

        # The dfclient.log lines name other peers, and only peers of this swarm, as sources.
        lines = self.from_peers()
        self.assertGreater(len(lines), 0)
        self.assertLessEqual({p.dst for p in lines}, {run.cid for run in runs})
        log.info(
            "8 x 64 MiB in {took:.2f}s: origin {origin:.4f} x file; CDN {cdn:.1%} of piece bytes "
            "(socket {socket:.1%}); {peer_lines}/{lines} piece lines from peers",
            took=reactor.seconds() - started, origin=origin / file.length, cdn=from_cdn / total,
            socket=self.cdn_factory.sent / total, peer_lines=len(lines), lines=len(self.pieces),
        )


class CorruptPeerTests(P2PTestCase):
    async def test_corrupt_peer_is_rejected_and_blacklisted(self) -> None:
        """A peer that serves wrong bytes: each piece fails its digest, it is blacklisted, every download is right."""
        file = self.serve("f.bin", 32)
        self.start_supernode()
        bad = self.start_host(corrupt=True)
        first = self.download(bad, file)
        [result] = await self.settle([first], reactor.seconds() + SETTLE)
        self.assertDownloaded(result, first, file)  # fetched honestly: now it holds every piece

        honest = [self.start_host() for _ in range(5)]
        runs = [self.download(host, file) for host in honest]
        results = await self.settle(runs, reactor.seconds() + SETTLE)
        for run, result in zip(runs, results):
            self.assertDownloaded(result, run, file)

        # It did serve, and every piece it served was rejected and reported as a digest mismatch.
        self.assertGreater(bad.factory.sent, 0)
        served = [p for p in self.pieces if p.dst == first.cid]
        self.assertGreater(len(served), 0)
        rejected = [f for f in self.piece_failures if f["dst"] == first.cid]
        self.assertEqual(len(rejected), len(served))
        for failure in rejected:
            self.assertIn("has sha256", failure["error"])
        self.assertEqual([e["kind"] for e in self.error_reports], ["digest mismatch"] * len(served))
        self.assertLessEqual(self.origin_factory.sent, 1.02 * file.length)  # nobody went back to source

        # The supernode stopped offering it: each peer it cheated blacklisted it,
        # and after ELIMINATION failures from two hosts it is offered to nobody
        # and holds nothing (here every peer is 127.0.0.1: one host, so the
        # blacklists alone protect them).
        task = self.task()
        cheated = {f["sign"] for f in rejected}
        for run in runs:
            if run.req.sign in cheated:
                self.assertIn(first.cid, task.peers[run.cid].blacklist)
        liar = task.peers[first.cid]
        self.assertTrue(
            liar.service_errors >= scheduler.ELIMINATION or cheated == {run.req.sign for run in runs},
            f"service_errors={liar.service_errors}, blacklisted by {len(cheated)} of {len(runs)}",
        )
        self.assertEqual(liar.blamed_from <= {"127.0.0.1"}, True)
        if liar.service_errors >= scheduler.ELIMINATION and len(liar.blamed_from) >= scheduler.ELIMINATION_HOSTS:
            self.assertFalse(liar.can_serve)
            self.assertEqual([n for n, holders in task.schedule.holders.items() if first.cid in holders], [])
        log.info(
            "corrupt peer: {n} pieces served, all rejected; service_errors={errors}; blacklisted by {by}/5",
            n=len(served), errors=liar.service_errors, by=len(cheated),
        )


class KilledPeerTests(P2PTestCase):
    """Six peers share 64 MiB; one dies after it has served some piece bytes.

    It dies while it has a piece in flight from the CDN that no peer holds
    yet: the CDN sends a piece to one peer at a time, so the others must get
    that piece from the CDN once the scheduler lets go of the dead peer's claim.
    """

    file: Served
    killed_at: float

    async def run_and_kill(self, kill: Callable[[Host], None]) -> tuple[Run, list[Run]]:
        """Start six downloads and ``kill`` a host at that moment; the victim's run and every run."""
        file = self.file = self.serve("f.bin", 64)
        self.start_supernode()
        hosts = [self.start_host() for _ in range(6)]
        runs = [self.download(host, file) for host in hosts]

        def only_from_cdn(run: Run) -> bool:
            task = self.task()
            peer = task.peers.get(run.cid)
            return peer is not None and any(
                source == CDN and not task.schedule.holders.get(piece) for piece, source in peer.running.items()
            )

        def victim() -> Run | None:
            if self.supernode is None or not self.supernode.tasks.tasks:
                return None
            for run in runs:
                if run.host.factory.sent >= MiB and not run.d.called and only_from_cdn(run):
                    return run
            return None

        await self.wait_until(lambda: victim() is not None, SETTLE, "a peer that served and fetches a rare piece")
        dying = victim()
        assert dying is not None
        self.killed_at = reactor.seconds()
        kill(dying.host)
        return dying, runs

    async def test_killed_peers_download_ends_there(self) -> None:
        """Listener closed and download cancelled: that download ends cancelled, nothing placed, no second source fetch."""

        def kill(host: Host) -> None:
            host.parts.listener.stopService()
            host.factory.abort_all()
            host.runs[0].d.cancel()

        victim, runs = await self.run_and_kill(kill)
        # Read it before the others: they may be stuck on the dead peer (see the next test).
        deadline = self.killed_at + AFTER_KILL
        while not victim.d.called and reactor.seconds() < deadline:
            await deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(victim.d.called, "the cancelled download is still running")
        outcome = await victim.d.addErrback(lambda f: f.trap(CancelledError) and None)
        self.assertIsNone(outcome, f"the cancelled download went on: {outcome and outcome.line()}")
        self.assertFalse(os.path.exists(victim.req.output))
        # What it verified stays for a later run to resume from: the working
        # file and its record, every recorded piece matching the file's bytes.
        files = victim.host.data_files
        if files:
            working, record = files
            self.assertEqual(record, working + resume.SUFFIX)
            kept = json.loads(open(os.path.join(victim.host.home, "data", record), "rb").read())["pieces"]
            pmap, why = resume.load(os.path.join(victim.host.home, "data", working), json.loads(
                open(os.path.join(victim.host.home, "data", record), "rb").read())["identity"])
            self.assertEqual((why, len(pmap.pieces)), ("", len(kept)))
        # A cancelled download reports nothing more: its unfinished pieces are nobody's fault.
        reports = [e for e in self.error_reports if e["cid"] == victim.cid]
        self.assertEqual(reports, [], "the cancelled download blamed the sources of its unfinished pieces")
        self.assertLessEqual(self.origin_factory.sent, 1.02 * self.file.length)

        others = [run for run in runs if run is not victim]
        for run, result in zip(others, await self.settle(others, self.killed_at + AFTER_KILL)):
            self.assertDownloaded(result, run, self.file)

    async def test_others_finish_soon_after_a_peer_dies(self) -> None:
        """Port closed, uploads cut, not another word: the others still finish within AFTER_KILL."""

        def kill(host: Host) -> None:
            host.parts.listener.stopService()
            host.factory.abort_all()
            # Nothing it says reaches anyone from now on (its open transfers drain into its dead file).
            host.parts.engine.http = BlackHole()
            host.parts.engine.source = SourceClient(BlackHole(), reactor)

        victim, runs = await self.run_and_kill(kill)
        others = [run for run in runs if run is not victim]
        for run, result in zip(others, await self.settle(others, self.killed_at + AFTER_KILL)):
            self.assertDownloaded(result, run, self.file)
        log.info("others done {after:.2f}s after the kill", after=reactor.seconds() - self.killed_at)


class KeepServingTests(P2PTestCase):
    async def test_finished_peer_keeps_serving_until_expiry(self) -> None:
        """After its download a peer serves its .server file to later peers, until nobody asked for --expiretime."""
        file = self.serve("f.bin", 16)
        self.start_supernode()
        first_host = self.start_host(expiretime=2.0)
        first = self.download(first_host, file)
        [result] = await self.settle([first], reactor.seconds() + SETTLE)
        self.assertDownloaded(result, first, file)
        [kept] = first_host.data_files
        self.assertTrue(kept.endswith(".server"))
        self.assertEqual(first_host.parts.engine.active, 0)

        later = self.download(self.start_host(), file)
        [result] = await self.settle([later], reactor.seconds() + SETTLE)
        self.assertDownloaded(result, later, file)
        self.assertGreater(result.from_peers, 0)
        self.assertEqual({p.dst for p in self.from_peers()}, {first.cid})
        self.assertGreaterEqual(first_host.factory.sent, result.from_peers)

        # Until --expiretime has passed since the last upload, collection keeps it ...
        first_host.parts.daemon.collect()
        self.assertEqual(first_host.data_files, [kept])
        # ... then it goes, and the supernode hears that this peer left.
        [held] = first_host.parts.uploads.held()
        await deferLater(reactor, max(held.last_access + 2.0 - reactor.seconds(), 0) + 0.05, lambda: None)
        first_host.parts.daemon.collect()
        self.assertEqual(first_host.data_files, [])
        await self.wait_until(lambda: first.cid not in self.task().peers, 3.0, "the first peer's service down")
        log.info("later peer: {peers} bytes from the first peer, {cdn} from the CDN",
                 peers=result.from_peers, cdn=result.from_supernode)


# --- a piece offered again while its failed attempt is still being reported --------------


class _OnePiece(resource.Resource):
    """A piece source: 206 with ``body`` to every GET; counts them."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.gets = 0

    def render_GET(self, request: IRequest) -> bytes:
        self.gets += 1
        request.setResponseCode(206)
        request.setHeader(b"content-range", f"bytes 0-{len(self.body) - 1}/{len(self.body)}".encode())
        return self.body


class _ScriptedSupernode(resource.Resource):
    """Answers as `TaskManager` does when a piece fails and its peer has a pull waiting.

    The first pull offers piece 0 from a closed port.  The peer's next pull is
    held; its error report wakes it (``TaskManager.piece_result`` calls
    ``task.changed()`` before the report is answered), so the pull's answer,
    piece 0 again, now from the CDN, leaves before the report's own answer.
    """

    isLeaf = True

    def __init__(self, body: bytes, good: int, dead: int) -> None:
        super().__init__()
        self.length = len(body)
        self.digest = hashlib.sha256(body).hexdigest()
        self.good, self.dead = good, dead
        self.pulls = 0
        self.held: IRequest | None = None
        self.done = False
        self.later: list[Any] = []  # delayed answers, cancelled at cleanup

    def _answer(self, request: IRequest, code: int, data: Any = None) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"code": code, "msg": "", **({"data": data} if data is not None else {})}).encode()

    def _piece(self, port: int, cid: str) -> dict[str, Any]:
        return {"pieceNum": 0, "range": f"0-{self.length - 1}", "pieceSize": 4 * MiB, "pieceDigest": self.digest,
                "cid": cid, "peerIp": "127.0.0.1", "peerPort": port, "path": f"/peer/file/{'ab' * 32}"}

    def _later(self, request: IRequest, code: int, data: Any = None) -> Any:
        def send() -> None:
            if request.channel is not None:  # the peer is still there
                request.write(self._answer(request, code, data))
                request.finish()

        self.later.append(reactor.callLater(0.2, send))
        return server.NOT_DONE_YET

    def render_POST(self, request: IRequest) -> bytes:
        return self._answer(request, 200, {"taskId": "ab" * 32, "fileLength": self.length, "pieceSize": 4 * MiB})

    def render_GET(self, request: IRequest) -> Any:
        path = request.path.decode()
        if path == "/peer/task":
            self.pulls += 1
            if self.done:
                return self._answer(request, 600, {"fileLength": self.length, "pieceSize": 4 * MiB, "pieceCount": 1})
            if self.pulls == 1:
                return self._answer(request, 601, [self._piece(self.dead, "127.0.0.1-dead")])
            if self.pulls == 2:
                self.held = request
                return server.NOT_DONE_YET
            return self._later(request, 602)
        if path == "/peer/piece/error":
            held, self.held = self.held, None
            if held is not None:
                held.write(self._answer(held, 601, [self._piece(self.good, f"{CDN}127.0.0.1~{'ab' * 32}")]))
                held.finish()
            return self._later(request, 611)
        if path == "/peer/piece/suc":
            self.done = True
            return self._answer(request, 611)
        return self._answer(request, 612)


class PieceRetryTests(TestCase):
    """The engine against a scripted supernode: a failed piece offered again at once.

    With the real supernode this ordering is a race that, when lost, leaves a
    live peer "running" a piece it never fetches (KilledPeerTests then
    occasionally stall on it); the script makes it happen every time.
    """

    timeout = 30

    async def test_piece_offered_again_while_its_failure_is_reported_is_fetched(self) -> None:
        """A piece offered again before its failure report is answered: fetched, not dropped as already running."""
        body = os.urandom(1000)
        good = _OnePiece(body)
        servers = []
        for site in (good, _OnePiece(body)):
            factory = ClosingFactory(server.Site(site))
            port = reactor.listenTCP(0, factory, interface="127.0.0.1")
            self.addCleanup(factory.close_all)
            self.addCleanup(port.stopListening)
            servers.append(port.getHost().port)
        dead = servers[1]
        await port.stopListening()  # nothing listens there now: the first attempt fails at once
        script = _ScriptedSupernode(body, servers[0], dead)
        factory = ClosingFactory(server.Site(script))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        self.addCleanup(lambda: [call.cancel() for call in script.later if call.active()])
        http, pool = make_http_client(reactor)
        self.addCleanup(pool.closeCachedConnections)
        engine = PeerEngine(reactor, http, Home(os.path.abspath(self.mktemp())).ensure(), ip="127.0.0.1")
        req = DownloadRequest(
            url="http://127.0.0.1:1/f.bin", output=os.path.abspath(self.mktemp()), sign=f"{os.getpid()}-1.000",
            nodes=(("127.0.0.1", port.getHost().port),), back_source=False, timeout=3,
        )
        result = await engine.download(req)
        self.assertEqual(good.gets, 1, f"piece 0 from the CDN was never fetched: {result.line()}")
        self.assertTrue(result.success, result.line())


class _RangeServer(resource.Resource):
    """Serves ``body`` by Range, as the CDN port does (206 with exactly the bytes asked for)."""

    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body
        self.ranges: list[str] = []

    def render_GET(self, request: IRequest) -> bytes:
        text = request.getHeader(b"range").decode().removeprefix("bytes=")
        self.ranges.append(text)
        start, end = (int(n) for n in text.split("-"))
        request.setResponseCode(206)
        request.setHeader(b"content-range", f"bytes {start}-{end}/{len(self.body)}".encode())
        return self.body[start : end + 1]


class _NextSupernode(resource.Resource):
    """Hands out piece 0 in the first pull and piece 1 only in the answer to piece 0's ``next=1`` report.

    The second pull is held until the last report, then answered 600: a
    peer that only pulled (never read its reports' answers) would never get
    piece 1 and would fail.
    """

    isLeaf = True

    def __init__(self, body: bytes, piece_size: int, cdn_port: int) -> None:
        super().__init__()
        self.body, self.piece_size, self.cdn_port = body, piece_size, cdn_port
        self.pulls: list[dict[str, str]] = []
        self.reports: list[dict[str, str]] = []
        self.held: IRequest | None = None

    def _answer(self, request: IRequest, code: int, data: Any = None) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"code": code, "msg": "", **({"data": data} if data is not None else {})}).encode()

    def _piece(self, n: int) -> dict[str, Any]:
        start = n * self.piece_size
        end = min(start + self.piece_size, len(self.body)) - 1
        return {"pieceNum": n, "range": f"{start}-{end}", "pieceSize": self.piece_size,
                "pieceDigest": hashlib.sha256(self.body[start : end + 1]).hexdigest(),
                "cid": f"{CDN}127.0.0.1~{'cd' * 32}", "peerIp": "127.0.0.1", "peerPort": self.cdn_port,
                "path": f"/download/cdc/{'cd' * 32}"}

    def render_POST(self, request: IRequest) -> bytes:
        return self._answer(request, 200, {"taskId": "cd" * 32, "fileLength": len(self.body),
                                           "pieceSize": self.piece_size, "key": "key"})

    def render_GET(self, request: IRequest) -> Any:
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        if request.path == b"/peer/task":
            self.pulls.append(args)
            if len(self.pulls) == 1:
                return self._answer(request, 601, [self._piece(0)])
            self.held = request
            return server.NOT_DONE_YET
        if request.path == b"/peer/piece/suc":
            self.reports.append(args)
            if args["pieceRange"].startswith("0-"):
                return self._answer(request, 611, [self._piece(1)])
            held, self.held = self.held, None
            if held is not None:
                held.write(self._answer(held, 600, {"fileLength": len(self.body), "pieceSize": self.piece_size,
                                                    "pieceCount": 2}))
                held.finish()
            return self._answer(request, 611, [])
        return self._answer(request, 612)


class ReportAnswerTests(TestCase):
    """The engine reports with next=1 and runs the pieces its reports' answers carry."""

    timeout = 30

    def listen(self, site: resource.Resource) -> int:
        factory = ClosingFactory(server.Site(site))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_piece_in_a_report_answer_is_fetched_without_another_pull(self) -> None:
        piece_size = 4 * MiB
        body = os.urandom(piece_size + 1000)
        cdn = _RangeServer(body)
        script = _NextSupernode(body, piece_size, self.listen(cdn))
        node = self.listen(script)
        http, pool = make_http_client(reactor)
        self.addCleanup(pool.closeCachedConnections)
        engine = PeerEngine(reactor, http, Home(os.path.abspath(self.mktemp())).ensure(), ip="127.0.0.1")
        output = os.path.abspath(self.mktemp())
        req = DownloadRequest(url="http://127.0.0.1:1/f.bin", output=output, sign=f"{os.getpid()}-1.000",
                              nodes=(("127.0.0.1", node),), back_source=False, timeout=20)
        result = await engine.download(req)
        self.assertTrue(result.success, result.line())
        with open(output, "rb") as f:
            self.assertEqual(f.read(), body)
        self.assertEqual(cdn.ranges, [f"0-{piece_size - 1}", f"{piece_size}-{len(body) - 1}"])
        self.assertEqual(len(script.pulls), 2)  # the first, and the held one that got 600
        self.assertEqual({p["wait"] for p in script.pulls}, {f"{engine.poll_timeout:g}"})
        self.assertEqual([r["next"] for r in script.reports], ["1", "1"])
