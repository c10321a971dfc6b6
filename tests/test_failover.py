"""Supernode failure is a non-event: the download's state machine, migration, resume, back to source by range.

The flow and the resume record are unit-tested (the flow on `Clock`); the
engine runs on real loopback sockets next to real in-process supernodes,
which the tests stop, restart and lose in the middle of downloads.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import usage
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.client import ResponseNeverReceived
from twisted.web.iweb import IRequest

from dfly import codes
from dfly.config import (
    DfdaemonFileConfig,
    DfgetFileConfig,
    Home,
    NodeTimeouts,
    SupernodeFileConfig,
    load_dfdaemon_config,
    load_dfget_config,
)
from dfly.dfdaemon.tap import build_service as build_dfdaemon
from dfly.httpclient import make_http_client
from dfly.peer import engine as engine_module, resume
from dfly.peer.engine import DownloadRequest, DownloadResult, PeerEngine, _describe_error
from dfly.peer.nodenames import NodeNames
from dfly.peer.options import Options as DaemonOptions
from dfly.peer.tap import build_service as build_daemon
from dfly.peer.flow import RUNNING, TERMINAL, TRANSITIONS, DownloadFlow, Input, InvalidTransition, State
from dfly.pieces import MiB
from dfly.placement import rendezvous_order, task_key
from dfly.stream import run_inline
from dfly.supernode.tap import SupernodeParts, build_service
from tests.loopback import ClosingFactory
from tests.test_p2p import CountingFactory
from tests.test_nodenames import Resolver, v4
from tests.test_integration import IntegrationTestCase, Served, distinct_mebibytes, sha256_file

# --- the state machine --------------------------------------------------------

#: Inputs that lead from a new flow to each state.
ROUTES: dict[State, list[Input]] = {
    State.REGISTERING: [],
    State.P2P: [Input.REGISTERED],
    State.MIGRATING: [Input.REGISTERED, Input.NODE_LOST],
    State.SOURCE: [Input.NODES_FAILED],
    State.FINISHING: [Input.REGISTERED, Input.COMPLETE],
    State.DONE: [Input.REGISTERED, Input.COMPLETE, Input.FINISHED],
    State.FAILED: [Input.ERROR],
}

#: What each running state takes besides error, cancel and timeout.
EXPECTED = {
    (State.REGISTERING, Input.REGISTERED): State.P2P,
    (State.REGISTERING, Input.NODES_FAILED): State.SOURCE,
    (State.P2P, Input.COMPLETE): State.FINISHING,
    (State.P2P, Input.NODE_LOST): State.MIGRATING,
    (State.P2P, Input.P2P_FAILED): State.SOURCE,
    (State.MIGRATING, Input.REGISTERED): State.P2P,
    (State.MIGRATING, Input.NODES_FAILED): State.SOURCE,
    (State.SOURCE, Input.COMPLETE): State.FINISHING,
    (State.FINISHING, Input.FINISHED): State.DONE,
}


class FlowTests(SynchronousTestCase):
    def flow_in(self, state: State, timeout: float = 100.0) -> tuple[DownloadFlow, Clock, list[str]]:
        clock = Clock()
        expired: list[str] = []
        flow = DownloadFlow(clock, timeout, lambda: expired.append(flow.state.value))
        for event in ROUTES[state]:
            flow.handle(event)
        self.assertIs(flow.state, state)
        return flow, clock, expired

    def test_every_state_and_input(self) -> None:
        """Each of the 7 x 9 pairs: the listed transitions, failed for error/cancel/timeout, refused otherwise."""
        for state in State:
            for event in Input:
                flow, _, _ = self.flow_in(state)
                if state in TERMINAL and event in (Input.CANCEL, Input.TIMEOUT):
                    self.assertIs(flow.handle(event), state, (state, event))
                elif state in RUNNING and event in (Input.ERROR, Input.CANCEL, Input.TIMEOUT):
                    self.assertIs(flow.handle(event), State.FAILED, (state, event))
                    self.assertIs(flow.ended_by, event)
                elif (state, event) in EXPECTED:
                    self.assertIs(flow.handle(event), EXPECTED[(state, event)], (state, event))
                else:
                    self.assertRaises(InvalidTransition, flow.handle, event)
                    self.assertIs(flow.state, state)  # a refused input changes nothing
        self.assertEqual(len(TRANSITIONS), len(EXPECTED) + 3 * len(RUNNING) + 2 * len(TERMINAL))

    def test_deadline_fails_every_running_state_once(self) -> None:
        for state in RUNNING - {State.FINISHING}:
            flow, clock, expired = self.flow_in(state, timeout=10)
            clock.advance(9.9)
            self.assertEqual((flow.state, expired), (state, []))
            clock.advance(0.2)
            self.assertEqual((flow.state, flow.ended_by, expired), (State.FAILED, Input.TIMEOUT, [State.FAILED.value]))
            self.assertEqual(clock.getDelayedCalls(), [])

    def test_finishing_has_no_deadline(self) -> None:
        """The bytes are in and verified: a deadline passing while the file is placed throws nothing away."""
        flow, clock, expired = self.flow_in(State.FINISHING, timeout=10)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(20)
        self.assertEqual((flow.state, expired, flow.handle(Input.FINISHED)), (State.FINISHING, [], State.DONE))

    def test_an_ended_flow_has_no_deadline(self) -> None:
        for state in TERMINAL:
            flow, clock, expired = self.flow_in(state, timeout=10)
            self.assertEqual(clock.getDelayedCalls(), [])
            clock.advance(20)
            self.assertEqual((flow.state, expired), (state, []))

    def test_extend_counts_from_the_start(self) -> None:
        """A timeout learnt later (from the length) is the whole download's, not more on top."""
        flow, clock, expired = self.flow_in(State.P2P, timeout=300)
        clock.advance(50)
        flow.extend(60)
        clock.advance(9.9)
        self.assertEqual(expired, [])
        clock.advance(0.2)
        self.assertEqual(expired, [State.FAILED.value])

    def test_migrations_are_counted(self) -> None:
        flow, _, _ = self.flow_in(State.P2P)
        for _ in range(3):
            flow.handle(Input.NODE_LOST, "gone")
            flow.handle(Input.REGISTERED)
        self.assertEqual((flow.migrations, flow.why), (3, "gone"))


