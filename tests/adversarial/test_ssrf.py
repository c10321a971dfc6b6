"""Item 1 of the trust-boundary issue: the supernode is not an open fetcher (SSRF).

The attacker reaches the register API and names a URL; the supernode must
not fetch from its own loopback, link-local or metadata addresses, nor from
anything ``sources:`` refuses, whether the URL names the address, a name
resolves to it, or a redirect leads there.  No test sends a packet beyond
127.0.0.0/8: an "internal service" is a loopback listener that counts
requests, and metadata and link-local addresses are checked on a
`MemoryReactor`, where a refused address is never dialled at all.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import resource, server
from twisted.web.iweb import IRequest

from dfly import codes
from dfly.config import SupernodeFileConfig
from dfly.connectguard import ConnectRefused, GuardedEndpoint
from dfly.httpclient import make_http_client
from dfly.supernode.sources import SourcePolicy, parse_sources
from dfly.supernode.tap import Options, build_service
from tests.loopback import ClosingFactory
from tests.test_integration import IntegrationTestCase
from tests.test_nodenames import Resolver

SECRET = b"internal admin API: root token 1234"


class Internal(resource.Resource):
    """Stands in for what must stay unreachable: counts every request, answers a secret."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[bytes] = []

    def render_GET(self, request: IRequest) -> bytes:
        self.requests.append(request.uri)
        request.setHeader(b"content-length", b"%d" % len(SECRET))
        return SECRET


class Redirect(resource.Resource):
    """An allowed origin whose every path redirects to ``target``."""

    isLeaf = True

    def __init__(self, target: bytes) -> None:
        super().__init__()
        self.target = target

    def render_GET(self, request: IRequest) -> bytes:
        request.redirect(self.target)
        return b""


