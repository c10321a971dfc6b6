"""System tests: the real ``twistd supernode`` and ``dfget`` processes on loopback."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase
from twisted.web import static
from twisted.web.server import Site

from tests.loopback import ClosingFactory

BIN = os.path.dirname(sys.executable)
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
_LISTENING = re.compile(rb"(register API|CDN|peer server) listening on [0-9.]+:(\d+)|(peer daemon) \d+ serving on port (\d+)")


def dfget_path() -> str:
    path = os.path.join(BIN, "dfget")
    if not os.access(path, os.X_OK):
        raise AssertionError(f"the dfget console script is not installed next to {sys.executable}: pip install -e .")
    return path


class _Watcher(ProcessProtocol):
    """Collects a long-running process's output and fires when it listens."""

    def __init__(self, wanted: set[bytes]) -> None:
        self.output = b""
        self.ports: dict[bytes, int] = {}
        self.wanted = wanted
        self.ready: Deferred[dict[bytes, int]] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        for match in _LISTENING.finditer(self.output):
            name, port = (match.group(1), match.group(2)) if match.group(1) else (match.group(3), match.group(4))
            self.ports[name] = int(port)
        if not self.ready.called and self.wanted <= set(self.ports):
            self.ready.callback(self.ports)

    errReceived = outReceived

    def processEnded(self, reason: object) -> None:
        code = getattr(getattr(reason, "value", None), "exitCode", None)
        if not self.ready.called:
            self.ready.errback(AssertionError(f"process ended before listening:\n{self.output.decode(errors='replace')}"))
        self.ended.callback(code)


