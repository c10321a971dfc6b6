"""dfdaemon end to end: a fake registry, a real supernode and real dfdaemons on 127.0.0.1.

Every test but the config ones runs on the real reactor with real sockets
(port 0, loopback only).  The registry is a small resource that serves
``/v2/``, manifests, blobs by digest and uploads, records every request it
answers (headers and body) and can misbehave on demand: ask for Basic auth,
serve the wrong bytes for a digest, redirect blob GETs to another server,
or hold a blob's body after some bytes until the test releases it.

The dfdaemons are built by ``dfly.dfdaemon.tap.build_service`` exactly as
twistd builds them; only their engine is wrapped (`RecordingEngine`) so a
test can see each P2P download's request and result, and their listeners
are wrapped in `ClosingFactory` so every connection is closed before a test
ends.  The HTTPS interception, the CA and the tunnel internals have their own
tests in ``test_dfdaemon_tls``; the real registry and skopeo are in
``tests/system``.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
from typing import Any, Callable

import attrs
import yaml  # type: ignore[import-untyped]
from cryptography import x509
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import (
    Agent, FileBodyProducer, HTTPConnectionPool, ProxyAgent, ResponseDone, ResponseFailed, readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

import dfly
from dfly import codes
from dfly.config import (
    BLOB_PATTERN, DfdaemonFileConfig, HijackRule, HostPattern, ProxyRule, SupernodeFileConfig, load_dfdaemon_config,
)
from dfly.dfdaemon.ca import CertificateAuthority, generate_ca
from dfly.dfdaemon.tap import DfdaemonParts, Options, build_service
from dfly.peer.engine import PeerEngine
from dfly.peer.request import DownloadRequest, DownloadResult
from dfly.peer.uploader import UploadStore
from dfly.pieces import MiB
from dfly.supernode.tap import SupernodeParts
from dfly.supernode.tap import build_service as build_supernode
from tests.loopback import ClosingFactory, LoopbackNames, RawClient, ResolvingReactor
from tests.test_integration import distinct_mebibytes

reactor: Any = _reactor

#: What containers/image (skopeo, podman) sends with a manifest GET, one line each, in this order.
OCI_ACCEPT = [
    b"application/vnd.oci.image.manifest.v1+json",
    b"application/vnd.docker.distribution.manifest.v2+json",
    b"application/vnd.docker.distribution.manifest.v1+prettyjws",
    b"application/vnd.docker.distribution.manifest.v1+json",
    b"application/vnd.docker.distribution.manifest.list.v2+json",
    b"application/vnd.oci.image.index.v1+json",
]
MANIFEST_TYPE = b"application/vnd.oci.image.manifest.v1+json"
CHALLENGE = b'Basic realm="r"'
UNAUTHORIZED = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}\n'
CREDENTIALS = b"Basic " + base64.b64encode(b"user:secret")
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"
GET_MANIFEST = b"GET /v2/library/app/manifests/v1 HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n"

_BLOB_PATH = re.compile(rb"\A(?:/v2/.+/blobs/sha256:|/objects/)([0-9a-f]{64})\Z")
_RANGE = re.compile(rb"\Abytes=(\d+)-(\d+)\Z")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the registry -------------------------------------------------------------------


@attrs.frozen
class Hit:
    """One request the registry answered."""

    method: bytes
    uri: bytes
    code: int
    headers: Headers
    body: bytes

    def values(self, name: bytes) -> list[bytes]:
        return list(self.headers.getRawHeaders(name, []))

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.getRawHeaders(name)
        return values[0] if values else None

    @property
    def names(self) -> set[bytes]:
        return {name.lower() for name, _ in self.headers.getAllRawHeaders()}


class Registry(resource.Resource):
    """A distribution-API registry, just enough of it, that records what it is asked.

    Every answer carries ``X-Served-By: <name>``, so a test can tell a
    forwarded response (which keeps it) from one dfdaemon built from P2P
    pieces (which cannot have it).
    """

    isLeaf = True

    def __init__(self, name: bytes = b"registry") -> None:
        super().__init__()
        self.name = name
        self.hits: list[Hit] = []
        self.blobs: dict[str, bytes] = {}  # sha256 hex -> the bytes served for it
        self.manifests: dict[bytes, bytes] = {}  # path -> body
        self.files: dict[bytes, bytes] = {}  # any other path -> body (an origin for proxy mode)
        self.credentials: bytes | None = None  # when set, every request needs this Authorization
        self.redirect: str | None = None  # when set, blob GETs answer 307 to <redirect>/objects/<hex>
        self.response_headers: dict[bytes, list[bytes]] = {}  # added to every answer
        self.chunked: set[str] = set()  # blobs whose GET has no Content-Length (sent chunked)
        self._holds: dict[str, tuple[int, Deferred[None]]] = {}

    def add_blob(self, data: bytes, served: bytes | None = None) -> str:
        """Serve ``data`` (or ``served`` instead of it) under its digest; returns the hex."""
        digest = sha256(data)
        self.blobs[digest] = data if served is None else served
        return digest

    def hold(self, digest: str, at: int) -> Deferred[None]:
        """The next GET of this blob stops after ``at`` bytes until the returned Deferred fires."""
        release: Deferred[None] = Deferred()
        self._holds[digest] = (at, release)
        return release

    def release_all(self) -> None:
        holds, self._holds = list(self._holds.values()), {}
        for _, release in holds:
            if not release.called:
                release.callback(None)

    def blob_hits(self, digest: str) -> list[Hit]:
        matches = ((hit, _BLOB_PATH.match(hit.uri.split(b"?", 1)[0])) for hit in self.hits)
        return [hit for hit, m in matches if m is not None and m.group(1).decode() == digest]

    def full_gets(self, digest: str) -> int:
        """How many times the whole blob was sent."""
        return sum(1 for hit in self.blob_hits(digest) if hit.method == b"GET" and hit.code == 200)

    def render(self, request: server.Request) -> Any:
        body = request.content.read() if request.content is not None else b""
        answer = self._route(request, body)
        self.hits.append(Hit(request.method, request.uri, request.code, request.requestHeaders.copy(), body))
        return answer

    def _route(self, request: server.Request, body: bytes) -> Any:
        request.setHeader(b"x-served-by", self.name)
        for name, values in self.response_headers.items():
            request.responseHeaders.setRawHeaders(name, values)
        if self.credentials is not None and request.getHeader(b"authorization") != self.credentials:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", CHALLENGE)
            request.setHeader(b"content-type", b"application/json")
            return UNAUTHORIZED
        path = request.uri.split(b"?", 1)[0]
        reading = request.method in (b"GET", b"HEAD")
        if path == b"/v2/" and reading:
            request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
            request.setHeader(b"content-type", b"application/json")
            return b"{}"
        blob = _BLOB_PATH.match(path)
        if blob is not None and reading:
            return self._blob(request, blob.group(1).decode())
        if path in self.manifests and reading:
            manifest = self.manifests[path]
            request.setHeader(b"content-type", MANIFEST_TYPE)
            request.setHeader(b"docker-content-digest", f"sha256:{sha256(manifest)}".encode())
            request.responseHeaders.setRawHeaders(b"x-multi", [b"first", b"second"])
            return manifest
        if path in self.files and reading:
            request.setHeader(b"content-type", b"application/octet-stream")
            return self.files[path]
        if request.method in (b"POST", b"PUT", b"PATCH"):
            request.setResponseCode(201 if request.method == b"PUT" else 202)
            request.setHeader(b"location", b"/v2/uploads/next")
            request.setHeader(b"x-received-sha256", sha256(body).encode())
            return b""
        return self._unknown(request, b"NAME_UNKNOWN")

    def _unknown(self, request: server.Request, code: bytes) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"errors":[{"code":"%s"}]}\n' % code

    def _blob(self, request: server.Request, digest: str) -> Any:
        data = self.blobs.get(digest)
        if data is None:
            return self._unknown(request, b"BLOB_UNKNOWN")
        if self.redirect is not None and request.method == b"GET":
            request.setResponseCode(307)
            request.setHeader(b"location", f"{self.redirect}/objects/{digest}".encode())
            return b""
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"docker-content-digest", f"sha256:{digest}".encode())
        request.setHeader(b"accept-ranges", b"bytes")
        wanted = _RANGE.match(request.getHeader(b"range") or b"")
        if wanted is not None and request.method == b"GET":
            start, end = int(wanted.group(1)), min(int(wanted.group(2)), len(data) - 1)
            if start >= len(data):
                request.setResponseCode(416)
                request.setHeader(b"content-range", b"bytes */%d" % len(data))
                return b""
            request.setResponseCode(206)
            request.setHeader(b"content-range", b"bytes %d-%d/%d" % (start, end, len(data)))
            return data[start:end + 1]
        if digest in self.chunked and request.method == b"GET":
            request.write(data)  # without Content-Length, HTTP/1.1 sends the body chunked
            request.finish()
            return server.NOT_DONE_YET
        hold = self._holds.pop(digest, None) if request.method == b"GET" else None
        if hold is None:
            return data
        request.setHeader(b"content-length", b"%d" % len(data))
        Deferred.fromCoroutine(self._send_held(request, data, *hold))
        return server.NOT_DONE_YET

    async def _send_held(self, request: server.Request, data: bytes, at: int, release: Deferred[None]) -> None:
        request.write(data[:at])
        await release
        if request.channel is None:
            return  # the client went away meanwhile
        request.write(data[at:])
        request.finish()


# --- clients -------------------------------------------------------------------------


class Collector(Protocol):
    """A response body: every byte, a wait for the first ``n``, and how it ended."""

    transport: Any

    def __init__(self) -> None:
        self.data = bytearray()
        self.reason: Failure | None = None
        self.done: Deferred[None] = Deferred()  # fires (never fails) when the body ended; see ``reason``
        self._wanted: tuple[int, Deferred[None]] | None = None

    def until(self, n: int) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._wanted = (n, d)
        self._check()
        return d

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        self._check()

    def _check(self) -> None:
        if self._wanted is not None and len(self.data) >= self._wanted[0]:
            d, self._wanted = self._wanted[1], None
            d.callback(None)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        if self._wanted is not None:
            d, self._wanted = self._wanted[1], None
            d.errback(AssertionError(f"body ended after {len(self.data)} bytes: {reason.value!r}"))
        self.done.callback(None)


def split_response(raw: bytes) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
    """Status line, header lines as (lower-case name, value), body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = [(name.strip().lower(), value.strip()) for name, _, value in (line.partition(b":") for line in lines)]
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    """The payload of a chunked HTTP/1.1 body."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2:]


@implementer(IBodyProducer)
class ChunkedBody:
    """A request body of unknown length, so the Agent sends it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, data: bytes) -> None:
        self.data = data

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Echo(Protocol):
    transport: Any

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


