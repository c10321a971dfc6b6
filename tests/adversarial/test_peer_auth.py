"""Item 3 of the trust-boundary issue: peers prove who they are.

A real supernode on 127.0.0.1 and a hostile client of its API.  Before the
fix the client could ``service/down`` any cid it learned from a pull answer,
pull and report in a victim's name, advertise any internal ``host:port`` as
a holder for honest peers to dial, and register without limit.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from dfly import codes
from dfly.config import SupernodeFileConfig
from dfly.supernode.tap import build_service
from tests.test_integration import IntegrationTestCase


class PeerAuthTests(IntegrationTestCase):
    async def supernode(self, **config: Any) -> str:
        parts = build_service(SupernodeFileConfig(port=0, download_port=0, listen="127.0.0.1",
                                                  home=self.supernode_home, advertise_ip="127.0.0.1", **config), reactor)
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        api = await parts.api.listening
        await parts.cdn.listening
        self.tasks = parts.tasks
        self.file = self.serve("f.bin", os.urandom(5000))
        return f"http://127.0.0.1:{api.getHost().port}"

    async def call(self, api: str, method: str, path: str, secret: str | bytes | None = None, body: Any = None,
                   bind: str | None = None, **params: str) -> tuple[int, dict[str, Any]]:
        """One request, from 127.0.0.1 or (``bind``) another loopback address."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool, bindAddress=(bind, 0) if bind else None)
        query = "&".join(f"{k}={v}" for k, v in params.items())
        headers = Headers({codes.PEER_SECRET_HEADER: [secret]} if secret else {})
        producer = FileBodyProducer(io.BytesIO(json.dumps(body).encode())) if body is not None else None
        if producer is not None:
            headers.setRawHeaders("content-type", ["application/json"])
        response = await agent.request(method.encode(), f"{api}{path}?{query}".encode(), headers, producer)
        return response.code, json.loads(await readBody(response))

    async def register(self, api: str, cid: str, ip: str = "127.0.0.1", bind: str | None = None) -> tuple[int, Any]:
        body = {"url": self.file.url, "cid": cid, "ip": ip, "port": 15001, "hostName": cid}
        return await self.call(api, "POST", "/peer/registry", body=body, bind=bind)

    async def test_service_down_needs_the_cid_s_secret(self) -> None:
        api = await self.supernode()
        status, victim = await self.register(api, "victim")
        self.assertEqual(status, 200, victim)
        tid, secret = victim["data"]["taskId"], victim["data"]["peerSecret"]
        for forged in (None, "", "x" * 32, secret[:-1] + ("A" if secret[-1] != "A" else "B")):
            status, answer = await self.call(api, "GET", "/peer/service/down", forged, taskId=tid, cid="victim")
            self.assertEqual((status, answer["code"]), (401, codes.PEER_UNAUTHORIZED), answer)
        self.assertIn("victim", self.tasks.task(tid).peers)
        status, answer = await self.call(api, "GET", "/peer/service/down", secret, taskId=tid, cid="victim")
        self.assertEqual((status, answer["code"]), (200, codes.PEER_DOWN))
        self.assertNotIn("victim", self.tasks.task(tid).peers)

    async def test_pulls_and_reports_need_the_cid_s_secret(self) -> None:
        api = await self.supernode()
        _, victim = await self.register(api, "victim")
        tid = victim["data"]["taskId"]
        await self.register(api, "attacker")  # its own secret unlocks nothing of the victim's
        mine = self.tasks.task(tid).peers["attacker"].secret
        for path, params in (("/peer/task", {"srcCid": "victim"}),
                             ("/peer/piece/suc", {"cid": "victim", "pieceRange": "0-4999"}),
                             ("/peer/piece/error", {"cid": "victim", "range": "0-4999", "kind": "unreachable"})):
            status, answer = await self.call(api, "GET", path, mine, taskId=tid, **params)
            self.assertEqual((status, answer["code"]), (401, codes.PEER_UNAUTHORIZED), (path, answer))

    async def test_a_secret_that_is_not_utf8_is_401(self) -> None:
        """A peer-secret header of any bytes is a wrong secret (401), not a 500 with a traceback."""
        api = await self.supernode()
        _, victim = await self.register(api, "victim")
        tid = victim["data"]["taskId"]
        for path, params in (("/peer/service/down", {"cid": "victim"}), ("/peer/task", {"srcCid": "victim"})):
            status, answer = await self.call(api, "GET", path, b"X\x8d\xc3", taskId=tid, **params)
            self.assertEqual((status, answer["code"]), (401, codes.PEER_UNAUTHORIZED), (path, answer))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_an_advertised_address_must_be_the_client_s(self) -> None:
        """Else every honest peer would dial the "holder" at any internal host:port."""
        api = await self.supernode()
        status, answer = await self.register(api, "liar", ip="10.0.0.5")
        self.assertEqual(status, 403, answer)
        self.assertIn("not this client's", answer["msg"])
        status, _ = await self.register(api, "lab", ip="127.0.0.9")  # one host's loopback: allowed
        self.assertEqual(status, 200)

    async def test_trusted_and_peer_networks(self) -> None:
        api = await self.supernode(trusted_peer_networks=self.networks("127.0.0.0/8"),
                                   peer_networks=self.networks("10.1.0.0/16", "127.0.0.0/8"))
        self.assertEqual((await self.register(api, "nat", ip="10.1.2.3"))[0], 200)
        status, answer = await self.register(api, "outside", ip="10.2.0.1")
        self.assertEqual(status, 403, answer)
        self.assertIn("outside peerNetworks", answer["msg"])

    def networks(self, *cidrs: str) -> Any:
        return tuple(ipaddress.ip_network(c) for c in cidrs)

    async def test_registrations_are_limited_per_client_and_refusals_logged_once(self) -> None:
        lines: list[str] = []

        def watch(event: dict[str, Any]) -> None:
            if "registrationRate" in str(event.get("why", "")):
                lines.append(str(event.get("client")))

        globalLogPublisher.addObserver(watch)
        self.addCleanup(globalLogPublisher.removeObserver, watch)
        api = await self.supernode(registration_rate=1.0)  # bursts of 10
        codes_seen = [(await self.register(api, f"c{n}"))[0] for n in range(25)]
        self.assertEqual(codes_seen, [200] * 10 + [429] * 15)
        self.assertEqual(lines, ["127.0.0.1"])
        status, answer = await self.register(api, "other", ip="127.0.0.2", bind="127.0.0.2")
        self.assertEqual(status, 200, answer)  # another client is served