# --- the resume record --------------------------------------------------------------


class RecordTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.working = os.path.join(self.dir, "f.server")
        self.body = os.urandom(10 * 1000 + 7)
        with open(self.working, "wb") as f:
            f.write(self.body)
        self.ident = resume.identity("http://origin.test/f", "/out/f", "k")
        self.pmap = resume.PieceMap(self.ident, len(self.body), 1000)
        for num in (0, 1, 2, 5, 10):
            start, end = self.pmap.range(num)
            self.pmap.pieces[num] = hashlib.sha256(self.body[start : end + 1]).hexdigest()

    def write(self, data: bytes) -> None:
        with open(resume.record_path(self.working), "wb") as f:
            f.write(data)

    def test_round_trip_keeps_pieces_whose_bytes_match(self) -> None:
        resume.save(self.working, self.pmap.to_bytes())
        pmap, why = resume.load(self.working, self.ident)
        self.assertEqual((why, pmap.pieces, pmap.length, pmap.piece_size), ("", self.pmap.pieces, len(self.body), 1000))
        self.assertEqual(pmap.missing(), [(3000, 4999), (6000, 9999)])
        self.assertEqual(pmap.verified_bytes(), 4 * 1000 + 7)

    def test_a_changed_piece_is_dropped_and_named(self) -> None:
        resume.save(self.working, self.pmap.to_bytes())
        with open(self.working, "r+b") as f:
            f.seek(1500)
            f.write(b"\0" if self.body[1500] else b"\1")
        pmap, why = resume.load(self.working, self.ident)
        self.assertEqual(sorted(pmap.pieces), [0, 2, 5, 10])
        self.assertIn("pieces [1]", why)

    def test_a_truncated_working_file_drops_the_pieces_past_its_end(self) -> None:
        resume.save(self.working, self.pmap.to_bytes())
        os.truncate(self.working, 5500)
        pmap, _ = resume.load(self.working, self.ident)
        self.assertEqual(sorted(pmap.pieces), [0, 1, 2])

    def test_records_that_cannot_be_used(self) -> None:
        good = json.loads(self.pmap.to_bytes())
        cases: list[tuple[bytes, str]] = [
            (b"\x00garbage", "not JSON"),
            (b"[" * 100000, "not JSON"),
            (json.dumps({**good, "version": 99}).encode(), "version"),
            (json.dumps({**good, "identity": "0" * 64}).encode(), "another download"),
            (json.dumps({**good, "length": -5}).encode(), "invalid"),
            (json.dumps({**good, "pieceSize": 0}).encode(), "invalid"),
            (json.dumps({**good, "pieces": {"11": "a" * 64}}).encode(), "invalid piece"),
            (json.dumps({**good, "pieces": {"1": "not hex"}}).encode(), "invalid piece"),
            (json.dumps({**good, "pieces": {"-1": "a" * 64}}).encode(), "invalid piece"),
        ]
        for data, why in cases:
            self.write(data)
            pmap, said = resume.load(self.working, self.ident)
            self.assertIsNone(pmap, data[:60])
            self.assertIn(why, said)

    def test_a_record_larger_than_any_is_not_read(self) -> None:
        self.write(b" " * (resume.MAX_RECORD + 1))
        self.assertEqual(resume.load(self.working, self.ident)[0], None)

    def test_a_record_without_its_working_file(self) -> None:
        resume.save(self.working, self.pmap.to_bytes())
        os.unlink(self.working)
        pmap, why = resume.load(self.working, self.ident)
        self.assertIsNone(pmap)
        self.assertIn("without its working file", why)

    def test_no_record_is_nothing_to_say(self) -> None:
        self.assertEqual(resume.load(self.working, self.ident), (None, ""))

    def test_writer_coalesces_and_writes_the_last_state(self) -> None:
        """Changes while a write is in flight make one more write, of the newest map."""
        queued: list[Callable[[], Any]] = []

        def later(f: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            queued.append(lambda: d.callback(f()))
            return d

        writer = resume.RecordWriter(self.working, resume.PieceMap(self.ident, len(self.body), 1000), later)
        for num in range(5):
            writer.pmap.pieces[num] = "a" * 64
            writer.changed()
        self.assertEqual(len(queued), 1)
        queued.pop(0)()
        self.assertEqual(len(queued), 1)  # one more, for the four changes behind the first
        queued.pop(0)()
        self.assertEqual(queued, [])
        on_disk, _ = resume.PieceMap.from_bytes(open(resume.record_path(self.working), "rb").read(), self.ident), None
        self.assertEqual(sorted(on_disk.pieces), [0, 1, 2, 3, 4])
        closed = writer.close(discard=True)
        self.successResultOf(closed)
        self.assertFalse(os.path.exists(resume.record_path(self.working)))
        writer.changed()  # after close: nothing more is written
        self.assertEqual(queued, [])

    def test_writer_close_waits_for_the_write_in_flight(self) -> None:
        queued: list[Callable[[], Any]] = []

        def later(f: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            queued.append(lambda: d.callback(f()))
            return d

        writer = resume.RecordWriter(self.working, self.pmap, later)
        writer.changed()
        closed = writer.close(discard=True)
        self.assertNoResult(closed)
        queued.pop(0)()
        self.successResultOf(closed)
        self.assertFalse(os.path.exists(resume.record_path(self.working)))

    def test_a_kept_record_has_the_change_made_during_the_last_write(self) -> None:
        """Closed (kept) while a write is in flight and a newer change waits: the newer one is written too."""
        queued: list[Callable[[], Any]] = []

        def later(f: Callable[[], Any]) -> Deferred[Any]:
            d: Deferred[Any] = Deferred()
            queued.append(lambda: d.callback(f()))
            return d

        pmap = resume.PieceMap(self.ident, len(self.body), 1000)
        writer = resume.RecordWriter(self.working, pmap, later)
        pmap.pieces[0] = hashlib.sha256(self.body[:1000]).hexdigest()
        writer.changed()  # written now
        pmap.pieces[1] = hashlib.sha256(self.body[1000:2000]).hexdigest()
        writer.changed()  # waits for the write in flight
        closed = writer.close(discard=False)
        while queued:
            queued.pop(0)()
        self.successResultOf(closed)
        loaded, _ = resume.load(self.working, self.ident)
        self.assertEqual(sorted(loaded.pieces), [0, 1])


# --- the engine against real supernodes ---------------------------------------------


class FailoverTestCase(IntegrationTestCase):
    """Several supernodes over their own homes; the engine's migration waits kept short."""

    timeout = 90

    def setUp(self) -> None:
        super().setUp()
        self.engine.timeouts = NodeTimeouts(rejoin=3.0)
        self.parts: dict[tuple[str, int], SupernodeParts] = {}
        self.homes: dict[tuple[str, int], str] = {}
        self.counter = 0

    async def start_node(self, home: str | None = None, port: int = 0, download_port: int = 0,
                         ip: str = "127.0.0.1") -> tuple[str, int]:
        self.counter += 1
        home = home or os.path.join(self.work, f"supernode-{self.counter}")
        config = SupernodeFileConfig(port=port, download_port=download_port, listen=ip, home=home, advertise_ip=ip)
        parts = build_service(config, reactor)
        # Connections a test can cut, as when the process dies.
        parts.api.factory, parts.cdn.factory = CountingFactory(parts.api.factory), CountingFactory(parts.cdn.factory)
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        self.addCleanup(parts.api.factory.close_all)
        self.addCleanup(parts.cdn.factory.close_all)
        api = await parts.api.listening
        await parts.cdn.listening
        node = (ip, api.getHost().port)
        self.parts[node], self.homes[node] = parts, home
        return node

    async def stop_node(self, node: tuple[str, int]) -> None:
        """The node dies: its ports close and every connection is cut."""
        parts = self.parts[node]
        stopped = parts.service.stopService()
        parts.api.factory.abort_all()
        parts.cdn.factory.abort_all()
        await stopped

    async def restart_node(self, node: tuple[str, int]) -> None:
        """The same ports and home: a supernode restarted in place (its cache resumes)."""
        cdn_port = (await self.parts[node].cdn.listening).getHost().port
        await self.stop_node(node)
        await self.start_node(self.homes[node], node[1], cdn_port)

    def file_placed_first_on(self, node: tuple[str, int], nodes: tuple[tuple[str, int], ...], mebibytes: int) -> Served:
        for n in range(100):
            name = f"big-{n}.bin"
            if rendezvous_order(task_key(self.origin_root + name), nodes)[0] == node:
                return self.serve(name, distinct_mebibytes(mebibytes))
        raise AssertionError("no URL placed first on the node in 100 tries")

    async def download_with(self, req: DownloadRequest, at: float,
                            fault: Callable[[], Deferred[None] | None]) -> DownloadResult:
        """Run ``req``; when ``at`` of the file is verified, run ``fault`` once."""
        fired: list[Deferred[None] | None] = []

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "progress" and not fired and event["total"] > 0 and event["done"] >= at * event["total"]:
                fired.append(fault())

        result = await self.download(req, on_event)
        self.assertEqual(len(fired), 1, "the fault never ran")
        if isinstance(fired[0], Deferred):
            await fired[0]
        return result

    def states(self) -> list[str]:
        return [e["state"] for e in self.events if e["event"] == "state"]


class MigrationTests(FailoverTestCase):
    async def test_stopped_supernode_hands_the_download_to_the_next(self) -> None:
        """The task's node stops at 30 %: the download registers with the next and fetches no byte twice."""
        a, b = await self.start_node(), await self.start_node()
        nodes = (a, b)
        served = self.file_placed_first_on(a, nodes, 24)
        req = self.request(served.url, nodes=nodes, local_limit=12 * MiB, back_source=False)
        result = await self.download_with(req, 0.3, lambda: Deferred.fromCoroutine(self.stop_node(a)))
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(req.output), served.sha256)
        self.assertEqual((result.reason, result.migrated, result.from_source), (codes.REASON_NONE, 1, 0))
        self.assertIn(" migrated:1", result.line())
        # Every byte came from a CDN exactly once: the pieces verified on A were not fetched from B.
        self.assertEqual(result.from_supernode + result.from_peers, served.length)
        self.assertEqual([e["node"] for e in self.events if e["event"] == "registered"],
                         [f"127.0.0.1:{a[1]}", f"127.0.0.1:{b[1]}"])
        self.assertEqual(self.states(), ["p2p", "migrating", "p2p", "finishing", "done"])
        self.assertEqual(os.listdir(self.engine.home.data), [])

    async def test_restarted_supernode_takes_the_download_back(self) -> None:
        """One node, restarted in place at 40 %: the download re-registers there; nobody goes to the source."""
        a = await self.start_node()
        served = self.serve("restart.bin", distinct_mebibytes(24))
        req = self.request(served.url, nodes=(a,), local_limit=12 * MiB, back_source=False)
        result = await self.download_with(req, 0.4, lambda: Deferred.fromCoroutine(self.restart_node(a)))
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(req.output), served.sha256)
        self.assertEqual((result.migrated, result.from_source), (1, 0))
        self.assertEqual(result.from_supernode, served.length)
        # The origin sent the body once: the restarted CDN resumed its cache (a Range, or a revalidation).
        self.assertEqual(self.origin.full_gets("restart.bin"), 1)

    async def test_all_supernodes_gone_fetches_only_the_missing_ranges(self) -> None:
        a = await self.start_node()
        served = self.serve("alone.bin", distinct_mebibytes(24))
        req = self.request(served.url, nodes=(a,), local_limit=12 * MiB)
        self.engine.timeouts = NodeTimeouts(rejoin=1.0)
        before: list[int] = []

        def fault() -> Deferred[None]:
            before.append(len(self.origin.requests("alone.bin")))
            return Deferred.fromCoroutine(self.stop_node(a))

        result = await self.download_with(req, 0.3, fault)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(req.output), served.sha256)
        self.assertEqual(result.reason, codes.REASON_REGISTER_FAILED)
        self.assertEqual(result.from_supernode + result.from_source, served.length)
        self.assertGreaterEqual(result.from_supernode, 0.3 * served.length)
        after = self.origin.requests("alone.bin")[before[0]:]
        self.assertTrue(after and all(seen.code == 206 and "Range" in seen.headers for seen in after),
                        [(seen.code, seen.headers) for seen in after])
        asked = 0
        for seen in after:
            first, last = (int(n) for n in seen.headers["Range"].removeprefix("bytes=").split("-"))
            asked += last - first + 1
        self.assertEqual(asked, result.from_source)

    async def test_source_ignoring_range_is_fetched_whole(self) -> None:
        a = await self.start_node()
        served = self.serve("norange.bin", distinct_mebibytes(40), mode="no-range")
        req = self.request(served.url, nodes=(a,), local_limit=8 * MiB)
        self.engine.timeouts = NodeTimeouts(rejoin=1.0)
        result = await self.download_with(req, 0.2, lambda: Deferred.fromCoroutine(self.stop_node(a)))
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(req.output), served.sha256)
        self.assertEqual(result.from_source, served.length, (result.line(), self.states()))


