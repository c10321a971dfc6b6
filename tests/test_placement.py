"""Task placement over supernodes (rendezvous hashing), the daemon's memory of failed nodes, and hung nodes.

Unit tests on `Clock`; the hung supernode is a real loopback listener that
accepts connections and never answers, next to a real supernode.
"""

from __future__ import annotations

import collections
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from dfly import codes
from dfly.config import NodeTimeouts
from dfly.peer.nodehealth import FAILURES, SKIP_FOR, NodeHealth
from dfly.placement import rendezvous_order, task_key
from dfly.supernode.api import parse_registration
from tests.loopback import ClosingFactory
from tests.test_integration import IntegrationTestCase

A, B, C = ("10.0.0.1", 8002), ("10.0.0.2", 8002), ("10.0.0.3", 8002)


class RendezvousTests(SynchronousTestCase):
    def test_order_is_the_same_for_everyone_whatever_the_list_order(self) -> None:
        for n in range(50):
            key = task_key(f"http://origin.test/f{n}")
            self.assertEqual(rendezvous_order(key, [A, B, C]), rendezvous_order(key, [C, A, B]))

    def test_tasks_spread_over_the_nodes(self) -> None:
        """300 URLs over 3 nodes: each node is first for roughly a third."""
        first = collections.Counter(rendezvous_order(task_key(f"http://origin.test/f{n}"), [A, B, C])[0]
                                    for n in range(300))
        self.assertEqual(set(first), {A, B, C})
        self.assertTrue(all(70 <= count <= 130 for count in first.values()), first)

    def test_removing_a_node_moves_only_its_own_tasks(self) -> None:
        for n in range(200):
            key = task_key(f"http://origin.test/f{n}")
            before = rendezvous_order(key, [A, B, C])
            after = rendezvous_order(key, [A, B])
            self.assertEqual(after, [node for node in before if node != C])

    def test_duplicates_are_dropped(self) -> None:
        self.assertEqual(sorted(rendezvous_order("k", [A, A, B, A])), [A, B])

    def test_key_is_the_task_id_the_supernode_computes(self) -> None:
        """Plain, filtered, md5, identifier and digest registrations: the peer's key is the supernode's id."""
        url = "http://origin.test:8080/v2/x/blobs/sha256:" + "a" * 64 + "?sig=1&expires=2&keep=3"
        cases: list[dict[str, Any]] = [
            {}, {"filter": ["sig", "expires"]}, {"md5": "b" * 32}, {"identifier": "release-1"},
            {"digest": "sha256:" + "a" * 64},
        ]
        for fields in cases:
            body = {"url": url, "cid": "c1", "ip": "127.0.0.1", **fields}
            expected = parse_registration(body).task_id
            digest = tuple(fields["digest"].split(":")) if "digest" in fields else None
            got = task_key(url, fields.get("filter", ()), fields.get("md5"), fields.get("identifier"), digest)
            self.assertEqual(got, expected, fields)


class NodeHealthTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.health = NodeHealth(self.clock)

    def test_failures_short_of_the_threshold_keep_the_order(self) -> None:
        for _ in range(FAILURES - 1):
            self.health.failed(A, "timeout")
        self.assertEqual(self.health.order([A, B]), [A, B])

    def test_repeated_failures_put_the_node_last(self) -> None:
        for _ in range(FAILURES):
            self.health.failed(A, "timeout")
        self.assertEqual(self.health.order([A, B, C]), [B, C, A])

    def test_a_node_that_is_down_goes_last_at_once(self) -> None:
        self.health.failed(A, "hung", down=True)
        self.assertEqual(self.health.order([A, B]), [B, A])

    def test_a_success_in_between_clears_the_count(self) -> None:
        for _ in range(FAILURES - 1):
            self.health.failed(A, "timeout")
        self.health.succeeded(A)
        self.health.failed(A, "timeout")
        self.assertEqual(self.health.order([A, B]), [A, B])

    def test_skipped_node_is_probed_again_after_skip_for(self) -> None:
        self.health.failed(A, "hung", down=True)
        self.clock.advance(SKIP_FOR - 0.1)
        self.assertEqual(self.health.order([A, B]), [B, A])
        self.clock.advance(0.1)
        self.assertEqual(self.health.order([A, B]), [A, B])

    def test_a_failed_probe_skips_it_again_at_once(self) -> None:
        self.health.failed(A, "hung", down=True)
        self.clock.advance(SKIP_FOR)
        self.health.order([A, B])
        self.health.failed(A, "timeout")
        self.assertEqual(self.health.order([A, B]), [B, A])

    def test_all_skipped_are_still_tried(self) -> None:
        self.health.failed(A, "refused", down=True)
        self.health.failed(B, "refused", down=True)
        self.assertEqual(self.health.order([A, B]), [A, B])


