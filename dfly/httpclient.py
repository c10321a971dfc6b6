"""The one way dfly builds its HTTP clients: a persistent, quiet connection pool, no cookies, and
the TLS policy towards origins and registries (system roots, a CA bundle, or none)."""

from __future__ import annotations

import ipaddress
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL
import treq
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool, _HTTP11ClientFactory
from twisted.internet.defer import Deferred, fail
from twisted.web.iweb import UNKNOWN_LENGTH, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from dfly.connectguard import Guard, GuardedEndpointFactory
from dfly.source import abort_body


class _QuietFactory(_HTTP11ClientFactory):
    # Without this every pooled connection logs "Starting/Stopping factory".
    noisy = False


class QuietConnectionPool(HTTPConnectionPool):
    _factory = _QuietFactory


def make_http_client(reactor: Any, policy: IPolicyForHTTPS | None = None,
                     connect_timeout: float | None = None, guard: Guard | None = None,
                     ) -> tuple[HTTPClient, HTTPConnectionPool]:
    """A treq client and its pool; close the pool (``closeCachedConnections``) on stop.

    ``connect_timeout`` bounds each TCP connection attempt (None: the
    reactor's default of 30 s): a peer moves on from a dead address fast.
    ``guard`` is asked about every address before it is dialled
    (`dfly.connectguard`): the supernode's source policy.

    treq keeps a cookie jar per client; one client fetches for every caller
    (the supernode's source fetches carry each caller's credentials), so a
    cookie set for one caller must never go out with another's request: the
    jar accepts none.
    """
    pool = QuietConnectionPool(reactor, persistent=True)
    no_cookies = CookieJar(DefaultCookiePolicy(allowed_domains=[]))
    tls = policy or BrowserLikePolicyForHTTPS()
    if guard is not None:
        agent = Agent.usingEndpointFactory(reactor, GuardedEndpointFactory(reactor, guard, tls, connect_timeout), pool)
    else:
        agent = Agent(reactor, contextFactory=tls, pool=pool, connectTimeout=connect_timeout)
    return HTTPClient(agent, cookiejar=no_cookies), pool


def cluster_client(reactor: Any, cluster_ca: str | None, connect_timeout: float | None = None,
                   ) -> tuple[HTTPClient | None, HTTPConnectionPool | None]:
    """The client a peer engine speaks to its cluster with (supernode API, CDN, peers), and its pool.

    (None, None) without ``clusterCa``: the engine's one client serves.
    With it, a second client and pool whose TLS trusts that CA alone, so
    that no public CA can vouch for a supernode, while back-to-source
    keeps the system's roots (or ``caBundle``).
    """
    if cluster_ca is None:
        return None, None
    return make_http_client(reactor, upstream_policy(cluster_ca, False), connect_timeout=connect_timeout)


def upstream_policy(ca_bundle: str | None, insecure: bool) -> IPolicyForHTTPS:
    """The TLS policy towards registries and origins (supernode fetches, dfdaemon, back to source).

    By default the system's trust roots, with the host name verified by
    service-identity.  *ca_bundle* is a PEM file whose certificates replace
    the system roots (like curl's ``--cacert``), for registries with a private
    CA; ValueError when it cannot be read or holds no certificate.
    *insecure* turns verification off and wins over *ca_bundle*: anyone on
    the path can then read and change the traffic, so it is for tests and
    labs only.
    """
    if insecure:
        return _UnverifiedPolicy()
    if ca_bundle is None:
        return BrowserLikePolicyForHTTPS()
    try:
        with open(ca_bundle, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"cannot read CA bundle {ca_bundle}: {e.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{ca_bundle} holds no PEM certificate") from None
    roots = [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certificates]
    return BrowserLikePolicyForHTTPS(trustRoot=ssl.trustRootFromCertificates(roots))


@implementer(IPolicyForHTTPS)
class _UnverifiedPolicy:
    """TLS that accepts any certificate (``insecure``); still sends SNI so virtual hosts work."""

    def __init__(self) -> None:
        self._context = ssl.CertificateOptions().getContext()  # verify=False is its default

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return _UnverifiedCreator(self._context, hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedCreator:
    def __init__(self, context: SSL.Context, hostname: bytes) -> None:
        self._context = context
        self._hostname = hostname

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        try:
            ipaddress.ip_address(self._hostname.decode("ascii"))
        except ValueError:
            connection.set_tlsext_host_name(self._hostname)  # SNI carries names, never IP literals
        return connection


class BodyTooLarge(Exception):
    """A response body passed the reader's limit; its connection was closed."""


def read_limited(response: IResponse, limit: int) -> Deferred[bytes]:
    """The whole body, or a `BodyTooLarge` failure as soon as more than ``limit`` bytes arrive.

    For answers that are small by contract (the supernode's JSON): a broken
    or hostile server must not make us buffer without bound.
    """
    if response.length is not UNKNOWN_LENGTH and response.length > limit:
        abort_body(response)
        return fail(BodyTooLarge(f"declared {response.length} bytes, more than {limit}"))
    chunks: list[bytes] = []
    size = 0

    def got(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise BodyTooLarge(f"more than {limit} bytes")
        chunks.append(data)

    return treq.collect(response, got).addCallback(lambda _: b"".join(chunks))