class SsrfTests(IntegrationTestCase):
    """A supernode whose API listens on all interfaces, as a real one does."""

    def listen(self, site: resource.Resource, ip: str = "127.0.0.1") -> int:
        factory = ClosingFactory(server.Site(site))
        port = reactor.listenTCP(0, factory, interface=ip)
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def supernode(self, **sources: Any) -> str:
        config = SupernodeFileConfig(port=0, download_port=0, listen="0.0.0.0", home=self.supernode_home,
                                     advertise_ip="127.0.0.1", sources=sources)
        parts = build_service(config, reactor)
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        api = await parts.api.listening
        await parts.cdn.listening
        return f"http://127.0.0.1:{api.getHost().port}"

    async def register(self, api: str, url: str, **fields: Any) -> tuple[int, dict[str, Any]]:
        body = {"url": url, "headers": ["Metadata-Flavor: Google"], "cid": "attacker-1", "ip": "127.0.0.1",
                "port": 0, "hostName": "attacker", "version": "0", **fields}
        http, pool = make_http_client(reactor)
        self.addCleanup(pool.closeCachedConnections)
        response = await http.post(f"{api}/peer/registry", json=body, timeout=10, reactor=reactor)
        return response.code, json.loads(await response.content())

    def assertRefused(self, answer: tuple[int, dict[str, Any]], *words: str) -> None:
        status, body = answer
        self.assertEqual((status, body.get("code")), (403, codes.SOURCE_REFUSED), body)
        for word in words:
            self.assertIn(word, body["msg"])

    async def test_loopback_service_is_refused_when_the_api_listens_beyond_loopback(self) -> None:
        internal = Internal()
        port = self.listen(internal)
        api = await self.supernode()
        self.assertRefused(await self.register(api, f"http://127.0.0.1:{port}/admin"), "loopback")
        self.assertRefused(await self.register(api, f"http://localhost:{port}/admin"), "loopback")
        self.assertEqual(internal.requests, [])

    async def test_a_redirect_to_a_refused_address_is_refused(self) -> None:
        internal = Internal()
        target = self.listen(internal)
        allowed = self.listen(Redirect(f"http://127.0.0.1:{target}/admin".encode()), ip="127.0.0.2")
        api = await self.supernode(allow=["127.0.0.2"])
        self.assertRefused(await self.register(api, f"http://127.0.0.2:{allowed}/file"), "127.0.0.1")
        self.assertEqual(internal.requests, [])

    async def test_deny_refuses_a_named_internal_host(self) -> None:
        """``deny`` stands for an internal network; the "internal service" is on 127.0.0.3."""
        internal = Internal()
        port = self.listen(internal, ip="127.0.0.3")
        api = await self.supernode(allow=["127.0.0.0/8"], deny=["127.0.0.3"])
        self.assertRefused(await self.register(api, f"http://127.0.0.3:{port}/admin"), "sources.deny")
        self.assertEqual(internal.requests, [])

    async def test_allow_list_refuses_what_it_does_not_name(self) -> None:
        internal = Internal()
        port = self.listen(internal, ip="127.0.0.3")
        api = await self.supernode(allow=["127.0.0.2", "registry.example.test"])
        self.assertRefused(await self.register(api, f"http://127.0.0.3:{port}/x"), "sources.allow")
        self.assertEqual(internal.requests, [])

    async def test_the_access_probe_is_checked_too(self) -> None:
        """A cached blob's digest with an internal URL: the probe (Range 0-0) must not reach it."""
        data = os.urandom(4000)
        digest = hashlib.sha256(data).hexdigest()
        origin = self.listen(_Static(data), ip="127.0.0.2")
        internal = Internal()
        port = self.listen(internal)
        api = await self.supernode(allow=["127.0.0.2"])
        path = f"/v2/public/blobs/sha256:{digest}"
        status, body = await self.register(api, f"http://127.0.0.2:{origin}{path}", digest=f"sha256:{digest}")
        self.assertEqual(status, 200, body)
        answer = await self.register(api, f"http://127.0.0.1:{port}/v2/private/blobs/sha256:{digest}",
                                     digest=f"sha256:{digest}")
        self.assertRefused(answer, "loopback")
        self.assertEqual(internal.requests, [])

    async def test_an_allowed_source_still_works(self) -> None:
        data = os.urandom(3000)
        port = self.listen(_Static(data), ip="127.0.0.2")
        api = await self.supernode(allow=["127.0.0.2"])
        status, body = await self.register(api, f"http://127.0.0.2:{port}/file")
        self.assertEqual((status, body["data"]["fileLength"]), (200, len(data)), body)

    async def test_a_supernode_on_loopback_fetches_from_loopback(self) -> None:
        """Local demos and tests: a supernode listening on 127.0.0.1 has only local clients."""
        served = self.serve("demo.bin", os.urandom(2000))
        await self.start_supernode()
        result = await self.download(self.request(served.url, back_source=False))
        self.assertTrue(result.success, result.line())


class _Static(resource.Resource):
    isLeaf = True

    def __init__(self, data: bytes) -> None:
        super().__init__()
        self.data = data

    def render_GET(self, request: IRequest) -> bytes:
        request.setHeader(b"etag", b'"v1"')
        return self.data


