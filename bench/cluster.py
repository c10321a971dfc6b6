"""N hosts fetch one file at once over emulated links: plain downloads from the origin vs dfly.

``python3 bench/cluster.py`` runs it all with the defaults: N = 16 hosts,
F = 100 MiB, 100 Mbit/s links.  Try ``--peers 4 --size-mib 16`` first; the
native part of a default run alone takes N*F/U = 134 s.

Method.  Each host is its own peer daemon with its own address, and every
link (origin, supernode, each host) has the same rate U each way:

- **netns+tc** (when run as root, unless ``--no-netns``): the origin, the
  supernode and each host get a network namespace (``dflyc-*``) with one
  veth into a "switch" namespace that holds a bridge; addresses 10.213.0.0/24
  (origin .1, supernode .2, host k .(10+k)), no routes beyond.  Both ends
  of every veth are shaped with ``tc tbf``: the host end is that host's
  upload, the switch end its download.  Nothing is added to the root
  namespace.  The MTU is 9000 (``--mtu``): at 1500 the kernel's per-packet
  work for this emulated network alone (veth, bridge, tbf, in softirq)
  fills two cores, and 16 plain host-to-host curls of 100 MiB at once take
  15 s instead of 8.9 s.
- **loopback+dfly limits** (``--no-netns``, or not root): no tc; dfly's own
  limits stand in for the links: each peer daemon gets ``--totallimit U``
  (both ways), the supernode ``--max-bandwidth U`` (its source fetches) and
  ``--max-upload-bandwidth U`` (its CDN), the origin paces everything it
  sends through one token bucket at U, and each native ``curl`` gets
  ``--limit-rate U`` and leaves from its host's 127.0.0.(10+k).

In one run:

1. **native**: every host runs ``curl URL`` against the origin, all at once;
2. **dfly**: a fresh supernode (one more host, with the same link) and N
   peer daemons are started before the clock starts, then every host runs
   ``dfget --locallimit 0`` at once (dfget's own default is 10M per download);
3. **limit accuracy**: on 127.0.0.1, with no tc on that path, a fresh origin,
   supernode and peer daemon, and one ``dfget --locallimit 4M`` of 64 MiB,
   which should take 16 s.

The origin is a small twisted.web server in its own process (paced by
``dfly.ratelimit``) that counts every byte it writes and logs each response.
Files go to /dev/shm (``--tmpdir``): the emulated hosts share one disk here,
and in RAM their writes and fsyncs do not queue behind each other.

Reading the output:

- ``T_min = max(F/U_origin, F/D_host, N*F/(U_origin + N*U_host))`` is the
  fastest any scheme could give every host the file; ``/T_min`` is the
  slowest host's time over it.  Under tc U counts Ethernet/IP/TCP headers,
  so one TCP flow carries 99.3 % of U in file bytes at MTU 9000 (95.6 % at
  1500); T_min does not allow for that.
- Times are wall clock from the common start to each process's exit, so a
  dfget time includes its interpreter start-up, registering and the fsync.
- ``origin egress`` is what the origin wrote, ``x F`` the same in file sizes;
  ``from peers`` is the share of dfly's piece bytes that came from other
  peers rather than the supernode or the source, as each dfget reports it;
  ``hosts ok`` counts downloads that exited 0 with the right sha256 (for
  dfly, also through the host's own peer daemon).
- ``dfly: the origin sent ...`` is the supernode's fetch, in seconds from
  the start: after it ends, what is left is spreading the last pieces.
- The CPU line says where the two shared cores went during the dfly run:
  per role, and for the whole machine (softirq is mostly the emulated
  network; user time beyond our roles' is other work on the machine).
  When idle is near 0 the CPUs, not the links, set the pace.

Aims are marked PASS or MISS for information; the exit status is 1 only when
a download failed or its bytes are wrong.  Everything the run creates
(namespaces, processes, files) is removed at the end, on Ctrl-C and on
SIGTERM too; namespaces left by a killed run are removed at the next start.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from collections.abc import Iterator
from typing import Any, Self, TypeVar

import attrs
from twisted.internet.interfaces import IReactorCore, IReactorTime
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import resource as web_resource
from twisted.web import server
from twisted.web.server import Request

#: The checkout this script belongs to: its dfly is the one measured.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dfly.ratelimit import FileRangeProducer, TokenBucket  # noqa: E402

MIB = 1 << 20
#: Children find dfly (and its twistd plugin) in this checkout.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
DFGET = [sys.executable, "-m", "dfly.peer.cli"]
#: Everything this script creates in the network is named with this prefix.
PREFIX = "dflyc-"
SWITCH = PREFIX + "switch"
SUBNET = "10.213.0"
TBF = "burst 64kb latency 50ms"
AIM_SLOWEST = 1.5  # dfly's slowest host <= this x T_min
AIM_EGRESS = 1.05  # dfly's origin egress <= this x F
AIM_SPEEDUP = 8.0  # slowest native / slowest dfly >= this
LIMIT_MIB = 64
LIMIT_RATE = 4 * MIB  # passed as "4M" (dfly's suffixes are binary): 64 MiB take 16 s
LIMIT_TOLERANCE = 0.05

from benchlib import Children, machine_cpu, process_cpu, read_text
from benchlib import wait_for as _wait_for

T = TypeVar("T")
wait_for = partial(_wait_for, name='cluster')


@attrs.frozen
class Host:
    """One emulated machine: a name, an address, and the namespace it runs in (None on loopback)."""

    name: str
    ip: str
    netns: str | None = None

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv


@attrs.define
class Topology:
    """Who is where: the origin, the supernode and the N hosts."""

    origin: Host
    supernode: Host
    hosts: list[Host]
    netns: bool


@attrs.frozen
class Result:
    """One command of a `run_all`: seconds from the common start to its exit, exit status, output."""

    seconds: float
    code: int
    output: str


@attrs.define
class Phase:
    """What one way of distributing the file did."""

    name: str
    times: list[float]
    traffic: Traffic
    ok: int  # hosts whose download exited 0 with the right sha256 (dfly: and went through their daemon)
    sources: dict[str, int] = attrs.field(factory=dict)  # piece bytes by where they came from


# --- the origin (a child process) ------------------------------------------------


class OriginFiles(web_resource.Resource):
    """``GET /NAME``: the whole file (no Range), paced by one bucket all clients share.

    It counts the bytes it writes and logs each finished response as
    (client, start, end, bytes), times in seconds since the epoch.
    """

    isLeaf = True

    def __init__(self, directory: str, clock: IReactorTime, bucket: TokenBucket | None) -> None:
        super().__init__()
        self.directory = directory
        self.clock = clock
        self.bucket = bucket
        self.done_bytes = 0
        self.sending: set[FileRangeProducer] = set()
        self.responses: list[tuple[str, float, float, int]] = []

    def sent(self) -> int:
        """Bytes written to clients so far, finished responses and running ones."""
        return self.done_bytes + sum(p.sent for p in self.sending)

    def render_GET(self, request: Request) -> bytes | int:
        name = os.path.basename(request.path.decode("utf-8", "replace"))
        try:
            fd = os.open(os.path.join(self.directory, name), os.O_RDONLY)
        except OSError:
            request.setResponseCode(404)
            return b"not found\n"
        size = os.fstat(fd).st_size
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(size).encode())
        producer = FileRangeProducer(request, fd, 0, size, self.clock, self.bucket)
        self.sending.add(producer)
        request.notifyFinish().addErrback(lambda _: producer.stopProducing())
        start = self.clock.seconds()

        def ended(result: Failure | None) -> None:
            self.sending.discard(producer)
            self.done_bytes += producer.sent
            self.responses.append((request.getClientAddress().host, start, self.clock.seconds(), producer.sent))
            if result is None:
                request.finish()  # otherwise the client is gone

        producer.start().addBoth(ended)
        return server.NOT_DONE_YET


class OriginControl(LineReceiver):
    """The origin's stdin/stdout: each line in gets a JSON line of its counts; stdin closing stops it."""

    delimiter = b"\n"

    def __init__(self, files: OriginFiles, reactor: IReactorCore) -> None:
        self.files = files
        self.reactor = reactor

    def lineReceived(self, line: bytes) -> None:
        self.sendLine(json.dumps({"sent": self.files.sent(), "responses": self.files.responses}).encode())

    def connectionLost(self, reason: object = None) -> None:
        if self.reactor.running:  # not when SIGTERM stopped it first
            self.reactor.stop()


