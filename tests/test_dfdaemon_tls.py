"""dfdaemon's TLS parts: the interception CA, CONNECT tunnels and hijacking, the upstream policy, ``gen-ca``.

The certificate tests are synchronous.  The handshake and CONNECT tests use
the real reactor with real sockets on 127.0.0.1 (port 0): a proxy `Site`
whose `Request.process` hands CONNECTs to the test, raw TCP clients that
speak HTTP/1.1 by hand, and Twisted TLS clients that trust (or not) the CA.
Every connection is closed, and waited for, before a test ends.
"""

from __future__ import annotations

import io
import ipaddress
import os
import stat
import sys
from datetime import timedelta
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from OpenSSL import crypto
from twisted.internet import reactor as _reactor
from twisted.internet import ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.static import Data
from zope.interface import implementer
from zope.interface.verify import verifyObject

import dfly
from dfly.dfdaemon.ca import CertificateAuthority, generate_ca
from dfly.httpclient import upstream_policy
from dfly.dfdaemon.cli import main
from dfly.dfdaemon.tunnel import open_tunnel, parse_connect_target, take_over, tunnel_pair
from tests.loopback import ClosingFactory, RawClient

reactor: Any = _reactor  # Twisted's stubs want a ServerFactory where any IProtocolFactory works
NOW = 1_800_000_000.0
PEM = serialization.Encoding.PEM


def new_ca(test: SynchronousTestCase, clock: Clock | None = None) -> CertificateAuthority:
    return CertificateAuthority.load(*generate_ca(test.mktemp()), clock=clock)


def clock_at(when: float) -> Clock:
    clock = Clock()
    clock.advance(when)
    return clock


def trust(ca: CertificateAuthority) -> Any:
    """A Twisted trust root with only this CA."""
    return ssl.Certificate.loadPEM(ca.certificate.public_bytes(PEM))


def x509_of(leaf: ssl.PrivateCertificate) -> x509.Certificate:
    return leaf.original.to_cryptography()


def san_of(certificate: x509.Certificate) -> list[Any]:
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return names.get_values_for_type(x509.DNSName) + names.get_values_for_type(x509.IPAddress)


# --- generate_ca ---------------------------------------------------------------------