class _NamedReactor:
    """The real reactor, but names resolve as ``dns`` says (two loopback addresses for one name)."""

    def __init__(self, dns: Any) -> None:
        self.nameResolver = dns

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class NodeNameTests(FailoverTestCase):
    async def test_a_name_for_two_supernodes_is_two_nodes_to_fail_over_between(self) -> None:
        """A headless Service: one name, two supernodes on one port; losing the task's one moves the download."""
        a = await self.start_node()
        b = await self.start_node(port=a[1], ip="127.0.0.2")
        dns = Resolver()
        dns.answers["supernodes.test"] = [v4("127.0.0.2"), v4("127.0.0.1")]
        self.engine.names = NodeNames(_NamedReactor(dns))
        first = rendezvous_order(task_key(self.origin_root + "big-0.bin"), (a, b))[0]
        served = self.file_placed_first_on(first, (a, b), 16)
        other = b if first == a else a
        req = self.request(served.url, nodes=(("supernodes.test", a[1]),), local_limit=12 * MiB, back_source=False)
        result = await self.download_with(req, 0.3, lambda: Deferred.fromCoroutine(self.stop_node(first)))
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(req.output), served.sha256)
        self.assertEqual([e["node"] for e in self.events if e["event"] == "registered"],
                         [f"{first[0]}:{first[1]}", f"{other[0]}:{other[1]}"])
        self.assertEqual(dns.lookups, ["supernodes.test"])  # the second registration used the kept answer


