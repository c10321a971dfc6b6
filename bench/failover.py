"""Supernode failover: N peers fetch one file while the task's supernode is killed, hung or restarted.

``python3 bench/failover.py`` runs every case with the defaults: 8 peers,
2 supernodes, a 128 MiB file, ``--locallimit 32M`` per download, about
3 minutes.  ``--quick`` is a smoke run (32 MiB, 4 peers, only the 30 % cases).

Method.  One origin (bench/cluster.py's: a twisted.web server in its own
process that counts every byte it writes) serves the file on 127.0.0.1 with
no limit.  Each case starts everything else afresh, on loopback only:
``--supernodes`` supernodes (``twistd -n supernode`` on 127.0.0.2, .3, ...,
each with its own home and fixed ports, so a restart can reuse them) and N
peer daemons (``dfget server``, each with its own home), then runs N
``dfget --node A,B --locallimit L`` at once, each for a URL of its own
(a new file name: a fresh task) and a fresh output file.  The client orders
the nodes per task by rendezvous hashing; the first in that order, the
task's *active* supernode, is the one the case faults, computed here with
``dfly.placement.rendezvous_order(task_key(url), nodes)[0]``:

- ``fault-free``: nothing happens (the baseline of the ratios);
- ``kill@P``: SIGKILL the active supernode;
- ``hang@P``: SIGSTOP it, and SIGCONT it once every dfget has ended;
- ``restart@P``: SIGTERM it, wait for it to exit, start it again with the
  same ``--port``, ``--download-port`` and ``--home`` (its CDN cache stays).

P (30 % and 60 %) is the peers' aggregate progress: the bytes written into
the peers' working files (allocated blocks of ``data/*.server``, capped at
F each) over N x F, polled every 50 ms.  With ``--trigger timer`` it is a
timer at P x the fault-free slowest time instead.  The output says which.

Reading the output:

- ``slowest``: wall clock from the common start to the last dfget's exit
  (its interpreter start-up, registration and fsync included); ``x base``
  the same over the fault-free case's;
- ``twice``: bytes fetched twice, the sum over the successful peers of
  ``from peers + from supernode + from source - F`` (dfget's own counts of
  verified pieces: a piece cut off mid-body is not in them);
- ``egress/F``: what the origin wrote during the case, in file sizes
  (the supernodes' CDN fetches plus any peer's back-to-source);
- ``to source``: peers that fetched any bytes from the origin themselves;
- ``migr``: migrations to another supernode, summed over the peers;
- ``ok``: dfgets that exited 0 with a result line; ``sha256``: all of those
  outputs have the file's sha256;
- the lines under the table say when the fault landed, where each peer
  registered, why peers migrated and what the origin sent to whom;
- the CPU lines give, per case, the CPU seconds of each role and how busy
  the machine was; a case is marked CPU-bound when less than 10 % of its
  CPU time (wall x cores) was idle: then the CPUs, not the rate limit, set
  the pace, and times stretch for every process at once.

Aims (printed PASS or MISS, information only): for every fault case the
slowest host within 1.3 x the fault-free slowest; for kill and restart the
origin egress within 1.05 x F; a hung node adds at most 5 s.  The exit
status is 1 only when a download failed or its bytes are wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Callable

import attrs

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchlib import Children, read_text  # noqa: E402
from cluster import (  # noqa: E402
    DFGET,
    ENV,
    MIB,
    CpuMeter,
    Host,
    Origin,
    Response,
    Result,
    make_file,
    mark,
    run_all,
    sha256_of,
    start_origin,
    start_peer_daemons,
    start_supernode,
)
from dfly.config import format_node, parse_size  # noqa: E402
from dfly.placement import rendezvous_order, task_key  # noqa: E402

AIM_RATIO = 1.3  # a fault case's slowest host <= this x the fault-free slowest
AIM_EGRESS = 1.05  # kill and restart: origin egress <= this x F
AIM_HANG_ADDED = 5.0  # seconds a hung node may add to the slowest host
CPU_BOUND_IDLE = 0.10  # a case whose idle share of wall x cores is below this was CPU-bound
POLL = 0.05
FROM = re.compile(r"from peers:(\d+) from supernode:(\d+) from source:(\d+)")
REGISTERED = re.compile(r"do register to (\S+), res:(.*)$", re.M)
MIGRATING = re.compile(r"migrating taskID:\S+ away from its supernode: (.*)$", re.M)


@attrs.frozen
class Case:
    fault: str | None  # None, "kill", "hang" or "restart"
    at: float = 0.0  # the share of the download at which the fault lands

    @property
    def name(self) -> str:
        return f"{self.fault}@{self.at:.0%}" if self.fault else "fault-free"

    @property
    def slug(self) -> str:
        return f"{self.fault}-{self.at * 100:.0f}" if self.fault else "fault-free"


@attrs.define(eq=False)
class Supernode:
    """One supernode of a case: where it listens and lives, and its current process."""

    host: Host
    home: str
    port: int
    download_port: int
    pid: int = 0

    @property
    def node(self) -> tuple[str, int]:
        return self.host.ip, self.port

    def start(self, children: Children) -> None:
        _, self.pid = start_supernode(children, self.host, self.home, 0, self.port, self.download_port)


@attrs.define
class Outcome:
    """What one case did."""

    case: Case
    times: list[float]
    ok: int  # dfgets that exited 0 with a result line
    right: int  # ... whose output has the right sha256
    twice: int
    egress: int
    to_source: int
    migrations: int
    cpu: CpuMeter
    notes: list[str]


def free_port(ip: str) -> int:
    """A port free on ``ip`` now (the supernodes need fixed ports to be restarted on)."""
    with socket.socket() as s:
        s.bind((ip, 0))
        return s.getsockname()[1]


def allocated(home: str, size: int) -> int:
    """Bytes written so far into the working files of a peer's home (tmpfs allocates as it is written)."""
    total = 0
    try:
        entries = list(os.scandir(os.path.join(home, "data")))
    except OSError:
        return 0
    for entry in entries:
        if entry.name.endswith(".server"):
            try:
                total += entry.stat().st_blocks * 512
            except OSError:
                pass  # replaced under us
    return min(total, size)


