"""System tests of supernode failure: real ``twistd supernode`` and ``dfget`` processes on loopback.

Supernodes are killed (SIGKILL), hung (SIGSTOP), restarted and lost in the
middle of downloads by real peer daemons; ``dfget`` and its daemon are
killed and run again.  The origin runs in the test process so every byte it
sends is counted (full bodies and ranges, `egress`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web import server

from dfly.pieces import MiB
from dfly.placement import rendezvous_order, task_key
from tests.loopback import ClosingFactory
from tests.system.test_processes import TWISTD
from tests.system.test_registry import Child, console_script
from tests.test_integration import Origin, Served, distinct_mebibytes, sha256_file

Node = tuple[str, int]

_RESULT = re.compile(r"(?m)^download (SUCCESS|FAIL)\((\d+)\) cost:([\d.]+)s length:(-?\d+) reason:(\d+)"
                     r"(?: migrated:(\d+))?(?: resumed:(\d+))?(?: error:(.*))?$")
_FROM = re.compile(r"(?m)^from peers:(\d+) from supernode:(\d+) from source:(\d+)$")


@attrs.frozen
class Run:
    """What one ``dfget`` printed: its result line and byte counts."""

    code: int | None
    output: str
    success: bool = False
    cost: float = 0.0
    reason: int = -1
    migrated: int = 0
    resumed: int = 0
    from_peers: int = 0
    from_supernode: int = 0
    from_source: int = 0

    @classmethod
    def parse(cls, code: int | None, output: str) -> "Run":
        result, counts = _RESULT.search(output), _FROM.search(output)
        if result is None:
            return cls(code, output)
        peers, supernode, source = (int(n) for n in counts.groups()) if counts else (0, 0, 0)
        return cls(code, output, result.group(1) == "SUCCESS", float(result.group(3)), int(result.group(5)),
                   int(result.group(6) or 0), int(result.group(7) or 0), peers, supernode, source)

    @property
    def fetched(self) -> int:
        return self.from_peers + self.from_supernode + self.from_source


@attrs.define
class Supernode:
    child: Child
    node: Node
    cdn_port: int
    home: str


class FleetTestCase(TestCase):
    """An origin in this process, supernodes and dfget runs as processes; all in ``self.work``."""

    timeout = 180

    def setUp(self) -> None:
        self.work = os.path.abspath(self.mktemp())
        os.makedirs(self.work)
        self.origin = Origin(os.path.join(self.work, "origin"))
        factory = ClosingFactory(server.Site(self.origin))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(factory.close_all)
        self.addCleanup(port.stopListening)
        self.origin_root = f"http://127.0.0.1:{port.getHost().port}/"
        self.dfget_bin = console_script("dfget")
        self.count = 0

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["HOME"] = self.work
        return env

    def spawn(self, name: str, argv: list[str]) -> Child:
        child = Child(name)
        reactor.spawnProcess(child, argv[0], argv, env=self.env())
        self.addCleanup(child.stop)
        return child

    async def start_supernode(self, name: str, api_port: int = 0, cdn_port: int = 0) -> Supernode:
        home = os.path.join(self.work, name)
        child = self.spawn(name, [
            *TWISTD, "-n", "--pidfile=", "-l", "-", "supernode", "--port", str(api_port),
            "--download-port", str(cdn_port), "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1", "--home", home,
        ])
        cdn = await child.wait_for(rb"CDN listening on 127\.0\.0\.1:(\d+)")
        api = await child.wait_for(rb"register API listening on 127\.0\.0\.1:(\d+)")
        return Supernode(child, ("127.0.0.1", int(api.group(1))), int(cdn.group(1)), home)

    async def restart(self, supernode: Supernode) -> Supernode:
        """SIGTERM, then the same ports and home again: a supernode restarted in place."""
        await supernode.child.stop()
        return await self.start_supernode(os.path.basename(supernode.home), supernode.node[1], supernode.cdn_port)

    def hang(self, supernode: Supernode) -> None:
        """SIGSTOP: the kernel still accepts its connections, nothing answers them."""
        os.kill(supernode.child.pid, signal.SIGSTOP)

        def resume() -> None:
            try:
                os.kill(supernode.child.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

        self.addCleanup(resume)  # before its stop (cleanups run last-in, first-out)

    def home(self, name: str) -> str:
        home = os.path.join(self.work, name)
        self.addCleanup(self.stop_daemon, home, signal.SIGTERM)
        return home

    def stop_daemon(self, home: str, sig: int) -> None:
        """Signal the peer daemon of ``home`` (its pid is in host.meta)."""
        try:
            with open(os.path.join(home, "meta", "host.meta")) as f:
                os.kill(json.load(f)["pid"], sig)
        except (OSError, ValueError, KeyError):
            pass

    def dfget_child(self, home: str, url: str, output: str, nodes: tuple[Node, ...], *args: str) -> Child:
        listed = ",".join(f"{host}:{port}" for host, port in nodes)
        return self.spawn("dfget", [self.dfget_bin, "--home", home, "-u", url, "-o", output, "--node", listed, *args])

    async def dfget(self, home: str, url: str, output: str, nodes: tuple[Node, ...], *args: str) -> Run:
        child = self.dfget_child(home, url, output, nodes, *args)
        timer = reactor.callLater(120, child.transport.signalProcess, "KILL")
        code = await child.ended
        if timer.active():
            timer.cancel()
        return Run.parse(code, child.output)

    def serve_placed(self, node: Node, nodes: tuple[Node, ...], prefix: str, mebibytes: int) -> Served:
        """A new file whose task the rendezvous order gives to ``node`` first."""
        for n in range(1000):
            self.count += 1
            name = f"{prefix}-{self.count}.bin"
            if rendezvous_order(task_key(self.origin_root + name), nodes)[0] == node:
                return self.serve(name, mebibytes)
        raise AssertionError(f"no name placed first on {node}")

    def serve(self, name: str, mebibytes: int) -> Served:
        sha256, length = self.origin.put(name, distinct_mebibytes(mebibytes))
        return Served(self.origin_root + name, sha256, length)

    def egress(self, served: Served) -> int:
        """Bytes the origin sent of ``served``: whole bodies and the ranges it answered."""
        name = served.url.removeprefix(self.origin_root)
        sent = 0
        for seen in self.origin.requests(name):
            if seen.code == 200:
                sent += served.length
            elif seen.code == 206:
                first, _, last = seen.headers["Range"].removeprefix("bytes=").partition("-")
                sent += (int(last) if last else served.length - 1) - int(first) + 1
        return sent

    def verified(self, homes: list[str]) -> int:
        """Pieces the peers of ``homes`` have recorded as verified (their resume records in data/)."""
        count = 0
        for home in homes:
            for path in glob.glob(os.path.join(home, "data", "*.pieces")):
                try:
                    with open(path) as f:
                        count += len(json.load(f)["pieces"])
                except (OSError, ValueError, KeyError):
                    pass
        return count

    async def when_verified(self, homes: list[str], pieces: int, within: float = 60.0) -> None:
        """Wait until ``pieces`` pieces are verified over ``homes`` (polling their records)."""
        waited = 0.0
        while self.verified(homes) < pieces:
            if waited >= within:
                raise AssertionError(f"fewer than {pieces} pieces verified within {within:g} s")
            await deferLater(reactor, 0.1, lambda: None)
            waited += 0.1

    def client_log(self, home: str) -> str:
        with open(os.path.join(home, "logs", "dfclient.log"), encoding="utf-8") as f:
            return f.read()

    def assertRun(self, run: Run, output: str, served: Served) -> None:
        self.assertTrue(run.success and run.code == 0, run.output)
        self.assertEqual(sha256_file(output), served.sha256)


class PlacementTests(FleetTestCase):
    async def test_30_urls_spread_over_3_supernodes_and_each_is_fetched_once(self) -> None:
        """Rendezvous placement: each supernode about a third, both peers of a task on one node, one origin GET."""
        supernodes = await gatherResults([Deferred.fromCoroutine(self.start_supernode(f"sn{n}")) for n in range(3)])
        nodes = tuple(s.node for s in supernodes)
        files = [self.serve(f"spread-{n}.bin", 1) for n in range(30)]
        homes = [self.home("peer1"), self.home("peer2")]
        for n, served in enumerate(files):
            runs = await gatherResults([
                Deferred.fromCoroutine(self.dfget(home, served.url, os.path.join(self.work, f"{i}-{n}.out"), nodes))
                for i, home in enumerate(homes)])
            for i, run in enumerate(runs):
                self.assertRun(run, os.path.join(self.work, f"{i}-{n}.out"), served)
        expected = {s.node: [f.url for f in files if rendezvous_order(task_key(f.url), nodes)[0] == s.node]
                    for s in supernodes}
        for supernode in supernodes:
            fetched = re.findall(r"start to download taskID:\S+ from (\S+),", supernode.child.output)
            self.assertEqual(sorted(fetched), sorted(expected[supernode.node]))
            self.assertTrue(3 <= len(fetched) <= 19, {s.node: len(expected[s.node]) for s in supernodes})
        # Both peers of each task met on one supernode.
        registered = [{task: node for node, task in re.findall(r"do register to (\S+), res:.*?\"taskId\": \"(\w+)\"",
                                                               self.client_log(home))} for home in homes]
        self.assertEqual(registered[0], registered[1])
        self.assertEqual(len(registered[0]), 30)
        for served in files:
            self.assertEqual(self.origin.full_gets(served.url.removeprefix(self.origin_root)), 1)


class HungSupernodeTests(FleetTestCase):
    async def test_a_hung_supernode_costs_one_short_wait_per_daemon(self) -> None:
        """SIGSTOPped and first in the task's order: the download goes to the second within seconds, the next 10 never wait."""
        hung, good = await self.start_supernode("hung"), await self.start_supernode("good")
        nodes = (hung.node, good.node)
        self.hang(hung)
        home = self.home("peer")
        where = f"127.0.0.1:{hung.node[1]}"
        for n in range(11):
            served = self.serve_placed(hung.node, nodes, "h", 1)
            output = os.path.join(self.work, f"h{n}.out")
            run = await self.dfget(home, served.url, output, nodes)
            self.assertRun(run, output, served)
            self.assertEqual((run.reason, run.from_source), (0, 0), run.output)
            if n == 0:
                # A hang check (3 s) and a ping (2 s), not the registration's 60 s.
                self.assertLess(run.cost, 20.0, run.output)
        attempts = re.findall(r"do register to %s failed: (.*)" % re.escape(where), self.client_log(home))
        self.assertEqual(len(attempts), 1, attempts)
        self.assertIn("does not answer, not even /_ping", attempts[0])