class ProcessTestCase(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(self.work, "origin"))
        self.data = os.urandom(9 * 1024 * 1024 + 17)  # three pieces, the last one short
        with open(os.path.join(self.work, "origin", "file.bin"), "wb") as f:
            f.write(self.data)
        factory = ClosingFactory(Site(static.File(os.path.join(self.work, "origin"))))
        origin = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(origin.stopListening)
        self.url = f"http://127.0.0.1:{origin.getHost().port}/file.bin"
        self.home = os.path.join(self.work, "home")
        self.addCleanup(self._stop_peer_daemon)
        return self._start_supernode()

    def _start_supernode(self) -> Deferred[None]:
        watcher = _Watcher({b"register API", b"CDN"})
        args = [*TWISTD, "-n", "--pidfile=", "-l", "-", "supernode", "--port", "0", "--download-port", "0",
                "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1", "--home", os.path.join(self.work, "supernode")]
        process = reactor.spawnProcess(watcher, sys.executable, args, env=self._env())

        def stop() -> Deferred[int]:
            if watcher.ended.called:
                return watcher.ended
            process.signalProcess("TERM")
            return watcher.ended

        self.addCleanup(stop)

        def listening(ports: dict[bytes, int]) -> None:
            self.node = f"127.0.0.1:{ports[b'register API']}"

        return watcher.ready.addCallback(listening)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.endswith("_PROXY") and not k.endswith("_proxy")}
        env["HOME"] = self.work
        return env

    def _stop_peer_daemon(self) -> None:
        try:
            with open(os.path.join(self.home, "meta", "host.meta")) as f:
                os.kill(json.load(f)["pid"], signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass

    def dfget(self, *args: str) -> Deferred[tuple[bytes, bytes, int]]:
        return getProcessOutputAndValue(dfget_path(), ["--home", self.home, *args], env=self._env())

    async def test_dfget_downloads_through_twistd_supernode(self) -> None:
        """dfget exits 0, prints the SUCCESS line, and the bytes and logs are right."""
        output = os.path.join(self.work, "out.bin")
        out, err, code = await self.dfget("-u", self.url, "-o", output, "--node", self.node)
        self.assertEqual(code, 0, out + err)
        self.assertRegex(out.decode(), r"(?m)^download SUCCESS\(0\) cost:\d+\.\d{3}s length:%d reason:0$" % len(self.data))
        with open(output, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(self.data).digest())
        with open(os.path.join(self.home, "logs", "dfclient.log")) as f:
            client_log = f.read()
        self.assertIn('"dstCid": "cdnnode:', client_log)
        self.assertRegex(client_log, r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO sign:\d+-\d+\.\d{3} : download SUCCESS")

    async def test_limits_reach_the_peer_daemon(self) -> None:
        """-s and --totallimit are accepted, and the daemon takes the host limit from the run."""
        output = os.path.join(self.work, "limited.bin")
        out, err, code = await self.dfget("-u", self.url, "-o", output, "--node", self.node,
                                          "-s", "64M", "--totallimit", "48M")
        self.assertEqual(code, 0, out + err)
        with open(os.path.join(self.home, "logs", "dfclient.log")) as f:
            self.assertIn("host limit (--totallimit) now 48.0 MiB/s each way", f.read())

    async def test_bad_limit_is_a_one_line_error(self) -> None:
        """A limit that is not a size: one line naming the flag, exit 2, nothing downloaded."""
        out, err, code = await self.dfget("-u", self.url, "-o", os.path.join(self.work, "x"), "-s", "fast")
        self.assertEqual((code, err.decode().splitlines()[0]),
                         (2, "dfget: error: --locallimit: invalid size 'fast': use a number with an optional K, M or G suffix, e.g. 10M"))

    async def test_second_dfget_reuses_the_peer_daemon(self) -> None:
        """A second run finds the daemon through host.meta instead of starting another."""
        await self.dfget("-u", self.url, "-o", os.path.join(self.work, "a.bin"), "--node", self.node)
        with open(os.path.join(self.home, "meta", "host.meta")) as f:
            first = json.load(f)["pid"]
        out, err, code = await self.dfget("-u", self.url, "-o", os.path.join(self.work, "b.bin"), "--node", self.node)
        self.assertEqual(code, 0, out + err)
        with open(os.path.join(self.home, "meta", "host.meta")) as f:
            self.assertEqual(json.load(f)["pid"], first)

    async def test_missing_source_with_notbs_fails_with_reason_1001(self) -> None:
        """A 404 source and --notbs: FAIL with reason 1001, exit 1, nothing at -o."""
        output = os.path.join(self.work, "missing.bin")
        out, err, code = await self.dfget("-u", self.url + ".nope", "-o", output, "--node", self.node, "--notbs")
        self.assertEqual(code, 1, out + err)
        self.assertRegex(out.decode(), r"(?m)^download FAIL\(1103\) cost:\S+ length:-1 reason:1001 error:.*404")
        self.assertFalse(os.path.exists(output))

    async def test_conflicting_flags_are_a_one_line_error(self) -> None:
        """--md5 with --identifier: exit 2 and one error line, no traceback."""
        out, err, code = await self.dfget("-u", self.url, "-o", os.path.join(self.work, "x"),
                                          "--md5", "0" * 32, "--identifier", "x")
        self.assertEqual(code, 2)
        self.assertEqual(err.decode().splitlines()[0], "dfget: error: --md5 and --identifier cannot be used together")
        self.assertNotIn(b"Traceback", err)

    async def test_directory_output_is_refused(self) -> None:
        """-o pointing at a directory is refused before anything is downloaded."""
        out, err, code = await self.dfget("-u", self.url, "-o", self.work, "--node", self.node)
        self.assertEqual(code, 2)
        self.assertIn(b"is a directory", err)

    async def test_daemon_on_a_specific_address_is_found(self) -> None:
        """A daemon started with --listen 127.0.0.2 is the one dfget uses (no second daemon, no fallback)."""
        watcher = _Watcher({b"peer daemon"})
        process = reactor.spawnProcess(
            watcher, dfget_path(), [dfget_path(), "server", "--home", self.home, "--listen", "127.0.0.2", "--ip", "127.0.0.2"],
            env=self._env(),
        )
        self.addCleanup(lambda: None if watcher.ended.called else (process.signalProcess("TERM"), watcher.ended)[1])
        await watcher.ready
        with open(os.path.join(self.home, "meta", "host.meta")) as f:
            meta = json.load(f)
        out, err, code = await self.dfget("-u", self.url, "-o", os.path.join(self.work, "o.bin"), "--node", self.node)
        self.assertEqual((code, meta["serviceHost"]), (0, "127.0.0.2"), out + err)
        with open(os.path.join(self.home, "logs", "dfclient.log")) as f:
            self.assertNotIn("downloading in this process", f.read())
        with open(os.path.join(self.home, "meta", "host.meta")) as f:
            self.assertEqual(json.load(f)["pid"], meta["pid"])

    async def test_peer_daemon_exits_after_alivetime(self) -> None:
        """dfget server --alivetime 1s exits by itself and removes host.meta."""
        watcher = _Watcher({b"peer daemon"})
        reactor.spawnProcess(watcher, dfget_path(), [dfget_path(), "server", "--home", self.home, "--alivetime", "1s"],
                             env=self._env())
        await watcher.ready
        self.assertTrue(os.path.exists(os.path.join(self.home, "meta", "host.meta")))
        code = await watcher.ended
        self.assertEqual(code, 0)
        self.assertFalse(os.path.exists(os.path.join(self.home, "meta", "host.meta")))
