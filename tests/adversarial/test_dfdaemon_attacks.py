"""Attacks on dfdaemon's proxy port (security issue 7), one test each.

Each test is an attack that worked before the fix: a connection opened
without certificate verification serving a verified request, CONNECT to any
port, proxying for anyone, a hijack or proxy rule matching a longer host
name, a leaf certificate for a name the client picked, a CA that may sign
for any host.

Real dfdaemons on 127.0.0.1 (port 0), built as in ``tests.test_dfdaemon``,
on a reactor whose name resolver is `LoopbackNames`: the attackers' host
names (``registry.example.internal.evil.net``) resolve to nothing, so no
lookup and no connection leaves loopback.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import os
import re
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web import resource, server
from twisted.web.client import ProxyAgent
from twisted.internet.endpoints import TCP4ClientEndpoint

from dfly.config import BLOB_PATTERN, HijackRule, HostPattern, ProxyRule
from dfly.dfdaemon.access import ProxyGate
from dfly.dfdaemon.ca import CertificateAuthority, generate_ca
from dfly.dfdaemon.cli import main as dfdaemon_main
from dfly.httpclient import upstream_policy
from tests.loopback import LoopbackNames, RawClient, ResolvingReactor
from tests.test_dfdaemon import ESTABLISHED, DfdaemonTestCase, reactor, split_response

REGISTRY = "registry.example.internal"
EVIL = "registry.example.internal.evil.net"
PEM = serialization.Encoding.PEM


def self_signed(host: str) -> ssl.CertificateOptions:
    """Server TLS with a self-signed certificate for *host* (an IP): no trust store knows it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self-signed origin")])
    now = datetime.now(timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(PEM) + key.private_bytes(
        PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ssl.PrivateCertificate.loadPEM(pem).options()


class Origin(resource.Resource):
    """Answers ``origin`` to every request and counts them."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def render(self, request: server.Request) -> bytes:
        self.requests += 1
        return b"origin"


class Listener(Protocol):
    """Counts the connections a target got (a CONNECT that must not reach it)."""

    made: list[object]

    def connectionMade(self) -> None:
        self.factory.made.append(self)  # type: ignore[attr-defined]


class AttackTestCase(DfdaemonTestCase):
    """dfdaemons whose name lookups go to `LoopbackNames` (nothing resolves but what a test maps)."""

    def setUp(self) -> None:
        super().setUp()
        self.names = LoopbackNames()
        self.lines: list[str] = []
        globalLogPublisher.addObserver(self._observe)
        self.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event: dict[str, Any]) -> None:
        self.lines.append(formatEvent(event))

    def dfdaemon_reactor(self) -> Any:
        return ResolvingReactor(reactor, self.names)

    def ca_files(self, **options: Any) -> dict[str, Any]:
        cert, key = generate_ca(os.path.join(self.work, "ca"), **options)
        self.ca = CertificateAuthority.load(cert, key)
        return {"hijack_cert": cert, "hijack_key": key}

    async def connect(self, port: int, target: bytes, headers: bytes = b"") -> RawClient:
        return await self.raw(port, b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (target, target, headers))

    async def closed_answer(self, client: RawClient) -> tuple[bytes, list[tuple[bytes, bytes]], bytes]:
        """The status line, headers and body of the one answer before the client hangs up."""
        await client.until(b"\n\r\n")
        client.transport.loseConnection()
        await client.closed
        return split_response(client.received)

    def target(self) -> tuple[int, list[object]]:
        """A listener on loopback that records each connection it gets."""
        factory = Factory.forProtocol(Listener)
        factory.made = []  # type: ignore[attr-defined]
        return self.listen(factory), factory.made  # type: ignore[attr-defined]


class PooledTrustTests(AttackTestCase):
    async def test_unverified_connection_is_not_reused_for_a_verified_request(self) -> None:
        """After an ``insecure`` hijack rule reached a self-signed origin, a verified request to it still fails."""
        origin = Origin()
        port = self.listen(TLSMemoryBIOFactory(self_signed("127.0.0.1"), False, server.Site(origin)))
        daemon = await self.start_dfdaemon(
            registry=f"https://127.0.0.1:{port}", connect_ports=(port,),
            hijack_hosts=(HijackRule(re.compile(r"127\.0\.0\.1"), insecure=True),), **self.ca_files())
        client = await self.connect(daemon.port, b"127.0.0.1:%d" % port)
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.received = b""
        client.transport.startTLS(ssl.optionsForClientTLS("127.0.0.1", trustRoot=ssl.Certificate.loadPEM(
            self.ca.certificate.public_bytes(PEM))))
        client.transport.write(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        await client.closed
        self.assertTrue(client.received.startswith(b"HTTP/1.1 200 "), client.received[:200])
        self.assertEqual(origin.requests, 1)

        response, body = await self.get(f"{daemon.url}/v2/")  # the mirror's agent verifies the registry
        self.assertEqual(response.code, 502, body)
        self.assertIn(b"certificate verify failed", body)
        self.assertEqual(origin.requests, 1)


class ConnectPortTests(AttackTestCase):
    async def test_connect_to_a_port_not_in_connect_ports_is_403(self) -> None:
        """CONNECT to a port other than 443 (an SSH or database port behind the proxy): 403, logged, no connection."""
        port, made = self.target()
        daemon = await self.start_dfdaemon()
        status, _, body = await self.closed_answer(await self.connect(daemon.port, b"127.0.0.1:%d" % port))
        self.assertTrue(status.startswith(b"HTTP/1.1 403 "), status)
        self.assertIn(b"not allowed (connectPorts: 443)", body)
        self.assertEqual(made, [])
        self.assertTrue([line for line in self.lines if f"127.0.0.1:{port} refused" in line], self.lines)


class ProxyAuthTests(AttackTestCase):
    CREDENTIALS = (b"ci:s3cret",)

    async def test_proxy_request_without_credentials_is_407(self) -> None:
        """proxyAuth set: an absolute-URI request without Proxy-Authorization gets 407 and a challenge."""
        daemon = await self.start_dfdaemon(proxy_auth=self.CREDENTIALS)
        client = await self.raw(daemon.port, f"GET {self.registry_url}/v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, headers, _ = await self.closed_answer(client)
        self.assertTrue(status.startswith(b"HTTP/1.1 407 "), status)
        self.assertIn((b"proxy-authenticate", b'Basic realm="dfdaemon", charset="UTF-8"'), headers)
        self.assertEqual(self.registry.hits, [])

    async def test_proxy_request_with_wrong_credentials_is_407(self) -> None:
        """A wrong password (or another scheme) is no better than none."""
        daemon = await self.start_dfdaemon(proxy_auth=self.CREDENTIALS)
        for value in (b"Basic " + base64.b64encode(b"ci:guess"), b"Basic " + base64.b64encode(b"ci:s3cretX"),
                      b"Bearer s3cret", b"Basic !!!"):
            client = await self.raw(daemon.port, b"GET %s/v2/ HTTP/1.1\r\nHost: x\r\nProxy-Authorization: %s\r\n\r\n"
                                    % (self.registry_url.encode(), value))
            status, _, _ = await self.closed_answer(client)
            self.assertTrue(status.startswith(b"HTTP/1.1 407 "), (value, status))
        self.assertEqual(self.registry.hits, [])

    async def test_connect_without_credentials_is_407(self) -> None:
        """CONNECT to an allowed port without credentials: 407, and the target gets no connection."""
        port, made = self.target()
        daemon = await self.start_dfdaemon(proxy_auth=self.CREDENTIALS, connect_ports=(port,))
        status, headers, _ = await self.closed_answer(await self.connect(daemon.port, b"127.0.0.1:%d" % port))
        self.assertTrue(status.startswith(b"HTTP/1.1 407 "), status)
        self.assertIn(b"proxy-authenticate", [name for name, _ in headers])
        self.assertEqual(made, [])

    async def test_beyond_loopback_without_proxy_auth_there_is_no_proxying(self) -> None:
        """A dfdaemon for 0.0.0.0 without proxyAuth is no open proxy: 403 (its listener here stays on loopback)."""
        daemon = await self.start_dfdaemon()
        daemon.parts.dfdaemon.gate = ProxyGate.from_config(attrs.evolve(daemon.parts.dfdaemon.config, listen="0.0.0.0"))
        client = await self.raw(daemon.port, f"GET {self.registry_url}/v2/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        status, _, body = await self.closed_answer(client)
        self.assertTrue(status.startswith(b"HTTP/1.1 403 "), status)
        self.assertIn(b"no proxyAuth is configured", body)
        self.assertEqual(self.registry.hits, [])


class HostAnchoringTests(AttackTestCase):
    async def test_hijack_regex_does_not_match_a_longer_host(self) -> None:
        r"""``registry\.example\.internal`` does not intercept ``...internal.evil.net``: a blind tunnel is tried."""
        daemon = await self.start_dfdaemon(
            hijack_hosts=(HijackRule(re.compile(r"registry\.example\.internal")),), **self.ca_files())
        status, _, body = await self.closed_answer(await self.connect(daemon.port, f"{EVIL}:443".encode()))
        self.assertTrue(status.startswith(b"HTTP/1.1 502 "), status)
        self.assertEqual(body, f"dfdaemon: cannot connect to {EVIL}:443: cannot resolve the host name\n".encode())
        self.assertFalse([line for line in self.lines if "intercepting" in line])
        self.assertEqual(self.names.asked, [EVIL])

    async def test_proxy_host_rule_does_not_match_a_longer_host(self) -> None:
        """A p2p rule for host registry.example.internal leaves ``...internal.evil.net`` direct (and unresolved)."""
        daemon = await self.start_dfdaemon(
            registry=None, proxies=(ProxyRule(re.compile(BLOB_PATTERN), "p2p", HostPattern.parse(REGISTRY)),))
        proxy = ProxyAgent(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), reactor, pool=self.pool)
        response, body = await self.get(f"http://{EVIL}/v2/app/blobs/sha256:{'a' * 64}", agent=proxy)
        self.assertEqual(response.code, 502, body)
        self.assertEqual(daemon.engine.requests, [])
        self.assertEqual(self.names.asked, [EVIL])

    async def test_constrained_ca_does_not_sign_for_a_host_a_pattern_rule_matches(self) -> None:
        """A loose regex rule matches the evil host, but the CA made for the registry only tunnels it."""
        daemon = await self.start_dfdaemon(hijack_hosts=(HijackRule(re.compile(r"registry\.example\.internal.*")),),
                                           **self.ca_files(hosts=[REGISTRY]))
        status, _, _ = await self.closed_answer(await self.connect(daemon.port, f"{EVIL}:443".encode()))
        self.assertTrue(status.startswith(b"HTTP/1.1 502 "), status)
        self.assertTrue([line for line in self.lines if "name constraints do not permit" in line], self.lines)
        self.assertRaises(KeyError, lambda: self.ca._leaves[EVIL])


class LeafTests(AttackTestCase):
    async def test_sni_naming_another_host_gets_the_connect_hosts_certificate(self) -> None:
        """CONNECT registry:443, then SNI and Host for bank.example: no certificate for bank.example, ever."""
        daemon = await self.start_dfdaemon(hijack_hosts=(HijackRule(re.compile(r"registry\.example\.internal")),),
                                           **self.ca_files())
        client = await self.connect(daemon.port, f"{REGISTRY}:443".encode())
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.received = b""
        # Verifies nothing, so the test sees whatever certificate dfdaemon offers for that name.
        client.transport.startTLS(upstream_policy(None, True).creatorForNetloc(b"bank.example", 443))
        client.transport.write(b"GET / HTTP/1.1\r\nHost: bank.example\r\nConnection: close\r\n\r\n")
        await client.closed
        certificate = client.transport.getPeerCertificate().to_cryptography()
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), [REGISTRY])
        self.assertIn(f"cannot reach https://{REGISTRY}/".encode(), client.received)  # the Host header moved nothing
        self.assertEqual(self.names.asked, [REGISTRY])

    def test_generated_ca_is_name_constrained(self) -> None:
        """``dfdaemon gen-ca --host registry`` makes a CA that neither clients nor dfdaemon accept for other hosts."""
        directory = self.mktemp()
        self.patch(sys, "stdout", io.StringIO())
        self.patch(sys, "stderr", io.StringIO())
        error = self.assertRaises(SystemExit, dfdaemon_main, ["gen-ca", "--dir", directory, "--host", REGISTRY])
        self.assertEqual(error.code, 0, sys.stderr.getvalue())  # type: ignore[attr-defined]
        ca = CertificateAuthority.load(os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key"))
        extension = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
        self.assertTrue(extension.critical)
        self.assertEqual(extension.value.permitted_subtrees, [x509.DNSName(REGISTRY)])
        ca.leaf_for(REGISTRY)
        self.assertRaises(ValueError, ca.leaf_for, EVIL)
        self.assertRaises(ValueError, ca.leaf_for, "127.0.0.1")