# --- the dfdaemon under test -----------------------------------------------------------


class RecordingEngine:
    """Stands in for a dfdaemon's `PeerEngine`: passes each download on, keeps its request and result.

    ``ended[i]`` fires on the reactor turn after download ``i`` ended, by
    which time `serve_p2p` has dealt with its outcome (finally clauses run).
    """

    def __init__(self, engine: PeerEngine) -> None:
        self.engine = engine
        self.reactor = engine.reactor
        self.requests: list[DownloadRequest] = []
        self.results: list[DownloadResult] = []
        self.ended: list[Deferred[None]] = []

    def download(self, req: DownloadRequest, emit: Callable[[dict[str, Any]], None]) -> Deferred[DownloadResult]:
        self.requests.append(req)
        ended: Deferred[None] = Deferred()
        self.ended.append(ended)

        def record(result: Any) -> Any:
            if isinstance(result, DownloadResult):
                self.results.append(result)
            self.reactor.callLater(0, ended.callback, None)
            return result

        return self.engine.download(req, emit).addBoth(record)


@attrs.frozen
class Daemon:
    parts: DfdaemonParts
    engine: RecordingEngine
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data(self) -> str:
        return self.parts.engine.home.data

    @property
    def uploads(self) -> UploadStore:
        assert self.parts.engine.uploads is not None
        return self.parts.engine.uploads

    @property
    def localrepo(self) -> str:
        return self.parts.dfdaemon.localrepo


class DfdaemonTestCase(TestCase):
    """A registry per test; supernodes, dfdaemons and extra servers on demand."""

    timeout = 10

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.registry = Registry()
        self.registry_url = f"http://127.0.0.1:{self.listen(server.Site(self.registry))}"
        self.addCleanup(self.registry.release_all)  # before its connections are closed
        self.nodes: tuple[tuple[str, int], ...] = ()
        self.supernode_home = os.path.join(self.work, "supernode")
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.pool = pool
        self.agent = Agent(reactor, pool=pool)

    def listen(self, factory: Any) -> int:
        """Serve ``factory`` on a loopback port; close it and its connections at the end."""
        closing = ClosingFactory(factory)
        port: Any = reactor.listenTCP(0, closing, interface="127.0.0.1")
        self.addCleanup(closing.close_all)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def dfdaemon_reactor(self) -> Any:
        """The reactor dfdaemons are built on (a subclass may give one that resolves names its own way)."""
        return reactor

    async def start_supernode(self) -> SupernodeParts:
        config = SupernodeFileConfig(
            port=0, download_port=0, listen="127.0.0.1", home=self.supernode_home, advertise_ip="127.0.0.1"
        )
        parts = build_supernode(config, reactor)
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        api: Any = await parts.api.listening
        await parts.cdn.listening
        self.nodes = (("127.0.0.1", api.getHost().port),)
        self.supernode = parts
        return parts

    async def start_dfdaemon(self, name: str = "a", **changes: Any) -> Daemon:
        """A dfdaemon on fresh ports with its home in the test's directory, using ``self.nodes``."""
        values: dict[str, Any] = dict(
            port=0, listen="127.0.0.1", registry=self.registry_url, nodes=self.nodes,
            home=os.path.join(self.work, name), ratelimit=0,
        )
        values.update(changes)
        parts = build_service(DfdaemonFileConfig(**values), self.dfdaemon_reactor())
        recorder = RecordingEngine(parts.engine)
        parts.dfdaemon.engine = recorder  # type: ignore[assignment]
        proxy_connections = ClosingFactory(parts.proxy.factory)
        parts.proxy.factory = proxy_connections  # type: ignore[assignment]
        peer_connections = ClosingFactory(parts.peer.factory)
        parts.peer.factory = peer_connections  # type: ignore[assignment]
        parts.service.startService()
        self.addCleanup(lambda: parts.service.stopService() if parts.service.running else None)
        self.addCleanup(peer_connections.close_all)
        self.addCleanup(proxy_connections.close_all)
        listening: Any = await parts.proxy.listening
        port = listening.getHost().port
        await parts.peer.listening
        return Daemon(parts, recorder, port)

    async def start(self, **changes: Any) -> Daemon:
        await self.start_supernode()
        return await self.start_dfdaemon(**changes)

    async def get(
        self, url: str, headers: dict[bytes, list[bytes]] | None = None, method: bytes = b"GET",
        body: Any = None, agent: Any = None,
    ) -> tuple[Any, bytes]:
        response = await (agent or self.agent).request(method, url.encode(), Headers(headers or {}), body)
        return response, await readBody(response)

    async def raw(self, port: int, data: bytes) -> RawClient:
        """A raw connection to ``port`` that has sent ``data``."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        client.transport.write(data)
        return client

    def assertP2P(self, response: Any, body: bytes, data: bytes) -> None:
        """200 with the blob's bytes, its digest and length, built by the dfdaemon (not forwarded)."""
        self.assertEqual(response.code, 200)
        self.assertEqual(len(body), len(data))
        self.assertTrue(body == data, "the body differs from the blob")
        self.assertEqual(response.headers.getRawHeaders(b"docker-content-digest"), [f"sha256:{sha256(data)}".encode()])
        self.assertEqual(response.length, len(data))  # Twisted's client keeps Content-Length out of headers
        self.assertIsNone(response.headers.getRawHeaders(b"x-served-by"), "forwarded, not P2P")

    def cached_files(self) -> list[str]:
        """Every file under the supernode's CDN cache."""
        return [name for _, _, names in os.walk(os.path.join(self.supernode_home, "repo")) for name in names]


# --- routing in mirror mode -------------------------------------------------------------