def serve_origin(directory: str, ip: str, rate: int) -> None:
    """Run the origin on ip:0; print ``port N``, then answer queries (see OriginControl)."""
    from twisted.internet import reactor, stdio

    files = OriginFiles(directory, reactor, TokenBucket(rate, reactor) if rate else None)
    port = reactor.listenTCP(0, server.Site(files), interface=ip)
    control = OriginControl(files, reactor)
    stdio.StandardIO(control)
    control.sendLine(f"port {port.getHost().port}".encode())
    reactor.run()


@attrs.frozen
class Response:
    """One response the origin finished, times in seconds from a phase's start."""

    client: str
    start: float
    end: float
    size: int


@attrs.define
class Traffic:
    """What the origin sent during a phase."""

    egress: int = 0
    responses: list[Response] = attrs.field(factory=list)


class Origin:
    """The origin process, as the parent sees it."""

    def __init__(self, process: subprocess.Popen[bytes], host: Host) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process, self.questions, self.answers = process, process.stdin, process.stdout
        line = self.answers.readline().decode()
        if not line.startswith("port "):
            raise SystemExit(f"cluster: the origin did not start (said {line!r})")
        self.base = f"http://{host.ip}:{int(line.split()[1])}"

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def counts(self) -> dict[str, Any]:
        """``{"sent": bytes, "responses": [[client, start, end, bytes], ...]}`` so far."""
        self.questions.write(b"?\n")
        self.questions.flush()
        return json.loads(self.answers.readline())

    @contextlib.contextmanager
    def measure(self) -> Iterator[Traffic]:
        """What the origin sends during the block (filled in when it ends)."""
        before, started = self.counts(), time.time()
        traffic = Traffic()
        yield traffic
        after = self.counts()
        traffic.egress = after["sent"] - before["sent"]
        traffic.responses = [Response(client, start - started, end - started, size)
                             for client, start, end, size in after["responses"][len(before["responses"]):]]


