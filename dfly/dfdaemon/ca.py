"""The certificate authority behind dfdaemon's HTTPS interception, and the upstream TLS policy.

In proxy mode a client asks ``CONNECT registry.example:443``.  For hosts that
match a hijack rule dfdaemon terminates that TLS connection itself, so the
blob GETs inside can go peer-to-peer.  The client accepts this only because
the server certificate chains to a CA it was told to trust: the operator makes
one with ``dfdaemon gen-ca`` and installs ``ca.crt`` on the clients, and
dfdaemon mints a short-lived leaf certificate per host name on demand
(`CertificateAuthority`).  The other direction, dfdaemon to the real registry,
verifies the registry like a browser would (`upstream_policy`).

A CA that clients trust can vouch for any name, so it is kept as narrow as
the hijack rules: ``gen-ca`` writes X.509 name constraints (RFC 5280
4.2.1.10) that permit only the hijacked hosts (`name_constraints`), and
dfdaemon itself mints a leaf only for the host of the CONNECT being served
and only when the CA's constraints permit it.  A TLS client hello naming
another host (SNI) still gets the CONNECT host's leaf, which that client
then refuses: no certificate is ever made for a name the client picked.

Everything runs on the reactor thread: minting an EC P-256 leaf takes about a
millisecond, and each leaf is cached, so no thread pool is involved.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from collections import OrderedDict
from datetime import datetime, timedelta, timezone
from typing import Sequence

import attrs
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.interfaces import (
    IOpenSSLServerConnectionCreator,
    IReactorTime,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from dfly.config import normalize_host

log = Logger(namespace="dfly.dfdaemon")

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
#: The CA outlives many daemon restarts: clients install it by hand.
CA_VALIDITY = timedelta(days=3650)
#: Leaves are cheap to re-mint, so they stay short-lived.
LEAF_VALIDITY = timedelta(days=30)
#: Tolerates clients whose clock is a little behind ours.
LEAF_BACKDATE = timedelta(hours=1)
#: A cached leaf this close to its notAfter is replaced by a fresh one.
LEAF_RENEW_MARGIN = timedelta(days=1)
#: Distinct host names whose leaves are kept; the oldest-used is dropped first.
LEAF_CACHE_SIZE = 256
#: What a hijacked connection speaks.  Naming it matters: Twisted's ALPN
#: callback aborts the handshake (alert 80) when a client offers ALPN and the
#: server names no protocol at all, which is the case after a CONNECT.
ALPN_PROTOCOLS = [b"http/1.1"]

#: Private keys that can sign certificates (what a CA key may be).
SigningKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | dsa.DSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)
#: A DNS subtree no real name is in (RFC 6761 reserves ``.invalid``): permitting
#: only it shuts out every DNS name when the CA is for IP addresses alone.
NO_DNS_NAME = "invalid"
#: Excluding these shuts out every IP address when the CA is for names alone
#: (name constraints restrict only the name types they list).
ALL_IP_ADDRESSES = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def name_constraints(hosts: Sequence[str]) -> x509.NameConstraints:
    """Name constraints that let a CA sign for *hosts* and nothing else.

    Each host is a DNS name, ``*.domain`` or an IP literal.  A DNS subtree
    covers the name and every name under it (RFC 5280: labels may be added on
    the left), so ``registry.example.internal`` also permits
    ``x.registry.example.internal`` and ``*.example.internal`` is written as
    ``example.internal``; an IP literal is a /32 (/128).  A type no host uses
    is shut out entirely.  ValueError for an empty list or a bad name.
    """
    if not hosts:
        raise ValueError("name at least one host the CA may sign for")
    names: list[x509.GeneralName] = []
    addresses: list[x509.GeneralName] = []
    for host in hosts:
        wildcard = host.startswith("*.")
        name = normalize_host(host[2:] if wildcard else host)
        try:
            address = ipaddress.ip_address(name)
        except ValueError:
            names.append(x509.DNSName(name))
            continue
        if wildcard:
            raise ValueError(f"{host!r}: '*.' needs a domain name after it, not an IP address")
        addresses.append(x509.IPAddress(ipaddress.ip_network(address)))
    permitted = list(dict.fromkeys(names or [x509.DNSName(NO_DNS_NAME)])) + list(dict.fromkeys(addresses))
    excluded = None if addresses else [x509.IPAddress(network) for network in ALL_IP_ADDRESSES]
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def generate_ca(directory: str, common_name: str = "dfly dfdaemon CA", force: bool = False,
                hosts: Sequence[str] | None = None) -> tuple[str, str]:
    """Create ``ca.crt`` (0644) and ``ca.key`` (0600) in *directory*; return their paths.

    The key is EC P-256 and the certificate is valid for about ten years.
    With *hosts* (what ``dfdaemon gen-ca --host`` passes) the certificate
    carries critical `name_constraints` for them, so even its own key can
    make no certificate a client accepts for another host; None leaves it
    unconstrained (tests whose origin servers use the CA too).
    Existing files are kept unless *force*, because replacing the CA breaks
    every client that was told to trust the old one (FileExistsError).  The
    directory is created with mode 0700 when it does not exist.
    """
    if not common_name or len(common_name) > 64:
        raise ValueError(f"the CA name must be 1 to 64 characters, not {len(common_name)}")
    constraints = None if hosts is None else name_constraints(hosts)
    cert_path = os.path.join(directory, CA_CERT_FILE)
    key_path = os.path.join(directory, CA_KEY_FILE)
    if not force:
        for path in (cert_path, key_path):
            if os.path.lexists(path):
                raise FileExistsError(f"{path} already exists (not replaced without force)")
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700)
        os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if constraints is not None:
        # Critical, as RFC 5280 requires: a client that cannot apply them must refuse the CA.
        builder = builder.add_extension(constraints, critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomically(key_path, key_pem, 0o600)
    _write_atomically(cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path, key_path


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    """Write through a temporary file created with *mode*, so the key is never readable by others."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    try:
        os.fchmod(fd, mode)  # exact, whatever the umask says
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@attrs.frozen
class _Leaf:
    certificate: ssl.PrivateCertificate
    context: SSL.Context
    not_after: datetime


