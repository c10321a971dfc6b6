"""System tests: ``skopeo`` pulls an image from a real registry through ``twistd dfdaemon``.

Real components on 127.0.0.1: the CNCF distribution registry (Debian's
``docker-registry``) with its own config in the test's directory, Debian's
``skopeo``, a ``twistd supernode`` and ``twistd dfdaemon`` processes.  The
image is made at test time (an OCI layout with three layers of random bytes)
and pushed with skopeo.  Each test has its own registry, image and supernode:
tasks are content-addressed, so a supernode that already holds a blob would
not fetch it again and the registry's counts would mean nothing.

The tests cannot pass by accident:

- in mirror mode the image name is mapped (``registries.conf``) to a location
  that refuses connections, with dfdaemon as its only mirror: skopeo falls
  back to the real location when a mirror fails, so there must be nothing
  to fall back to;
- in proxy mode the registry's name resolves through ``/etc/hosts`` (Go
  does not proxy loopback literals) and skopeo trusts only dfdaemon's CA for
  it, so a connection that bypassed dfdaemon would fail verification;
- every blob of the output is checked against its digest, and the
  manifest against the pushed one;
- a blob counts as peer-to-peer only when dfdaemon.log says "via P2P" with
  ``reason:0`` (a blob dfdaemon had to fetch from the source itself is
  logged "from the source").

They fail, never skip, when the binaries are missing; ``.ci/run`` installs
them.  Facts about skopeo 1.9.3 these tests rely on: ``--registries-conf``
(``CONTAINERS_REGISTRIES_CONF`` is ignored), and credentials reach a mirror
only from an auth file keyed by the mirror's own host:port.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from dfly.config import parse_node
from dfly.placement import rendezvous_order, task_key
from tests.oci import make_image
from tests.system.test_processes import TWISTD

reactor: Any = _reactor  # Twisted's stubs type the global reactor too narrowly
MIB = 1 << 20
PACKAGES = "docker-registry skopeo"
#: Resolved through /etc/hosts during the HTTPS test: Go's proxy selection
#: skips loopback literals, so the registry needs a name.
REGISTRY_NAME = "dfly-registry.test"
HOSTS_FILE = "/etc/hosts"
USER, PASSWORD = "dfly", "not-a-secret"
#: Anything that starts, pushes or pulls gets this long.
DEADLINE = 30.0


def require(binary: str, package: str) -> str:
    """The path of ``binary``, or a failure naming the Debian package that has it."""
    path = shutil.which(binary)
    if path is None:
        raise AssertionError(f"{binary} is not on the PATH: these system tests need Debian's package {package} "
                             f"(apt-get install {PACKAGES}; .ci/run installs them)")
    return path


def console_script(name: str) -> str:
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.access(path, os.X_OK):
        raise AssertionError(f"the {name} console script is not installed next to {sys.executable}: pip install -e .")
    return path


class Child(ProcessProtocol):
    """A process of a test: its output, lines awaited with a deadline, its end."""

    transport: Any

    def __init__(self, name: str) -> None:
        self.name = name
        self.out = b""
        self.err = b""
        self.ended: Deferred[int | None] = Deferred()
        self._waiting: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]], Any]] = []
        self.pid = 0

    @property
    def output(self) -> str:
        return (self.out + self.err).decode(errors="replace")

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        self._check()

    def errReceived(self, data: bytes) -> None:
        self.err += data
        self._check()

    def wait_for(self, pattern: bytes, timeout: float = DEADLINE) -> Deferred[re.Match[bytes]]:
        """Fires with the first match of ``pattern`` in the output, or fails after ``timeout`` s."""
        regex = re.compile(pattern)
        match = regex.search(self.out + self.err)
        if match:
            return succeed(match)
        if self.ended.called:
            return fail(AssertionError(f"{self.name} ended without printing {pattern!r}:\n{self.output[-6000:]}"))
        d: Deferred[re.Match[bytes]] = Deferred()
        timer = reactor.callLater(timeout, self._expire, d, f"no {pattern!r} within {timeout:g} s")
        self._waiting.append((regex, d, timer))
        return d

    def _check(self) -> None:
        for regex, d, timer in list(self._waiting):
            match = regex.search(self.out + self.err)
            if match:
                self._waiting.remove((regex, d, timer))
                timer.cancel()
                d.callback(match)

    def _expire(self, d: Deferred[Any], why: str) -> None:
        self._waiting = [w for w in self._waiting if w[1] is not d]
        d.errback(AssertionError(f"{self.name}: {why}; its output:\n{self.output[-6000:]}"))

    def processEnded(self, reason: Failure) -> None:
        for regex, d, timer in self._waiting:
            timer.cancel()
            d.errback(AssertionError(f"{self.name} ended before printing {regex.pattern!r}:\n{self.output[-6000:]}"))
        self._waiting = []
        self.ended.callback(0 if reason.check(ProcessDone) else getattr(reason.value, "exitCode", None))

    def stop(self) -> Deferred[int | None]:
        """SIGTERM, then SIGKILL after 10 s; fires when the process is gone."""
        if self.ended.called:
            return self.ended
        self.transport.signalProcess("TERM")
        kill = reactor.callLater(10, self.transport.signalProcess, "KILL")
        self.ended.addBoth(lambda result: (kill.cancel() if kill.active() else None, result)[1])
        return self.ended


# --- certificates ----------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_registry_certificates(directory: str, dns_name: str) -> tuple[str, str, str]:
    """A self-signed CA and a server certificate for ``dns_name`` signed by it: (ca.crt, server.crt, server.key)."""
    now = datetime.now(timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dfly test registry CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(directory, name) for name in ("ca.crt", "server.crt", "server.key"))
    for path, data in zip(paths, (ca.public_bytes(serialization.Encoding.PEM),
                                  leaf.public_bytes(serialization.Encoding.PEM), _pem_key(key))):
        with open(path, "wb") as f:
            f.write(data)
    return paths  # type: ignore[return-value]


# --- what the logs say -----------------------------------------------------------

_REGISTER = re.compile(r"sign:(\S+) : do register to \S+, res:(\{.*\})$", re.MULTILINE)
_PIECE = re.compile(r"sign:(\S+) : downloading piece:(\{.*\})$", re.MULTILINE)


def pieces_by_length(dfdaemon_log: str) -> dict[int, tuple[str, list[str]]]:
    """fileLength -> (taskId, dstCid of every piece downloaded for it), from a dfdaemon.log."""
    tasks = {m.group(1): json.loads(m.group(2))["data"] for m in _REGISTER.finditer(dfdaemon_log)}
    found: dict[int, tuple[str, list[str]]] = {}
    for m in _PIECE.finditer(dfdaemon_log):
        task = tasks[m.group(1)]
        found.setdefault(int(task["fileLength"]), (task["taskId"], []))[1].append(json.loads(m.group(2))["dstCid"])
    return found


def uploaded_bytes(dfdaemon_log: str, task_id: str) -> int:
    """What this dfdaemon's uploader sent other peers of ``task_id`` (its access-log lines)."""
    pattern = re.compile(r'"GET /peer/file/%s HTTP/1\.1" 20[06] (\d+)' % re.escape(task_id))
    return sum(int(n) for n in pattern.findall(dfdaemon_log))