class MirrorRoutingTests(DfdaemonTestCase):
    """Everything but a blob GET passes through to --registry untouched."""

    async def test_v2_base_is_forwarded(self) -> None:
        """``GET /v2/``: the registry's status, headers and body, and the registry saw one GET."""
        daemon = await self.start()
        response, body = await self.get(daemon.url + "/v2/")
        self.assertEqual((response.code, body), (200, b"{}"))
        self.assertEqual(response.headers.getRawHeaders(b"docker-distribution-api-version"), [b"registry/2.0"])
        self.assertEqual(response.headers.getRawHeaders(b"x-served-by"), [b"registry"])
        self.assertEqual([(h.method, h.uri) for h in self.registry.hits], [(b"GET", b"/v2/")])
        self.assertEqual(daemon.engine.requests, [])

    async def test_manifest_get_passes_all_six_accept_lines_in_order(self) -> None:
        """The OCI pitfall: every Accept line reaches the registry, in order, with the query string."""
        manifest = b'{"schemaVersion":2}'
        self.registry.manifests[b"/v2/library/app/manifests/v1"] = manifest
        daemon = await self.start()
        response, body = await self.get(daemon.url + "/v2/library/app/manifests/v1?ns=docker.io",
                                        {b"Accept": OCI_ACCEPT, b"X-Custom": [b"a", b"b"]})
        self.assertEqual((response.code, body), (200, manifest))
        [hit] = self.registry.hits
        self.assertEqual(hit.uri, b"/v2/library/app/manifests/v1?ns=docker.io")
        self.assertEqual(hit.values(b"accept"), OCI_ACCEPT)
        self.assertEqual(hit.values(b"x-custom"), [b"a", b"b"])
        self.assertEqual(hit.values(b"host"), [self.registry_url[len("http://"):].encode()])

    async def test_manifest_response_headers_come_back_as_sent(self) -> None:
        """Content type, digest and a header with two values reach the client unchanged."""
        manifest = b'{"schemaVersion":2,"layers":[]}'
        self.registry.manifests[b"/v2/library/app/manifests/v1"] = manifest
        daemon = await self.start()
        response, body = await self.get(daemon.url + "/v2/library/app/manifests/v1")
        self.assertEqual(body, manifest)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [MANIFEST_TYPE])
        self.assertEqual(response.headers.getRawHeaders(b"docker-content-digest"), [f"sha256:{sha256(manifest)}".encode()])
        self.assertEqual(response.headers.getRawHeaders(b"x-multi"), [b"first", b"second"])

    async def test_registry_404_comes_back_as_it_is(self) -> None:
        """An unknown manifest: the registry's 404 and JSON body."""
        daemon = await self.start()
        response, body = await self.get(daemon.url + "/v2/library/app/manifests/missing")
        self.assertEqual((response.code, body), (404, b'{"errors":[{"code":"NAME_UNKNOWN"}]}\n'))
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])

    async def test_hop_by_hop_request_headers_stay_behind(self) -> None:
        """Connection (and what it names), Keep-Alive, Proxy-*, TE, Upgrade do not reach the registry."""
        self.registry.manifests[b"/v2/library/app/manifests/v1"] = b"{}"
        daemon = await self.start()
        client = await self.raw(daemon.port, (
            b"GET /v2/library/app/manifests/v1 HTTP/1.1\r\n"
            b"Host: mirror.test\r\n"
            b"Connection: close\r\n"  # Twisted's server reads only the first Connection line for "close"
            b"Connection: X-Hop\r\n"
            b"X-Hop: one hop only\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"Proxy-Authorization: Basic c2VjcmV0\r\n"
            b"Proxy-Connection: keep-alive\r\n"
            b"TE: trailers\r\n"
            b"Upgrade: h2c\r\n"
            b"X-End-To-End: kept\r\n"
            b"\r\n"
        ))
        await client.closed
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received)
        [hit] = self.registry.hits
        self.assertEqual(hit.names - {b"connection"}, {b"host", b"x-end-to-end"})
        self.assertEqual(hit.values(b"x-end-to-end"), [b"kept"])
        self.assertEqual(hit.values(b"host"), [self.registry_url[len("http://"):].encode()])
        self.assertNotIn(b"X-Hop", b",".join(hit.values(b"connection")))

    async def response_through(self, headers: dict[bytes, list[bytes]]) -> list[tuple[bytes, bytes]]:
        """The header lines a client gets for a manifest whose registry answer carries ``headers``."""
        self.registry.manifests[b"/v2/library/app/manifests/v1"] = b"{}"
        self.registry.response_headers = headers
        daemon = await self.start()
        client = await self.raw(daemon.port, GET_MANIFEST)
        await client.closed
        status, lines, _ = split_response(client.received)
        self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        return lines

    async def test_hop_by_hop_response_headers_stay_behind(self) -> None:
        """Proxy-Authenticate and Keep-Alive from the registry do not reach the client."""
        lines = await self.response_through({
            b"Keep-Alive": [b"timeout=9"], b"Proxy-Authenticate": [b'Basic realm="proxy"'], b"X-End": [b"kept"],
        })
        names = {name for name, _ in lines}
        self.assertIn(b"x-end", names)
        self.assertEqual(names & {b"keep-alive", b"proxy-authenticate"}, set())

    async def test_forwarded_response_keeps_its_content_length(self) -> None:
        """The registry's Content-Length reaches the client (not turned into a chunked body)."""
        manifest = b'{"schemaVersion":2}'
        self.registry.manifests[b"/v2/library/app/manifests/v1"] = manifest
        daemon = await self.start()
        client = await self.raw(daemon.port, GET_MANIFEST)
        await client.closed
        status, headers, body = split_response(client.received)
        self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        self.assertEqual([value for name, value in headers if name == b"content-length"], [b"%d" % len(manifest)])
        self.assertEqual(body, manifest)

    async def test_blob_head_keeps_its_content_length(self) -> None:
        """HEAD of a blob: the client sees the registry's Content-Length (clients read the size from it)."""
        digest = self.registry.add_blob(os.urandom(1000))
        daemon = await self.start()
        client = await self.raw(
            daemon.port,
            b"HEAD /v2/library/app/blobs/sha256:%s HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n" % digest.encode(),
        )
        await client.closed
        status, headers, body = split_response(client.received)
        self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        self.assertEqual([value for name, value in headers if name == b"content-length"], [b"1000"])
        self.assertEqual(body, b"")

    async def test_blob_head_is_forwarded_without_p2p(self) -> None:
        """HEAD of a blob: the registry's answer (length, digest), no download, no task."""
        data = os.urandom(1000)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}", method=b"HEAD")
        self.assertEqual((response.code, body), (200, b""))
        self.assertEqual(response.headers.getRawHeaders(b"docker-content-digest"), [f"sha256:{digest}".encode()])
        self.assertEqual([hit.method for hit in self.registry.hits], [b"HEAD"])
        self.assertEqual(daemon.engine.requests, [])
        self.assertEqual(self.supernode.tasks.tasks, {})

    async def test_upload_with_content_length_is_forwarded_with_its_body(self) -> None:
        """A POST with a body (Content-Length): the registry gets the body and one Content-Length, the client its 202."""
        payload = os.urandom(100_000)
        daemon = await self.start()
        response, _ = await self.get(daemon.url + "/v2/library/app/blobs/uploads/", method=b"POST",
                                     body=FileBodyProducer(io.BytesIO(payload)))
        self.assertEqual(response.code, 202)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/v2/uploads/next"])
        [hit] = self.registry.hits
        self.assertEqual((hit.method, hit.body == payload), (b"POST", True))
        self.assertEqual(hit.values(b"content-length"), [b"100000"])

    async def test_chunked_upload_is_forwarded_with_its_body(self) -> None:
        """A PATCH whose body came chunked: the registry gets all of it."""
        payload = os.urandom(70_000)
        daemon = await self.start()
        response, _ = await self.get(daemon.url + "/v2/library/app/blobs/uploads/u1", method=b"PATCH",
                                     body=ChunkedBody(payload))
        self.assertEqual(response.code, 202)
        self.assertEqual(response.headers.getRawHeaders(b"x-received-sha256"), [sha256(payload).encode()])
        [hit] = self.registry.hits
        self.assertEqual((hit.method, hit.body == payload), (b"PATCH", True))

    async def test_ping_answers_json_with_the_version(self) -> None:
        """``/_ping`` is answered by dfdaemon itself, never by the registry."""
        daemon = await self.start()
        response, body = await self.get(daemon.url + "/_ping")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        answer = json.loads(body)
        self.assertEqual((answer["code"], answer["data"]["version"], answer["data"]["pid"]),
                         (codes.SUCCESS, dfly.__version__, os.getpid()))
        self.assertEqual(self.registry.hits, [])

    async def test_mirror_request_without_registry_is_a_clear_404(self) -> None:
        """No --registry: a /v2 request gets a 404 text that says so."""
        daemon = await self.start(registry=None)
        response, body = await self.get(daemon.url + "/v2/")
        self.assertEqual(response.code, 404)
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"])
        self.assertIn(b"no --registry is set", body)

    async def test_unreachable_registry_is_502(self) -> None:
        """A registry nobody listens at: 502 with the reason, not a hang."""
        closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = closed.getHost().port
        await closed.stopListening()
        daemon = await self.start(registry=f"http://127.0.0.1:{number}")
        response, body = await self.get(daemon.url + "/v2/")
        self.assertEqual(response.code, 502)
        self.assertIn(b"cannot reach", body)
        self.assertIn(b"connection refused", body)
        self.assertNotIn(b"Failure", body)  # the kind of failure, not Twisted's exception text


# --- blobs peer-to-peer ------------------------------------------------------------------