# --- processes -------------------------------------------------------------------


def start_origin(children: Children, host: Host, directory: str, rate: int) -> Origin:
    argv = host.command([sys.executable, os.path.abspath(__file__), "--serve-origin", directory, host.ip, str(rate)])
    return Origin(children.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE), host)


def start_supernode(children: Children, host: Host, home: str, rate: int, port: int = 0,
                    download_port: int = 0) -> tuple[str, int]:
    """A supernode limited to ``rate`` bytes/s each way (0: unlimited); its API ``ip:port`` and its pid.

    ``port`` and ``download_port`` 0 pick free ones.  Given an existing
    ``home`` (and the same ports) it is a restart: the cache there is kept.
    """
    log = os.path.join(home, "twistd.log")
    os.makedirs(home, exist_ok=True)
    earlier = len(read_text(log))  # a restart appends to the log of the last start
    limits = ["--max-bandwidth", str(rate), "--max-upload-bandwidth", str(rate)]  # 0: unlimited, whatever a yml says
    process = children.start(host.command([
        *TWISTD, "-n", "--pidfile=", "-l", log, "supernode", "--port", str(port), "--download-port", str(download_port),
        "--listen", host.ip, "--advertise-ip", host.ip, "--home", home, *limits]))

    def api_port() -> int | None:
        if process.poll() is not None:
            raise SystemExit(f"cluster: the supernode exited, see {log}")
        match = re.search(r"register API listening on [\d.]+:(\d+)", read_text(log)[earlier:])
        return int(match.group(1)) if match else None

    return f"{host.ip}:{wait_for(api_port, 'the supernode')}", process.pid