def registry_blob_gets(access_log: str, digest: str) -> list[str]:
    """The statuses of the registry's full GETs of blob ``digest`` (its access log, one line per response)."""
    return re.findall(r'"GET /v2/[^ ]+/blobs/%s HTTP/1\.1" (\d{3}) ' % re.escape(digest), access_log)


# --- the test case ---------------------------------------------------------------


class RegistryTestCase(TestCase):
    """Starts and ends the processes of one scenario; everything lives in ``self.work``."""

    timeout = 60

    def setUp(self) -> None:
        self.registry_bin = require("docker-registry", "docker-registry")
        self.skopeo_bin = require("skopeo", "skopeo")
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.addCleanup(shutil.rmtree, self.work, True)
        self.supernodes: dict[str, Child] = {}

    def env(self, **extra: str) -> dict[str, str]:
        """Our environment without proxies and with HOME in the test's directory, plus ``extra``."""
        env = {k: v for k, v in os.environ.items()
               if not k.lower().endswith("_proxy") and k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR",
                                                                  "SSL_CERT_FILE", "SSL_CERT_DIR")}
        env["HOME"] = self.work
        env.update(extra)
        return env

    def spawn(self, name: str, argv: list[str], env: dict[str, str]) -> Child:
        child = Child(name)
        reactor.spawnProcess(child, argv[0], argv, env=env)
        self.addCleanup(child.stop)
        return child

    async def run_command(self, name: str, argv: list[str], env: dict[str, str],
                          timeout: float = DEADLINE) -> tuple[int | None, str]:
        """Run ``argv`` to its end (killed after ``timeout`` s): its exit code and output."""
        child = self.spawn(name, argv, env)
        timer = reactor.callLater(timeout, child.transport.signalProcess, "KILL")
        self.addCleanup(lambda: timer.cancel() if timer.active() else None)
        code = await child.ended
        if not timer.active():
            raise AssertionError(f"{name} did not finish within {timeout:g} s:\n{child.output}")
        timer.cancel()
        return code, child.output

    async def start_registry(self, auth: bool = False, tls: tuple[str, str] | None = None,
                             auth_config: dict[str, Any] | None = None) -> Child:
        """``docker-registry serve`` on 127.0.0.1 (any port: ``self.registry_port``), htpasswd auth or TLS as asked.

        ``auth_config`` is the config's whole ``auth`` section (token auth, say) instead of htpasswd.
        """
        root = os.path.join(self.work, "registry")
        os.makedirs(root)
        http: dict[str, Any] = {"addr": "127.0.0.1:0", "secret": "not-a-secret-test-only"}
        config: dict[str, Any] = {
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": os.path.join(root, "data")}},
            "http": http,
        }
        if tls is not None:
            http["tls"] = {"certificate": tls[0], "key": tls[1]}
        if auth:
            with open(os.path.join(root, "htpasswd"), "w") as f:
                f.write(await self.htpasswd_line(USER, PASSWORD))
            config["auth"] = {"htpasswd": {"realm": "dfly-test", "path": os.path.join(root, "htpasswd")}}
        if auth_config is not None:
            config["auth"] = auth_config
        path = os.path.join(root, "config.yml")
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        registry = self.spawn("docker-registry", [self.registry_bin, "serve", path], self.env())
        match = await registry.wait_for(rb"listening on 127\.0\.0\.1:(\d+)")
        self.registry_port = int(match.group(1))
        return registry

    async def htpasswd_line(self, user: str, password: str) -> str:
        """A bcrypt htpasswd line: with Python's bcrypt when it is there, else apache2-utils' htpasswd."""
        try:
            import bcrypt  # type: ignore[import-not-found, unused-ignore]
        except ImportError:
            pass
        else:
            return f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
        htpasswd = shutil.which("htpasswd")
        if htpasswd is None:
            raise AssertionError("the auth test needs bcrypt hashes: install Debian's apache2-utils (htpasswd) "
                                 "or Python's bcrypt (.ci/run installs apache2-utils)")
        code, output = await self.run_command("htpasswd", [htpasswd, "-Bbn", user, password], self.env())
        self.assertEqual(code, 0, output)
        return output.strip() + "\n"

    async def push(self, image: str, *args: str, repository: str = "test/app") -> None:
        """Push the OCI layout ``image`` to the registry as ``<repository>:1``."""
        code, output = await self.run_command("skopeo copy (push)", [
            self.skopeo_bin, "copy", "--dest-tls-verify=false", *args,
            f"oci:{image}:v1", f"docker://127.0.0.1:{self.registry_port}/{repository}:1"], self.env())
        self.assertEqual(code, 0, output)

    async def start_supernode(self, *args: str, name: str = "supernode") -> str:
        """A fresh ``twistd supernode`` on 127.0.0.1 (its home ``work/name``); its API as ``host:port``."""
        supernode = self.spawn(name, [
            *TWISTD, "-n", "--pidfile=", "-l", "-", "supernode", "--port", "0", "--download-port", "0",
            "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1", "--home", os.path.join(self.work, name),
            *args,
        ], self.env())
        await supernode.wait_for(rb"CDN listening on 127\.0\.0\.1:\d+")
        match = await supernode.wait_for(rb"register API listening on 127\.0\.0\.1:(\d+)")
        node = f"127.0.0.1:{int(match.group(1))}"
        self.supernodes[node] = supernode
        return node

    async def start_dfdaemon(self, name: str, node: str, *args: str, **env: str) -> tuple[Child, int, str]:
        """``twistd dfdaemon`` with its home in ``work/name``: the process, its proxy port, its dfdaemon.log path."""
        home = os.path.join(self.work, name)
        dfdaemon = self.spawn(name, [
            *TWISTD, "-n", "--pidfile=", "-l", "-", "dfdaemon", "--port", "0", "--node", node, "--home", home,
            "--ratelimit", "0", *args,
        ], self.env(**env))
        match = await dfdaemon.wait_for(rb"dfdaemon proxy listening on 127\.0\.0\.1:(\d+)")
        return dfdaemon, int(match.group(1)), os.path.join(home, "logs", "dfdaemon.log")

    def mirror_conf(self, port: int) -> str:
        """registries.conf: ``unreachable.invalid/test`` lives at a port that refuses; dfdaemon is its mirror."""
        path = os.path.join(self.work, f"registries-{port}.conf")
        with open(path, "w") as f:
            f.write('unqualified-search-registries = []\n'
                    '[[registry]]\n'
                    'prefix = "unreachable.invalid/test"\n'
                    'location = "127.0.0.1:1/test"\n'
                    '[[registry.mirror]]\n'
                    f'location = "127.0.0.1:{port}/test"\n'
                    'insecure = true\n')
        return path

    async def pull(self, conf: str, reference: str, output: str, *args: str, **env: str) -> tuple[int | None, str]:
        return await self.run_command("skopeo copy (pull)", [
            self.skopeo_bin, "--registries-conf", conf, "copy", *args, f"docker://{reference}", f"dir:{output}",
        ], self.env(**env))

    def assert_image(self, output: str, image: dict[str, Any]) -> None:
        """``output`` (skopeo's dir: format) holds the pushed manifest and exactly its blobs, each matching its digest."""
        with open(os.path.join(output, "manifest.json"), "rb") as f:
            self.assertEqual("sha256:" + hashlib.sha256(f.read()).hexdigest(), image["manifest"])
        blobs = sorted(name for name in os.listdir(output) if name not in ("manifest.json", "version"))
        self.assertEqual(blobs, sorted(blob["digest"][7:] for blob in image["blobs"]))
        for name in blobs:
            with open(os.path.join(output, name), "rb") as f:
                self.assertEqual(hashlib.sha256(f.read()).hexdigest(), name, f"{name} in {output}")

    async def assert_registry_served_each_blob_once(self, registry: Child, image: dict[str, Any]) -> None:
        """The access log shows exactly one full GET, answered 200, of every blob."""
        for blob in image["blobs"]:
            await registry.wait_for(rb'"GET /v2/[^ ]+/blobs/%s HTTP/1\.1" ' % blob["digest"].encode(), timeout=5)
        access_log = registry.out.decode(errors="replace")
        for blob in image["blobs"]:
            self.assertEqual(registry_blob_gets(access_log, blob["digest"]), ["200"], blob["digest"])

    def read(self, path: str) -> str:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def assert_via_p2p(self, dfdaemon_log: str, base: str, image: dict[str, Any]) -> None:
        """Every blob of ``image`` was served from a P2P download of ``base``/v2/test/app/blobs/..., none from source."""
        log = self.read(dfdaemon_log)
        for blob in image["blobs"]:
            line = re.escape(f"{base}/v2/test/app/blobs/{blob['digest']} via P2P: download SUCCESS(0) cost:") + \
                r"\S+" + re.escape(f" length:{blob['size']} reason:0") + "$"
            self.assertRegex(log, re.compile(line, re.MULTILINE))
        self.assertNotIn("download from source", log)