class GuardedEndpointTests(SynchronousTestCase):
    """The check sits on the connection: what is checked is what is dialled (MemoryReactor: nothing leaves)."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.dns = Resolver()
        self.reactor.nameResolver = self.dns
        self.policy = SourcePolicy(refuse_loopback=True)

    def connect(self, host: str, port: int = 80) -> Deferred[Any]:
        endpoint = GuardedEndpoint(self.reactor, host, port, self.policy.refusal, timeout=3.0)
        return endpoint.connect(Factory.forProtocol(Protocol))

    def assertNotDialled(self, d: Deferred[Any], *words: str) -> None:
        failure = self.failureResultOf(d, ConnectRefused)
        for word in words:
            self.assertIn(word, failure.getErrorMessage())
        self.assertEqual(self.reactor.tcpClients, [])

    def test_the_metadata_address_is_never_dialled(self) -> None:
        self.assertNotDialled(self.connect("169.254.169.254"), "metadata")

    def test_a_name_for_the_metadata_address_is_never_dialled(self) -> None:
        self.dns.answers["metadata.google.internal"] = [IPv4Address("TCP", "169.254.169.254", 0)]
        self.assertNotDialled(self.connect("metadata.google.internal"), "metadata")

    def test_link_local_is_never_dialled(self) -> None:
        self.assertNotDialled(self.connect("169.254.10.1"), "link-local")
        self.assertNotDialled(self.connect("fe80::1"), "link-local")
        self.assertNotDialled(self.connect("::ffff:169.254.169.254"), "metadata")
        self.assertNotDialled(self.connect("::ffff:127.0.0.1"), "loopback")
        self.assertNotDialled(self.connect("0.0.0.0"), "loopback")

    def test_dns_rebinding_is_checked_at_each_connect(self) -> None:
        """The name answers an allowed address, then the metadata address: the second connect is refused."""
        self.dns.answers["rebind.test"] = [IPv4Address("TCP", "192.0.2.7", 0)]
        self.connect("rebind.test")
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["192.0.2.7"])
        self.dns.answers["rebind.test"] = [IPv4Address("TCP", "169.254.169.254", 0)]
        self.failureResultOf(self.connect("rebind.test"), ConnectRefused)
        self.assertEqual(len(self.reactor.tcpClients), 1)

    def test_only_the_allowed_addresses_of_a_name_are_dialled(self) -> None:
        self.dns.answers["mixed.test"] = [IPv4Address("TCP", "127.0.0.1", 0), IPv6Address("TCP", "2001:db8::5", 0)]
        self.connect("mixed.test")
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["2001:db8::5"])

    def test_an_allowed_network_lets_link_local_through(self) -> None:
        self.policy = SourcePolicy(parse_sources({"allow": ["169.254.7.0/24"]}, "0.0.0.0").allow)
        self.connect("169.254.7.9")
        self.assertEqual([c[0] for c in self.reactor.tcpClients], ["169.254.7.9"])

    def test_an_allowed_name_does_not_unlock_the_metadata_address(self) -> None:
        self.policy = parse_sources({"allow": ["files.example.test"]}, "0.0.0.0")
        self.dns.answers["files.example.test"] = [IPv4Address("TCP", "169.254.169.254", 0)]
        self.assertNotDialled(self.connect("files.example.test"), "metadata")


class SourcesConfigTests(SynchronousTestCase):
    def test_bad_entries_are_one_line_errors(self) -> None:
        for sources, words in (({"allow": "10.0.0.0/8"}, "must be a list"), ({"deny": ["bad host!"]}, "not a host"),
                               ({"permit": []}, "unknown key 'permit'")):
            with self.assertRaises(ValueError) as caught:
                parse_sources(sources, "0.0.0.0")
            self.assertIn(words, str(caught.exception))

    def test_supernode_yml_sources_key(self) -> None:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("sources:\n  allow: [registry.example.test, '*.cdn.example.test', 10.0.0.0/8]\n  deny: [x]\n")
        opts = Options()
        opts.parseOptions(["--config", path, "--home", self.mktemp()])
        policy = parse_sources(opts["config_obj"].sources, opts["config_obj"].listen)
        self.assertIsNone(policy.refusal("a.cdn.example.test", "192.0.2.1"))
        self.assertIsNotNone(policy.refusal("cdn.example.test", "192.0.2.1"))
        self.assertIsNone(policy.refusal("other.test", "10.1.2.3"))
        self.assertIsNotNone(policy.refusal("x", "10.1.2.3"))
        with open(path, "w") as f:
            f.write("sources:\n  allow: [a..b]\n")
        with self.assertRaises(usage.UsageError):
            Options().parseOptions(["--config", path, "--home", self.mktemp()])