def start_peer_daemons(children: Children, hosts: list[Host], homes: list[str], rate: int) -> list[int]:
    """One ``dfget server`` per host with ``--totallimit rate``, each up before this returns; their pids."""
    limits = ["--totallimit", str(rate)]
    processes = []
    for host, home in zip(hosts, homes):
        listen, ip = daemon_address(host)
        argv = [*DFGET, "server", "--home", home, "--listen", listen, "--ip", ip, *limits]
        processes.append(children.start(host.command(argv), stdout=subprocess.DEVNULL))
    for process, home in zip(processes, homes):
        wait_for(functools.partial(publishes, process.pid, home), f"the peer daemon in {home}")
    return [p.pid for p in processes]


def publishes(pid: int, home: str) -> bool:
    """Has daemon ``pid`` written the host.meta in ``home``?  (dfget starts a daemon of its own unless it finds one.)"""
    return json.loads(read_text(os.path.join(home, "meta", "host.meta")) or "{}").get("pid") == pid


def daemon_address(host: Host) -> tuple[str, str]:
    """(--listen, --ip) of a host's peer daemon.

    In its own namespace a daemon listens on all the host's interfaces, as on
    a real machine.  On loopback every daemon uses 127.0.0.1, because dfget
    looks for its daemon only there (dfly/peer/cli.py, ping_daemon and
    download_via_daemon), whatever --listen said.
    """
    return ("0.0.0.0", host.ip) if host.netns else ("127.0.0.1", "127.0.0.1")


def run_all(commands: list[list[str]], timeout: float) -> list[Result]:
    """Start every command at once; each one's seconds from the common start, exit status and output."""
    started = time.monotonic()
    results = [Result(0.0, 0, "")] * len(commands)

    def wait(n: int, process: subprocess.Popen[bytes]) -> None:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        results[n] = Result(time.monotonic() - started, process.returncode, out.decode(errors="replace"))

    processes = [subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for c in commands]
    waiters = [threading.Thread(target=wait, args=(n, p)) for n, p in enumerate(processes)]
    try:
        for w in waiters:
            w.start()
        for w in waiters:
            w.join()
    finally:  # interrupted: the waiters end with their processes
        for p in processes:
            if p.poll() is None:
                p.kill()
    return results


# --- the network ----------------------------------------------------------------