def exited(pid: int) -> bool:
    """Has child ``pid`` exited?  It is not reaped: its CPU times stay readable in /proc."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


class Fault(threading.Thread):
    """Waits for the case's moment, then faults the target supernode (from a thread, while run_all waits)."""

    def __init__(self, case: Case, target: Supernode, children: Children, progress: Callable[[], float],
                 deadline: float | None, pids: list[int]) -> None:
        super().__init__(daemon=True)
        self.case, self.target, self.children, self.progress, self.deadline = case, target, children, progress, deadline
        self.pids = pids  # the CpuMeter's list of supernode pids: a restarted one joins it
        self.ended = threading.Event()
        self.started_at = 0.0
        self.events: list[str] = []
        self.error = ""

    def now(self) -> float:
        return time.monotonic() - self.started_at

    def due(self) -> bool:
        if self.deadline is not None:
            return self.now() >= self.deadline
        return self.progress() >= self.case.at

    def run(self) -> None:
        try:
            while not self.due():
                if self.ended.wait(POLL):
                    self.events.append(f"every dfget ended before the fault was due ({self.progress():.0%} done)")
                    return
            self.fault()
        except BaseException as e:  # SystemExit from start_supernode included
            self.error = f"{type(e).__name__}: {e}"

    def fault(self) -> None:
        target, fault = self.target, self.case.fault
        what = {"kill": "SIGKILL", "hang": "SIGSTOP", "restart": "SIGTERM"}[fault]
        self.events.append(f"{what} at {self.now():.2f} s, progress {self.progress():.1%}")
        os.kill(target.pid, {"kill": signal.SIGKILL, "hang": signal.SIGSTOP, "restart": signal.SIGTERM}[fault])
        if fault != "restart":
            return
        while not exited(target.pid):
            if self.ended.wait(POLL):
                self.events.append("every dfget ended before it exited")
                return
        self.events.append(f"exited at {self.now():.2f} s")
        target.start(self.children)
        self.pids.append(target.pid)
        self.events.append(f"listening again at {self.now():.2f} s")