class BlobTests(DfdaemonTestCase):
    """``GET /v2/<name>/blobs/sha256:<hex>`` goes through the supernode and the peers."""

    async def test_blob_get_goes_through_the_supernode(self) -> None:
        """The bytes, Docker-Content-Digest and Content-Length; the supernode fetched it, once."""
        data = os.urandom(4 * MiB + 5)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}")
        self.assertP2P(response, body, data)
        self.assertEqual(self.registry.full_gets(digest), 1)
        self.assertEqual([task.url for task in self.supernode.tasks.tasks.values()], [f"{self.registry_url}#sha256:{digest}"])
        [result] = daemon.engine.results
        self.assertEqual((result.success, result.from_supernode, result.from_source), (True, len(data), 0))
        [req] = daemon.engine.requests
        self.assertEqual(req.digest, ("sha256", digest))

    async def test_empty_blob(self) -> None:
        """The empty blob: 200, Content-Length 0, its digest."""
        digest = self.registry.add_blob(b"")
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}")
        self.assertP2P(response, body, b"")

    async def test_range_and_conditional_headers_do_not_reach_the_download(self) -> None:
        """The P2P download is of the whole blob: Range and friends stay with this client."""
        data = os.urandom(10_000)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}",
                                        {b"Range": [b"bytes=0-99"], b"If-None-Match": [b'"x"'], b"X-Kept": [b"yes"]})
        self.assertP2P(response, body, data)
        [req] = daemon.engine.requests
        self.assertEqual({name.lower() for name in req.headers} & {"range", "if-none-match"}, set())
        self.assertEqual(req.headers.get("X-Kept"), "yes")

    async def test_second_dfdaemon_gets_the_pieces_from_the_first(self) -> None:
        """Two dfdaemons on one supernode: the second one's pieces all come from the first's uploader."""
        data = os.urandom(2 * 4 * MiB + 17)
        digest = self.registry.add_blob(data)
        await self.start_supernode()
        first = await self.start_dfdaemon("a")
        second = await self.start_dfdaemon("b")
        path = f"/v2/library/app/blobs/sha256:{digest}"
        self.assertP2P(*await self.get(first.url + path), data)
        self.assertEqual(first.uploads.last_upload, 0.0)
        self.assertP2P(*await self.get(second.url + path), data)
        [result] = second.engine.results
        self.assertEqual((result.from_peers, result.from_supernode, result.from_source), (len(data), 0, 0))
        self.assertGreater(first.uploads.last_upload, 0.0)
        self.assertEqual(self.registry.full_gets(digest), 1)

    async def test_same_digest_under_other_names_and_queries_is_one_fetch(self) -> None:
        """Other repository, signed query: one task, one full GET; access still probed per URL."""
        data = os.urandom(MiB + 3)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        self.assertP2P(*await self.get(f"{daemon.url}/v2/library/one/blobs/sha256:{digest}"), data)
        self.assertP2P(*await self.get(f"{daemon.url}/v2/mirror/two/blobs/sha256:{digest}?token=abc"), data)
        self.assertEqual(self.registry.full_gets(digest), 1)
        self.assertEqual(len(self.supernode.tasks.tasks), 1)
        probes = [(hit.uri, hit.code) for hit in self.registry.blob_hits(digest) if hit.header(b"range")]
        self.assertEqual(probes, [(f"/v2/mirror/two/blobs/sha256:{digest}?token=abc".encode(), 206)])

    async def test_fetch_sends_no_cookie_it_was_given_for_another_request(self) -> None:
        """A cookie set on one blob's fetch is not sent with the next one (the supernode serves many users)."""
        first, second = os.urandom(1000), os.urandom(1000)
        first_digest, second_digest = self.registry.add_blob(first), self.registry.add_blob(second)
        self.registry.response_headers = {b"Set-Cookie": [b"session=alice; Path=/"]}
        daemon = await self.start()
        self.assertP2P(*await self.get(f"{daemon.url}/v2/alice/app/blobs/sha256:{first_digest}"), first)
        self.assertP2P(*await self.get(f"{daemon.url}/v2/bob/app/blobs/sha256:{second_digest}"), second)
        self.assertEqual([hit.values(b"cookie") for hit in self.registry.blob_hits(second_digest)], [[]])

    async def test_blob_without_content_length_arrives_whole(self) -> None:
        """A registry that sends the blob chunked: the client still gets exactly the blob."""
        data = os.urandom(4 * MiB + 11)
        digest = self.registry.add_blob(data)
        self.registry.chunked.add(digest)
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}")
        self.assertEqual((response.code, body == data), (200, True))
        self.assertIsNone(response.headers.getRawHeaders(b"x-served-by"))
        self.assertEqual(self.registry.full_gets(digest), 1)

    async def test_concurrent_gets_of_one_blob_share_one_fetch(self) -> None:
        """Three clients at once through one dfdaemon: all get the blob, the registry sends it once."""
        data = os.urandom(2 * 4 * MiB + 1)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        url = f"{daemon.url}/v2/library/app/blobs/sha256:{digest}"
        results = await gatherResults([Deferred.fromCoroutine(self.get(url)) for _ in range(3)])
        for response, body in results:
            self.assertP2P(response, body, data)
        self.assertEqual(self.registry.full_gets(digest), 1)
        self.assertEqual(len(daemon.engine.results), 3)

    async def test_unreachable_supernode_falls_back_to_the_registry(self) -> None:
        """No supernode answers: the dfdaemon fetches the blob itself and still streams it, checked."""
        closed = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = closed.getHost().port
        await closed.stopListening()
        data = os.urandom(4 * MiB + 2)
        digest = self.registry.add_blob(data)
        self.nodes = (("127.0.0.1", number),)
        daemon = await self.start_dfdaemon()
        self.assertP2P(*await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}"), data)
        [result] = daemon.engine.results
        self.assertEqual((result.reason, result.from_source), (codes.REASON_REGISTER_FAILED, len(data)))
        self.assertEqual(self.registry.full_gets(digest), 1)

    async def test_unknown_blob_is_the_registry_404(self) -> None:
        """P2P cannot start (the source says 404): the client gets the registry's own 404."""
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{'0' * 64}")
        self.assertEqual((response.code, body), (404, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}\n'))
        self.assertEqual(response.headers.getRawHeaders(b"x-served-by"), [b"registry"])

    async def test_redirect_to_object_storage_is_followed_without_credentials(self) -> None:
        """A 307 to another server is followed by the fetch; the registry's Authorization stays behind."""
        storage = Registry(b"storage")
        storage_url = f"http://127.0.0.1:{self.listen(server.Site(storage))}"
        data = os.urandom(4 * MiB + 9)
        digest = self.registry.add_blob(data)
        storage.add_blob(data)
        self.registry.redirect = storage_url
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}",
                                        {b"Authorization": [CREDENTIALS]})
        self.assertP2P(response, body, data)
        self.assertEqual([hit.code for hit in self.registry.blob_hits(digest)], [307])
        self.assertEqual(self.registry.blob_hits(digest)[0].values(b"authorization"), [CREDENTIALS])
        self.assertEqual(storage.full_gets(digest), 1)
        self.assertEqual([hit.header(b"authorization") for hit in storage.hits], [None])


class StreamingTests(DfdaemonTestCase):
    """The client gets the verified prefix while the rest is still on its way."""

    SIZE = 9 * MiB  # three 4 MiB pieces, the last short

    async def start_held_blob(self) -> tuple[Daemon, bytes, str, Deferred[None], Collector]:
        """A 9 MiB blob whose registry body stops after the first piece; the client has its first piece."""
        data = b"".join(distinct_mebibytes(9))
        digest = self.registry.add_blob(data)
        release = self.registry.hold(digest, 4 * MiB + 1000)
        daemon = await self.start()
        response: Any = await self.agent.request(b"GET", f"{daemon.url}/v2/library/app/blobs/sha256:{digest}".encode())
        self.assertEqual((response.code, response.length), (200, self.SIZE))
        body = Collector()
        response.deliverBody(body)
        await body.until(4 * MiB)
        return daemon, data, digest, release, body

    async def test_first_piece_arrives_before_the_registry_sends_the_rest(self) -> None:
        """The first 4 MiB reach the client, in order, while the registry holds the rest; then all of it."""
        daemon, data, digest, release, body = await self.start_held_blob()
        self.assertFalse(release.called)
        self.assertEqual(len(body.data), 4 * MiB)
        self.assertTrue(bytes(body.data) == data[:4 * MiB], "the first piece's bytes differ")
        release.callback(None)
        await body.done
        assert body.reason is not None
        self.assertIsNotNone(body.reason.check(ResponseDone), body.reason)
        self.assertTrue(bytes(body.data) == data, "the whole body differs")
        self.assertEqual(self.registry.full_gets(digest), 1)

    async def test_client_leaving_mid_blob_leaves_nothing_behind(self) -> None:
        """The client hangs up after the first piece: the download stops, data/ is empty."""
        daemon, data, digest, release, body = await self.start_held_blob()
        body.transport.stopProducing()
        await body.done
        await daemon.engine.ended[0]
        self.assertEqual(daemon.engine.results, [])  # cancelled, not finished
        self.assertEqual(os.listdir(daemon.data), [])
        self.assertEqual(daemon.uploads.held(), [])


class DigestTests(DfdaemonTestCase):
    async def test_wrong_bytes_are_never_complete_and_nothing_stays(self) -> None:
        """Bytes that do not match the URL's digest: no complete body, nothing in localrepo, data/ or the CDN cache."""
        expected = os.urandom(4 * MiB + 10)
        digest = self.registry.add_blob(expected, served=os.urandom(len(expected)))
        localrepo = os.path.join(self.work, "localrepo")
        daemon = await self.start(localrepo=localrepo)
        try:
            response: Any = await self.agent.request(b"GET", f"{daemon.url}/v2/library/app/blobs/sha256:{digest}".encode())
        except ResponseFailed:
            pass  # dropped before the head went out: nothing arrived at all
        else:
            body = Collector()
            response.deliverBody(body)
            await body.done
            if response.code == 200:
                assert body.reason is not None
                self.assertEqual(response.length, len(expected))
                self.assertLess(len(body.data), len(expected))
                self.assertIsNone(body.reason.check(ResponseDone), "a wrong body arrived as complete")
            else:
                self.assertEqual(response.code, 502)
        await daemon.engine.ended[0]
        [result] = daemon.engine.results
        self.assertEqual((result.success, result.reason), (False, codes.REASON_DIGEST_MISMATCH), result.line())
        self.assertEqual(os.listdir(localrepo), [])
        self.assertEqual(os.listdir(daemon.data), [])
        self.assertEqual(self.cached_files(), [])


    async def test_wrong_bytes_without_content_length_are_never_complete(self) -> None:
        """The same when the registry sends no length: the chunked body never ends properly."""
        expected = os.urandom(4 * MiB + 10)
        digest = self.registry.add_blob(expected, served=os.urandom(len(expected)))
        self.registry.chunked.add(digest)
        daemon = await self.start()
        try:
            response: Any = await self.agent.request(b"GET", f"{daemon.url}/v2/library/app/blobs/sha256:{digest}".encode())
        except ResponseFailed:
            pass
        else:
            body = Collector()
            response.deliverBody(body)
            await body.done
            assert body.reason is not None
            if response.code == 200:
                self.assertIsNone(body.reason.check(ResponseDone), "a wrong body arrived as complete")
            else:
                self.assertEqual(response.code, 502)
        await daemon.engine.ended[0]
        self.assertEqual([r.reason for r in daemon.engine.results], [codes.REASON_DIGEST_MISMATCH])
        self.assertEqual(os.listdir(daemon.data), [])
        self.assertEqual(self.cached_files(), [])