class MidDownloadTests(FleetTestCase):
    PEERS = 4
    MEBIBYTES = 64
    PIECES = 16  # 4 MiB pieces

    async def downloads(self, served: Served, nodes: tuple[Node, ...], homes: list[str]) -> list[Deferred[Run]]:
        return [Deferred.fromCoroutine(self.dfget(home, served.url, os.path.join(home + ".out"), nodes, "-s", "12M"))
                for home in homes]

    async def test_killed_supernode_hands_every_download_to_the_next(self) -> None:
        """SIGKILL of the task's supernode at ~30 %: 4 peers finish via the second; no verified piece is fetched again."""
        a, b = await self.start_supernode("a"), await self.start_supernode("b")
        nodes = (a.node, b.node)
        served = self.serve_placed(a.node, nodes, "kill", self.MEBIBYTES)
        homes = [self.home(f"peer{n}") for n in range(self.PEERS)]
        running = await self.downloads(served, nodes, homes)
        await self.when_verified(homes, self.PEERS * self.PIECES * 3 // 10)
        os.kill(a.child.pid, signal.SIGKILL)
        runs = await gatherResults(running)
        for home, run in zip(homes, runs):
            self.assertRun(run, home + ".out", served)
            self.assertEqual(run.from_source, 0, run.output)
            self.assertEqual(run.migrated, 1, run.output)
            self.assertEqual(run.fetched, served.length, run.output)  # each byte once: kept pieces not refetched
            self.assertIn("migrating taskID:", self.client_log(home))
        self.assertIn("start to download", b.child.output)

    async def test_restarted_supernode_takes_its_downloads_back_without_the_origin(self) -> None:
        """SIGTERM and start again at ~40 %: peers re-register; the origin sends the file about once; no source."""
        a = await self.start_supernode("a")
        served = self.serve("restart.bin", self.MEBIBYTES)
        homes = [self.home(f"peer{n}") for n in range(self.PEERS)]
        running = await self.downloads(served, (a.node,), homes)
        await self.when_verified(homes, self.PEERS * self.PIECES * 4 // 10)
        await self.restart(a)
        runs = await gatherResults(running)
        for home, run in zip(homes, runs):
            self.assertRun(run, home + ".out", served)
            self.assertEqual((run.reason, run.from_source), (0, 0), run.output)
            self.assertEqual(run.migrated, 1, run.output)
            self.assertEqual(run.fetched, served.length, run.output)
        self.assertLessEqual(self.egress(served), 1.02 * served.length)

    async def test_all_supernodes_gone_back_to_source_fetches_only_the_missing_ranges(self) -> None:
        a = await self.start_supernode("a")
        served = self.serve("gone.bin", 32)
        home = self.home("peer")
        running = Deferred.fromCoroutine(self.dfget(home, served.url, home + ".out", (a.node,), "-s", "12M"))
        await self.when_verified([home], 3)
        os.kill(a.child.pid, signal.SIGKILL)
        before = len(self.origin.requests("gone.bin"))
        run = await running
        self.assertRun(run, home + ".out", served)
        self.assertNotEqual(run.reason, 0)
        self.assertGreater(run.from_supernode, 0)
        self.assertEqual(run.from_supernode + run.from_source, served.length)
        after = self.origin.requests("gone.bin")[before:]
        self.assertTrue(after and all(seen.code == 206 for seen in after), after)
        self.assertIn("back to source for", self.client_log(home))


class ResumeTests(FleetTestCase):
    async def killed_at_half(self, served: Served, home: str, nodes: tuple[Node, ...]) -> None:
        """dfget and its peer daemon killed with -9 once half the pieces are recorded."""
        child = self.dfget_child(home, served.url, home + ".out", nodes, "-s", "12M")
        await self.when_verified([home], 8)
        self.stop_daemon(home, signal.SIGKILL)
        child.transport.signalProcess("KILL")
        await child.ended

    async def test_killed_dfget_and_daemon_resume_from_the_verified_pieces(self) -> None:
        a = await self.start_supernode("a")
        served = self.serve("resume.bin", 64)
        home = self.home("peer")
        await self.killed_at_half(served, home, (a.node,))
        run = await self.dfget(home, served.url, home + ".out", (a.node,))
        self.assertRun(run, home + ".out", served)
        self.assertLessEqual(run.fetched, 0.55 * served.length, run.output)
        self.assertEqual(run.fetched + run.resumed, served.length, run.output)
        self.assertIn("resuming from break-point", self.client_log(home))

    async def test_a_corrupted_piece_in_the_working_file_is_refetched_alone(self) -> None:
        a = await self.start_supernode("a")
        served = self.serve("corrupt.bin", 64)
        home = self.home("peer")
        await self.killed_at_half(served, home, (a.node,))
        [record] = glob.glob(os.path.join(home, "data", "*.pieces"))
        with open(record) as f:
            pieces = json.load(f)["pieces"]
        bad = min(int(n) for n in pieces)
        with open(record.removesuffix(".pieces"), "r+b") as f:
            f.seek(bad * 4 * MiB + 100)
            f.write(b"corrupted")
        run = await self.dfget(home, served.url, home + ".out", (a.node,))
        self.assertRun(run, home + ".out", served)
        self.assertEqual(run.resumed, (len(pieces) - 1) * 4 * MiB, run.output)
        self.assertEqual(run.fetched, served.length - run.resumed)
        self.assertIn(f"resume: pieces [{bad}] of ", self.client_log(home))

    async def test_a_corrupt_record_is_reported_and_nothing_unverified_is_kept(self) -> None:
        a = await self.start_supernode("a")
        served = self.serve("badrecord.bin", 64)
        home = self.home("peer")
        await self.killed_at_half(served, home, (a.node,))
        [record] = glob.glob(os.path.join(home, "data", "*.pieces"))
        with open(record, "w") as f:
            f.write('{"version": 1, "pieces": ')
        run = await self.dfget(home, served.url, home + ".out", (a.node,))
        self.assertRun(run, home + ".out", served)
        self.assertEqual((run.resumed, run.fetched), (0, served.length), run.output)
        self.assertIn("resume: ", self.client_log(home))