class CertificateAuthority:
    """Mints and caches leaf certificates, signed by one CA, for the hosts dfdaemon intercepts.

    *clock* gives the time that leaf validity is computed from (the wall
    clock when None); tests pass a `Clock`.
    """

    def __init__(
        self,
        certificate: x509.Certificate,
        key: SigningKey,
        *,
        clock: IReactorTime | None = None,
        cache_size: int = LEAF_CACHE_SIZE,
    ) -> None:
        _check_authority(certificate, key)
        self.certificate = certificate
        self._key = key
        self._clock = clock
        if certificate.not_valid_after_utc <= self._now():
            # Every leaf would be born expired; say so at start-up instead.
            raise ValueError(f"the CA certificate expired on {certificate.not_valid_after_utc:%Y-%m-%d}")
        self._cache_size = cache_size
        self._leaves: OrderedDict[str, _Leaf] = OrderedDict()
        try:
            self.constraints: x509.NameConstraints | None = certificate.extensions.get_extension_for_class(
                x509.NameConstraints).value
        except x509.ExtensionNotFound:
            self.constraints = None
        # Lets clients find the issuer among several CAs with the same name.
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            self._authority_key_identifier = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
        except x509.ExtensionNotFound:
            self._authority_key_identifier = x509.AuthorityKeyIdentifier(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest, None, None
            )

    @classmethod
    def load(cls, cert_path: str, key_path: str, *, clock: IReactorTime | None = None) -> CertificateAuthority:
        """Read a CA made by ``dfdaemon gen-ca`` (or any CA cert + unencrypted PEM key).

        Raises ValueError with a one-line reason when a file is missing or
        unreadable, is not PEM, the key does not belong to the certificate,
        or the certificate is not a CA or has expired.
        """
        cert_pem = _read(cert_path, "CA certificate")
        key_pem = _read(key_path, "CA key")
        try:
            certificate = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise ValueError(f"{cert_path} is not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except TypeError:
            raise ValueError(f"{key_path} is encrypted; dfdaemon needs an unencrypted key") from None
        except (ValueError, UnsupportedAlgorithm):
            raise ValueError(f"{key_path} is not a PEM private key") from None
        if not isinstance(key, SigningKey):
            raise ValueError(f"{key_path} holds a {type(key).__name__}, which cannot sign certificates")
        try:
            return cls(certificate, key, clock=clock)
        except ValueError as e:
            raise ValueError(f"{cert_path}: {e}") from None

    def permits(self, host: str) -> bool:
        """Whether the CA's name constraints let it sign for *host* (always, for a CA without them).

        The same reading as OpenSSL's and Go's: within each name type that
        the constraints list, a name must be inside a permitted subtree (if
        any is listed) and inside no excluded one.  A DNS subtree holds its
        name and every name under it; ``.domain`` only the names under it.
        """
        if self.constraints is None:
            return True
        name = normalize_host(host)
        try:
            address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(name)
        except ValueError:
            address = None

        def inside(subtree: x509.GeneralName) -> bool | None:
            """None when *subtree* is of another type than the name."""
            if address is None and isinstance(subtree, x509.DNSName):
                return _dns_within(name, subtree.value.lower())
            if address is not None and isinstance(subtree, x509.IPAddress):
                network = subtree.value
                return isinstance(network, (ipaddress.IPv4Network, ipaddress.IPv6Network)) and address in network
            return None

        permitted = [inside(subtree) for subtree in self.constraints.permitted_subtrees or ()]
        excluded = [inside(subtree) for subtree in self.constraints.excluded_subtrees or ()]
        same_type = [match for match in permitted if match is not None]
        return (not same_type or any(same_type)) and not any(excluded)

    def leaf_for(self, host: str) -> ssl.PrivateCertificate:
        """The certificate (with its key) that dfdaemon presents as *host*.

        *host* is a DNS name or an IP literal (which gets an IP SAN).  Leaves
        are cached per host; one near its expiry is replaced.  ValueError for
        a name no certificate can carry, or that the CA's name constraints
        do not permit.
        """
        return self._leaf(host).certificate

    def server_creator(self, host: str) -> IOpenSSLServerConnectionCreator:
        """Server-side TLS for one intercepted connection: *host*'s leaf, whatever the client asks for.

        *host* is the CONNECT target, the one host whose requests this
        connection carries.  A server name (SNI) naming another host is
        logged and changes nothing: that client's own check then refuses the
        certificate.  ValueError (from `leaf_for`) before any handshake.
        """
        self._leaf(host)  # a bad or unpermitted name fails here, not in the handshake
        return _ConnectHostCreator(self, host)

    def _leaf(self, host: str) -> _Leaf:
        name = normalize_host(host)
        if not self.permits(name):
            raise ValueError(f"the CA's name constraints do not permit {name!r} "
                             "(make a CA for it: dfdaemon gen-ca --host NAME)")
        now = self._now()
        leaf = self._leaves.get(name)
        if leaf is not None and leaf.not_after - now > LEAF_RENEW_MARGIN:
            self._leaves.move_to_end(name)
            return leaf
        leaf = self._mint(name, now)
        self._leaves[name] = leaf
        self._leaves.move_to_end(name)
        while len(self._leaves) > self._cache_size:
            self._leaves.popitem(last=False)
        return leaf

    def _mint(self, name: str, now: datetime) -> _Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        # A CN longer than 64 characters is invalid; the SAN is what clients check anyway.
        # An IP leaf has none: OpenSSL would check a CN like "127.0.0.1" against
        # the CA's DNS name constraints, and fail it.
        named = isinstance(san, x509.DNSName) and len(name) <= 64
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if named else [])
        not_after = min(now + LEAF_VALIDITY, self.certificate.not_valid_after_utc)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - LEAF_BACKDATE)
            .not_valid_after(not_after)
            # An empty subject requires a critical SAN (RFC 5280 4.2.1.6).
            .add_extension(x509.SubjectAlternativeName([san]), critical=not subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(self._authority_key_identifier, critical=False)
            .sign(self._key, _signature_hash(self._key))
        )
        pem = certificate.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        private_certificate = ssl.PrivateCertificate.loadPEM(pem)
        context = ssl.CertificateOptions(
            privateKey=private_certificate.privateKey.original,
            certificate=private_certificate.original,
            acceptableProtocols=ALPN_PROTOCOLS,
        ).getContext()
        # Only to log a mismatch: the leaf never changes with the name a client sends.
        context.set_tlsext_servername_callback(lambda connection: _note_server_name(connection, name))
        log.debug("minted a certificate for {host}", host=name)
        return _Leaf(private_certificate, context, not_after)

    def _now(self) -> datetime:
        if self._clock is None:
            return datetime.now(timezone.utc)
        return datetime.fromtimestamp(self._clock.seconds(), timezone.utc)