class ResumeTests(FailoverTestCase):
    async def cancel_at(self, req: DownloadRequest, at: float) -> None:
        """Start ``req`` and cancel it once ``at`` of it is verified (a dfget killed, as its daemon sees it)."""
        running: list[Deferred[DownloadResult]] = []

        def on_event(event: dict[str, Any]) -> None:
            if event["event"] == "progress" and event["total"] > 0 and event["done"] >= at * event["total"]:
                if running and not running[0].called:
                    reactor.callLater(0, running[0].cancel)

        self.events = []
        running.append(self.engine.download(req, lambda e: (self.events.append(e), on_event(e))))
        try:
            await running[0]
        except CancelledError:
            return
        self.fail("the download ended before it was cancelled")

    def new_engine(self) -> PeerEngine:
        """Another daemon over the same home (the first one was killed)."""
        http_client, pool = make_http_client(reactor)
        self.addCleanup(pool.closeCachedConnections)
        return PeerEngine(reactor, http_client, Home(os.path.join(self.work, "peer")).ensure())

    def working(self) -> str:
        [name] = [n for n in os.listdir(self.engine.home.data) if n.endswith(".server")]
        return os.path.join(self.engine.home.data, name)

    async def test_the_same_download_again_fetches_only_the_rest(self) -> None:
        a = await self.start_node()
        served = self.serve("resume.bin", distinct_mebibytes(24))
        first = self.request(served.url, nodes=(a,), local_limit=12 * MiB)
        await self.cancel_at(first, 0.5)
        working = self.working()
        self.assertTrue(os.path.exists(resume.record_path(working)))
        self.engine = self.new_engine()
        again = DownloadRequest(url=first.url, output=first.output, sign="9-9.000", nodes=(a,), local_limit=0)
        result = await self.download(again)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(again.output), served.sha256)
        self.assertGreaterEqual(result.resumed, 0.5 * served.length)
        self.assertIn(f" resumed:{result.resumed}", result.line())
        self.assertEqual(result.from_supernode + result.from_peers + result.resumed, served.length)
        self.assertLessEqual(result.from_supernode, 0.55 * served.length)
        self.assertEqual(os.listdir(self.engine.home.data), [])

    async def test_a_corrupted_piece_in_the_working_file_is_fetched_again(self) -> None:
        a = await self.start_node()
        served = self.serve("bitrot.bin", distinct_mebibytes(24))
        first = self.request(served.url, nodes=(a,), local_limit=12 * MiB)
        await self.cancel_at(first, 0.5)
        working = self.working()
        record = json.loads(open(resume.record_path(working), "rb").read())
        victim = min(int(n) for n in record["pieces"])
        with open(working, "r+b") as f:
            f.seek(victim * record["pieceSize"] + 7)
            f.write(b"rot")
        warnings = self.capture_warnings()
        self.engine = self.new_engine()
        again = DownloadRequest(url=first.url, output=first.output, sign="9-9.001", nodes=(a,), local_limit=0)
        result = await self.download(again)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(again.output), served.sha256)
        size = record["pieceSize"]
        self.assertEqual(result.resumed, (len(record["pieces"]) - 1) * size)
        self.assertEqual(result.from_supernode, served.length - result.resumed)
        self.assertTrue(any(f"pieces [{victim}]" in w for w in warnings), warnings)

    async def test_a_corrupt_record_is_ignored_with_a_log_line(self) -> None:
        a = await self.start_node()
        served = self.serve("badrecord.bin", distinct_mebibytes(16))
        first = self.request(served.url, nodes=(a,), local_limit=12 * MiB)
        await self.cancel_at(first, 0.4)
        with open(resume.record_path(self.working()), "wb") as f:
            f.write(b'{"version": 1, "identity": ')
        warnings = self.capture_warnings()
        again = DownloadRequest(url=first.url, output=first.output, sign="9-9.002", nodes=(a,), local_limit=0)
        result = await self.download(again)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(again.output), served.sha256)
        self.assertEqual((result.resumed, result.from_supernode), (0, served.length))
        self.assertTrue(any("not JSON" in w for w in warnings), warnings)

    async def test_a_record_of_other_bytes_is_not_resumed(self) -> None:
        """The source changed between the runs (same length): no old piece matches the new digests."""
        a = await self.start_node()
        served = self.serve("changed.bin", distinct_mebibytes(16))
        first = self.request(served.url, nodes=(a,), local_limit=12 * MiB)
        await self.cancel_at(first, 0.5)
        await self.stop_node(a)
        changed = self.serve("changed.bin", distinct_mebibytes(16))
        self.assertNotEqual(changed.sha256, served.sha256)
        b = await self.start_node()  # a new cache: it sees the new bytes
        again = DownloadRequest(url=first.url, output=first.output, sign="9-9.003", nodes=(b,), local_limit=0)
        result = await self.download(again)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(again.output), changed.sha256)
        self.assertEqual((result.resumed, result.from_supernode), (0, changed.length))

    async def test_back_to_source_resumes_too(self) -> None:
        """No supernode at all: the second run asks the source only for what the first did not verify."""
        served = self.serve("direct.bin", distinct_mebibytes(16))
        first = self.request(served.url, nodes=(), local_limit=8 * MiB)
        await self.cancel_at(first, 0.5)
        count = len(self.origin.requests("direct.bin"))
        again = DownloadRequest(url=first.url, output=first.output, sign="9-9.004", nodes=(), local_limit=0)
        result = await self.download(again)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(again.output), served.sha256)
        self.assertEqual(result.from_source + result.resumed, served.length)
        self.assertGreaterEqual(result.resumed, 0.5 * served.length - 4 * MiB)
        self.assertTrue(all(seen.code == 206 for seen in self.origin.requests("direct.bin")[count:]))

    async def test_a_source_whose_file_changed_length_is_fetched_whole(self) -> None:
        """The kept pieces are another version's: the source's new, shorter file is fetched whole, not refused."""
        served = self.serve("changed.bin", distinct_mebibytes(16))
        first = self.request(served.url, nodes=(), local_limit=8 * MiB)
        await self.cancel_at(first, 0.5)
        now = self.serve("changed.bin", distinct_mebibytes(6))  # shorter: the missing ranges are past its end
        again = DownloadRequest(url=first.url, output=first.output, sign="9-9.005", nodes=(), local_limit=0)
        result = await self.download(again)
        self.assertTrue(result.success, result.line())
        self.assertEqual((sha256_file(again.output), result.from_source, result.resumed), (now.sha256, now.length, 0))

    def capture_warnings(self) -> list[str]:
        seen: list[str] = []

        def watch(event: dict[str, Any]) -> None:
            if "why" in event:
                seen.append(str(event["why"]))

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        return seen