class MirrorTests(RegistryTestCase):
    """dfdaemon as the registry mirror of skopeo (registries.conf), no auth."""

    async def test_two_hosts_pull_layers_peer_to_peer_and_the_registry_serves_each_blob_once(self) -> None:
        """Pulls through two dfdaemons: right digests, host 2 gets every layer from host 1, one registry GET a blob."""
        image = make_image(os.path.join(self.work, "image"))
        registry = await self.start_registry()
        await self.push(os.path.join(self.work, "image"))
        node = await self.start_supernode()
        (first, port1, log1), (_, port2, log2) = await gatherResults([
            Deferred.fromCoroutine(self.start_dfdaemon(name, node, "--registry", f"http://127.0.0.1:{self.registry_port}"))
            for name in ("host1", "host2")])

        for port, output in ((port1, "out1"), (port2, "out2")):
            code, said = await self.pull(self.mirror_conf(port), "unreachable.invalid/test/app:1",
                                         os.path.join(self.work, output))
            self.assertEqual(code, 0, said)
            self.assert_image(os.path.join(self.work, output), image)

        base = f"http://127.0.0.1:{self.registry_port}"
        self.assert_via_p2p(log1, base, image)
        self.assert_via_p2p(log2, base, image)
        pieces, host1_log = pieces_by_length(self.read(log2)), self.read(log1)
        for layer in image["layers"]:
            task_id, sources = pieces[layer["size"]]
            self.assertTrue(any(cid.startswith(f"127.0.0.1-{first.pid}-") for cid in sources),
                            f"host 2 got no piece of {layer['digest']} from host 1 (pid {first.pid}): {sources}")
            self.assertGreater(uploaded_bytes(host1_log, task_id), 0, f"host 1 uploaded nothing of {task_id}")
        await self.assert_registry_served_each_blob_once(registry, image)


