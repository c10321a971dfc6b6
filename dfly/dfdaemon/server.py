"""The dfdaemon front: one port for registry-mirror, proxy and CONNECT requests.

What arrives, and where it goes:

- ``GET /_ping``: liveness, as JSON;
- origin-form ``/v2/...`` (a container engine or skopeo using us as its
  registry mirror): forwarded to ``--registry``; a blob GET
  (``/v2/<name>/blobs/sha256:<hex>``) goes peer-to-peer instead;
- absolute-form ``GET http://host/path`` (``HTTP_PROXY`` pointing here): the
  first ``proxies`` rule that matches the URL (`ProxyRule.matches`: its
  regex found in the URL, its host equal to the URL's) decides: ``p2p``,
  ``direct`` (forwarded), or ``use_https`` (forwarded over https); no match
  is ``direct``;
- ``CONNECT host:port`` (``HTTPS_PROXY``), to a port in ``connectPorts``
  only: a blind tunnel, unless the host matches a ``hijackHttps`` rule
  (the whole host: `HijackRule.matches`): then we are the TLS server (a
  certificate for that host, and only that host, minted by our CA) and the
  decrypted requests go through the same rules with ``https://host:port``
  in front of their path.

Proxy requests and CONNECT pass `ProxyGate` first (``proxyAuth``, and no
proxying at all beyond loopback without it); a decrypted request inside a
hijacked CONNECT was let in with its CONNECT.

Requests are dispatched in `DfdaemonRequest.process`, before twisted.web's
resource traversal would trip over absolute or authority-form targets.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import urlsplit

import attrs
import hyperlink
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import resource, server
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAgent, IRequest

import dfly
from dfly import codes
from dfly.config import DfdaemonFileConfig, HijackRule
from dfly.dfdaemon.access import ProxyGate
from dfly.dfdaemon.blobs import blob_digest, serve_p2p
from dfly.dfdaemon.ca import CertificateAuthority
from dfly.dfdaemon.forward import fail, forward
from dfly.dfdaemon.tunnel import open_tunnel, parse_connect_target, take_over
from dfly.peer.engine import PeerEngine
from dfly.urls import access_log_uri, redact_userinfo, split_userinfo

log = Logger(namespace="dfly.dfdaemon")


@attrs.define(eq=False)
class Dfdaemon:
    """Decides what happens to each request; holds what the decisions need."""

    reactor: Any
    config: DfdaemonFileConfig
    engine: PeerEngine
    localrepo: str
    agent: IAgent  # to registries and proxied hosts, verifying as configured
    insecure_agent: IAgent  # for hijacked hosts whose rule says insecure
    ca: CertificateAuthority | None = None
    gate: ProxyGate = attrs.field(default=attrs.Factory(lambda self: ProxyGate.from_config(self.config),
                                                        takes_self=True))

    async def handle(self, request: IRequest, upstream: str | None = None, agent: IAgent | None = None) -> None:
        uri = request.uri.decode("latin-1")
        if request.method == b"CONNECT":
            if upstream is not None:
                fail(request, 400, "dfdaemon: CONNECT inside an intercepted connection")
            elif self._let_in(request):
                self.connect(request)
            return
        absolute = upstream is None and uri.startswith(("http://", "https://"))
        try:
            _check_target(uri, absolute)
        except ValueError as e:
            fail(request, 400, f"dfdaemon: {e}")
            return
        if absolute and not self._let_in(request):
            return
        if upstream is not None:  # decrypted from a hijacked CONNECT
            await self.proxy(request, upstream + uri, agent or self.agent)
        elif absolute:
            await self.proxy(request, _credentials_to_header(request, uri), self.agent)
        elif uri.split("?", 1)[0] == "/_ping":
            self.ping(request)
        else:
            await self.mirror(request, uri)

    def ping(self, request: IRequest) -> None:
        body = {"code": codes.SUCCESS, "msg": "OK", "data": {"version": dfly.__version__, "pid": os.getpid()}}
        request.setHeader(b"content-type", b"application/json")
        request.write(json.dumps(body).encode() + b"\n")
        request.finish()

    async def mirror(self, request: IRequest, uri: str) -> None:
        if self.config.registry is None:
            fail(request, 404, "dfdaemon: no --registry is set, so registry-mirror requests cannot be served "
                               "(use dfdaemon as HTTP_PROXY, or start it with --registry URL)")
            return
        url = self.config.registry + uri
        digest = blob_digest(uri.split("?", 1)[0])
        if request.method == b"GET" and digest is not None:
            await self.p2p(request, url, digest, self.agent)
        else:
            await forward(request, url, self.agent, self.reactor)

    def _let_in(self, request: IRequest) -> bool:
        """Whether a proxy request or CONNECT passes the gate; answers it (407 or 403) when not."""
        refusal = self.gate.check_proxy(request.getHeader(b"proxy-authorization"))
        if refusal is None:
            return True
        fail(request, refusal.status, refusal.message, refusal.headers)
        return False

    async def proxy(self, request: IRequest, url: str, agent: IAgent) -> None:
        action = next((rule.action for rule in self.config.proxies if rule.matches(url)), "direct")
        if action == "use_https" and url.startswith("http://"):
            url = "https://" + url[len("http://"):]
        if action == "p2p" and request.method == b"GET":
            await self.p2p(request, url, blob_digest(urlsplit(url).path), agent)
        else:
            await forward(request, url, agent, self.reactor)

    async def p2p(self, request: IRequest, url: str, digest: str | None, agent: IAgent) -> None:
        await serve_p2p(request, url, digest, self.engine, self.config.nodes, self.localrepo, self.config.ratelimit,
                        lambda: forward(request, url, agent, self.reactor))

    def connect(self, request: IRequest) -> None:
        try:
            host, port = parse_connect_target(request.uri)
        except ValueError as e:
            fail(request, 400, f"dfdaemon: {e}")
            return
        refusal = self.gate.check_connect_port(host, port)
        if refusal is not None:
            fail(request, refusal.status, refusal.message, refusal.headers)
            return
        rule = self._hijack_rule(host, port)
        if rule is None or self.ca is None:
            open_tunnel(request, self.reactor, host, port, idle_timeout=self.config.tunnel_idle_timeout)
            return
        try:
            # The CONNECT's host, never a name from SNI or a header: the only host this connection reaches.
            tls = self.ca.server_creator(host)
        except ValueError as e:
            log.warn("not intercepting CONNECT {host}:{port}, a blind tunnel instead: {why}", host=host, port=port,
                     why=e)
            open_tunnel(request, self.reactor, host, port, idle_timeout=self.config.tunnel_idle_timeout)
            return
        upstream = hyperlink.URL(scheme="https", host=host, port=port).to_text()  # brackets, default port left out
        site = InterceptedSite(self, upstream, self.insecure_agent if rule.insecure else self.agent)
        log.info("intercepting CONNECT {host}:{port}", host=host, port=port)
        take_over(request, site.buildProtocol(None), tls)

    def _hijack_rule(self, host: str, port: int) -> HijackRule | None:
        return next((rule for rule in self.config.hijack_hosts if rule.matches(host, port)), None)


def _credentials_to_header(request: IRequest, url: str) -> str:
    """``url`` without ``user:password@``, which becomes the request's Basic ``Authorization`` (unless it has one).

    So the credentials reach the origin as a client meant them, and never
    appear in an answer, a log line or the task's URL on the supernode.
    """
    stripped, extra = split_userinfo(url)
    for name, value in extra.items():
        if not request.requestHeaders.hasHeader(name.encode()):
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode()])
    return stripped


def _check_target(uri: str, absolute: bool) -> None:
    """An absolute target must be a URL with a host; any other must be a path (``/...``)."""
    if not absolute:
        if not uri.startswith("/"):
            raise ValueError(f"request target {uri[:200]!r} is neither a path nor an http(s) URL")
        return
    try:
        parsed = urlsplit(uri)
        parsed.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError as e:
        raise ValueError(f"invalid URL {redact_userinfo(uri[:200])!r}: {e}") from None
    if not parsed.hostname:
        raise ValueError(f"invalid URL {redact_userinfo(uri[:200])!r}: no host")


class DfdaemonRequest(server.Request):
    """Dispatches to `Dfdaemon.handle` instead of resource traversal."""

    def process(self) -> None:
        self.site = self.channel.site
        self.setHeader(b"server", b"dfdaemon")
        site = self.site
        d = Deferred.fromCoroutine(site.dfdaemon.handle(self, site.upstream, site.agent))
        d.addErrback(self._crashed)

    def _crashed(self, failure: Failure) -> None:
        log.failure("dfdaemon: {method} {uri} failed", failure, method=self.method,
                    uri=redact_userinfo(self.uri.decode("latin-1")))
        if not self.finished and self.channel is not None:
            fail(self, 500, "dfdaemon: internal error (see dfdaemon.log)")


class ProbeGuardChannel(HTTPChannel):
    """Closes a connection that starts with a TLS handshake.

    skopeo and containers/image try TLS first on an ``insecure`` mirror; an
    HTTP parser would wait for a line end that never comes, and the client
    only falls back to plain HTTP after its 10 s handshake timeout.
    """

    _first = True

    def dataReceived(self, data: bytes) -> None:
        if self._first:
            self._first = False
            if data[:1] == b"\x16":
                self.transport.loseConnection()
                return
        super().dataReceived(data)


class DfdaemonSite(server.Site):
    """The listening port's factory."""

    protocol = ProbeGuardChannel
    requestFactory = DfdaemonRequest
    upstream: str | None = None
    agent: IAgent | None = None

    def __init__(self, dfdaemon: Dfdaemon) -> None:
        super().__init__(resource.Resource(), reactor=dfdaemon.reactor)
        self.dfdaemon = dfdaemon
        self.noisy = False

    def log(self, request: IRequest) -> None:
        log.info('{method} {uri} {code} {length}', method=request.method.decode("latin-1"),
                 uri=access_log_uri(request.uri.decode("latin-1")), code=request.code, length=request.sentLength)


class InterceptedSite(DfdaemonSite):
    """One hijacked CONNECT's decrypted requests, all for ``upstream``."""

    protocol = HTTPChannel

    def __init__(self, dfdaemon: Dfdaemon, upstream: str, agent: IAgent) -> None:
        super().__init__(dfdaemon)
        self.upstream = upstream
        self.agent = agent
