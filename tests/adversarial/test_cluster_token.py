"""Item 4 of the trust-boundary issue: a cluster token on every port peers reach.

A real supernode (API and CDN port) and a real peer daemon (its uploader) on
127.0.0.1, all with ``clusterToken`` set, and clients that send no token, a
wrong one or a malformed one.  Before the fix every port served anyone who
could connect: any stranger on the network could register URLs, pull, read
the metrics, and read a task's bytes from the CDN once it had the key.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest
from twisted.logger import LogLevel, globalLogPublisher
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from dfly import codes
from dfly.clustertoken import ClusterGate
from dfly.config import SupernodeFileConfig
from dfly.peer.options import PeerConfig
from dfly.peer.tap import build_service as build_peer
from dfly.supernode.tap import build_service
from tests.test_integration import IntegrationTestCase

TOKEN = "s3cret-cluster-token"
#: The header, spelled out: these tests must not depend on the constant they check.
HEADER = b"X-Dfly-Cluster-Token"
#: Tokens that are not the cluster's: absent, empty, wrong, one byte off, malformed.
BAD_TOKENS: tuple[list[bytes] | None, ...] = (
    None,
    [b""],
    [b"wrong"],
    [TOKEN[:-1].encode()],
    [TOKEN.encode() + b"x"],
    [b"\xff\xfe" + TOKEN.encode()],  # not ASCII
    [b"tok\x01en"],  # a control character (a NUL is refused by Twisted's parser: a bare 400)
    [b"tok en"],  # a space
    [b"x" * 5000],  # far too long
    [TOKEN.encode(), TOKEN.encode()],  # two headers: ambiguous, refused
)


class ClusterTokenTests(IntegrationTestCase):
    async def start(self, token: str = TOKEN) -> None:
        parts = build_service(SupernodeFileConfig(port=0, download_port=0, listen="127.0.0.1",
                                                  home=self.supernode_home, advertise_ip="127.0.0.1",
                                                  cluster_token=token), reactor)
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        self.api = f"http://127.0.0.1:{(await parts.api.listening).getHost().port}"
        self.cdn = f"http://127.0.0.1:{(await parts.cdn.listening).getHost().port}"
        peer = build_peer(PeerConfig(home=os.path.join(self.work, "peer-daemon"), port=0, listen="127.0.0.1",
                                     ip="127.0.0.1", alivetime=0, cluster_token=token), reactor, on_idle=lambda: None)
        peer.service.startService()
        self.addCleanup(lambda: peer.service.stopService() if peer.service.running else None)
        self.uploader = f"http://127.0.0.1:{(await peer.listener.listening).getHost().port}"
        self.refusal_lines: list[dict[str, Any]] = []

        def watch(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.warn and "cluster token" in str(event.get("what", "")):
                self.refusal_lines.append(event)

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)

    async def get(self, url: str, token: list[bytes] | None, bind: str | None = None,
                  method: bytes = b"GET") -> tuple[int, bytes]:
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool, bindAddress=(bind, 0) if bind else None)
        headers = Headers({HEADER: token} if token is not None else {})
        response = await agent.request(method, url.encode(), headers)
        return response.code, await readBody(response)

    def assertRefused(self, status: int, body: bytes, what: str) -> None:
        self.assertEqual(status, 401, (what, body))
        answer = json.loads(body)
        self.assertEqual(answer["code"], 615, (what, answer))
        self.assertIn("cluster token", answer["msg"], what)

    async def test_api_refuses_requests_without_the_token(self) -> None:
        """Registration, pull, metrics and version: 401 JSON (code 615) for every bad token."""
        await self.start()
        for path in ("/version", "/metrics", "/peer/task?taskId=x&srcCid=y"):
            for token in BAD_TOKENS:
                status, body = await self.get(self.api + path, token)
                self.assertRefused(status, body, f"{path} with {token!r}")
        status, body = await self.get(self.api + "/peer/registry", [b"wrong"], method=b"POST")
        self.assertRefused(status, body, "a registration")

    async def test_api_serves_the_right_token(self) -> None:
        await self.start()
        status, body = await self.get(self.api + "/version", [TOKEN.encode()])
        self.assertEqual((status, json.loads(body)["code"]), (200, codes.SUCCESS))

    async def test_ping_stays_open(self) -> None:
        """``/_ping`` is for load balancers' liveness checks: no token needed."""
        await self.start()
        self.assertEqual(await self.get(self.api + "/_ping", None), (200, b"OK"))

    async def test_cdn_refuses_requests_without_the_token(self) -> None:
        await self.start()
        for token in BAD_TOKENS:
            status, body = await self.get(self.cdn + "/download/aaa/" + "a" * 64, token)
            self.assertRefused(status, body, f"the CDN with {token!r}")
        status, _ = await self.get(self.cdn + "/download/aaa/" + "a" * 64, [TOKEN.encode()])
        self.assertNotEqual(status, 401)  # past the gate: the CDN's own answer (no such file)

    async def test_uploader_refuses_requests_without_the_token(self) -> None:
        await self.start()
        for token in BAD_TOKENS:
            status, body = await self.get(self.uploader + "/peer/file/" + "a" * 64, token)
            self.assertRefused(status, body, f"the uploader with {token!r}")
        status, _ = await self.get(self.uploader + "/peer/file/" + "a" * 64, [TOKEN.encode()])
        self.assertNotEqual(status, 401)  # past the gate: the uploader's own answer (not held)

    async def test_local_api_needs_no_cluster_token(self) -> None:
        """The daemon's local API (dfget on this host) keeps its own token; the cluster's is for peers."""
        await self.start()
        status, body = await self.get(self.uploader + "/_ping", None)
        self.assertEqual((status, json.loads(body)["code"]), (200, codes.SUCCESS))

    async def test_refusals_are_logged_once_a_minute_per_client(self) -> None:
        """A flood of bad tokens is one line per client and port, and honest clients are still served."""
        await self.start()
        for _ in range(30):
            self.assertEqual((await self.get(self.api + "/version", [b"forged-value"]))[0], 401)
        for _ in range(5):
            self.assertEqual((await self.get(self.api + "/version", None, bind="127.0.0.2"))[0], 401)
        api_lines = [(e["client"], e["what"]) for e in self.refusal_lines]
        self.assertEqual(len(api_lines), 2, api_lines)
        self.assertEqual(sorted(client for client, _ in api_lines), ["127.0.0.1", "127.0.0.2"])
        for line in self.refusal_lines:
            self.assertNotIn(b"forged-value", json.dumps(line, default=repr).encode())  # never the token given
        status, body = await self.get(self.api + "/version", [TOKEN.encode()])
        self.assertEqual(status, 200, body)
        status, _ = await self.get(self.uploader + "/peer/file/" + "a" * 64, [TOKEN.encode()])
        self.assertNotEqual(status, 401)