class _SourceErrorNode(resource.Resource):
    """A supernode that registers, answers the pull "source error" and never answers service/down."""

    isLeaf = True

    def answer(self, request: IRequest, code: int, data: Any = None) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"code": code, "msg": "x", **({"data": data} if data is not None else {})}).encode()

    def render_POST(self, request: IRequest) -> bytes:
        return self.answer(request, codes.SUCCESS, {"taskId": "ab" * 32, "fileLength": 200_000, "pieceSize": 65536})

    def render_GET(self, request: IRequest) -> Any:
        if request.path == b"/peer/service/down":
            return server.NOT_DONE_YET
        return self.answer(request, codes.SOURCE_ERROR if request.path == b"/peer/task" else codes.SUCCESS)


class DeadlineTests(IntegrationTestCase):
    """The download's deadline against the stages that used to outlive it (found in review)."""

    async def test_a_deadline_during_the_service_down_stops_the_download(self) -> None:
        """Before, the cancel was swallowed there: the whole source fetch ran after the deadline, then a bug."""
        served = self.serve("a.bin", os.urandom(200_000))
        factory = ClosingFactory(server.Site(_SourceErrorNode()))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        req = self.request(served.url, nodes=(("127.0.0.1", port.getHost().port),), timeout=1.0)
        result = await self.download(req)
        self.assertEqual((result.success, result.error, result.from_source), (False, "download timeout (1s)", 0),
                         result.line())
        self.assertEqual(self.origin.requests("a.bin"), [])

    async def test_a_deadline_while_the_file_is_checked_keeps_the_download(self) -> None:
        """Every byte is in and verified: a slow digest past the deadline still places the file."""
        data = os.urandom(200_000)
        served = self.serve("b.bin", data)
        checked = engine_module.file_digest

        def slow_disk(path: str, algorithm: str) -> str:
            time.sleep(1.5)
            return checked(path, algorithm)

        self.patch(engine_module, "file_digest", slow_disk)
        req = self.request(served.url, nodes=(), timeout=1.0, md5=hashlib.md5(data).hexdigest())
        result = await self.download(req)
        self.assertTrue(result.success, result.line())
        self.assertEqual(sha256_file(req.output), served.sha256)