class HungSupernodeTests(RegistryTestCase):
    """A supernode that takes connections and never answers (SIGSTOP) costs a pull seconds, not minutes."""

    async def test_pull_through_dfdaemon_skips_a_hung_supernode(self) -> None:
        registry = await self.start_registry()
        good = await self.start_supernode(name="good")
        hung = await self.start_supernode(name="hung")
        nodes = tuple(parse_node(node) for node in (hung, good))
        # An image with a layer the rendezvous order gives the hung node first
        # (blob tasks are keyed by the registry and the digest).
        for attempt in range(20):
            root = os.path.join(self.work, f"image{attempt}")
            image = make_image(root, layer_size=MIB)
            first = [rendezvous_order(task_key(f"http://127.0.0.1:{self.registry_port}/v2/test/app/blobs/{b['digest']}",
                                               digest=("sha256", b["digest"][7:])), nodes)[0] for b in image["blobs"]]
            if parse_node(hung) in first:
                break
        else:
            raise AssertionError("no image with a blob placed on the hung node in 20 tries")
        await self.push(root)
        stopped = self.supernodes[hung]
        os.kill(stopped.pid, signal.SIGSTOP)
        self.addCleanup(lambda: os.kill(stopped.pid, signal.SIGCONT) if not stopped.ended.called else None)
        _, port, log = await self.start_dfdaemon("host", f"{hung},{good}",
                                                 "--registry", f"http://127.0.0.1:{self.registry_port}")
        # Before: 60 s a blob; the deadline is 30 s for the whole pull.
        code, said = await self.pull(self.mirror_conf(port), "unreachable.invalid/test/app:1",
                                     os.path.join(self.work, "out"))
        self.assertEqual(code, 0, said)
        self.assert_image(os.path.join(self.work, "out"), image)
        self.assert_via_p2p(log, f"http://127.0.0.1:{self.registry_port}", image)
        attempts = re.findall(r"do register to %s failed: (.*)" % re.escape(hung), self.read(log))
        # Only the blobs asked for while the node was not yet known hung tried it.
        self.assertTrue(1 <= len(attempts) <= first.count(parse_node(hung)), attempts)
        await self.assert_registry_served_each_blob_once(registry, image)