def piece_request() -> DummyRequest:
    request = DummyRequest([b"download"])
    request.path = b"/download/abc"
    return request


class GateLogTests(SynchronousTestCase):
    """The gate's refusal log on a fake clock: one line per client a minute, a new one after it."""

    def test_a_minute_later_the_flood_is_logged_again(self) -> None:
        clock = Clock()
        lines: list[dict[str, Any]] = []
        gate = ClusterGate(TOKEN, clock, "CDN")
        gate.refusals.log.observer = lines.append  # type: ignore[method-assign]
        for _ in range(100):
            self.assertIsNotNone(gate.refusal(piece_request()))
            clock.advance(0.5)  # 100 requests over 50 s
        self.assertEqual(len(lines), 1)
        clock.advance(10)
        self.assertIsNotNone(gate.refusal(piece_request()))
        self.assertEqual(len(lines), 2)

    def test_the_right_token_passes_and_is_not_logged(self) -> None:
        gate = ClusterGate(TOKEN, Clock(), "CDN")
        request = piece_request()
        request.requestHeaders.setRawHeaders(HEADER, [TOKEN.encode()])
        self.assertIsNone(gate.refusal(request))

    def test_the_token_header_is_redacted_in_logs(self) -> None:
        """A logged ``X-Dfly-Cluster-Token: <value>`` shows ``***`` (dfly.logs.redact, every log file)."""
        from dfly.logs import redact

        self.assertEqual(redact(f"X-Dfly-Cluster-Token: {TOKEN}"), "X-Dfly-Cluster-Token: ***")