# --- hostile and broken answers ------------------------------------------------------------


class _WrongRanges(resource.Resource):
    """A supernode whose first offer of piece 1 has a range that is not piece 1's; then the true one."""

    isLeaf = True

    def __init__(self, body: bytes, piece_size: int, cdn_port: int) -> None:
        super().__init__()
        self.body, self.piece_size, self.cdn_port = body, piece_size, cdn_port
        self.reports: list[dict[str, str]] = []
        self.offered = 0

    def _answer(self, request: IRequest, code: int, data: Any = None) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"code": code, "msg": "", **({"data": data} if data is not None else {})}).encode()

    def _piece(self, n: int, byte_range: str | None = None) -> dict[str, Any]:
        start = n * self.piece_size
        end = min(start + self.piece_size, len(self.body)) - 1
        return {"pieceNum": n, "range": byte_range or f"{start}-{end}", "pieceSize": self.piece_size,
                "pieceDigest": hashlib.sha256(self.body[start : end + 1]).hexdigest(),
                "cid": "cdnnode:127.0.0.1~" + "cd" * 32, "peerIp": "127.0.0.1", "peerPort": self.cdn_port,
                "path": "/download/cdc/" + "cd" * 32}

    def render_POST(self, request: IRequest) -> bytes:
        return self._answer(request, 200, {"taskId": "cd" * 32, "fileLength": len(self.body), "pieceSize": self.piece_size})

    def render_GET(self, request: IRequest) -> Any:
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        if request.path == b"/peer/task":
            self.offered += 1
            if self.offered == 1:
                # Piece 1 "covering" piece 0's bytes and past the end of the file.
                return self._answer(request, 601, [self._piece(1, f"0-{len(self.body) + 100}")])
            if len(self.reports) < 3:
                return self._answer(request, 601, [self._piece(n) for n in range(2)])
            return self._answer(request, 600, {"fileLength": len(self.body), "pieceCount": 2})
        if request.path in (b"/peer/piece/suc", b"/peer/piece/error"):
            self.reports.append({"path": request.path.decode(), **args})
            return self._answer(request, 200, [])
        return self._answer(request, 200)