class AuthTests(RegistryTestCase):
    """A registry with htpasswd basic auth behind dfdaemon as the mirror."""

    async def setUp(self) -> None:  # type: ignore[override]
        super().setUp()
        self.image = make_image(os.path.join(self.work, "image"))
        self.registry = await self.start_registry(auth=True)
        await self.push(os.path.join(self.work, "image"), f"--dest-creds={USER}:{PASSWORD}")
        node = await self.start_supernode()
        _, self.port, self.log = await self.start_dfdaemon("host1", node,
                                                           "--registry", f"http://127.0.0.1:{self.registry_port}")
        self.conf = self.mirror_conf(self.port)

    async def test_pull_without_credentials_is_unauthorized(self) -> None:
        """No credentials: the registry's 401 reaches skopeo through dfdaemon and the pull fails."""
        code, said = await self.pull(self.conf, "unreachable.invalid/test/app:1", os.path.join(self.work, "out"))
        self.assertNotEqual(code, 0, said)
        self.assertIn("unauthorized", said)
        self.assertRegex(self.read(self.log), r"GET /v2/test/app/manifests/1 401 ")

    async def test_pull_with_credentials_for_the_mirror_goes_peer_to_peer(self) -> None:
        """An auth file keyed by dfdaemon's host:port: the pull succeeds, blobs via P2P, one registry GET each."""
        authfile = os.path.join(self.work, "auth.json")
        with open(authfile, "w") as f:
            token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            json.dump({"auths": {f"127.0.0.1:{self.port}": {"auth": token}}}, f)
        output = os.path.join(self.work, "out")
        code, said = await self.pull(self.conf, "unreachable.invalid/test/app:1", output, "--src-authfile", authfile)
        self.assertEqual(code, 0, said)
        self.assert_image(output, self.image)
        self.assert_via_p2p(self.log, f"http://127.0.0.1:{self.registry_port}", self.image)
        await self.assert_registry_served_each_blob_once(self.registry, self.image)


