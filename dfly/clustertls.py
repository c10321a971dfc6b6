"""TLS for the supernode's ports: its certificate and key, read once and checked at start-up.

``tlsCert`` (PEM: the supernode's certificate first, then any intermediate
certificates, which are served with it) and ``tlsKey`` (an unencrypted PEM
key) in ``supernode.yml`` turn the API and the CDN port into TLS ports.
`server_tls` reads them and fails with a one-line ValueError for a file
that cannot be read, is not PEM, or whose key does not belong to the
certificate, so a bad pair stops the start instead of the first handshake.
Clients verify against ``clusterCa`` (`dfly.httpclient.upstream_policy`),
which must have signed the certificate, and check that the certificate
names what they dial: Twisted (with service-identity) checks a DNS name
against the DNS SANs and an IP literal against the IP SANs.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.internet.defer import Deferred
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the TLS {what} {path}: {e.strerror}") from None


def server_tls(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """Server-side TLS options for ``cert_path`` (with its chain) and ``key_path``; ValueError with the reason."""
    cert_pem, key_pem = _read(cert_path, "certificate"), _read(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ValueError(f"{cert_path} holds no PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ValueError(f"{key_path} is encrypted; the supernode needs an unencrypted key") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{key_path} is not a PEM private key") from None
    leaf, *intermediates = [crypto.X509.from_cryptography(c) for c in chain]
    options = ssl.CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=leaf,
        extraCertChain=intermediates,
    )
    try:
        options.getContext()  # checks that the key is the certificate's
    except SSL.Error:
        raise ValueError(f"the key {key_path} does not belong to the certificate {cert_path}") from None
    return options


@implementer(IStreamServerEndpoint)
class TLSServerEndpoint:
    """Any stream server endpoint, with TLS on every connection it accepts.

    The factory it is given (a `BoundedSite`) stays the factory tests and
    services see; only the wire is wrapped.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, options: ssl.CertificateOptions) -> None:
        self.endpoint = endpoint
        self.options = options

    def listen(self, factory: IProtocolFactory) -> Deferred[IListeningPort]:
        wrapped: Any = TLSMemoryBIOFactory(self.options, False, factory)
        wrapped.noisy = False
        return self.endpoint.listen(wrapped)