class _RangeServer(resource.Resource):
    isLeaf = True

    def __init__(self, body: bytes) -> None:
        super().__init__()
        self.body = body

    def render_GET(self, request: IRequest) -> bytes:
        start, end = (int(n) for n in request.getHeader(b"range").decode().removeprefix("bytes=").split("-"))
        request.setResponseCode(206)
        request.setHeader(b"content-range", f"bytes {start}-{end}/{len(self.body)}".encode())
        return self.body[start : end + 1]


class _Faulty:
    """The real HTTP client, but the first piece GET raises an error nobody expects (a bug stand-in)."""

    def __init__(self, http: Any) -> None:
        self.http = http
        self.raised = 0

    def get(self, url: str, *args: Any, **kwargs: Any) -> Any:
        if "/download/" in url and not self.raised:
            self.raised += 1
            raise RuntimeError("boom inside a piece fetch")
        return self.http.get(url, *args, **kwargs)

    def request(self, *args: Any, **kwargs: Any) -> Any:
        return self.http.request(*args, **kwargs)


class HostileAnswerTests(IntegrationTestCase):
    def listen(self, site: resource.Resource) -> int:
        factory = ClosingFactory(server.Site(site))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_a_range_that_is_not_the_piece_is_refused_and_never_written(self) -> None:
        body = os.urandom(2 * 1000 - 300)
        cdn = self.listen(_RangeServer(body))
        script = _WrongRanges(body, 1000, cdn)
        node = ("127.0.0.1", self.listen(script))
        req = self.request("http://127.0.0.1:1/never-fetched.bin", nodes=(node,), back_source=False)
        written: list[tuple[int, int]] = []
        result = await self.download(req, lambda e: written.append((e["start"], e["end"])) if e["event"] == "piece" else None)
        self.assertTrue(result.success, result.line())
        with open(req.output, "rb") as f:
            self.assertEqual(f.read(), body)
        [refused] = [r for r in script.reports if r["path"] == "/peer/piece/error"]
        self.assertEqual(refused["kind"], "invalid")
        self.assertTrue(all(end < len(body) for _, end in written), written)

    async def test_an_error_inside_a_piece_fetch_is_logged_and_the_piece_retried(self) -> None:
        await self.start_supernode()
        failures: list[str] = []

        def watch(event: dict[str, Any]) -> None:
            if event.get("log_failure") is not None:
                failures.append(event["log_failure"].getErrorMessage())

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        self.engine.http = faulty = _Faulty(self.engine.http)
        served = self.serve("boom.bin", os.urandom(3 * MiB))
        req = self.request(served.url, back_source=False)
        result = await self.download(req)
        self.flushLoggedErrors(RuntimeError)
        self.assertTrue(result.success, result.line())
        self.assertEqual((faulty.raised, result.from_source), (1, 0))
        self.assertEqual(sha256_file(req.output), served.sha256)
        self.assertIn("boom inside a piece fetch", failures)
        self.assertEqual(len([f for f in self.piece_failures if "internal error" in f]), 1)

    async def test_garbage_from_the_task_s_node_moves_the_download_to_the_next(self) -> None:
        """A registration answered 200 without a dfly body: the next node takes it."""
        garbage = resource.Resource()
        garbage.isLeaf = True  # type: ignore[attr-defined]
        garbage.render_POST = lambda request: b"<html>hello</html>"  # type: ignore[attr-defined]
        bad = ("127.0.0.1", self.listen(garbage))
        await self.start_supernode()
        nodes = (bad, *self.nodes)
        for n in range(100):
            served = self.serve(f"g{n}.bin", os.urandom(5000))
            if rendezvous_order(task_key(served.url), nodes)[0] == bad:
                break
        req = self.request(served.url, nodes=nodes, back_source=False)
        result = await self.download(req)
        self.assertDownloaded(result, req, served)


class EngineUnitTests(SynchronousTestCase):
    def test_max_migrations_follows_the_node_list(self) -> None:
        engine = PeerEngine(Clock(), None, Home(self.mktemp()), run_blocking=run_inline)
        self.assertEqual(engine.max_migrations((("a", 1), ("b", 1), ("a", 1))), 5)

    def test_a_hang_is_found_within_hang_check_and_ping_of_the_last_answer(self) -> None:
        """A call that began before the node's last answer is checked hang_check s after that answer.

        Before, the one check at hang_check s after the call began saw the
        recent answer and never looked again: such a call (a piece report)
        waited for its whole API timeout.
        """
        clock = Clock()
        engine = PeerEngine(clock, _SilentHttp(clock), Home(self.mktemp()), run_blocking=run_inline)
        engine.timeouts, engine.ping_timeout = NodeTimeouts(hang_check=3.0), 2.0
        node = ("127.0.0.1", 1)
        clock.advance(1.0)
        call: Deferred[Any] = Deferred()  # the node never answers it
        outcome: list[Any] = []
        Deferred.fromCoroutine(engine._unless_hung(node, call)).addBoth(outcome.append)
        clock.advance(1.5)
        engine._heard[node] = clock.seconds()  # t = 2.5: another call's answer, the node's last
        clock.advance(3.0 - 1e-6)
        self.assertEqual((outcome, engine.http.asked), ([], 0))  # t < 5.5: not quiet for 3 s yet
        clock.advance(2e-6)
        self.assertEqual(engine.http.asked, 1)  # t = 5.5: pinged
        clock.advance(2.0)  # t = 7.5: the ping went unanswered
        self.assertEqual(len(outcome), 1)
        self.assertIn("does not answer, not even /_ping", outcome[0].getErrorMessage())