class HungSupernodeTests(IntegrationTestCase):
    """A supernode that accepts connections and never answers, first in the task's order."""

    async def hung_node(self) -> tuple[str, int]:
        self.hung_connections = 0

        def counted(addr: Any) -> Protocol:
            self.hung_connections += 1
            return Protocol()  # reads, never writes

        inner = Factory()
        inner.buildProtocol = counted  # type: ignore[method-assign]
        factory = ClosingFactory(inner)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        return ("127.0.0.1", port.getHost().port)

    def url_placed_first_on(self, node: tuple[str, int], nodes: tuple[tuple[str, int], ...], name: str) -> Any:
        """A file served by the origin whose task's first node is ``node``."""
        for n in range(100):
            served = self.serve(f"{name}-{n}.bin", os.urandom(3000))
            if rendezvous_order(task_key(served.url), nodes)[0] == node:
                return served
        raise AssertionError("no URL placed on the hung node in 100 tries")

    async def test_download_goes_through_the_next_node_within_seconds(self) -> None:
        await self.start_supernode()
        hung = await self.hung_node()
        nodes = (hung, *self.nodes)
        self.engine.timeouts, self.engine.ping_timeout = NodeTimeouts(hang_check=0.5), 0.5
        served = self.url_placed_first_on(hung, nodes, "first")
        req = self.request(served.url, nodes=nodes, back_source=False)
        started = reactor.seconds()
        result = await self.download(req)
        self.assertDownloaded(result, req, served)
        self.assertLess(reactor.seconds() - started, 5.0)  # hang_check + ping_timeout, not register_timeout (60 s)
        self.assertEqual(self.registered()["node"], f"127.0.0.1:{self.nodes[0][1]}")

    async def test_later_downloads_do_not_wait_on_the_hung_node(self) -> None:
        """Once found hung, the node is tried last by the daemon's next downloads: none connects to it again."""
        await self.start_supernode()
        hung = await self.hung_node()
        nodes = (hung, *self.nodes)
        self.engine.timeouts, self.engine.ping_timeout = NodeTimeouts(hang_check=0.5), 0.5
        first = self.url_placed_first_on(hung, nodes, "a")
        self.assertTrue((await self.download(self.request(first.url, nodes=nodes, back_source=False))).success)
        seen = self.hung_connections
        self.assertGreaterEqual(seen, 1)
        for n in range(5):
            served = self.url_placed_first_on(hung, nodes, f"b{n}")
            req = self.request(served.url, nodes=nodes, back_source=False)
            result = await self.download(req)
            self.assertDownloaded(result, req, served)
        self.assertEqual(self.hung_connections, seen)

    async def test_slow_source_behind_a_live_supernode_is_not_taken_for_a_hang(self) -> None:
        """The supernode answers /_ping while it waits 1.5 s for a slow source: the registration keeps waiting."""
        await self.start_supernode()
        self.engine.timeouts, self.engine.ping_timeout = NodeTimeouts(hang_check=0.2), 0.5
        body = os.urandom(3000)
        factory = ClosingFactory(server.Site(SlowHeaders(body, 1.5)))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        req = self.request(f"http://127.0.0.1:{port.getHost().port}/slow.bin", back_source=False)
        result = await self.download(req)
        self.assertEqual((result.success, result.reason), (True, codes.REASON_NONE), result.line())
        with open(req.output, "rb") as f:
            self.assertEqual(f.read(), body)


class SlowHeaders(Resource):
    """An origin that takes ``delay`` seconds before it answers (its headers included)."""

    isLeaf = True

    def __init__(self, body: bytes, delay: float) -> None:
        super().__init__()
        self.body, self.delay = body, delay

    def render_GET(self, request: Any) -> Any:
        def answer() -> None:
            if request.channel is not None:
                request.setHeader(b"content-length", b"%d" % len(self.body))
                request.write(self.body)
                request.finish()

        call = reactor.callLater(self.delay, answer)
        request.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)
        return server.NOT_DONE_YET