def run_case(case: Case, args: argparse.Namespace, origin: Origin, source: str, digest: str,
             work: str, baseline: float | None) -> Outcome:
    size = args.mib * MIB
    case_dir = os.path.join(work, case.slug)
    name = f"{case.slug}.bin"
    os.link(source, os.path.join(os.path.dirname(source), name))  # a fresh URL: a fresh task
    url = origin.url(name)
    hosts = [Host(f"host{k}", f"127.0.0.{10 + k}") for k in range(1, args.peers + 1)]
    homes = [os.path.join(case_dir, "homes", h.name) for h in hosts]
    outputs = [os.path.join(case_dir, "out", f"{h.name}.bin") for h in hosts]
    os.makedirs(os.path.join(case_dir, "out"))
    with Children(ENV) as children:
        supernodes = []
        for i in range(args.supernodes):
            host = Host(f"supernode{i + 1}", f"127.0.0.{2 + i}")
            supernodes.append(Supernode(host, os.path.join(case_dir, host.name), free_port(host.ip),
                                        free_port(host.ip)))
        for s in supernodes:
            s.start(children)
        daemon_pids = start_peer_daemons(children, hosts, homes, 0)
        nodes = [s.node for s in supernodes]
        active = rendezvous_order(task_key(url), nodes)[0]
        target = next(s for s in supernodes if s.node == active)
        node_arg = ",".join(format_node(n) for n in nodes)
        commands = [[*DFGET, "-u", url, "-o", out, "--node", node_arg, "--home", home, "--locallimit", args.locallimit]
                    for out, home in zip(outputs, homes)]
        supernode_pids = [s.pid for s in supernodes]
        fault = None
        if case.fault:
            deadline = case.at * baseline if args.trigger == "timer" and baseline else None
            fault = Fault(case, target, children, lambda: sum(allocated(h, size) for h in homes) / (len(homes) * size),
                          deadline, supernode_pids)
        with origin.measure() as traffic, CpuMeter({"supernodes": supernode_pids, "peer daemons": daemon_pids,
                                                    "origin": [origin.process.pid]}) as cpu:
            if fault is not None:
                fault.started_at = time.monotonic()
                fault.start()
            try:
                results = run_all(commands, args.timeout)
            finally:
                if fault is not None:
                    fault.ended.set()
                    fault.join()
                if case.fault == "hang":
                    os.kill(target.pid, signal.SIGCONT)
    outcome = judge(case, results, outputs, homes, size, digest, traffic.egress, cpu)
    outcome.notes[:0] = describe(case, target, active, nodes, fault, traffic.responses, homes)
    if not args.keep:
        shutil.rmtree(case_dir, ignore_errors=True)
        os.remove(os.path.join(os.path.dirname(source), name))
    return outcome


def judge(case: Case, results: list[Result], outputs: list[str], homes: list[str], size: int, digest: str,
          egress: int, cpu: CpuMeter) -> Outcome:
    ok = right = twice = to_source = migrations = 0
    notes = []
    for n, (r, out, home) in enumerate(zip(results, outputs, homes), 1):
        match = FROM.search(r.output)
        migrated = re.search(r" migrated:(\d+)", r.output)
        migrations += int(migrated.group(1)) if migrated else 0
        went_to_source = "download from source" in read_text(os.path.join(home, "logs", "dfclient.log"))
        if r.code or not match:
            last = r.output.strip().splitlines()[-1:] or ["(no output)"]
            notes.append(f"host{n}: dfget failed after {r.seconds:.2f} s (exit {r.code}): {last[0]}")
            to_source += went_to_source
            continue
        ok += 1
        peers, supernode, source = map(int, match.groups())
        twice += peers + supernode + source - size
        to_source += source > 0 or went_to_source
        if sha256_of(out) == digest:
            right += 1
        else:
            notes.append(f"host{n}: the output's sha256 is wrong")
        if "no peer daemon" in read_text(os.path.join(home, "logs", "dfclient.log")):
            notes.append(f"host{n}: dfget could not reach its peer daemon and downloaded by itself")
    return Outcome(case, [r.seconds for r in results], ok, right, twice, egress, to_source, migrations, cpu, notes)


