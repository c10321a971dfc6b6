"""The certificate authority behind dfdaemon's HTTPS interception, and the upstream TLS policy.

In proxy mode a client asks ``CONNECT registry.example:443``.  For hosts that
match a hijack rule dfdaemon terminates that TLS connection itself, so the
blob GETs inside can go peer-to-peer.  The client accepts this only because
the server certificate chains to a CA it was told to trust: the operator makes
one with ``dfdaemon gen-ca`` and installs ``ca.crt`` on the clients, and
dfdaemon mints a short-lived leaf certificate per host name on demand
(`CertificateAuthority`).  The other direction, dfdaemon to the real registry,
verifies the registry like a browser would (`upstream_policy`).

Everything runs on the reactor thread: minting an EC P-256 leaf takes about a
millisecond, and each leaf is cached, so no thread pool is involved.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
from collections import OrderedDict
from datetime import datetime, timedelta, timezone

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
_DNS_NAME = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*")


def generate_ca(directory: str, common_name: str = "dfly dfdaemon CA", force: bool = False) -> tuple[str, str]:
    """Create ``ca.crt`` (0644) and ``ca.key`` (0600) in *directory*; return their paths.

    The key is EC P-256 and the certificate is valid for about ten years.
    Existing files are kept unless *force*, because replacing the CA breaks
    every client that was told to trust the old one (FileExistsError).  The
    directory is created with mode 0700 when it does not exist.
    """
    if not common_name or len(common_name) > 64:
        raise ValueError(f"the CA name must be 1 to 64 characters, not {len(common_name)}")
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
    certificate = (
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
        .sign(key, hashes.SHA256())
    )
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

    def leaf_for(self, host: str) -> ssl.PrivateCertificate:
        """The certificate (with its key) that dfdaemon presents as *host*.

        *host* is a DNS name or an IP literal (which gets an IP SAN).  Leaves
        are cached per host; one near its expiry is replaced.  ValueError for
        a name no certificate can carry.
        """
        return self._leaf(host).certificate

    def server_creator(self, default_host: str) -> IOpenSSLServerConnectionCreator:
        """Server-side TLS for one intercepted connection.

        The leaf is chosen during the handshake from the name the client
        sends (SNI); clients send none for IP literals, so *default_host*,
        normally the CONNECT target, is used then.
        """
        self._leaf(default_host)  # a bad name fails here, not in the handshake
        return _ServerNameCreator(self, default_host)

    def _leaf(self, host: str) -> _Leaf:
        name = _normalize_host(host)
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
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)] if len(name) <= 64 else [])
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
        # pyOpenSSL's callback rather than Twisted's contextForServerName,
        # which Twisted 23.10 (our floor) does not have.
        context.set_tlsext_servername_callback(self._on_server_name)
        log.debug("minted a certificate for {host}", host=name)
        return _Leaf(private_certificate, context, not_after)

    def _on_server_name(self, connection: SSL.Connection) -> None:
        """During the handshake: switch to the leaf for the name the client sent."""
        server_name = connection.get_servername()
        if not server_name:
            return  # keep the default host's leaf
        try:
            leaf = self._leaf(server_name.decode("ascii"))
        except ValueError:
            # Keep the default leaf: the client's own verification decides.
            log.info("TLS client sent an unusable server name {name!r}", name=server_name)
            return
        connection.set_context(leaf.context)

    def _now(self) -> datetime:
        if self._clock is None:
            return datetime.now(timezone.utc)
        return datetime.fromtimestamp(self._clock.seconds(), timezone.utc)


@implementer(IOpenSSLServerConnectionCreator)
class _ServerNameCreator:
    """Starts every connection on *default_host*'s leaf; the SNI callback may switch it."""

    def __init__(self, authority: CertificateAuthority, default_host: str) -> None:
        self._authority = authority
        self._default_host = default_host

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._authority._leaf(self._default_host).context, None)


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


def _normalize_host(host: str) -> str:
    """The name as it goes into a certificate (and the cache key): lower case, A-labels, no brackets."""
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a valid host name: {host!r}") from None
    if len(name) > 253 or not _DNS_NAME.fullmatch(name):
        raise ValueError(f"not a valid host name: {host!r}")
    return name
