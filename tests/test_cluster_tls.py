"""TLS on the supernode's ports (``tlsCert``/``tlsKey``) and peers that verify it (``clusterCa``), end to end.

A private PKI made for each test: a root CA, an intermediate it signed, and
the supernode's certificate (SAN IP 127.0.0.1) signed by the intermediate;
the certificate file holds the leaf and the intermediate (a chain), the
peers trust the root alone.  A real supernode (`build_service`) with a
cluster token and TLS, real peer daemons with ``clusterCa`` and the token,
a loopback origin; the bytes at ``-o`` are checked by sha256.  A peer that
trusts another CA fails with a reason that says TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from dfly import codes
from dfly.clustertls import server_tls
from dfly.config import load_supernode_config
from dfly.httpclient import upstream_policy
from dfly.supernode.tasks import CDN
from tests.test_p2p import SETTLE, P2PTestCase

TOKEN = "cluster-token-for-tls-tests"
PEM = serialization.Encoding.PEM


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool,
                 sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject)).issuer_name(_name(issuer))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans or []), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _key() -> Any:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: str, *parts: bytes) -> str:
    with open(path, "wb") as f:
        f.write(b"".join(parts))
    return path


def make_pki(directory: str, sans: tuple[str, ...] = ("127.0.0.1",)) -> dict[str, str]:
    """PEM files: ``ca`` (the root), ``cert`` (leaf + intermediate), ``key``, and ``other_ca`` (unrelated)."""
    os.makedirs(directory, exist_ok=True)
    root_key, middle_key, leaf_key, other_key = _key(), _key(), _key(), _key()
    root = _certificate("dfly test root", root_key, "dfly test root", root_key, ca=True)
    middle = _certificate("dfly test intermediate", middle_key, "dfly test root", root_key, ca=True)
    names: list[x509.GeneralName] = []
    for san in sans:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(san)))
        except ValueError:
            names.append(x509.DNSName(san))
    leaf = _certificate("supernode", leaf_key, "dfly test intermediate", middle_key, ca=False, sans=names)
    other = _certificate("another root", other_key, "another root", other_key, ca=True)
    key_pem = leaf_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    other_key_pem = other_key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return {
        "ca": _write(os.path.join(directory, "ca.pem"), root.public_bytes(PEM)),
        "cert": _write(os.path.join(directory, "cert.pem"), leaf.public_bytes(PEM), middle.public_bytes(PEM)),
        "key": _write(os.path.join(directory, "key.pem"), key_pem),
        "other_ca": _write(os.path.join(directory, "other.pem"), other.public_bytes(PEM)),
        "other_key": _write(os.path.join(directory, "other-key.pem"), other_key_pem),
    }


class ServerTlsFileTests(SynchronousTestCase):
    """``tlsCert``/``tlsKey``: a bad pair stops the start with a one-line reason."""

    def setUp(self) -> None:
        self.pki = make_pki(self.mktemp())

    def test_a_good_pair_loads(self) -> None:
        """The leaf and the intermediate are both served."""
        options = server_tls(self.pki["cert"], self.pki["key"])
        self.assertEqual(len(options.extraCertChain), 1)

    def test_a_key_of_another_certificate_is_refused(self) -> None:
        error = self.assertRaises(ValueError, server_tls, self.pki["cert"], self.pki["other_key"])
        self.assertIn("does not belong to the certificate", str(error))

    def test_unreadable_and_non_pem_files_are_refused(self) -> None:
        self.assertIn("cannot read the TLS certificate", str(self.assertRaises(
            ValueError, server_tls, "/nonexistent/cert.pem", self.pki["key"])))
        self.assertIn("holds no PEM certificate", str(self.assertRaises(
            ValueError, server_tls, self.pki["key"], self.pki["key"])))
        self.assertIn("is not a PEM private key", str(self.assertRaises(
            ValueError, server_tls, self.pki["cert"], self.pki["cert"])))

    def config_file(self, text: str) -> str:
        path = os.path.join(self.mktemp() + ".yml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_cert_without_key_is_a_config_error(self) -> None:
        path = self.config_file(f"tlsCert: {self.pki['cert']}\n")
        error = self.assertRaises(ValueError, load_supernode_config, path)
        self.assertIn("tlsCert and tlsKey go together", str(error))

    def test_supernode_options_refuse_a_mismatched_pair(self) -> None:
        from dfly.supernode.tap import Options

        path = self.config_file(f"tlsCert: {self.pki['cert']}\ntlsKey: {self.pki['other_key']}\n")
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("does not belong to the certificate", str(error))
        self.assertNotIn("\n", str(error))


class PeerOptionsTests(SynchronousTestCase):
    """``dfget server`` reads clusterToken and clusterCa from its dfget.yml; an unreadable CA stops it."""

    def options(self, text: str) -> Any:
        from dfly.peer.options import Options

        path = self.mktemp() + ".yml"
        with open(path, "w") as f:
            f.write(text)
        options = Options()
        options.parseOptions(["--config", path, "--home", self.mktemp()])
        return options["config_obj"]

    def test_the_daemon_takes_both_keys(self) -> None:
        ca = make_pki(self.mktemp())["ca"]
        config = self.options(f"clusterToken: {TOKEN}\nclusterCa: {ca}\n")
        self.assertEqual((config.cluster_token, config.cluster_ca), (TOKEN, ca))

    def test_an_unreadable_ca_stops_the_start(self) -> None:
        error = self.assertRaises(usage.UsageError, self.options, "clusterCa: /nonexistent/ca.pem\n")
        self.assertIn("/nonexistent/ca.pem", str(error))


class ClusterTlsTests(P2PTestCase):
    """A supernode with a token and TLS; peers with the token and ``clusterCa``."""

    def setUp(self) -> None:
        super().setUp()
        self.pki = make_pki(os.path.join(self.work, "pki"))
        self.supernode_config = {"cluster_token": TOKEN, "tls_cert": self.pki["cert"], "tls_key": self.pki["key"]}
        self.host_config = {"cluster_token": TOKEN, "cluster_ca": self.pki["ca"]}

    async def test_peers_download_through_a_tls_supernode(self) -> None:
        """Two peers: the right bytes, nothing from the source, CDN pieces over TLS, peer pieces with the token."""
        file = self.serve("tls.bin", 12)
        self.start_supernode()
        hosts = [self.start_host(), self.start_host()]
        runs = [self.download(host, file) for host in hosts]
        for result, run in zip(await self.settle(runs, reactor.seconds() + SETTLE), runs):
            self.assertDownloaded(result, run, file)
        self.assertGreater(sum(r.from_supernode for r in [await run.d for run in runs]), 0)
        self.assertEqual(self.origin.full_gets("tls.bin"), 1)  # the supernode's fetch only
        self.assertEqual(self.piece_failures, [])

    async def test_cdn_pieces_say_https(self) -> None:
        """The pull answer marks the CDN's pieces ``scheme: https``; a peer's pieces carry no scheme."""
        file = self.serve("scheme.bin", 1)
        parts = self.start_supernode()
        run = self.download(self.start_host(), file)
        self.assertDownloaded(await run.d, run, file)
        [task] = parts.tasks.tasks.values()
        [holder] = task.peers
        cdn_info, = parts.tasks.piece_infos(task, [(0, CDN)], "127.0.0.1", 1)
        peer_info, = parts.tasks.piece_infos(task, [(0, holder)], "127.0.0.1", 1)
        self.assertEqual((cdn_info.get("scheme"), "scheme" in peer_info), ("https", False))

    async def test_plain_http_to_the_tls_api_fails(self) -> None:
        """The API speaks TLS only: a plain HTTP request gets no answer."""
        self.start_supernode()
        host, port = self.nodes[0]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        with self.assertRaises(Exception):
            await Agent(reactor, pool=pool, connectTimeout=3).request(
                b"GET", f"http://{host}:{port}/_ping".encode(), Headers({}))

    async def test_api_over_tls_answers_with_the_token(self) -> None:
        """A client that trusts the root (the server sends the intermediate) and sends the token is served."""
        self.start_supernode()
        host, port = self.nodes[0]
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, contextFactory=upstream_policy(self.pki["ca"], False), pool=pool)
        response = await agent.request(b"GET", f"https://{host}:{port}/version".encode(),
                                       Headers({codes.CLUSTER_TOKEN_HEADER: [TOKEN]}))
        self.assertEqual(response.code, 200, await readBody(response))
        response = await agent.request(b"GET", f"https://{host}:{port}/version".encode(), Headers({}))
        self.assertEqual(response.code, 401)
        await readBody(response)

    async def test_a_peer_with_another_ca_fails_clearly(self) -> None:
        """A peer whose clusterCa did not sign the supernode's certificate does not register; the reason says TLS."""
        file = self.serve("wrong-ca.bin", 1)
        self.start_supernode()
        host = self.start_host(cluster_ca=self.pki["other_ca"])
        run = self.download(host, file, back_source=False)
        result = await run.d
        self.assertFalse(result.success, result.line())
        self.assertEqual(result.reason, codes.REASON_NO_BACK_SOURCE + codes.REASON_REGISTER_FAILED, result.line())
        self.assertIn("TLS handshake failed", result.error)
        self.assertIn("clusterCa", result.error)
        self.assertEqual(self.supernode.tasks.tasks if self.supernode else None, {})

    async def test_a_certificate_that_does_not_name_the_address_fails_clearly(self) -> None:
        """A certificate for another address, signed by the right CA, is refused: the name is checked too."""
        self.pki = make_pki(os.path.join(self.work, "pki-other-name"), sans=("10.9.9.9", "supernode.example"))
        self.supernode_config = {"cluster_token": TOKEN, "tls_cert": self.pki["cert"], "tls_key": self.pki["key"]}
        file = self.serve("wrong-name.bin", 1)
        self.start_supernode()
        host = self.start_host(cluster_ca=self.pki["ca"])
        result = await self.download(host, file, back_source=False).d
        self.assertFalse(result.success, result.line())
        self.assertIn("TLS: the certificate does not name 127.0.0.1", result.error)
