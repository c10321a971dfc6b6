"""System tests of issue 11 item 2 on a real registry: a digest cannot unlock another repository's blob.

A real ``docker-registry`` (Debian's CNCF distribution 2.8) with *token*
auth, the only auth it has with per-repository permissions: its
``auth.token`` section trusts a self-signed certificate, and a token server
in this process (`TokenRealm`, a Twisted resource on a loopback port) hands
out ES256 JWTs signed with that certificate's key, the certificate in the
JWT header's ``x5c``, the way distribution's ``registry/auth/token``
verifies them (``iss``, ``aud`` a string, ``exp``/``nbf`` with 60 s leeway,
``access`` of ``{type, name, actions}``).  Users, by Basic auth to the token
server: ``alice`` may pull and push ``private/app`` and pull ``public/app``;
``mallory`` may pull ``public/app`` only; ``ci`` pushes both images.

A private layer P lives in ``private/app``, a public layer Q in
``public/app``.  Alice pulls P through a real ``twistd supernode`` and her
own ``dfget`` peer daemon, so the supernode's CDN holds it; then mallory,
with her own token and her own peer daemon, tries to get P's bytes by
naming P's digest with URLs she may read.  The registry decides what she
may read; dfly must never hand her bytes the registry would not.

Like tests/system/test_registry.py these fail, never skip, when the
registry or skopeo is missing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import signal
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from tests.loopback import ClosingFactory
from tests.oci import MIB, make_image
from tests.system.test_registry import RegistryTestCase, console_script, reactor

SERVICE = "dfly-test-registry"
ISSUER = "dfly-test-token-issuer"
#: user -> (password, {repository: actions}): what the token server grants.
USERS: dict[str, tuple[str, dict[str, set[str]]]] = {
    "alice": ("alice-pw", {"private/app": {"pull", "push"}, "public/app": {"pull"}}),
    "mallory": ("mallory-pw", {"public/app": {"pull"}}),
    "ci": ("ci-pw", {"private/app": {"pull", "push"}, "public/app": {"pull", "push"}}),
}


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenRealm(Resource):
    """``GET /token?service=...&scope=repository:<name>:<actions>``: a registry JWT for what the user may do.

    The registry's realm (docker's token protocol): Basic auth names the
    user; each asked scope is granted only the actions ``USERS`` lets that
    user do, so a scope nobody grants is in the token with no actions, and
    the registry answers such a request 401 (insufficient_scope).
    """

    isLeaf = True

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        super().__init__()
        self.key = key
        self.x5c = [base64.b64encode(certificate.public_bytes(serialization.Encoding.DER)).decode()]

    def issue(self, user: str, scopes: list[str]) -> str:
        """A JWT for ``user`` granting what ``USERS`` allows of ``scopes`` (``repository:<name>:<a,b>``)."""
        granted = USERS[user][1]
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if kind == "repository" and name:
                access.append({"type": "repository", "name": name,
                               "actions": sorted(set(actions.split(",")) & granted.get(name, set()))})
        now = int(reactor.seconds())  # the registry checks exp/nbf against its wall clock
        header = {"typ": "JWT", "alg": "ES256", "x5c": self.x5c}
        claims = {"iss": ISSUER, "sub": user, "aud": SERVICE, "exp": now + 600, "nbf": now - 10, "iat": now,
                  "jti": _b64url(os.urandom(12)), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        r, s = decode_dss_signature(self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
        return f"{signing_input}.{_b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"  # JOSE: raw r || s

    def render_GET(self, request: Request) -> bytes:
        user = (request.getUser() or b"").decode()
        if user not in USERS or (request.getPassword() or b"").decode() != USERS[user][0]:
            request.setResponseCode(401)
            request.setHeader(b"WWW-Authenticate", b'Basic realm="dfly-test-token"')
            return b'{"errors": [{"code": "UNAUTHORIZED"}]}'
        scopes = [scope.decode() for value in request.args.get(b"scope", []) for scope in value.split(b" ")]
        token = self.issue(user, scopes)
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"token": token, "access_token": token, "expires_in": 600}).encode()


def make_signing_certificate(directory: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, str]:
    """A P-256 key and a self-signed certificate of it, written as the registry's rootcertbundle."""
    now = datetime.now(timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    path = os.path.join(directory, "token-signer.crt")
    with open(path, "wb") as f:
        f.write(certificate.public_bytes(serialization.Encoding.PEM))
    return key, certificate, path


class PrivateRepositoryTests(RegistryTestCase):
    """A token-auth registry, a supernode, and one ``dfget`` peer daemon (home) per user."""

    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        self.dfget_bin = console_script("dfget")
        key, certificate, bundle = make_signing_certificate(self.work)
        self.realm = TokenRealm(key, certificate)
        factory = ClosingFactory(Site(self.realm))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        self.registry = await self.start_registry(auth_config={"token": {
            "realm": f"http://127.0.0.1:{port.getHost().port}/token", "service": SERVICE, "issuer": ISSUER,
            "rootcertbundle": bundle}})
        self.blobs: dict[str, bytes] = {}
        for repository in ("private/app", "public/app"):
            root = os.path.join(self.work, repository.replace("/", "-"))
            layer = make_image(root, layers=1, layer_size=5 * MIB)["layers"][0]
            with open(os.path.join(root, "blobs", "sha256", layer["digest"][7:]), "rb") as f:
                self.blobs[repository] = f.read()
            # skopeo does the token dance with TokenRealm: it checks the realm as much as the push.
            await self.push(root, "--dest-creds=ci:" + USERS["ci"][0], repository=repository)
        self.private, self.public = self.blobs["private/app"], self.blobs["public/app"]
        self.node = await self.start_supernode()

    def blob_url(self, repository: str, data: bytes) -> str:
        return f"http://127.0.0.1:{self.registry_port}/v2/{repository}/blobs/{digest_of(data)}"

    async def dfget(self, user: str, url: str, expected: bytes, name: str) -> tuple[int | None, str, str]:
        """``dfget --digest`` of ``expected`` as ``user`` (own home and peer daemon, own token): code, output, -o."""
        home = os.path.join(self.work, user)
        if not os.path.exists(home):
            self.addCleanup(self.stop_peer_daemon, home)
        repository = url.split("/v2/", 1)[1].rsplit("/blobs/", 1)[0]
        token = self.realm.issue(user, [f"repository:{repository}:pull"])
        output = os.path.join(home, "out", name)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        code, said = await self.run_command(f"dfget ({user})", [
            self.dfget_bin, "--home", home, "--node", self.node, "-u", url, "-o", output,
            "--header", f"Authorization: Bearer {token}", "--digest", digest_of(expected)], self.env())
        return code, said, output

    def stop_peer_daemon(self, home: str) -> None:
        """SIGTERM the ``dfget server`` that the user's first dfget started (host.meta has its pid)."""
        try:
            with open(os.path.join(home, "meta", "host.meta")) as f:
                os.kill(json.load(f)["pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass

    def assert_file(self, path: str, data: bytes) -> None:
        with open(path, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), digest_of(data)[7:], path)

    def assert_no_bytes_of(self, data: bytes, directory: str) -> None:
        """No file under ``directory`` (output, pieces, logs) holds any MiB-spaced 4 KiB sample of ``data``."""
        samples = [data[at:at + 4096] for at in range(0, len(data) - 4096, MIB)]
        for parent, _, files in os.walk(directory):
            for name in files:
                with open(os.path.join(parent, name), "rb") as f:
                    content = f.read()
                self.assertFalse(any(sample in content for sample in samples),
                                 f"{os.path.join(parent, name)} holds bytes of the private layer")

    def supernode_log(self) -> str:
        return self.read(os.path.join(self.work, "supernode", "logs", "supernode.log"))

    async def alice_pulls_the_private_layer(self) -> None:
        code, said, output = await self.dfget("alice", self.blob_url("private/app", self.private), self.private,
                                              "private.blob")
        self.assertEqual(code, 0, said)
        self.assert_file(output, self.private)

    async def test_alice_gets_the_private_layer_with_her_token(self) -> None:
        """Alice's token for private/app: dfget succeeds with P's bytes, through the supernode."""
        await self.alice_pulls_the_private_layer()
        self.assertIn(f"from {self.blob_url('private/app', self.private)}, length:{len(self.private)} ",
                      self.supernode_log())

    async def test_mallory_s_token_does_not_open_the_private_repository(self) -> None:
        """The registry's own check, for the record: mallory's token for private/app has no actions, a 401."""
        await self.alice_pulls_the_private_layer()
        code, said, output = await self.dfget("mallory", self.blob_url("private/app", self.private), self.private,
                                              "private.blob")
        self.assertEqual(code, 1, said)
        self.assertRegex(said, r"download FAIL\(\d+\) .*401")
        self.assertFalse(os.path.exists(output))
        self.assert_no_bytes_of(self.private, os.path.join(self.work, "mallory"))

    async def test_the_public_repository_naming_the_private_digest_is_refused_by_the_registry(self) -> None:
        """public/app/blobs/<P> with P's digest, P cached: the registry's 404 is dfly's answer, no byte of P."""
        await self.alice_pulls_the_private_layer()
        url = self.blob_url("public/app", self.private)
        code, said, output = await self.dfget("mallory", url, self.private, "attack.blob")
        self.assert_no_bytes_of(self.private, os.path.join(self.work, "mallory"))  # first: it names a leak
        self.assertEqual(code, 1, said)
        self.assertRegex(said, r"download FAIL\(\d+\) .*404")
        self.assertFalse(os.path.exists(output))
        # The supernode asked the registry with mallory's token; the registry's per-repository check said no.
        self.assertRegex(self.supernode_log(), r"source refused taskID:\S+: source %s answered 404" % re.escape(url))
        self.assertRegex(self.registry.output, r'auth\.user\.name=mallory err\.code="blob unknown" err\.detail="%s"'
                         % digest_of(self.private))

    async def test_the_refused_probe_does_not_shut_alice_out_of_the_cached_layer(self) -> None:
        """After mallory's 404 for public/app/blobs/<P>, alice's next pull of P is still served by the supernode."""
        await self.alice_pulls_the_private_layer()
        await self.dfget("mallory", self.blob_url("public/app", self.private), self.private, "attack.blob")
        code, said, output = await self.dfget("alice", self.blob_url("private/app", self.private), self.private,
                                              "again.blob")
        self.assertEqual(code, 0, said)
        self.assert_file(output, self.private)
        self.assertRegex(said, r"(?m)^from peers:\d+ from supernode:\d+ from source:0$")

    async def test_a_readable_blob_s_url_with_the_private_digest_gets_no_private_bytes(self) -> None:
        """public/app/blobs/<Q> with P's digest, P cached: a plain URL task, Q's bytes fail the check, no byte of P."""
        await self.alice_pulls_the_private_layer()
        url = self.blob_url("public/app", self.public)
        code, said, output = await self.dfget("mallory", url, self.private, "attack.blob")
        self.assert_no_bytes_of(self.private, os.path.join(self.work, "mallory"))  # first: it names a leak
        self.assertEqual(code, 1, said)
        self.assertRegex(said, r"download FAIL\(\d+\) .*expected %s" % digest_of(self.private)[7:])
        # A task of its own for Q's URL (not P's cached task), whose fetch the digest check failed.
        self.assertRegex(self.supernode_log(),
                         r"start to download taskID:\S+ from %s, length:%d " % (re.escape(url), len(self.public)))
        self.assertIn(f"CDN fetch of {url} failed: sha256 of the source is {digest_of(self.public)[7:]}, "
                      f"expected {digest_of(self.private)[7:]}", self.supernode_log())
        self.assertFalse(os.path.exists(output))

    async def test_mallory_gets_the_public_layer_with_its_own_digest(self) -> None:
        """Honest use after the attack: public/app/blobs/<Q> with Q's digest gives Q."""
        await self.alice_pulls_the_private_layer()
        code, said, output = await self.dfget("mallory", self.blob_url("public/app", self.public), self.public,
                                              "public.blob")
        self.assertEqual(code, 0, said)
        self.assert_file(output, self.public)
        self.assert_no_bytes_of(self.private, os.path.join(self.work, "mallory"))


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