class GenerateCaTests(SynchronousTestCase):
    def test_writes_certificate_0644_and_key_0600_in_a_new_0700_directory(self) -> None:
        """The key is private, the certificate readable, a new directory private."""
        directory = os.path.join(self.mktemp(), "ca")
        cert_path, key_path = generate_ca(directory)
        self.assertEqual((cert_path, key_path), (os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key")))
        self.assertEqual(stat.S_IMODE(os.stat(cert_path).st_mode), 0o644)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(sorted(os.listdir(directory)), ["ca.crt", "ca.key"])

    def test_certificate_is_a_ten_year_p256_ca(self) -> None:
        """CA:true (critical), keyCertSign + cRLSign, EC P-256, about ten years."""
        cert_path, key_path = generate_ca(self.mktemp(), common_name="test CA")
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertTrue(usage.key_cert_sign and usage.crl_sign)
        self.assertIsInstance(key, ec.EllipticCurvePrivateKey)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertEqual(certificate.subject.rfc4514_string(), "CN=test CA")
        lifetime = certificate.not_valid_after_utc - certificate.not_valid_before_utc
        self.assertGreater(lifetime, timedelta(days=3640))

    def test_refuses_to_overwrite(self) -> None:
        """A second run without force raises and leaves the first CA alone."""
        directory = self.mktemp()
        cert_path, _ = generate_ca(directory)
        with open(cert_path, "rb") as f:
            before = f.read()
        e = self.assertRaises(FileExistsError, generate_ca, directory)
        self.assertIn("ca.crt already exists", str(e))
        with open(cert_path, "rb") as f:
            self.assertEqual(f.read(), before)

    def test_force_replaces(self) -> None:
        """force=True writes a new CA over the old one."""
        directory = self.mktemp()
        cert_path, _ = generate_ca(directory)
        with open(cert_path, "rb") as f:
            before = f.read()
        generate_ca(directory, force=True)
        with open(cert_path, "rb") as f:
            self.assertNotEqual(f.read(), before)
        self.assertEqual(sorted(os.listdir(directory)), ["ca.crt", "ca.key"])

    def test_empty_name_is_refused(self) -> None:
        """A CA needs a common name."""
        self.assertRaises(ValueError, generate_ca, self.mktemp(), common_name="")


# --- CertificateAuthority.load ---------------------------------------------------------


class LoadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cert_path, self.key_path = generate_ca(self.mktemp())

    def assert_refused(self, cert_path: str, key_path: str, reason: str) -> None:
        e = self.assertRaises(ValueError, CertificateAuthority.load, cert_path, key_path)
        self.assertIn(reason, str(e))
        self.assertNotIn("\n", str(e))

    def write(self, data: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(data)
        return path

    def test_loads_a_generated_ca(self) -> None:
        """What gen-ca wrote loads."""
        ca = CertificateAuthority.load(self.cert_path, self.key_path)
        self.assertTrue(ca.certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)

    def test_missing_certificate(self) -> None:
        """A missing file is named in the error."""
        self.assert_refused("/nonexistent/ca.crt", self.key_path, "cannot read CA certificate /nonexistent/ca.crt")

    def test_missing_key(self) -> None:
        """So is a missing key."""
        self.assert_refused(self.cert_path, "/nonexistent/ca.key", "cannot read CA key /nonexistent/ca.key")

    def test_certificate_not_pem(self) -> None:
        """Garbage instead of a certificate."""
        self.assert_refused(self.write(b"hello"), self.key_path, "is not a PEM certificate")

    def test_key_not_pem(self) -> None:
        """Garbage instead of a key."""
        self.assert_refused(self.cert_path, self.write(b"hello"), "is not a PEM private key")

    def test_encrypted_key(self) -> None:
        """dfdaemon cannot ask for a pass phrase."""
        with open(self.key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
        )
        self.assert_refused(self.cert_path, self.write(encrypted), "is encrypted")

    def test_key_of_another_ca(self) -> None:
        """A certificate with someone else's key."""
        _, other_key = generate_ca(self.mktemp())
        self.assert_refused(self.cert_path, other_key, "the key does not belong to this certificate")

    def test_expired_ca(self) -> None:
        """A CA past its notAfter would only mint expired leaves."""
        e = self.assertRaises(
            ValueError, CertificateAuthority.load, self.cert_path, self.key_path, clock=clock_at(NOW + 20 * 365 * 86400)
        )
        self.assertIn("the CA certificate expired on", str(e))

    def test_leaf_is_not_a_ca(self) -> None:
        """A server certificate cannot sign others."""
        leaf = CertificateAuthority.load(self.cert_path, self.key_path).leaf_for("registry.test")
        cert = self.write(x509_of(leaf).public_bytes(PEM))
        key = self.write(
            leaf.privateKey.original.to_cryptography_key().private_bytes(
                PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        self.assert_refused(cert, key, "not a CA certificate")


class Text(Resource):
    """The same text at every path."""

    isLeaf = True

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return self.text


# --- leaves --------------------------------------------------------------------------


class LeafTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = clock_at(NOW)
        self.ca = new_ca(self, self.clock)

    def test_leaf_is_signed_by_the_ca_for_the_host(self) -> None:
        """Signature, issuer, SAN, not a CA, serverAuth."""
        leaf = x509_of(self.ca.leaf_for("registry.test"))
        leaf.verify_directly_issued_by(self.ca.certificate)
        self.assertEqual(san_of(leaf), ["registry.test"])
        self.assertFalse(leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertIn(ExtendedKeyUsageOID.SERVER_AUTH, list(usage))

    def test_leaf_is_backdated_an_hour_and_valid_30_days(self) -> None:
        """Validity comes from the injected clock."""
        leaf = x509_of(self.ca.leaf_for("registry.test"))
        self.assertEqual(leaf.not_valid_before_utc.timestamp(), NOW - 3600)
        self.assertEqual(leaf.not_valid_after_utc.timestamp(), NOW + 30 * 86400)

    def test_ip_literal_gets_an_ip_san(self) -> None:
        """IPv4 and (bracketed) IPv6 targets get IP SANs."""
        self.assertEqual(san_of(x509_of(self.ca.leaf_for("127.0.0.1"))), [ipaddress.ip_address("127.0.0.1")])
        self.assertEqual(san_of(x509_of(self.ca.leaf_for("[::1]"))), [ipaddress.ip_address("::1")])

    def test_cache_returns_the_same_leaf(self) -> None:
        """Asking again, in another spelling, gives the cached leaf."""
        first = self.ca.leaf_for("registry.test")
        self.assertIs(self.ca.leaf_for("registry.test"), first)
        self.assertIs(self.ca.leaf_for("Registry.TEST."), first)

    def test_cache_drops_the_least_recently_used(self) -> None:
        """With room for two, using a then c drops b, not a."""
        cert_path, key_path = generate_ca(self.mktemp())
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        with open(cert_path, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        ca = CertificateAuthority(certificate, key, clock=self.clock, cache_size=2)
        a, b = ca.leaf_for("a.test"), ca.leaf_for("b.test")
        ca.leaf_for("a.test")
        ca.leaf_for("c.test")
        self.assertIs(ca.leaf_for("a.test"), a)
        self.assertIsNot(ca.leaf_for("b.test"), b)

    def test_leaf_near_expiry_is_replaced(self) -> None:
        """A day before its notAfter a cached leaf is minted anew."""
        first = self.ca.leaf_for("registry.test")
        self.clock.advance(28 * 86400)
        self.assertIs(self.ca.leaf_for("registry.test"), first)
        self.clock.advance(1.5 * 86400)
        self.assertIsNot(self.ca.leaf_for("registry.test"), first)

    def test_bad_names_are_refused(self) -> None:
        """Names no certificate should carry are a ValueError."""
        for bad in ["", "a..b", "bad name", "x/y", "-a.test"]:
            self.assertRaises(ValueError, self.ca.leaf_for, bad)

    def test_server_creator_provides_the_interface(self) -> None:
        """What TLSMemoryBIOFactory expects of a server creator."""
        verifyObject(IOpenSSLServerConnectionCreator, self.ca.server_creator("registry.test"))


# --- name constraints ------------------------------------------------------------------


def openssl_verifies(ca: CertificateAuthority, leaf: x509.Certificate) -> str:
    """"ok", or why OpenSSL (what Twisted and curl use) refuses *leaf* under *ca* alone."""
    store = crypto.X509Store()
    store.add_cert(crypto.X509.from_cryptography(ca.certificate))
    try:
        crypto.X509StoreContext(store, crypto.X509.from_cryptography(leaf)).verify_certificate()
    except crypto.X509StoreContextError as e:
        return str(e)
    return "ok"


def forged_leaf(ca_dir: str, host: str) -> x509.Certificate:
    """A leaf for *host* signed with the CA's own key, bypassing `CertificateAuthority` (a stolen key)."""
    with open(os.path.join(ca_dir, "ca.key"), "rb") as f:
        ca_key: Any = serialization.load_pem_private_key(f.read(), None)
    with open(os.path.join(ca_dir, "ca.crt"), "rb") as f:
        ca_cert = x509.load_pem_x509_certificate(f.read())
    key = ec.generate_private_key(ec.SECP256R1())
    now = ca_cert.not_valid_before_utc + timedelta(hours=1)  # the CA is backdated a day: valid now
    return (
        x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + timedelta(days=3))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=True)
        .sign(ca_key, hashes.SHA256())
    )


class NameConstraintTests(SynchronousTestCase):
    """``generate_ca(hosts=...)``: a CA that may sign for the hijacked hosts and nothing else."""

    def constrained(self, *hosts: str) -> tuple[str, CertificateAuthority]:
        directory = self.mktemp()
        return directory, CertificateAuthority.load(*generate_ca(directory, hosts=list(hosts)))

    def test_names_are_permitted_and_every_ip_is_excluded(self) -> None:
        """DNS hosts only: permitted DNS subtrees (``*.d`` as ``d``), all IPv4 and IPv6 excluded, critical."""
        _, ca = self.constrained("Registry.Test", "*.mirror.test")
        extension = ca.certificate.extensions.get_extension_for_class(x509.NameConstraints)
        self.assertTrue(extension.critical)
        self.assertEqual(extension.value.permitted_subtrees, [x509.DNSName("registry.test"), x509.DNSName("mirror.test")])
        self.assertEqual(extension.value.excluded_subtrees, [
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")), x509.IPAddress(ipaddress.ip_network("::/0"))])

    def test_ip_hosts_alone_shut_out_every_name(self) -> None:
        """IP hosts only: a /32 each, and DNS permitted only under the reserved ``invalid``."""
        _, ca = self.constrained("127.0.0.1", "::1")
        assert ca.constraints is not None
        self.assertEqual(ca.constraints.permitted_subtrees, [
            x509.DNSName("invalid"), x509.IPAddress(ipaddress.ip_network("127.0.0.1/32")),
            x509.IPAddress(ipaddress.ip_network("::1/128"))])
        self.assertIsNone(ca.constraints.excluded_subtrees)
        self.assertFalse(ca.permits("registry.test"))

    def test_permits_reads_the_constraints(self) -> None:
        """The host and names under it, yes; a longer name that merely starts with it, or an IP, no."""
        _, ca = self.constrained("registry.test")
        self.assertEqual([ca.permits(h) for h in ("registry.test", "a.registry.test", "registry.test.evil.test",
                                                   "xregistry.test", "127.0.0.1")],
                         [True, True, False, False, False])

    def test_no_leaf_outside_the_constraints(self) -> None:
        """The CA refuses to mint a leaf its constraints leave out."""
        _, ca = self.constrained("registry.test")
        error = self.assertRaises(ValueError, ca.leaf_for, "other.test")
        self.assertIn("name constraints do not permit 'other.test'", str(error))
        self.assertRaises(ValueError, ca.server_creator, "other.test")

    def test_openssl_accepts_our_leaves(self) -> None:
        """Minted leaves for a permitted name and a permitted IP verify (an IP leaf has no CN to trip on)."""
        _, ca = self.constrained("registry.test", "127.0.0.1")
        self.assertEqual(openssl_verifies(ca, x509_of(ca.leaf_for("registry.test"))), "ok")
        self.assertEqual(openssl_verifies(ca, x509_of(ca.leaf_for("127.0.0.1"))), "ok")

    def test_openssl_refuses_a_forged_leaf_for_another_host(self) -> None:
        """Even the CA's own key cannot make a leaf for another host that a client accepts."""
        directory, ca = self.constrained("registry.test")
        self.assertEqual(openssl_verifies(ca, forged_leaf(directory, "registry.test")), "ok")
        self.assertIn("permitted subtree violation", openssl_verifies(ca, forged_leaf(directory, "bank.test")))

    def test_bad_hosts_are_refused(self) -> None:
        """No hosts at all, a bad name, or ``*.`` before an IP: ValueError, nothing written."""
        for hosts in ([], ["bad name"], ["*.127.0.0.1"]):
            directory = self.mktemp()
            self.assertRaises(ValueError, generate_ca, directory, hosts=hosts)
            self.assertFalse(os.path.exists(directory))


# --- real handshakes -----------------------------------------------------------------


@implementer(IHandshakeListener)
class TLSProbe(Protocol):
    """Says ``ping`` once the handshake is done, hangs up on the echo; records what it saw."""

    transport: Any

    def __init__(self) -> None:
        self.peer_certificate: x509.Certificate | None = None
        self.negotiated: bytes | None = None
        self.received = b""
        self.reason: Failure | None = None
        self.closed: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.peer_certificate = self.transport.getPeerCertificate().to_cryptography()
        self.negotiated = self.transport.negotiatedProtocol
        self.transport.write(b"ping")

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == b"ping":
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.closed.callback(None)


class Echo(Protocol):
    """Echoes; hangs up on ``quit``; tells the test when its connection is gone."""

    transport: Any

    def __init__(self, lost: list[Deferred[None]]) -> None:
        self.lost: Deferred[None] = Deferred()
        lost.append(self.lost)

    def dataReceived(self, data: bytes) -> None:
        if data.endswith(b"quit"):
            self.transport.loseConnection()
        else:
            self.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback(None)


class ReactorTestCase(TestCase):
    timeout = 10

    def listen(self, factory: Any) -> int:
        """Serve *factory* on a loopback port; close it and its connections at the end."""
        closing = ClosingFactory(factory)
        port = reactor.listenTCP(0, closing, interface="127.0.0.1")
        self.addCleanup(closing.close_all)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def echo_server(self) -> tuple[int, list[Deferred[None]]]:
        lost: list[Deferred[None]] = []
        return self.listen(Factory.forProtocol(lambda: Echo(lost))), lost

    async def handshake(self, port: int, name: str, trusted: CertificateAuthority, **options: Any) -> TLSProbe:
        """A TLS client for *name* that trusts *trusted*, run until its connection is closed."""
        creator = ssl.optionsForClientTLS(name, trustRoot=trust(trusted), **options)
        probe = TLSProbe()
        await connectProtocol(wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", port)), probe)
        await probe.closed
        return probe


class ServerCreatorTests(ReactorTestCase):
    """``server_creator`` behind a TLS echo server: the leaf is the CONNECT host's, whatever SNI says."""

    def setUp(self) -> None:
        self.ca = new_ca(self)

    def tls_echo(self, default_host: str) -> int:
        lost: list[Deferred[None]] = []
        # A plain Factory names no ALPN protocol: the case that broke handshakes (research section 7).
        echo = Factory.forProtocol(lambda: Echo(lost))
        return self.listen(TLSMemoryBIOFactory(self.ca.server_creator(default_host), False, echo))

    async def test_the_connect_host_gets_its_leaf(self) -> None:
        """A client of the CONNECT host verifies and sees that name."""
        port = self.tls_echo("registry.test")
        probe = await self.handshake(port, "registry.test", self.ca)
        self.assertEqual(probe.received, b"ping")
        assert probe.peer_certificate is not None
        self.assertEqual(san_of(probe.peer_certificate), ["registry.test"])

    async def test_another_server_name_gets_no_leaf_of_its_own(self) -> None:
        """SNI for another host: the handshake offers the CONNECT host's leaf, which that client refuses."""
        port = self.tls_echo("registry.test")
        probe = await self.handshake(port, "other.test", self.ca)
        self.assertEqual(probe.received, b"")
        assert probe.reason is not None
        self.assertIn("DNSMismatch", str(probe.reason.value))
        self.assertRaises(KeyError, lambda: self.ca._leaves["other.test"])

    async def test_without_sni_the_default_host_is_used(self) -> None:
        """Clients send no SNI for IP literals: the default (CONNECT) host's leaf verifies."""
        port = self.tls_echo("127.0.0.1")
        probe = await self.handshake(port, "127.0.0.1", self.ca)
        self.assertEqual(probe.received, b"ping")
        assert probe.peer_certificate is not None
        self.assertEqual(san_of(probe.peer_certificate), [ipaddress.ip_address("127.0.0.1")])

    async def test_client_that_does_not_trust_the_ca_fails(self) -> None:
        """Another CA's clients refuse the handshake."""
        port = self.tls_echo("a.test")
        probe = await self.handshake(port, "a.test", new_ca(self))
        self.assertIsNone(probe.peer_certificate)
        self.assertEqual(probe.received, b"")
        assert probe.reason is not None
        self.assertIn("certificate verify failed", str(probe.reason.value))

    async def test_alpn_offering_client_gets_http_1_1(self) -> None:
        """A client offering h2 and http/1.1 (like curl) completes the handshake on http/1.1."""
        port = self.tls_echo("a.test")
        probe = await self.handshake(port, "a.test", self.ca, acceptableProtocols=[b"h2", b"http/1.1"])
        self.assertEqual(probe.received, b"ping")
        self.assertEqual(probe.negotiated, b"http/1.1")


# --- CONNECT ---------------------------------------------------------------------------


class ConnectRequest(server.Request):
    """Hands CONNECT to the site's ``on_connect``; anything else is served by the resources."""

    def process(self) -> None:
        if self.method == b"CONNECT":
            self.channel.site.on_connect(self)  # type: ignore[attr-defined]
        else:
            super().process()


class ProxySite(server.Site):
    requestFactory = ConnectRequest

    def __init__(self, on_connect: Callable[[server.Request], object]) -> None:
        super().__init__(Text(b"proxy root"))
        self.on_connect = on_connect


ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


class TunnelTests(ReactorTestCase):
    """open_tunnel behind a real twisted.web Site."""

    def setUp(self) -> None:
        self.tunnels: list[Deferred[None]] = []

        def on_connect(request: server.Request) -> None:
            host, port = parse_connect_target(request.uri)
            self.tunnels.append(open_tunnel(request, reactor, host, port, timeout=5))

        self.proxy_port = self.listen(ProxySite(on_connect))

    async def client(self) -> RawClient:
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        return client

    async def test_bytes_flow_both_ways(self) -> None:
        """200, then what the client sends comes back from the echo server through the tunnel."""
        echo_port, _ = self.echo_server()
        client = await self.client()
        client.transport.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (echo_port, echo_port))
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.transport.write(b"hello")
        self.assertEqual(await client.until(b"hello"), ESTABLISHED + b"hello")
        client.transport.loseConnection()
        await client.closed

    async def test_bytes_sent_with_the_connect_are_not_lost(self) -> None:
        """Bytes behind the CONNECT head, in the same packet, go through once the tunnel is up."""
        echo_port, _ = self.echo_server()
        client = await self.client()
        client.transport.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\nearly" % echo_port)
        self.assertEqual(await client.until(b"early"), ESTABLISHED + b"early")
        client.transport.loseConnection()
        await client.closed

    async def test_a_large_stream_arrives_intact(self) -> None:
        """8 MiB each way, enough to make the transports pause each other."""
        echo_port, _ = self.echo_server()
        client = await self.client()
        client.transport.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % echo_port)
        await client.until(b"\r\n\r\n")
        payload = bytes(range(256)) * (32 * 1024) + b"END"
        client.transport.write(payload)
        received = await client.until(b"END")
        self.assertEqual(received[len(ESTABLISHED):], payload)
        client.transport.loseConnection()
        await client.closed

    async def test_client_closing_closes_the_target_connection(self) -> None:
        """When the client hangs up, the tunnel's connection to the target goes too."""
        echo_port, lost = self.echo_server()
        client = await self.client()
        client.transport.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % echo_port)
        await client.until(b"\r\n\r\n")
        client.transport.loseConnection()
        await lost[0]
        await client.closed

    async def test_target_closing_closes_the_client_connection(self) -> None:
        """When the target hangs up, the client's connection is closed after the last bytes."""
        echo_port, lost = self.echo_server()
        client = await self.client()
        client.transport.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % echo_port)
        await client.until(b"\r\n\r\n")
        client.transport.write(b"last")
        await client.until(b"last")
        client.transport.write(b"quit")
        await client.closed
        await lost[0]

    async def test_unreachable_target_is_502_and_the_connection_stays_http(self) -> None:
        """A refused connection is a 502 with the reason; the next request on the connection works."""
        closed_port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = closed_port.getHost().port
        await closed_port.stopListening()
        client = await self.client()
        client.transport.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % number)
        head, _, body = (await client.until(b"refused\n")).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 502 "), head)
        self.assertEqual(body, b"dfdaemon: cannot connect to 127.0.0.1:%d: connection refused\n" % number)
        await self.tunnels[0]
        client.received = b""
        client.transport.write(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n")
        self.assertTrue((await client.until(b"proxy root")).endswith(b"proxy root"))
        client.transport.loseConnection()
        await client.closed

    def test_tunnel_ends_pause_each_other(self) -> None:
        """Flow control: each end's transport is the other's streaming producer; a close closes both."""
        client_end, server_end = tunnel_pair(Clock(), 300.0)
        upstream, downstream = StringTransport(), StringTransport()
        server_end.makeConnection(upstream)
        client_end.makeConnection(downstream)
        self.assertIs(upstream.producer, downstream)
        self.assertIs(downstream.producer, upstream)
        self.assertTrue(upstream.streaming and downstream.streaming)
        client_end.dataReceived(b"up")
        server_end.dataReceived(b"down")
        self.assertEqual((upstream.value(), downstream.value()), (b"up", b"down"))
        client_end.connectionLost(Failure(ConnectionError()))
        self.assertTrue(upstream.disconnecting)
        self.assertIsNone(upstream.producer)


class TakeOverTests(ReactorTestCase):
    """take_over without TLS, straight from ``process()``: the proxy itself echoes."""

    def setUp(self) -> None:
        self.lost: list[Deferred[None]] = []
        self.proxy_port = self.listen(ProxySite(lambda request: take_over(request, Echo(self.lost))))

    async def test_bytes_behind_the_connect_head_reach_the_new_protocol(self) -> None:
        """What arrived in the same read as the CONNECT is replayed, after the 200."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        client.transport.write(b"CONNECT echo.test:7 HTTP/1.1\r\nHost: echo.test:7\r\n\r\nearly")
        self.assertEqual(await client.until(b"early"), ESTABLISHED + b"early")
        client.transport.write(b"late")
        self.assertEqual(await client.until(b"late"), ESTABLISHED + b"earlylate")
        client.transport.write(b"quit")
        await client.closed
        await self.lost[0]


class HijackTests(ReactorTestCase):
    """take_over with TLS: the proxy terminates the client's TLS and serves a Site inside."""

    def setUp(self) -> None:
        self.ca = new_ca(self)
        inner = Resource()
        inner.putChild(b"v2", Data(b"inside", "text/plain"))

        def on_connect(request: server.Request) -> None:
            host, _ = parse_connect_target(request.uri)
            take_over(request, server.Site(inner).buildProtocol(None), self.ca.server_creator(host))

        self.proxy_port = self.listen(ProxySite(on_connect))

    async def get_through_proxy(self, name: str, trusted: CertificateAuthority) -> tuple[RawClient, bytes]:
        """CONNECT name:443, TLS as a client of *name*, GET /v2 with Connection: close; all bytes after TLS."""
        client = RawClient()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.proxy_port), client)
        client.transport.write(b"CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n\r\n" % (name.encode(), name.encode()))
        self.assertEqual(await client.until(b"\r\n\r\n"), ESTABLISHED)
        client.received = b""
        client.transport.startTLS(ssl.optionsForClientTLS(name, trustRoot=trust(trusted)))
        client.transport.write(b"GET /v2 HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % name.encode())
        await client.closed
        return client, client.received

    async def test_client_trusting_the_ca_gets_the_inner_resource(self) -> None:
        """The decrypted request reaches the inner Site; its response comes back over TLS."""
        client, received = await self.get_through_proxy("registry.test", self.ca)
        self.assertTrue(received.startswith(b"HTTP/1.1 200 OK\r\n"), received)
        self.assertTrue(received.endswith(b"\r\n\r\ninside"), received)
        certificate = client.transport.getPeerCertificate().to_cryptography()
        self.assertEqual(san_of(certificate), ["registry.test"])

    async def test_client_not_trusting_the_ca_gets_nothing(self) -> None:
        """Without the CA the client's TLS fails before any request is sent."""
        _, received = await self.get_through_proxy("registry.test", new_ca(self))
        self.assertEqual(received, b"")


class ParseConnectTargetTests(SynchronousTestCase):
    def test_host_and_port(self) -> None:
        """Names are lower-cased; IPv4 stays as it is."""
        self.assertEqual(parse_connect_target(b"Registry.Test:443"), ("registry.test", 443))
        self.assertEqual(parse_connect_target(b"127.0.0.1:5000"), ("127.0.0.1", 5000))

    def test_bracketed_ipv6(self) -> None:
        """Brackets are removed; the address is in its short form."""
        self.assertEqual(parse_connect_target(b"[::1]:8443"), ("::1", 8443))
        self.assertEqual(parse_connect_target(b"[2001:db8:0::1]:443"), ("2001:db8::1", 443))

    def test_malformed_targets(self) -> None:
        """Anything but host:port is a ValueError."""
        for bad in [
            b"registry.test", b"registry.test:", b":443", b"registry.test:0", b"registry.test:65536",
            b"registry.test:https", b"http://registry.test:443", b"user@registry.test:443",
            b"/v2/:443", b"[::1]", b"::1:443", b"[zz::1]:443", b"a b:443", b"r\xc3\xa9gistry.test:443",
        ]:
            self.assertRaises(ValueError, parse_connect_target, bad)


# --- the upstream policy ------------------------------------------------------------------


class UpstreamPolicyTests(ReactorTestCase):
    """An Agent with ``upstream_policy`` against an HTTPS server whose certificate our CA signed."""

    def setUp(self) -> None:
        self.ca = new_ca(self)
        self.bundle = self.mktemp()
        with open(self.bundle, "wb") as f:
            f.write(new_ca(self).certificate.public_bytes(PEM) + self.ca.certificate.public_bytes(PEM))
        site = server.Site(Text(b"origin"))
        self.port = self.listen(TLSMemoryBIOFactory(self.ca.server_creator("127.0.0.1"), False, site))

    async def get(self, policy: IPolicyForHTTPS) -> bytes:
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        response = await Agent(reactor, contextFactory=policy, pool=pool).request(
            b"GET", b"https://127.0.0.1:%d/" % self.port
        )
        return await readBody(response)

    async def test_bundle_trusts_a_private_ca(self) -> None:
        """Any certificate in the bundle is a trust root (here the second)."""
        self.assertEqual(await self.get(upstream_policy(self.bundle, False)), b"origin")

    async def test_system_trust_refuses_a_private_ca(self) -> None:
        """The default policy does not know our CA."""
        with self.assertRaises(Exception) as caught:
            await self.get(upstream_policy(None, False))
        self.assertIn("certificate verify failed", repr(caught.exception))

    async def test_insecure_accepts_any_certificate(self) -> None:
        """insecure skips verification (labs and tests only)."""
        self.assertEqual(await self.get(upstream_policy(None, True)), b"origin")

    def test_unreadable_or_empty_bundle(self) -> None:
        """A bundle that cannot be used is a one-line ValueError."""
        e = self.assertRaises(ValueError, upstream_policy, "/nonexistent/bundle.pem", False)
        self.assertIn("cannot read CA bundle /nonexistent/bundle.pem", str(e))
        empty = self.mktemp()
        with open(empty, "wb") as f:
            f.write(b"no certificates here\n")
        e = self.assertRaises(ValueError, upstream_policy, empty, False)
        self.assertIn("holds no PEM certificate", str(e))


# --- dfdaemon gen-ca -----------------------------------------------------------------------


class GenCaCommandTests(SynchronousTestCase):
    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        e = self.assertRaises(SystemExit, main, list(argv))
        assert isinstance(e.code, int)
        return e.code, out.getvalue(), err.getvalue()

    def test_gen_ca_prints_paths_and_how_to_use_them(self) -> None:
        """Exit 0; the two paths, then the dfdaemon.yml keys and the client side."""
        directory = os.path.abspath(self.mktemp())
        code, out, err = self.run_main("gen-ca", "--dir", directory, "--name", "lab CA", "--host", "registry.test")
        self.assertEqual((code, err), (0, ""))
        cert_path, key_path = os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key")
        lines = out.splitlines()
        self.assertEqual(lines[:3], [f"CA certificate: {cert_path}", f"CA private key: {key_path}",
                                     "It may sign for: registry.test"])
        self.assertIn(f"hijackHttps: {{cert: {cert_path}, key: {key_path}}}", lines[3])
        self.assertIn("--src-cert-dir", lines[3])
        self.assertEqual(len(lines), 4)
        CertificateAuthority.load(cert_path, key_path)

    def test_existing_ca_is_an_error_unless_forced(self) -> None:
        """Exit 2 with one line on stderr; --force replaces."""
        directory = self.mktemp()
        self.assertEqual(self.run_main("gen-ca", "--dir", directory, "--host", "registry.test")[0], 0)
        code, out, err = self.run_main("gen-ca", "--dir", directory, "--host", "registry.test")
        self.assertEqual((code, out), (2, ""))
        self.assertTrue(err.startswith("dfdaemon: error: "), err)
        self.assertIn("--force", err)
        self.assertEqual(err.count("\n"), 1)
        self.assertEqual(self.run_main("gen-ca", "--dir", directory, "--host", "registry.test", "--force")[0], 0)

    def test_default_directory_is_under_the_home(self) -> None:
        """Without --dir the CA goes to ~/.small-dragonfly/dfdaemon/ca."""
        home = os.path.abspath(self.mktemp())
        previous = os.environ["HOME"]
        os.environ["HOME"] = home
        self.addCleanup(os.environ.__setitem__, "HOME", previous)
        code, out, _ = self.run_main("gen-ca", "--host", "registry.test")
        self.assertEqual(code, 0)
        self.assertIn(os.path.join(home, ".small-dragonfly", "dfdaemon", "ca", "ca.crt"), out)

    def test_hosts_are_required(self) -> None:
        """A CA for no named host would be a CA for every host: exit 2, saying how to name them."""
        code, out, err = self.run_main("gen-ca", "--dir", self.mktemp())
        self.assertEqual((code, out), (2, ""))
        self.assertIn("--host NAME", err)

    def test_config_gives_the_hijack_hosts(self) -> None:
        """--config: the hijackHttps rules' hosts (host: and literal regexes) become the name constraints."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write("hijackHttps:\n  cert: c\n  key: k\n  hosts:\n"
                    "    - {regex: '^registry\\.test$'}\n    - {host: '*.mirror.test'}\n")
        directory = self.mktemp()
        code, out, err = self.run_main("gen-ca", "--dir", directory, "--config", config, "--host", "127.0.0.1")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("It may sign for: 127.0.0.1, registry.test, *.mirror.test", out)
        ca = CertificateAuthority.load(os.path.join(directory, "ca.crt"), os.path.join(directory, "ca.key"))
        assert ca.constraints is not None
        self.assertEqual(ca.constraints.permitted_subtrees, [
            x509.DNSName("registry.test"), x509.DNSName("mirror.test"),
            x509.IPAddress(ipaddress.ip_network("127.0.0.1/32"))])

    def test_config_with_a_pattern_rule_is_refused(self) -> None:
        """A regex that names no single host cannot become a name constraint: exit 2, pointing at host:."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write("hijackHttps: {cert: c, key: k, hosts: [{regex: '.*\\.test'}]}\n")
        code, _, err = self.run_main("gen-ca", "--dir", self.mktemp(), "--config", config)
        self.assertEqual(code, 2)
        self.assertIn("is a pattern, not a host", err)

    def test_no_command_is_a_usage_error(self) -> None:
        """Plain ``dfdaemon`` points at twistd for the daemon."""
        code, _, err = self.run_main()
        self.assertEqual(code, 2)
        self.assertIn("twistd -n dfdaemon", err)

    def test_help_explains_twistd(self) -> None:
        """--help says where the daemon is."""
        code, out, _ = self.run_main("--help")
        self.assertEqual(code, 0)
        self.assertIn("twistd -n dfdaemon", out)

    def test_version(self) -> None:
        """--version prints dfget-style version line."""
        self.assertEqual(self.run_main("--version")[:2], (0, f"dfdaemon version:{dfly.__version__}\n"))


class SupernodeTrustTests(SynchronousTestCase):
    """``twistd supernode --ca-bundle`` / ``caBundle``: the roots its source fetches trust."""

    def options(self, *args: str) -> Any:
        from dfly.supernode.tap import Options as SupernodeOptions

        opts = SupernodeOptions()
        opts.parseOptions(list(args))
        return opts["config_obj"]

    def test_flag_sets_the_bundle(self) -> None:
        """A readable bundle is kept in the config (and used for the fetches' TLS policy)."""
        directory = self.mktemp()
        cert, _ = generate_ca(directory)
        self.assertEqual(self.options("--ca-bundle", cert).ca_bundle, cert)

    def test_unreadable_bundle_stops_the_start(self) -> None:
        """A bundle that cannot be read is a one-line usage error naming it."""
        from twisted.python import usage

        error = self.assertRaises(usage.UsageError, self.options, "--ca-bundle", "/nonexistent/ca.pem")
        self.assertIn("/nonexistent/ca.pem", str(error))