class AuthTests(DfdaemonTestCase):
    """A registry that wants ``Authorization: Basic ...`` on everything."""

    def setUp(self) -> None:
        super().setUp()
        self.registry.credentials = CREDENTIALS

    async def test_401_reaches_the_client_unchanged(self) -> None:
        """Without credentials: the registry's 401, WWW-Authenticate and JSON body."""
        digest = self.registry.add_blob(os.urandom(1000))
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}")
        self.assertEqual((response.code, body), (401, UNAUTHORIZED))
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [CHALLENGE])
        self.assertEqual(response.headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(self.supernode.tasks.tasks, {})

    async def test_credentials_reach_the_supernode_fetch(self) -> None:
        """With credentials: 200 and the bytes, fetched by the supernode with the client's Authorization."""
        data = os.urandom(4 * MiB + 1)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}",
                                        {b"Authorization": [CREDENTIALS]})
        self.assertP2P(response, body, data)
        [fetch] = self.registry.blob_hits(digest)
        self.assertEqual((fetch.code, fetch.values(b"authorization")), (200, [CREDENTIALS]))

    async def test_the_registration_carries_the_client_s_authorization(self) -> None:
        """dfdaemon forwards the registry ``Authorization`` to the supernode in the registration's headers."""
        data = os.urandom(1000)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        registrations: list[dict[str, Any]] = []
        site: Any = self.supernode.api.factory
        resource_for = site.getResourceFor

        def recording(request: Any) -> Any:
            if request.path == b"/peer/registry":
                registrations.append(json.loads(request.content.getvalue()))
            return resource_for(request)

        site.getResourceFor = recording
        self.assertP2P(*await self.get(f"{daemon.url}/v2/library/app/blobs/sha256:{digest}",
                                       {b"Authorization": [CREDENTIALS]}), data)
        self.assertEqual([reg["headers"] for reg in registrations], [[f"Authorization: {CREDENTIALS.decode()}"]])

    async def test_cached_blob_still_needs_credentials(self) -> None:
        """Once cached, the blob is still refused (401 with the challenge) to a client without credentials."""
        data = os.urandom(1000)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        url = f"{daemon.url}/v2/library/app/blobs/sha256:{digest}"
        self.assertP2P(*await self.get(url, {b"Authorization": [CREDENTIALS]}), data)
        response, body = await self.get(url)
        self.assertEqual((response.code, body), (401, UNAUTHORIZED))
        self.assertEqual(response.headers.getRawHeaders(b"www-authenticate"), [CHALLENGE])
        self.assertEqual(self.registry.full_gets(digest), 1)


# --- proxy mode ----------------------------------------------------------------------------


class ProxyModeTests(DfdaemonTestCase):
    """Absolute-URI requests (HTTP_PROXY): the first matching rule decides."""

    RULES = (
        ProxyRule(re.compile(r"/files/direct"), "direct"),
        ProxyRule(re.compile(r"/files/"), "p2p"),
        ProxyRule(re.compile(r"/secure/"), "use_https"),
    )

    async def start_proxy(self, **changes: Any) -> tuple[Daemon, ProxyAgent]:
        changes.setdefault("proxies", self.RULES)
        daemon = await self.start(registry=None, **changes)
        return daemon, ProxyAgent(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), reactor, pool=self.pool)

    async def test_p2p_rule_goes_through_the_supernode(self) -> None:
        """A URL matching a p2p rule is downloaded through the supernode, by URL."""
        data = os.urandom(4 * MiB + 3)
        self.registry.files[b"/files/p2p.bin"] = data
        daemon, proxy = await self.start_proxy()
        url = f"{self.registry_url}/files/p2p.bin"
        response, body = await self.get(url, agent=proxy)
        self.assertEqual((response.code, body == data), (200, True))
        self.assertIsNone(response.headers.getRawHeaders(b"x-served-by"))
        self.assertEqual([req.url for req in daemon.engine.requests], [url])
        self.assertEqual([task.url for task in self.supernode.tasks.tasks.values()], [url])

    async def test_first_matching_rule_wins(self) -> None:
        """``/files/direct...`` matches direct before p2p: forwarded, no download."""
        self.registry.files[b"/files/direct.bin"] = b"direct bytes"
        daemon, proxy = await self.start_proxy()
        response, body = await self.get(f"{self.registry_url}/files/direct.bin", agent=proxy)
        self.assertEqual((response.code, body), (200, b"direct bytes"))
        self.assertEqual(response.headers.getRawHeaders(b"x-served-by"), [b"registry"])
        self.assertEqual(daemon.engine.requests, [])

    async def test_no_matching_rule_is_direct(self) -> None:
        """A URL no rule matches is forwarded as it is."""
        self.registry.files[b"/other/x.txt"] = b"other"
        daemon, proxy = await self.start_proxy()
        response, body = await self.get(f"{self.registry_url}/other/x.txt?q=1", agent=proxy)
        self.assertEqual((response.code, body), (200, b"other"))
        self.assertEqual(response.headers.getRawHeaders(b"x-served-by"), [b"registry"])
        self.assertEqual([hit.uri for hit in self.registry.hits], [b"/other/x.txt?q=1"])
        self.assertEqual(daemon.engine.requests, [])

    def all_log_text(self) -> list[str]:
        """Every log line from now on, formatted (for "the password never shows")."""
        lines: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            lines.append(formatEvent(event))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return lines

    async def test_url_credentials_become_basic_authorization(self) -> None:
        """``http://user:secret@host/...`` through the proxy: the origin gets a Basic header and a clean path,
        and no log line shows the password."""
        lines = self.all_log_text()
        self.registry.files[b"/other/x.txt"] = b"other"
        daemon, proxy = await self.start_proxy()
        url = self.registry_url.replace("http://", "http://user:s3cret@") + "/other/x.txt"
        response, body = await self.get(url, agent=proxy)
        self.assertEqual((response.code, body), (200, b"other"))
        [hit] = self.registry.hits
        self.assertEqual(hit.uri, b"/other/x.txt")
        self.assertEqual(hit.headers.getRawHeaders(b"authorization"), [b"Basic " + base64.b64encode(b"user:s3cret")])
        self.assertTrue(lines)
        self.assertFalse([line for line in lines if "s3cret" in line])

    async def test_url_credentials_never_show_in_an_error_answer(self) -> None:
        """A proxied URL that cannot be reached: the 502 and its log line name the host, not the password."""
        lines = self.all_log_text()
        daemon, proxy = await self.start_proxy()
        port: Any = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        closed = port.getHost().port
        await port.stopListening()
        response, body = await self.get(f"http://user:s3cret@127.0.0.1:{closed}/x", agent=proxy)
        self.assertEqual(response.code, 502)
        self.assertNotIn(b"s3cret", body)
        self.assertFalse([line for line in lines if "s3cret" in line])

    async def test_p2p_rule_forwards_other_methods(self) -> None:
        """A POST to a p2p URL is forwarded with its body, not downloaded."""
        daemon, proxy = await self.start_proxy()
        response, _ = await self.get(f"{self.registry_url}/files/upload", method=b"POST", agent=proxy,
                                     body=ChunkedBody(b"payload"))
        self.assertEqual(response.code, 202)
        self.assertEqual([(hit.method, hit.body) for hit in self.registry.hits], [(b"POST", b"payload")])
        self.assertEqual(daemon.engine.requests, [])

    async def test_default_rule_sends_blob_urls_p2p(self) -> None:
        """Without proxies in the config, blob URLs go P2P and anything else is forwarded."""
        data = os.urandom(5000)
        digest = self.registry.add_blob(data)
        daemon, proxy = await self.start_proxy(proxies=DfdaemonFileConfig().proxies)
        self.assertP2P(*await self.get(f"{self.registry_url}/v2/library/app/blobs/sha256:{digest}", agent=proxy), data)
        response, body = await self.get(f"{self.registry_url}/v2/", agent=proxy)
        self.assertEqual((response.code, body), (200, b"{}"))
        self.assertEqual([req.digest for req in daemon.engine.requests], [("sha256", digest)])

    async def test_use_https_rule_forwards_over_tls(self) -> None:
        """``use_https`` turns http:// into https:// on the same port (verified against caBundle)."""
        cert, key = generate_ca(os.path.join(self.work, "ca"))
        tls_origin = Registry(b"tls")
        tls_origin.files[b"/secure/x.txt"] = b"over tls"
        creator = CertificateAuthority.load(cert, key).server_creator("127.0.0.1")
        site: Any = server.Site(tls_origin)
        port = self.listen(TLSMemoryBIOFactory(creator, False, site))
        daemon, proxy = await self.start_proxy(ca_bundle=cert)
        response, body = await self.get(f"http://127.0.0.1:{port}/secure/x.txt", agent=proxy)
        self.assertEqual((response.code, body), (200, b"over tls"))
        self.assertEqual(response.headers.getRawHeaders(b"x-served-by"), [b"tls"])
        self.assertEqual(daemon.engine.requests, [])