def describe(case: Case, target: Supernode, active: tuple[str, int], nodes: list[tuple[str, int]],
             fault: Fault | None, responses: list[Response], homes: list[str]) -> list[str]:
    """The lines under the table for one case: the fault, registrations, migrations, the origin's responses."""
    lines = []
    if fault is not None:
        lines.append(f"{target.host.name} {format_node(active)} (the task's first node) " + "; ".join(fault.events))
        if fault.error:
            lines.append(f"the fault thread failed: {fault.error}")
    else:
        lines.append(f"active supernode {target.host.name} {format_node(active)}")
    paths: Counter[str] = Counter()
    whys: Counter[str] = Counter()
    for home in homes:
        log = read_text(os.path.join(home, "logs", "dfclient.log"))
        path = []
        for where, answer in REGISTERED.findall(log):
            try:
                registered = json.loads(answer).get("code") == 200
            except ValueError:
                registered = False
            if registered:
                path.append(where)
        paths[" -> ".join(path) or "never registered"] += 1
        whys.update(re.sub(r"\d+\.\d+s", "Ns", why) for why in MIGRATING.findall(log))
    lines.append("registered with: " + "; ".join(f"{p} ({n} peers)" for p, n in paths.most_common()))
    for why, n in whys.most_common():
        lines.append(f"migrated ({n}x): {why}")
    for r in responses:
        lines.append(f"origin sent {r.size / MIB:.1f} MiB to {r.client} from {r.start:.2f} s to {r.end:.2f} s")
    return lines


# --- output ----------------------------------------------------------------------


def cpu_line(o: Outcome) -> str:
    cores = os.cpu_count() or 1
    budget = o.cpu.wall * cores
    idle = o.cpu.machine["idle"]
    roles = ", ".join(f"{role} {u + s:.1f}" for role, (u, s) in o.cpu.used.items())
    verdict = "CPU-bound" if idle < CPU_BOUND_IDLE * budget else "not CPU-bound"
    return (f"  {o.case.name:12} {o.cpu.wall:5.1f} s x {cores} = {budget:5.1f} CPU-s, idle {idle:4.1f} "
            f"({idle / budget:4.0%}), softirq {o.cpu.machine['softirq']:.1f}; {roles}: {verdict}")


def report(outcomes: list[Outcome], args: argparse.Namespace, size: int) -> None:
    base = max(outcomes[0].times)
    n = args.peers
    print(f"{'case':12} {'slowest':>8} {'x base':>7} {'twice':>12} {'egress/F':>9} {'to source':>10} {'migr':>5} "
          f"{'ok':>6} {'sha256':>7}")
    for o in outcomes:
        slowest = max(o.times)
        sha = "ok" if o.right == o.ok == n else f"{o.ok - o.right} bad" if o.ok > o.right else "-"
        print(f"{o.case.name:12} {slowest:>7.2f}s {slowest / base:>7.2f} {o.twice:>12,} {o.egress / size:>9.2f} "
              f"{o.to_source:>7}/{n} {o.migrations:>5} {o.ok:>4}/{n} {sha:>7}")
    for o in outcomes:
        print(f"{o.case.name}: hosts finished {min(o.times):.2f}-{max(o.times):.2f} s")
        for note in o.notes:
            print(f"  {note}")
    print("CPU (machine-wide idle; per role CPU seconds; 'dfget runs' are the CLI processes):")
    for o in outcomes:
        print(cpu_line(o))
    print("aims:")
    for o in outcomes[1:]:
        slowest = max(o.times)
        print(f"  {mark(slowest <= AIM_RATIO * base)} {o.case.name}: slowest {slowest:.2f} s <= {AIM_RATIO} x "
              f"fault-free = {AIM_RATIO * base:.2f} s")
        if o.case.fault in ("kill", "restart"):
            print(f"  {mark(o.egress <= AIM_EGRESS * size)} {o.case.name}: origin egress {o.egress / size:.3f} x F "
                  f"<= {AIM_EGRESS} x F")
        if o.case.fault == "hang":
            added = slowest - base
            print(f"  {mark(added <= AIM_HANG_ADDED)} {o.case.name}: the hung node added {added:+.2f} s "
                  f"<= {AIM_HANG_ADDED:g} s")
        if o.ok < n or o.right < o.ok:
            print(f"  MISS {o.case.name}: {o.ok}/{n} succeeded, {o.right} with the right sha256")