class _SilentHttp:
    """An HTTP client whose requests are never answered: each fails at its timeout, as treq's do."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.asked = clock, 0

    def get(self, url: str, timeout: float, reactor: Any) -> Deferred[Any]:
        self.asked += 1
        # Cancelling a sent request fails it as Twisted's HTTP client does.
        d: Deferred[Any] = Deferred(lambda d: d.errback(ResponseNeverReceived([Failure(CancelledError())])))
        self.clock.callLater(timeout, d.cancel)
        return d


class SilentNodeTests(IntegrationTestCase):
    """The words a migration logs when a supernode lets an API call time out."""

    async def test_a_timed_out_call_is_described(self) -> None:
        """treq's timeout cancels the request; its reason has no message of its own."""
        silent = ClosingFactory(Factory.forProtocol(Protocol))  # takes the request, answers nothing
        port = reactor.listenTCP(0, silent, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(silent.close_all)
        http, pool = make_http_client(reactor, connect_timeout=1.0)
        self.addCleanup(pool.closeCachedConnections)
        url = f"http://127.0.0.1:{port.getHost().port}/peer/piece/suc"
        with self.assertRaises(Exception) as caught:
            await http.get(url, timeout=0.2, reactor=reactor)
        self.assertEqual(_describe_error(caught.exception), "no answer within the API timeout")



class TimeoutConfigTests(SynchronousTestCase):
    """connectTimeout, apiTimeout, hangCheck, rejoinWait: dfget.yml, dfdaemon.yml, daemon flags, wiring."""

    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return path

    def daemon_config(self, *args: str) -> Any:
        opts = DaemonOptions()
        opts.parseOptions(["--home", self.mktemp(), *args])
        return opts["config_obj"]

    def test_defaults_are_a_few_seconds(self) -> None:
        """Without keys or flags: connect 3 s, API 5 s, hang check 3 s, rejoin 10 s."""
        expected = NodeTimeouts(connect=3.0, api=5.0, hang_check=3.0, rejoin=10.0)
        self.assertEqual((DfgetFileConfig().timeouts, DfdaemonFileConfig().timeouts, NodeTimeouts()),
                         (expected, expected, expected))

    def test_dfget_yml_keys(self) -> None:
        path = self.write("connectTimeout: 1s\napiTimeout: 2500ms\nhangCheck: 4\nrejoinWait: 0\n")
        self.assertEqual(load_dfget_config(path).timeouts, NodeTimeouts(connect=1.0, api=2.5, hang_check=4.0, rejoin=0.0))

    def test_dfdaemon_yml_keys(self) -> None:
        path = self.write("apiTimeout: 7s\nhangCheck: 1s\n")
        self.assertEqual(load_dfdaemon_config(path).timeouts, NodeTimeouts(api=7.0, hang_check=1.0))

    def test_a_zero_or_bad_timeout_names_its_key(self) -> None:
        for text, key in (("connectTimeout: 0\n", "connectTimeout"), ("apiTimeout: soon\n", "apiTimeout"),
                          ("hangCheck: -1\n", "hangCheck"), ("rejoinWait: []\n", "rejoinWait")):
            error = self.assertRaises(ValueError, load_dfget_config, self.write(text))
            self.assertIn(repr(key), str(error))

    def test_daemon_flags_win_over_the_file(self) -> None:
        path = self.write("connectTimeout: 1s\napiTimeout: 9s\n")
        config = self.daemon_config("--config", path, "--apitimeout", "2s", "--rejoinwait", "30s")
        self.assertEqual(config.timeouts, NodeTimeouts(connect=1.0, api=2.0, rejoin=30.0))

    def test_bad_daemon_flags_are_usage_errors_naming_the_flag(self) -> None:
        for flag, value in (("--hangcheck", "0"), ("--connecttimeout", "x"), ("--rejoinwait", "-1s")):
            error = self.assertRaises(usage.UsageError, self.daemon_config, flag, value)
            self.assertIn(flag, str(error))

    def test_the_daemon_s_engine_and_connections_use_them(self) -> None:
        """build_service hands the timeouts to the engine and the connect timeout to its HTTP agent."""
        config = self.daemon_config("--connecttimeout", "1.5s", "--hangcheck", "2s", "--listen", "127.0.0.1")
        parts = build_daemon(config, MemoryReactorClock())
        self.assertEqual(parts.engine.timeouts, NodeTimeouts(connect=1.5, hang_check=2.0))
        agent = parts.engine.http._agent
        self.assertEqual(agent._endpointFactory._connectTimeout, 1.5)

    def test_dfdaemon_s_engine_uses_them(self) -> None:
        config = DfdaemonFileConfig(home=self.mktemp(), timeouts=NodeTimeouts(api=2.0, connect=0.5))
        parts = build_dfdaemon(config, MemoryReactorClock())
        self.assertEqual(parts.engine.timeouts, NodeTimeouts(api=2.0, connect=0.5))
        self.assertEqual(parts.engine.http._agent._endpointFactory._connectTimeout, 0.5)

    def test_etc_dfget_yml_states_the_defaults(self) -> None:
        """The example file shows the timeouts the code uses without it."""
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "etc", "dfget.yml")
        self.assertEqual(load_dfget_config(path).timeouts, NodeTimeouts())