class ConnectTests(DfdaemonTestCase):
    """CONNECT on the dfdaemon's own port."""

    async def test_connect_is_a_blind_tunnel(self) -> None:
        """200 Connection established, then bytes both ways to an echo server."""
        echo = self.listen(Factory.forProtocol(Echo))
        daemon = await self.start_dfdaemon(connect_ports=(echo,))
        client = await self.raw(daemon.port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (echo, echo))
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.transport.write(b"through the tunnel")
        self.assertEqual(await client.until(b"tunnel"), ESTABLISHED + b"through the tunnel")
        client.transport.loseConnection()
        await client.closed

    async def test_malformed_connect_target_is_400(self) -> None:
        """A CONNECT target without a port: 400 with the reason."""
        daemon = await self.start_dfdaemon()
        client = await self.raw(
            daemon.port, b"CONNECT registry.test HTTP/1.1\r\nHost: registry.test\r\nConnection: close\r\n\r\n"
        )
        await client.closed
        status, _, body = split_response(client.received)
        self.assertTrue(status.startswith(b"HTTP/1.1 400 "), status)
        self.assertEqual(body, b"dfdaemon: the CONNECT target 'registry.test' is not host:port\n")


class ProxyAuthTests(DfdaemonTestCase):
    """proxyAuth set: the right Basic credentials let proxy requests and CONNECT through (the refusals are in
    ``tests.adversarial``); mirror requests need none."""

    CREDENTIALS = (b"ci:s3cret", b"other:pw")

    def authorization(self, pair: bytes) -> bytes:
        return b"Basic " + base64.b64encode(pair)

    async def test_right_credentials_pass_a_proxy_request(self) -> None:
        """Either configured pair works; the origin never sees Proxy-Authorization."""
        self.registry.files[b"/other/x.txt"] = b"other"
        daemon = await self.start_dfdaemon(proxy_auth=self.CREDENTIALS)
        for pair in self.CREDENTIALS:
            client = await self.raw(daemon.port, b"GET %s/other/x.txt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                    b"Proxy-Authorization: %s\r\n\r\n" % (self.registry_url.encode(),
                                                                          self.authorization(pair)))
            await client.closed
            status, _, body = split_response(client.received)
            self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        self.assertEqual([hit.header(b"proxy-authorization") for hit in self.registry.hits], [None, None])

    async def test_right_credentials_pass_a_connect(self) -> None:
        """CONNECT with the credentials to an allowed port is a tunnel."""
        echo = self.listen(Factory.forProtocol(Echo))
        daemon = await self.start_dfdaemon(proxy_auth=self.CREDENTIALS, connect_ports=(echo,))
        client = await self.raw(daemon.port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nProxy-Authorization: %s\r\n\r\n"
                                % (echo, self.authorization(b"ci:s3cret")))
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.transport.loseConnection()
        await client.closed

    async def test_mirror_requests_need_no_credentials(self) -> None:
        """Origin-form requests go to --registry only: proxyAuth does not apply to them."""
        daemon = await self.start_dfdaemon(proxy_auth=self.CREDENTIALS)
        response, body = await self.get(f"{daemon.url}/v2/")
        self.assertEqual((response.code, body), (200, b"{}"))