# --- main ------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=None, help="peer daemons, one dfget each [8; --quick 4]")
    parser.add_argument("--supernodes", type=int, default=2, help="supernodes given to every dfget, 2 or 3 [2]")
    parser.add_argument("--mib", type=int, default=None, help="file size in MiB [128; --quick 32]")
    parser.add_argument("--locallimit", default="32M",
                        help="dfget --locallimit of every download, so a fault lands mid-download [32M]")
    parser.add_argument("--at", default=None, help="where faults land, shares of the download [0.3,0.6; --quick 0.3]")
    parser.add_argument("--faults", default="kill,hang,restart", help="faults to run [kill,hang,restart]")
    parser.add_argument("--trigger", choices=("progress", "timer"), default="progress",
                        help="progress: the peers' bytes on disk reach the share; timer: share x fault-free "
                             "slowest time [progress]")
    parser.add_argument("--quick", action="store_true", help="smoke run: 32 MiB, 4 peers, only the 30%% cases")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds a dfget may take before it is killed [120 + 10 x F/locallimit]")
    parser.add_argument("--tmpdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the files go [/dev/shm, so the peers' writes do not queue on one disk]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (and every case's homes)")
    args = parser.parse_args()
    args.peers = args.peers or (4 if args.quick else 8)
    args.mib = args.mib or (32 if args.quick else 128)
    try:
        args.at = [float(a) for a in (args.at or ("0.3" if args.quick else "0.3,0.6")).split(",")]
        rate = parse_size(args.locallimit)
    except ValueError as e:
        parser.error(str(e))
    args.faults = [f for f in args.faults.split(",") if f]
    if not 2 <= args.supernodes <= 3:
        parser.error("--supernodes must be 2 or 3")
    if not 1 <= args.peers <= 40:
        parser.error("--peers must be 1-40")
    if any(not 0 < a < 1 for a in args.at) or set(args.faults) - {"kill", "hang", "restart"}:
        parser.error("--at takes shares between 0 and 1, --faults some of kill,hang,restart")
    args.floor = args.mib * MIB / rate if rate else 0.0
    if args.timeout is None:
        args.timeout = 120 + 10 * args.floor
    return args


def stopped(signum: int, frame: object) -> None:
    """SIGTERM: leave through the with and finally blocks, which end the processes and remove the files."""
    print("failover: terminated, cleaning up", file=sys.stderr)
    sys.exit(128 + signum)


def main() -> int:
    args = parse_args()
    signal.signal(signal.SIGTERM, stopped)
    started = time.monotonic()
    size = args.mib * MIB
    cases = [Case(None)] + [Case(f, a) for a in args.at for f in args.faults]
    print(f"failover: {args.peers} peers, {args.supernodes} supernodes, F = {args.mib} MiB, every dfget "
          f"--locallimit {args.locallimit} (F/locallimit = {args.floor:.2f} s), loopback (127.0.0.x), no other limit")
    print("failover: the fault lands when " + (
        "the peers' aggregate progress (bytes in their working files / (N x F)) reaches the share"
        if args.trigger == "progress" else "share x the fault-free slowest time has passed (a timer)"))
    work = tempfile.mkdtemp(prefix="dfly-failover-", dir=args.tmpdir)
    outcomes: list[Outcome] = []
    try:
        with Children(ENV) as children:
            os.makedirs(os.path.join(work, "origin"))
            source = os.path.join(work, "origin", "file.bin")
            digest = make_file(source, args.mib)
            origin = start_origin(children, Host("origin", "127.0.0.1"), os.path.dirname(source), 0)
            for case in cases:
                baseline = max(outcomes[0].times) if outcomes else None
                outcome = run_case(case, args, origin, source, digest, work, baseline)
                outcomes.append(outcome)
                print(f"failover: {case.name} done, slowest {max(outcome.times):.2f} s, "
                      f"{outcome.ok}/{args.peers} ok", flush=True)
        report(outcomes, args, size)
    finally:
        if args.keep:
            print(f"failover: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    ok = all(o.ok == o.right == args.peers for o in outcomes)
    print(f"failover: {'done' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # the with and finally blocks have cleaned up by now
        sys.exit("failover: interrupted")