def sh(*argv: str) -> str:
    """Run a setup command; its stdout, or exit with its error."""
    done = subprocess.run(argv, check=False, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"cluster: {' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def our_namespaces() -> list[str]:
    return [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.startswith(PREFIX)]


def remove_namespaces() -> list[str]:
    """Kill what still runs in our namespaces (by pid) and delete them; their veths and the bridge go too."""
    names = our_namespaces()
    for name in names:
        for pid in sh("ip", "netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    for name in sorted(names, key=lambda n: n == SWITCH):
        sh("ip", "netns", "del", name)
    return names


def shape(netns: str, device: str, rate_bits: int) -> None:
    sh("tc", "-n", netns, "qdisc", "replace", "dev", device, "root", "tbf", "rate", f"{rate_bits}bit", *TBF.split())


def add_host(host: Host, rate_bits: int, mtu: int) -> None:
    """Host's namespace, its veth into the switch, both ends shaped (upload inside, download at the switch)."""
    ns, port = host.netns, f"v-{host.name}"
    assert ns is not None
    sh("ip", "netns", "add", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")  # dfget talks to its daemon on 127.0.0.1
    sh("ip", "-n", ns, "link", "add", "eth0", "mtu", str(mtu), "type", "veth", "peer", "name", port, "mtu", str(mtu),
       "netns", SWITCH)
    sh("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
    sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", SWITCH, "link", "set", port, "master", "br0", "up")
    shape(ns, "eth0", rate_bits)
    shape(SWITCH, port, rate_bits)


@contextlib.contextmanager
def network(peers: int, netns: bool, rate_bits: int, mtu: int) -> Iterator[Topology]:
    """The hosts' addresses; with netns, the namespaces and shaped links, removed again on the way out."""
    if not netns:
        yield Topology(Host("origin", "127.0.0.1"), Host("supernode", "127.0.0.2"),
                       [Host(f"host{k}", f"127.0.0.{10 + k}") for k in range(1, peers + 1)], False)
        return
    topology = Topology(Host("origin", f"{SUBNET}.1", PREFIX + "origin"),
                        Host("supernode", f"{SUBNET}.2", PREFIX + "supernode"),
                        [Host(f"host{k}", f"{SUBNET}.{10 + k}", f"{PREFIX}host{k}") for k in range(1, peers + 1)], True)
    try:
        sh("ip", "netns", "add", SWITCH)
        sh("ip", "-n", SWITCH, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", SWITCH, "link", "set", "br0", "up")
        for host in [topology.origin, topology.supernode, *topology.hosts]:
            add_host(host, rate_bits, mtu)
        yield topology
    finally:
        remove_namespaces()


# --- measuring -------------------------------------------------------------------


def make_file(path: str, mib: int) -> str:
    """Write ``mib`` MiB of random bytes; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mib):
            block = os.urandom(MIB)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def sha256_of(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return ""


def children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


class CpuMeter:
    """CPU seconds spent during a block: per long-running process role, by the commands run, machine-wide."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self.pids = pids

    def sample(self) -> dict[str, tuple[float, float]]:
        roles = {role: [process_cpu(p) for p in pids] for role, pids in self.pids.items()}
        sample = {role: (sum(u for u, _ in cpu), sum(s for _, s in cpu)) for role, cpu in roles.items()}
        sample["dfget runs"] = children_cpu()
        return sample

    def __enter__(self) -> Self:
        self.before, self.machine_before, self.started = self.sample(), machine_cpu(), time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self.started
        after, machine = self.sample(), machine_cpu()
        self.used = {role: (u - self.before[role][0], s - self.before[role][1]) for role, (u, s) in after.items()}
        self.machine = {kind: seconds - self.machine_before[kind] for kind, seconds in machine.items()}

    def summary(self) -> str:
        cores = os.cpu_count() or 1
        roles = ", ".join(f"{role} {u + s:.1f} ({u:.1f} user)" for role, (u, s) in self.used.items())
        machine = ", ".join(f"{kind} {seconds:.1f}" for kind, seconds in self.machine.items())
        return (f"CPU seconds in the dfly run ({self.wall:.1f} s x {cores} cores = {self.wall * cores:.1f}): {roles}; "
                f"whole machine: {machine}")


# --- the phases ------------------------------------------------------------------


def run_native(top: Topology, origin: Origin, work: str, digest: str, rate: int, timeout: float) -> Phase:
    os.makedirs(os.path.join(work, "native"))
    outputs = [os.path.join(work, "native", f"{h.name}.bin") for h in top.hosts]
    # On loopback each curl leaves from its host's address, at its link rate.
    per_host = {h: [] if top.netns else ["--interface", h.ip, "--limit-rate", str(rate)] for h in top.hosts}
    with origin.measure() as traffic:
        results = run_all([h.command(["curl", "-sSf", "-o", out, *per_host[h], origin.url("file.bin")])
                           for h, out in zip(top.hosts, outputs)], timeout)
    ok = 0
    for h, r, out in zip(top.hosts, results, outputs):
        if r.code == 0 and sha256_of(out) == digest:
            ok += 1
        else:
            print(f"cluster: native download on {h.name} failed (exit {r.code}): {r.output.strip()}")
        with contextlib.suppress(FileNotFoundError):
            os.remove(out)  # room for dfly's copies when the files are in RAM
    return Phase("native", [r.seconds for r in results], traffic, ok)


def run_dfly(top: Topology, origin: Origin, children: Children, work: str, digest: str, rate: int,
             timeout: float) -> tuple[Phase, CpuMeter]:
    limit = 0 if top.netns else rate
    node, supernode_pid = start_supernode(children, top.supernode, os.path.join(work, "supernode"), limit)
    homes = [os.path.join(work, "homes", h.name) for h in top.hosts]
    daemon_pids = start_peer_daemons(children, top.hosts, homes, limit)
    os.makedirs(os.path.join(work, "dfly"))
    outputs = [os.path.join(work, "dfly", f"{h.name}.bin") for h in top.hosts]
    with origin.measure() as traffic, CpuMeter({"supernode": [supernode_pid], "peer daemons": daemon_pids,
                                                "origin": [origin.process.pid]}) as cpu:
        results = run_all([
            h.command([*DFGET, "-u", origin.url("file.bin"), "-o", out, "--node", node, "--home", home,
                       "--locallimit", "0"])
            for h, out, home in zip(top.hosts, outputs, homes)
        ], timeout)
    sources = {"peers": 0, "supernode": 0, "source": 0}
    ok = 0
    for h, r, out, home in zip(top.hosts, results, outputs, homes):
        match = re.search(r"from peers:(\d+) from supernode:(\d+) from source:(\d+)", r.output)
        if r.code or not match or sha256_of(out) != digest:
            print(f"cluster: dfget on {h.name} failed (exit {r.code}):\n{r.output.strip()}")
            continue
        for key, value in zip(sources, match.groups()):
            sources[key] += int(value)
        if "no peer daemon" in read_text(os.path.join(home, "logs", "dfclient.log")):
            # It waited 10 s for a daemon it could not reach, then downloaded by itself.
            print(f"cluster: dfget on {h.name} could not reach the host's peer daemon (see its dfclient.log)")
            continue
        ok += 1
    return Phase("dfly", [r.seconds for r in results], traffic, ok, sources), cpu


def limit_accuracy(work: str) -> tuple[float, bool]:
    """One dfget of LIMIT_MIB at --locallimit LIMIT_RATE on 127.0.0.1, nothing else limited; (seconds, ok)."""
    here = Host("limit", "127.0.0.1")
    directory = os.path.join(work, "limit-origin")
    os.makedirs(directory)
    digest = make_file(os.path.join(directory, "limit.bin"), LIMIT_MIB)
    home = os.path.join(work, "limit-home")
    output = os.path.join(work, "limit.bin")
    with Children(ENV) as children:
        origin = start_origin(children, here, directory, 0)
        node, _ = start_supernode(children, here, os.path.join(work, "limit-supernode"), 0)
        start_peer_daemons(children, [here], [home], 0)
        [result] = run_all([[*DFGET, "-u", origin.url("limit.bin"), "-o", output, "--node", node, "--home", home,
                             "--locallimit", f"{LIMIT_RATE // MIB}M"]], timeout=120)
    ok = result.code == 0 and sha256_of(output) == digest
    if not ok:
        print(f"cluster: the limit-accuracy dfget failed ({result.code}):\n{result.output.strip()}")
    return result.seconds, ok


# --- output ----------------------------------------------------------------------


def parse_link(text: str) -> int:
    """A tc-style rate (``100mbit``, ``1gbit``, ``512kbit``) in bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", text.strip().lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"invalid link rate {text!r}: expected e.g. 100mbit")
    return int(float(match.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[match.group(2)])


def lower_bound(size: int, peers: int, rate: int) -> tuple[float, str]:
    """T_min for equal links of ``rate`` bytes/s, and how it was reached."""
    terms = [size / rate, size / rate, peers * size / (rate + peers * rate)]
    return max(terms), "max(F/U_origin, F/D_host, N*F/(U_origin+N*U_host)) = max(" + ", ".join(
        f"{t:.2f}" for t in terms) + ")"


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(phases: list[Phase], size: int, peers: int, rate: int, t_min: float, cpu: CpuMeter) -> None:
    print(f"{'':7} {'slowest':>8} {'/T_min':>7} {'origin egress':>15} {'x F':>6} {'from peers':>11} {'hosts ok':>9}")
    for p in phases:
        total = sum(p.sources.values())
        share = f"{p.sources['peers'] / total:.1%}" if total else "-"
        print(f"{p.name:7} {max(p.times):>7.2f}s {max(p.times) / t_min:>7.2f} {p.traffic.egress:>15,} "
              f"{p.traffic.egress / size:>6.2f} {share:>11} {p.ok:>6}/{peers}")
    for p in phases:
        print(f"{p.name} host times (s, host1..host{peers}): {' '.join(f'{t:.2f}' for t in p.times)}")
    for p in phases:
        if p.name == "native":
            print(f"native: the origin's link carried {p.traffic.egress / MIB:.0f} MiB of file bytes in "
                  f"{max(p.times):.2f} s = {p.traffic.egress / MIB / max(p.times):.2f} MiB/s "
                  f"(link rate {rate / MIB:.2f} MiB/s)")
            continue
        print("dfly piece bytes: " + ", ".join(f"from {k} {v:,}" for k, v in p.sources.items()))
        for r in p.traffic.responses:
            print(f"dfly: the origin sent {r.size / MIB:.1f} MiB to {r.client} from {r.start:.2f} s to {r.end:.2f} s "
                  f"({r.end - r.start:.2f} s; F/U_origin = {size / rate:.2f} s); hosts finished "
                  f"{min(p.times):.2f}-{max(p.times):.2f} s")
        print(cpu.summary())


def report_aims(dfly: Phase, native: Phase | None, size: int, t_min: float) -> None:
    slowest = max(dfly.times)
    print("aims:")
    print(f"  {mark(slowest <= AIM_SLOWEST * t_min)} dfly slowest host {slowest:.2f} s <= {AIM_SLOWEST} x T_min "
          f"= {AIM_SLOWEST * t_min:.2f} s")
    egress = dfly.traffic.egress / size
    print(f"  {mark(egress <= AIM_EGRESS)} dfly origin egress {egress:.3f} x F <= {AIM_EGRESS} x F")
    if native is None:
        print(f"  ---- dfly >= {AIM_SPEEDUP:g}x faster than native: not measured (--skip-native)")
    else:
        speedup = max(native.times) / slowest
        print(f"  {mark(speedup >= AIM_SPEEDUP)} dfly {speedup:.1f}x faster than native (slowest native / slowest "
              f"dfly), aim >= {AIM_SPEEDUP:g}x")


def plot(path: str, phases: list[Phase], t_min: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    fig, ax = plt.subplots(figsize=(8, 5))
    for p in phases:
        ax.plot(range(1, len(p.times) + 1), sorted(p.times), marker="o", drawstyle="steps-mid",
                label=f"{p.name} (slowest {max(p.times):.1f} s)")
    ax.axhline(t_min, color="black", linestyle="--", label=f"T_min {t_min:.1f} s")
    ax.axhline(AIM_SLOWEST * t_min, color="gray", linestyle=":", label=f"{AIM_SLOWEST} x T_min (aim)")
    ax.set_yscale("log")
    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(ScalarFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("hosts, sorted by completion time")
    ax.set_ylabel("completion time (s, log scale)")
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=16, help="number of hosts [16]")
    parser.add_argument("--size-mib", type=int, default=100, help="file size in MiB [100]")
    parser.add_argument("--link", type=parse_link, default=parse_link("100mbit"),
                        help="every link's rate each way, tc style [100mbit]")
    parser.add_argument("--mtu", type=int, default=9000,
                        help="MTU of the emulated links [9000: at 1500 the kernel's per-packet work for the "
                             "emulated network alone fills two cores]")
    parser.add_argument("--no-netns", action="store_true", help="loopback addresses and dfly's limits, even as root")
    parser.add_argument("--skip-native", action="store_true", help="do not run the native downloads")
    parser.add_argument("--skip-limit", action="store_true", help="do not run the --locallimit accuracy check")
    parser.add_argument("--plot", default="cluster.png", help="PNG of completion times [cluster.png]; '' for none")
    parser.add_argument("--tmpdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the files go [/dev/shm: all hosts share one disk here, in RAM their writes "
                             "and fsyncs do not queue behind each other]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not 1 <= args.peers <= 200:
        parser.error("--peers must be 1-200")
    return args


def describe_mode(args: argparse.Namespace, netns: bool) -> str:
    if netns:
        return (f"netns+tc: origin, supernode and {args.peers} hosts each in a network namespace ({PREFIX}*) on one "
                f"bridge, every link shaped with tc tbf to {args.link / 1e6:g} Mbit/s each way, MTU {args.mtu}; "
                "the supernode is one more host with the same link")
    return ("loopback+dfly limits: origin 127.0.0.1, supernode 127.0.0.2, curl on host k from 127.0.0.(10+k), "
            "peer daemons on 127.0.0.1, no tc; the link rate is the origin's total pacing, curl --limit-rate, "
            "peer daemon --totallimit and supernode --max-bandwidth/--max-upload-bandwidth")


def run_cluster(args: argparse.Namespace, netns: bool, rate: int, work: str) -> tuple[list[Phase], CpuMeter]:
    """Native (unless skipped) then dfly, in one network; everything started is gone when this returns."""
    timeout = 3 * args.peers * args.size_mib * MIB / rate + 120  # native takes N*F/U
    with network(args.peers, netns, args.link, args.mtu) as top, Children() as children:
        os.makedirs(os.path.join(work, "origin"))
        digest = make_file(os.path.join(work, "origin", "file.bin"), args.size_mib)
        origin = start_origin(children, top.origin, os.path.join(work, "origin"), 0 if netns else rate)
        phases = [] if args.skip_native else [run_native(top, origin, work, digest, rate, timeout)]
        dfly, cpu = run_dfly(top, origin, children, work, digest, rate, timeout)
    return [*phases, dfly], cpu


def check_limit(work: str) -> bool:
    """Run and print the limit-accuracy check; False when the download itself failed."""
    seconds, ok = limit_accuracy(work)
    expected = LIMIT_MIB * MIB / LIMIT_RATE
    error = seconds / expected - 1
    print(f"  {mark(ok and abs(error) <= LIMIT_TOLERANCE)} limit accuracy: one dfget of {LIMIT_MIB} MiB at "
          f"--locallimit {LIMIT_RATE // MIB}M on 127.0.0.1 took {seconds:.2f} s, expected {expected:.2f} s, "
          f"error {error:+.1%} (aim within {LIMIT_TOLERANCE:.0%})")
    return ok


def stopped(signum: int, frame: object) -> None:
    """SIGTERM: leave through the finally blocks, which remove everything this run made."""
    print("cluster: terminated, cleaning up", file=sys.stderr)
    sys.exit(128 + signum)


def main() -> int:
    args = parse_args()
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("cluster: --plot needs matplotlib: python3 -m pip install matplotlib "
                             "(or --plot '' for no plot)") from None
    started = time.monotonic()
    netns = os.geteuid() == 0 and not args.no_netns
    rate = args.link // 8  # bytes/s
    size = args.size_mib * MIB
    t_min, how = lower_bound(size, args.peers, rate)
    signal.signal(signal.SIGTERM, stopped)
    if netns:
        leftovers = remove_namespaces()
        if leftovers:
            print(f"cluster: removed leftovers of an earlier run: {' '.join(leftovers)}")
    print(f"cluster: mode {describe_mode(args, netns)}")
    print(f"cluster: N = {args.peers} hosts, F = {args.size_mib} MiB, link {args.link / 1e6:g} Mbit/s = {rate:,} B/s "
          f"each way; T_min = {how} = {t_min:.2f} s")
    work = tempfile.mkdtemp(prefix="dfly-cluster-", dir=args.tmpdir)
    try:
        phases, cpu = run_cluster(args, netns, rate, work)
        report(phases, size, args.peers, rate, t_min, cpu)
        ok = all(p.ok == args.peers for p in phases)
        report_aims(phases[-1], phases[0] if len(phases) > 1 else None, size, t_min)
        if not args.skip_limit:
            ok = check_limit(work) and ok
        if args.plot:
            title = f"{args.peers} hosts, {args.size_mib} MiB, {args.link / 1e6:g} Mbit/s, " + (
                "netns+tc" if netns else "loopback+dfly limits")
            plot(args.plot, phases, t_min, title)
            print(f"cluster: plot written to {os.path.abspath(args.plot)}")
    finally:
        if args.keep:
            print(f"cluster: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"cluster: {'done' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve-origin":
        serve_origin(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        try:
            sys.exit(main())
        except KeyboardInterrupt:  # the finally blocks have cleaned up by now
            sys.exit("cluster: interrupted")