class HijackHostTests(DfdaemonTestCase):
    """``hijackHttps`` hosts: the named host (exactly) is intercepted, with a CA made for it."""

    def dfdaemon_reactor(self) -> Any:
        # The request inside goes upstream to a made-up name: it must resolve to nothing, not reach DNS.
        self.names = LoopbackNames()
        return ResolvingReactor(reactor, self.names)

    async def intercepted_name(self, rule: HijackRule, target: bytes) -> str:
        """CONNECT *target*:443; the DNS name in the certificate dfdaemon answers with."""
        cert, key = generate_ca(os.path.join(self.work, "ca"), hosts=["registry.test", "*.mirror.test"])
        daemon = await self.start_dfdaemon(hijack_cert=cert, hijack_key=key, hijack_hosts=(rule,))
        client = await self.raw(daemon.port, b"CONNECT %s:443 HTTP/1.1\r\n\r\n" % target)
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        with open(cert, "rb") as f:
            trust = ssl.Certificate.loadPEM(f.read())
        client.transport.startTLS(ssl.optionsForClientTLS(target.decode(), trustRoot=trust))
        client.transport.write(b"GET /_ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        await client.closed
        self.assertIn(b"its host name does not resolve", client.received)  # LoopbackNames, not DNS
        certificate = client.transport.getPeerCertificate().to_cryptography()
        [name] = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
        return name

    async def test_host_rule_intercepts_its_host(self) -> None:
        """host: registry.test: CONNECT registry.test is answered with a certificate the client trusts."""
        rule = HijackRule(host=HostPattern.parse("registry.test"))
        self.assertEqual(await self.intercepted_name(rule, b"registry.test"), "registry.test")

    async def test_wildcard_rule_intercepts_a_name_under_it(self) -> None:
        """host: '*.mirror.test' covers eu.mirror.test."""
        rule = HijackRule(host=HostPattern.parse("*.mirror.test"))
        self.assertEqual(await self.intercepted_name(rule, b"eu.mirror.test"), "eu.mirror.test")

    async def test_regex_rule_matches_host_and_port(self) -> None:
        r"""A regex is matched against the whole host or the whole host:port."""
        rule = HijackRule(re.compile(r"registry\.test:443"))
        self.assertEqual(await self.intercepted_name(rule, b"registry.test"), "registry.test")

    def test_host_patterns_match_whole_names(self) -> None:
        """Exact names, wildcards for names under the domain only; case, trailing dots and IPv6 forms normalized."""
        exact, wildcard = HostPattern.parse("registry.test"), HostPattern.parse("*.mirror.test")
        self.assertEqual([exact.matches(h) for h in ("registry.test", "REGISTRY.test.", "registry.test.evil",
                                                      "a.registry.test", "xregistry.test")],
                         [True, True, False, False, False])
        self.assertEqual([wildcard.matches(h) for h in ("eu.mirror.test", "a.b.mirror.test", "mirror.test",
                                                         "mirror.test.evil", "evilmirror.test")],
                         [True, True, False, False, False])
        self.assertTrue(HostPattern.parse("[::1]").matches("0:0::1"))

    def test_proxy_rules_need_both_their_regex_and_their_host(self) -> None:
        """A proxy regex is searched in the URL; a host must equal the URL's host."""
        rule = ProxyRule(re.compile(BLOB_PATTERN), "p2p", HostPattern.parse("registry.test"))
        blob = f"/v2/a/blobs/sha256:{'a' * 64}"
        self.assertEqual([rule.matches(url) for url in (f"https://registry.test:5000{blob}", f"http://registry.test{blob}",
                                                         f"http://registry.test.evil{blob}", "http://registry.test/v2/",
                                                         f"http://evil{blob}?registry.test")],
                         [True, True, False, False, False])
        self.assertTrue(ProxyRule(re.compile(BLOB_PATTERN), "p2p").matches(f"http://anywhere{blob}"))


class ProbeGuardTests(DfdaemonTestCase):
    """skopeo tries TLS first on an insecure mirror: such a connection is closed at once."""

    async def test_tls_client_hello_is_closed_without_an_answer(self) -> None:
        """A first byte 0x16: the connection closes and no HTTP comes back."""
        daemon = await self.start_dfdaemon()
        client = await self.raw(daemon.port, b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03" + os.urandom(32))
        await client.closed
        self.assertEqual(client.received, b"")

    async def test_plain_request_after_a_probe_works(self) -> None:
        """After a closed probe, a plain HTTP request on a new connection is served."""
        daemon = await self.start_dfdaemon()
        probe = await self.raw(daemon.port, b"\x16\x03\x01")
        await probe.closed
        client = await self.raw(daemon.port, b"GET /_ping HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")
        await client.closed
        status, headers, body = split_response(client.received)
        self.assertTrue(status.startswith(b"HTTP/1.1 200 "), status)
        self.assertIn((b"server", b"dfdaemon"), headers)
        if (b"transfer-encoding", b"chunked") in headers:
            body = dechunk(body)
        self.assertEqual(json.loads(body)["data"]["version"], dfly.__version__)


# --- config ------------------------------------------------------------------------------------


class ConfigTests(SynchronousTestCase):
    """dfdaemon.yml and the flags on top of it."""

    def write(self, data: Any) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w", encoding="utf-8") as f:
            f.write(data if isinstance(data, str) else yaml.safe_dump(data))
        return path

    def refused(self, data: Any) -> str:
        e = self.assertRaises(ValueError, load_dfdaemon_config, self.write(data), True)
        self.assertNotIn("\n", str(e))
        return str(e)

    def parse(self, *argv: str) -> DfdaemonFileConfig:
        options = Options()
        options.parseOptions(list(argv))
        config = options["config_obj"]
        assert isinstance(config, DfdaemonFileConfig)
        return config

    def test_rules_and_hijack_hosts_load_in_order(self) -> None:
        """proxies keep their order and actions (p2p by default); hijackHttps its files and hosts."""
        config = load_dfdaemon_config(self.write({
            "registry": "https://registry.example:5000/",
            "nodes": ["sn1:8002", "sn2"],
            "ratelimit": "30M",
            "proxies": [
                {"regex": r"blobs/sha256:.*", "action": "p2p"},
                {"regex": r"\.iso$", "action": "direct"},
                {"regex": r"example\.com", "action": "use_https"},
                {"regex": r"/layers/"},
            ],
            "hijackHttps": {
                "cert": "/etc/ca.crt", "key": "/etc/ca.key",
                "hosts": [{"regex": r"registry\.example"}, {"regex": r"insecure\.example", "insecure": True}],
            },
        }), required=True)
        self.assertEqual(config.registry, "https://registry.example:5000")
        self.assertEqual(config.nodes, (("sn1", 8002), ("sn2", 8002)))
        self.assertEqual(config.ratelimit, 30 * MiB)
        self.assertEqual([(rule.regex.pattern, rule.action) for rule in config.proxies], [
            (r"blobs/sha256:.*", "p2p"), (r"\.iso$", "direct"), (r"example\.com", "use_https"), (r"/layers/", "p2p"),
        ])
        self.assertEqual((config.hijack_cert, config.hijack_key), ("/etc/ca.crt", "/etc/ca.key"))
        self.assertEqual([(rule.regex.pattern, rule.insecure) for rule in config.hijack_hosts],
                         [(r"registry\.example", False), (r"insecure\.example", True)])

    def test_default_rule_is_blobs_p2p(self) -> None:
        """With no proxies key, blob URLs go P2P (and nothing is hijacked)."""
        config = load_dfdaemon_config(self.write("port: 65001\n"), required=True)
        self.assertEqual([(rule.regex.pattern, rule.action) for rule in config.proxies], [(BLOB_PATTERN, "p2p")])
        self.assertEqual((config.hijack_cert, config.hijack_hosts), (None, ()))

    def test_invalid_regex_is_refused(self) -> None:
        """A regex that does not compile: one line naming the key and the regex."""
        error = self.refused({"proxies": [{"regex": "(unclosed", "action": "p2p"}]})
        self.assertIn("'proxies'", error)
        self.assertIn("invalid regular expression '(unclosed'", error)

    def test_invalid_hijack_regex_is_refused(self) -> None:
        """The same for a hijack host."""
        error = self.refused({"hijackHttps": {"cert": "c", "key": "k", "hosts": [{"regex": "[z-a]"}]}})
        self.assertIn("'hijackHttps'", error)
        self.assertIn("invalid regular expression", error)

    def test_unknown_action_is_refused(self) -> None:
        """Only p2p, direct and use_https."""
        error = self.refused({"proxies": [{"regex": "x", "action": "mirror"}]})
        self.assertIn("action must be one of p2p, direct, use_https, got 'mirror'", error)

    def test_unknown_keys_are_refused(self) -> None:
        """A misspelt top-level key, or an unknown key inside a rule."""
        self.assertIn("unknown key 'proxy'", self.refused({"proxy": []}))
        self.assertIn("'proxies'", self.refused({"proxies": [{"regex": "x", "action": "p2p", "insecure": True}]}))

    def test_non_bool_insecure_is_refused(self) -> None:
        """insecure must be true or false, not a string."""
        error = self.refused({"hijackHttps": {"cert": "c", "key": "k", "hosts": [{"regex": "x", "insecure": "yes"}]}})
        self.assertIn("expected true or false", error)

    def test_hijack_cert_without_key_is_a_usage_error(self) -> None:
        """hijackHttps with a cert but no key: a one-line UsageError from the options."""
        path = self.write({"hijackHttps": {"cert": "/etc/ca.crt", "hosts": [{"regex": "x"}]}})
        e = self.assertRaises(usage.UsageError, self.parse, "--config", path, "--node", "sn1")
        self.assertIn("hijackHttps", str(e))
        self.assertNotIn("\n", str(e))

    def test_connect_ports_default_to_443_and_load(self) -> None:
        """connectPorts: [443] unless the file lists others (in order, once each); [] allows none."""
        self.assertEqual(load_dfdaemon_config(self.write("port: 1\n"), required=True).connect_ports, (443,))
        config = load_dfdaemon_config(self.write({"connectPorts": [8443, 443, 8443]}), required=True)
        self.assertEqual(config.connect_ports, (8443, 443))
        self.assertEqual(load_dfdaemon_config(self.write({"connectPorts": []}), required=True).connect_ports, ())

    def test_bad_connect_ports_are_refused(self) -> None:
        """A port that is not 1-65535, or not a list: one line naming the key."""
        for bad in (443, [0], [65536], ["443"], [True]):
            self.assertIn("'connectPorts'", self.refused({"connectPorts": bad}))

    def test_proxy_auth_loads_one_or_a_list_and_stays_out_of_repr(self) -> None:
        """proxyAuth: 'user:password' or a list; the password never shows in the config's repr."""
        config = load_dfdaemon_config(self.write({"proxyAuth": "ci:s3cret"}), required=True)
        self.assertEqual(config.proxy_auth, (b"ci:s3cret",))
        self.assertNotIn("s3cret", repr(config))
        config = load_dfdaemon_config(self.write({"proxyAuth": ["a:1", "b:p:w"]}), required=True)
        self.assertEqual(config.proxy_auth, (b"a:1", b"b:p:w"))

    def test_bad_proxy_auth_is_refused_without_repeating_it(self) -> None:
        """No colon, an empty part, an empty list or a number: one line that does not echo the value."""
        for bad in ("s3cret", ":s3cret", "user:", [], [1234], "us\ter:s3cret"):
            error = self.refused({"proxyAuth": bad})
            self.assertIn("'proxyAuth'", error)
            self.assertNotIn("s3cret", error)

    def test_host_keys_load(self) -> None:
        """host: in proxy and hijack rules is normalized; a rule needs a regex or a host."""
        config = load_dfdaemon_config(self.write({
            "proxies": [{"host": "Downloads.Example", "action": "direct"}, {"host": "*.cdn.example", "regex": "/x"}],
            "hijackHttps": {"cert": "c", "key": "k", "hosts": [{"host": "*.Registry.Example"}, {"host": "[::1]"}]},
        }), required=True)
        self.assertEqual([(r.host and r.host.text, r.regex and r.regex.pattern) for r in config.proxies],
                         [("downloads.example", None), ("*.cdn.example", "/x")])
        self.assertEqual([r.certificate_name for r in config.hijack_hosts], ["*.registry.example", "::1"])
        self.assertIn("with a regex or a host", self.refused({"proxies": [{"action": "p2p"}]}))
        self.assertIn("'hijackHttps'", self.refused({"hijackHttps": {"cert": "c", "key": "k",
                                                                     "hosts": [{"host": "a", "regex": "a"}]}}))
        self.assertIn("not a valid host name", self.refused({"proxies": [{"host": "a b"}]}))
        self.assertIn("not an IP address", self.refused({"proxies": [{"host": "*.10.0.0.1"}]}))

    def test_literal_hijack_regexes_name_their_host(self) -> None:
        """A regex that spells one host (escaped dots, ^...$, :port) names it for the CA; a pattern names none."""
        from dfly.config import literal_host

        for regex in (r"registry\.example", r"^registry\.example$", r"registry\.example:5000", r"REGISTRY\.example"):
            self.assertEqual(literal_host(regex), "registry.example", regex)
        for regex in (r"registry.example", r".*\.example", r"registry\.example|evil", r"(a|b)\.example"):
            self.assertIsNone(literal_host(regex), regex)

    def test_hijack_ca_that_cannot_sign_for_a_rule_is_a_usage_error(self) -> None:
        """A CA made for other hosts than the rules name stops the start, in one line."""
        cert, key = generate_ca(self.mktemp(), hosts=["registry.example"])
        ok = self.write({"hijackHttps": {"cert": cert, "key": key, "hosts": [{"regex": r"registry\.example"}]}})
        self.assertEqual(len(self.parse("--config", ok, "--node", "sn1").hijack_hosts), 1)
        bad = self.write({"hijackHttps": {"cert": cert, "key": key, "hosts": [{"host": "other.example"}]}})
        e = self.assertRaises(usage.UsageError, self.parse, "--config", bad, "--node", "sn1")
        self.assertIn("may not sign for other.example", str(e))
        self.assertNotIn("\n", str(e))

    def test_flags_override_the_file(self) -> None:
        """Every flag beats its file value; what no flag sets (rules) stays from the file."""
        path = self.write({
            "port": 7001, "listen": "127.0.0.1", "registry": "http://file-registry", "nodes": ["file-sn"],
            "ratelimit": "30M", "peerPort": 7002, "home": "/file/home", "localrepo": "/file/repo",
            "proxies": [{"regex": "x", "action": "direct"}],
        })
        home, repo = os.path.abspath(self.mktemp()), os.path.abspath(self.mktemp())
        config = self.parse(
            "--config", path, "--port", "0", "--listen", "127.0.0.2", "--registry", "https://flag-registry:5000/",
            "--node", "sn1:9000,sn2", "--node", "sn3", "--ratelimit", "0", "--peer-port", "7003",
            "--home", home, "--localrepo", repo, "--insecure",
        )
        self.assertEqual((config.port, config.listen, config.registry), (0, "127.0.0.2", "https://flag-registry:5000"))
        self.assertEqual(config.nodes, (("sn1", 9000), ("sn2", 8002), ("sn3", 8002)))
        self.assertEqual((config.ratelimit, config.peer_port, config.insecure), (0, 7003, True))
        self.assertEqual((config.home, config.localrepo), (home, repo))
        self.assertEqual([(rule.regex.pattern, rule.action) for rule in config.proxies], [("x", "direct")])

    def test_file_values_hold_without_flags(self) -> None:
        """Without flags the file's values are used (and home made absolute)."""
        path = self.write({"port": 7001, "registry": "http://file-registry", "nodes": ["file-sn"], "home": "rel/home"})
        config = self.parse("--config", path)
        self.assertEqual((config.port, config.registry, config.nodes), (7001, "http://file-registry", (("file-sn", 8002),)))
        self.assertEqual(config.home, os.path.abspath("rel/home"))

    def test_node_is_required(self) -> None:
        """No --node and no nodes in the file: a UsageError that says how to give one."""
        e = self.assertRaises(usage.UsageError, self.parse, "--config", self.write(""))
        self.assertEqual(str(e), "no supernode: give --node host[:port] or nodes in the config file")

    def test_bad_flag_values_are_usage_errors(self) -> None:
        """A bad port, rate or registry URL: UsageError naming it."""
        path = self.write("")
        base = ("--config", path, "--node", "s")
        self.assertIn("--port", str(self.assertRaises(usage.UsageError, self.parse, *base, "--port", "x")))
        self.assertIn("--ratelimit", str(self.assertRaises(usage.UsageError, self.parse, *base, "--ratelimit", "fast")))
        self.assertRaises(usage.UsageError, self.parse, *base, "--registry", "ftp://r")

    def test_missing_config_file_given_explicitly_is_an_error(self) -> None:
        """An explicit --config that does not exist is refused."""
        e = self.assertRaises(usage.UsageError, self.parse, "--config", "/nonexistent/dfdaemon.yml", "--node", "s")
        self.assertIn("does not exist", str(e))


class FirstGetWrong(Registry):
    """The first full GET of a blob gets ``wrong`` bytes; later ones the real ones."""

    def __init__(self) -> None:
        super().__init__()
        self.wrong: dict[str, bytes] = {}
        self.full = 0

    def _blob(self, request: server.Request, digest: str) -> Any:
        if request.method == b"GET" and not request.getHeader(b"range") and digest in self.wrong:
            self.full += 1
            if self.full == 1:
                saved = self.blobs[digest]
                self.blobs[digest] = self.wrong[digest]
                try:
                    return super()._blob(request, digest)
                finally:
                    self.blobs[digest] = saved
        return super()._blob(request, digest)


class RestartedDownloadTests(DfdaemonTestCase):
    """Wrong bytes from the supernode's fetch streamed, then back to source with good bytes."""

    def setUp(self) -> None:
        super().setUp()
        self.registry = FirstGetWrong()
        self.registry_url = f"http://127.0.0.1:{self.listen(server.Site(self.registry))}"

    async def test_a_restart_after_bytes_went_out_never_completes_the_response(self) -> None:
        """The client has the bad first piece: the body must not complete, whatever the second file holds."""
        data = b"".join(distinct_mebibytes(9))
        digest = self.registry.add_blob(data)
        self.registry.wrong[digest] = bytes(b ^ 0xFF for b in data[: 4 * MiB]) + data[4 * MiB:]
        release = self.registry.hold(digest, 8 * MiB + 1000)
        daemon = await self.start()
        response: Any = await self.agent.request(b"GET", f"{daemon.url}/v2/library/app/blobs/sha256:{digest}".encode())
        body = Collector()
        response.deliverBody(body)
        await body.until(4 * MiB)
        release.callback(None)
        await body.done
        await daemon.engine.ended[0]
        self.assertIsNone(body.reason.check(ResponseDone), f"{len(body.data)} bytes delivered as complete")


class Anything(resource.Resource):
    """A server that says yes (one byte) to every request."""

    isLeaf = True

    def render(self, request: server.Request) -> bytes:
        return b"x"


class ForeignOriginTests(DfdaemonTestCase):
    """Content addressing stays within one origin: another server never unlocks a cached blob."""

    def setUp(self) -> None:
        super().setUp()
        self.registry.credentials = CREDENTIALS

    async def test_private_blob_is_not_served_for_another_servers_url(self) -> None:
        """User A caches a private blob; B's proxy request for the same digest at B's own server does not get it."""
        data = os.urandom(4 * MiB + 1)
        digest = self.registry.add_blob(data)
        daemon = await self.start()
        response, body = await self.get(f"{daemon.url}/v2/private/app/blobs/sha256:{digest}",
                                        {b"Authorization": [CREDENTIALS]})
        self.assertEqual((response.code, body == data), (200, True))
        other = f"http://127.0.0.1:{self.listen(server.Site(Anything()))}"
        proxy = ProxyAgent(TCP4ClientEndpoint(_reactor, "127.0.0.1", daemon.port), _reactor, pool=self.pool)
        response, body = await self.get(f"{other}/v2/whatever/blobs/sha256:{digest}", agent=proxy)
        self.assertNotEqual(body, data)
        self.assertEqual(len(self.supernode.tasks.tasks), 2)


class BadTargetTests(DfdaemonTestCase):
    async def test_unparsable_absolute_uri_is_400(self) -> None:
        """A target that is not a URL gets 400 with the reason, not a 500."""
        daemon = await self.start()
        for target in (f"http://[x/v2/a/blobs/sha256:{'a' * 64}", "http://[::1/x", "http:///x"):
            client = await self.raw(daemon.port, f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
            await client.closed
            self.assertTrue(client.received.startswith(b"HTTP/1.1 400 "), (target, client.received[:200]))

    async def test_origin_form_must_start_with_a_slash(self) -> None:
        """``GET .evil.example/x`` must not become ``<registry>.evil.example/x``."""
        daemon = await self.start()
        client = await self.raw(daemon.port, b"GET .evil.example/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        await client.closed
        self.assertTrue(client.received.startswith(b"HTTP/1.1 400 "), client.received[:200])


class LocalrepoSweepTests(SynchronousTestCase):
    """A --localrepo the user chose may hold other things: the sweep removes only dfdaemon's own old files."""

    def test_only_old_files_named_like_ours_go(self) -> None:
        from dfly.dfdaemon.tap import LOCALREPO_NAMES
        from dfly.peer.tap import RESIDUE_AGE, remove_residue

        repo = self.mktemp()
        os.makedirs(os.path.join(repo, "a-directory"))
        names = ["0123456789abcdef0123456789abcdef", ".0123456789abcdef0123456789abcdef.1-2.000.tmp",
                 "notes.txt", "fedcba9876543210fedcba9876543210"]
        for name in names:
            with open(os.path.join(repo, name), "wb") as f:
                f.write(b"x")
        old = 1_000_000.0
        for name in names[:3] + ["a-directory"]:
            os.utime(os.path.join(repo, name), (old, old))
        remove_residue(repo, set(), old + RESIDUE_AGE + 1, LOCALREPO_NAMES)
        self.assertEqual(sorted(os.listdir(repo)), ["a-directory", "fedcba9876543210fedcba9876543210", "notes.txt"])


class RelayIdleTests(SynchronousTestCase):
    """A registry that goes silent mid-body does not hold the client forever."""

    class Request:
        def __init__(self) -> None:
            self.written: list[bytes] = []
            self.aborted = False
            self.channel = self
            self.transport = self

        def registerProducer(self, producer: Any, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

        def write(self, data: bytes) -> None:
            self.written.append(data)

        def abortConnection(self) -> None:
            self.aborted = True

    def test_silence_stops_the_upstream_and_drops_the_client(self) -> None:
        from twisted.internet.task import Clock
        from twisted.internet.testing import StringTransport

        from dfly.dfdaemon.forward import Relay

        clock, request, upstream = Clock(), self.Request(), StringTransport()
        relay = Relay(request, clock, idle=5)  # type: ignore[arg-type]
        relay.makeConnection(upstream)
        clock.advance(4)
        relay.dataReceived(b"abc")
        clock.advance(4)
        self.assertEqual(upstream.producerState, "producing")  # data reset the timer
        clock.advance(1.5)
        self.assertEqual(upstream.producerState, "stopped")
        relay.connectionLost(Failure(ConnectionError("stopped")))
        self.assertEqual((request.written, request.aborted, relay.done.called), ([b"abc"], True, True))