class HijackTests(RegistryTestCase):
    """An HTTPS registry with a self-signed certificate, reached through dfdaemon as HTTPS_PROXY."""

    def setUp(self) -> None:
        super().setUp()
        self.map_registry_name()

    def map_registry_name(self) -> None:
        """Add ``127.0.0.1 REGISTRY_NAME`` to /etc/hosts; the cleanup removes exactly that line."""
        try:
            with open(HOSTS_FILE, "r+") as f:
                content = f.read()
                added = ("\n" if content and not content.endswith("\n") else "") + \
                    f"127.0.0.1 {REGISTRY_NAME}  # dfly tests/system/test_registry.py, pid {os.getpid()}\n"
                f.write(added)
        except OSError as e:
            raise AssertionError(f"{HOSTS_FILE} is not writable ({e.strerror}): this test maps {REGISTRY_NAME} to "
                                 "127.0.0.1 there, because Go does not proxy loopback addresses; run it as root "
                                 "(CI does)") from None

        def remove() -> None:
            with open(HOSTS_FILE, "r+") as f:
                content = f.read()
                at = content.rfind(added)
                if at >= 0:
                    f.seek(0)
                    f.write(content[:at] + content[at + len(added):])
                    f.truncate()

        self.addCleanup(remove)

    async def test_https_registry_layers_go_peer_to_peer_through_a_hijack_rule(self) -> None:
        """skopeo via HTTPS_PROXY trusting only dfdaemon's CA: right digests, blobs via P2P, one registry GET each."""
        image = make_image(os.path.join(self.work, "image"))
        certs = os.path.join(self.work, "registry-certs")
        os.makedirs(certs)
        registry_ca, cert, key = make_registry_certificates(certs, REGISTRY_NAME)
        registry = await self.start_registry(tls=(cert, key))
        await self.push(os.path.join(self.work, "image"))

        dfly_ca = os.path.join(self.work, "dfly-ca")
        code, said = await self.run_command("dfdaemon gen-ca", [console_script("dfdaemon"), "gen-ca", "--dir", dfly_ca,
                                                                "--host", REGISTRY_NAME],
                                            self.env())
        self.assertEqual(code, 0, said)
        config = os.path.join(self.work, "dfdaemon.yml")
        with open(config, "w") as f:
            # The registry is not on 443: its port must be a connectPorts entry, or the CONNECT is a 403.
            json.dump({"caBundle": registry_ca, "connectPorts": [self.registry_port],
                       "hijackHttps": {"cert": os.path.join(dfly_ca, "ca.crt"), "key": os.path.join(dfly_ca, "ca.key"),
                                       "hosts": [{"regex": "^" + re.escape(REGISTRY_NAME) + "$"}]}}, f)
        # The supernode trusts the registry's CA through --ca-bundle, dfdaemon
        # (proxy and its engine's back-to-source) through caBundle.
        node = await self.start_supernode("--ca-bundle", registry_ca)
        _, port, log = await self.start_dfdaemon("host1", node, "--config", config)

        client_certs = os.path.join(self.work, "client-certs")  # only *.crt: a lone ca.key would be a client key
        os.makedirs(client_certs)
        shutil.copy(os.path.join(dfly_ca, "ca.crt"), os.path.join(client_certs, "ca.crt"))
        empty_conf = os.path.join(self.work, "registries.conf")
        with open(empty_conf, "w") as f:
            f.write("unqualified-search-registries = []\n")
        output = os.path.join(self.work, "out")
        origin = f"{REGISTRY_NAME}:{self.registry_port}"
        code, said = await self.pull(empty_conf, f"{origin}/test/app:1", output, "--src-cert-dir", client_certs,
                                     HTTPS_PROXY=f"http://127.0.0.1:{port}")
        self.assertEqual(code, 0, said)
        self.assert_image(output, image)
        self.assertIn(f"intercepting CONNECT {origin}", self.read(log))
        self.assert_via_p2p(log, f"https://{origin}", image)
        supernode_log = self.read(os.path.join(self.work, "supernode", "logs", "supernode.log"))
        for blob in image["blobs"]:  # over https, trusting the registry's CA through --ca-bundle
            self.assertRegex(supernode_log, r"start to download taskID:\S+ from %s, length:%d " % (
                re.escape(f"https://{origin}/v2/test/app/blobs/{blob['digest']}"), blob["size"]))
        await self.assert_registry_served_each_blob_once(registry, image)