def _note_server_name(connection: SSL.Connection, host: str) -> None:
    """During the handshake: log a server name (SNI) that is not the CONNECT host; the leaf stays."""
    server_name = connection.get_servername()
    if not server_name:
        return  # clients send none for IP literals
    try:
        same = normalize_host(server_name.decode("ascii")) == host
    except (UnicodeDecodeError, ValueError):
        same = False
    if not same:
        log.info("TLS client inside CONNECT {host} asked for {name!r}: it gets {host}'s certificate only",
                 host=host, name=server_name)


def _dns_within(name: str, subtree: str) -> bool:
    """RFC 5280 DNS subtrees as OpenSSL and Go read them: ``""`` holds all, ``.d`` names under d, ``d`` also d."""
    if not subtree:
        return True
    if subtree.startswith("."):
        return name.endswith(subtree)
    return name == subtree or name.endswith("." + subtree)


@implementer(IOpenSSLServerConnectionCreator)
class _ConnectHostCreator:
    """Every connection gets *host*'s leaf (looked up per connection: a cached leaf may have been renewed)."""

    def __init__(self, authority: CertificateAuthority, host: str) -> None:
        self._authority = authority
        self._host = host

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._authority._leaf(self._host).context, None)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None


def _check_authority(certificate: x509.Certificate, key: SigningKey) -> None:
    """ValueError unless *key* belongs to *certificate* and the certificate may sign others."""
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ValueError("the key does not belong to this certificate")
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise ValueError("not a CA certificate (no BasicConstraints CA:TRUE)")
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return
    if not usage.key_cert_sign:
        raise ValueError("the CA certificate's KeyUsage does not allow keyCertSign")


def _signature_hash(key: SigningKey) -> hashes.SHA256 | None:
    # Ed25519/Ed448 sign the message itself; the others sign a SHA-256 digest.
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        return None
    return hashes.SHA256()
