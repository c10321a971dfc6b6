"""dfly throughput benchmark: curl straight from the origin vs. dfget through a supernode.

Run it from the repository (loopback only, everything in one temporary directory)::

    python3 bench/throughput.py [--size-mib 1024] [--runs 1] [--origin auto] [--keep]

What it does, for each run:

1. makes a --size-mib file of incompressible bytes (every MiB differs) and serves
   it from an origin HTTP server in its own process on 127.0.0.1 (``auto`` times
   one curl from ``python -m http.server`` and from ``twistd web`` and keeps the
   faster);
2. **direct**: ``curl -sf -o OUT URL``;
3. **cold**: a fresh ``twistd supernode`` (empty cache) and ``dfget -u URL
   --locallimit 0`` (unlimited: the default 10M would measure the limit)
   through it: the supernode fetches from the origin while the peer pulls pieces;
4. **warm**: the same supernode again (every piece cached), a new output file;
5. reads the high-water mark of resident memory (``VmHWM`` in /proc/PID/status)
   of the peer daemon and of the supernode after the downloads.

Every output is checked against the source's sha256.  Rates are MiB/s (2**20
bytes per second) of wall-clock time around the whole command, so a dfget
figure includes starting the dfget interpreter, registering, the fsync and
placing the file; the peer daemon itself is started (and answering) before the
clock starts, as it would be on a host that already ran a download.  The
ratios are dfget/direct; the aims (cold >= 0.5, warm >= 0.8, peer peak RSS
<= 100 MiB) are marked PASS or MISS for information only.  Exit status: 0,
or 1 when a download failed or its bytes differ from the source.  With
--runs N the table shows the median rate and the highest RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

MIB = 1 << 20
HOST = "127.0.0.1"
#: twistd run by this interpreter (as in dfly/demo.py).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
DFGET = [sys.executable, "-m", "dfly.peer.cli"]
AIMS = {"cold": 0.5, "warm": 0.8, "rss": 100.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 30.0, method: str = "GET") -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"bench: {url} did not come up (process exit status {proc.poll()})")
        time.sleep(0.1)


def stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def make_source(path: str, size_mib: int) -> str:
    """Write size_mib MiB (a few MiB of urandom, each MiB stamped with its index); return sha256."""
    pool = os.urandom(4 * MIB)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for i in range(size_mib):
            start = (i * 7919 % 3) * MIB
            block = i.to_bytes(8, "big") + pool[start + 8:start + MIB]
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def start_origin(kind: str, directory: str, work: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    if kind == "http.server":
        cmd = [sys.executable, "-m", "http.server", "--bind", HOST, str(port), "--directory", directory]
    else:
        cmd = [*TWISTD, "-n", "--pidfile=", "-l", os.path.join(work, "origin.log"),
               "web", "--path", directory, "--listen", f"tcp:{port}:interface={HOST}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_http(f"http://{HOST}:{port}/source.bin", proc, method="HEAD")
    return proc, port


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(cmd, check=False, capture_output=True, text=True)
    return time.perf_counter() - started, done


def curl(url: str, out: str, size: int, digest: str) -> float:
    """MiB/s of one curl download; SystemExit(1) if it failed or the bytes differ."""
    seconds, done = timed(["curl", "-sf", "-o", out, url])
    check(done, out, digest, "curl")
    os.unlink(out)
    return size / MIB / seconds


def check(done: subprocess.CompletedProcess, out: str, digest: str, what: str) -> None:
    if done.returncode != 0:
        sys.stdout.write(done.stdout + done.stderr)
        raise SystemExit(f"bench: {what} exited {done.returncode}")
    if sha256_of(out) != digest:
        raise SystemExit(f"bench: {what} output {out} differs from the source")


def vm_hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return float("nan")


def start_peer_daemon(home: str, work: str) -> tuple[subprocess.Popen, int]:
    """``dfget server`` as dfget would spawn it; returns it and the pid from host.meta."""
    with open(os.path.join(work, "daemon.out"), "wb") as out:
        proc = subprocess.Popen([*DFGET, "server", "--home", home], stdout=out, stderr=subprocess.STDOUT)
    meta_path = os.path.join(home, "meta", "host.meta")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            wait_http(f"http://{HOST}:{meta['servicePort']}/_ping", proc, 10)
            return proc, int(meta["pid"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.05)
    raise SystemExit(f"bench: the peer daemon did not come up (see {work}/daemon.out)")


def one_run(n: int, url: str, size: int, digest: str, work: str) -> dict[str, float]:
    run_dir = os.path.join(work, f"run{n}")
    os.makedirs(run_dir)
    result = {"direct": curl(url, os.path.join(run_dir, "direct.bin"), size, digest)}
    api, cdn = free_port(), free_port()
    supernode = daemon = None
    home = os.path.join(run_dir, "peer")
    try:
        supernode = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", "-l", os.path.join(run_dir, "supernode.out"), "supernode",
             "--home", os.path.join(run_dir, "supernode"), "--listen", HOST, "--port", str(api),
             "--download-port", str(cdn), "--advertise-ip", HOST],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_http(f"http://{HOST}:{api}/_ping", supernode)
        started = time.perf_counter()
        daemon, pid = start_peer_daemon(home, run_dir)
        print(f"  run {n}: peer daemon pid {pid} up in {time.perf_counter() - started:.2f}s, "
              f"supernode pid {supernode.pid}")
        for phase in ("cold", "warm"):
            out = os.path.join(run_dir, f"{phase}.bin")
            seconds, done = timed([*DFGET, "-u", url, "-o", out, "--node", f"{HOST}:{api}", "--home", home,
                                   "--locallimit", "0"])
            check(done, out, digest, f"dfget ({phase})")
            os.unlink(out)
            result[phase] = size / MIB / seconds
            cost = re.search(r"cost:([\d.]+)s", done.stdout)
            print(f"  run {n}: {phase}: {seconds:.2f}s wall, dfget says cost {cost.group(1) if cost else '?'}s, "
                  f"peer VmHWM {vm_hwm_mib(pid):.1f} MiB")
        result["peer_rss"] = vm_hwm_mib(pid)
        result["supernode_rss"] = vm_hwm_mib(supernode.pid)
        print(f"  run {n}: direct {result['direct']:.1f}, cold {result['cold']:.1f}, "
              f"warm {result['warm']:.1f} MiB/s")
    finally:
        try:  # the daemon dfget would find in host.meta, if it is not the one we started
            with open(os.path.join(home, "meta", "host.meta")) as f:
                pid = json.load(f)["pid"]
            if daemon is None or pid != daemon.pid:
                os.kill(pid, signal.SIGTERM)
        except (OSError, ValueError, KeyError):
            pass
        stop(daemon)
        stop(supernode)
        shutil.rmtree(os.path.join(run_dir, "supernode", "repo"), ignore_errors=True)
    return result


def report(results: list[dict[str, float]]) -> None:
    med = {k: statistics.median(r[k] for r in results) for k in ("direct", "cold", "warm")}
    peak = {k: max(r[k] for r in results) for k in ("peer_rss", "supernode_rss")}
    mark = lambda ok: "PASS" if ok else "MISS"
    rows = [
        ("direct (curl) MiB/s", f"{med['direct']:.1f}", ""),
        ("cold dfget MiB/s", f"{med['cold']:.1f}", ""),
        ("warm dfget MiB/s", f"{med['warm']:.1f}", ""),
        ("cold / direct", f"{med['cold'] / med['direct']:.2f}",
         f">= {AIMS['cold']:.1f}  {mark(med['cold'] / med['direct'] >= AIMS['cold'])}"),
        ("warm / direct", f"{med['warm'] / med['direct']:.2f}",
         f">= {AIMS['warm']:.1f}  {mark(med['warm'] / med['direct'] >= AIMS['warm'])}"),
        ("peer daemon peak RSS MiB", f"{peak['peer_rss']:.1f}",
         f"<= {AIMS['rss']:.0f}  {mark(peak['peer_rss'] <= AIMS['rss'])}"),
        ("supernode peak RSS MiB", f"{peak['supernode_rss']:.1f}", ""),
    ]
    print(f"\n{'metric':<26}{'value':>10}   aim")
    print("-" * 50)
    for name, value, aim in rows:
        print(f"{name:<26}{value:>10}   {aim}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="size of the test file in MiB [1024]")
    parser.add_argument("--runs", type=int, default=1, help="repetitions; the table shows medians [1]")
    parser.add_argument("--origin", choices=("auto", "http.server", "twisted"), default="auto",
                        help="origin HTTP server; auto times both with curl and keeps the faster [auto]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("bench: curl is needed for the direct download")
    work = tempfile.mkdtemp(prefix="dfly-bench-")
    origin = None
    try:
        origin_dir = os.path.join(work, "origin")
        os.makedirs(origin_dir)
        size = args.size_mib * MIB
        started = time.perf_counter()
        digest = make_source(os.path.join(origin_dir, "source.bin"), args.size_mib)
        print(f"bench: {args.size_mib} MiB source in {work} ({time.perf_counter() - started:.1f}s), sha256 {digest[:16]}...")
        kind = args.origin
        if kind == "auto":  # both up at once, best of two curls each; keep the faster
            servers: dict[str, tuple[subprocess.Popen, int]] = {}
            try:
                for k in ("http.server", "twisted"):
                    servers[k] = start_origin(k, origin_dir, work)
                speeds = {k: max(curl(f"http://{HOST}:{servers[k][1]}/source.bin", os.path.join(work, "probe.bin"),
                                      size, digest) for _ in range(2)) for k in servers}
                kind = max(speeds, key=speeds.__getitem__)
                origin, port = servers.pop(kind)
            finally:
                for proc, _ in servers.values():
                    stop(proc)
            print("bench: origin probe (best of 2 curls): " + ", ".join(f"{k} {v:.1f} MiB/s" for k, v in speeds.items()))
        else:
            origin, port = start_origin(kind, origin_dir, work)
        url = f"http://{HOST}:{port}/source.bin"
        print(f"bench: origin {kind} at {url}")
        results = [one_run(n, url, size, digest, work) for n in range(1, args.runs + 1)]
        report(results)
    finally:
        stop(origin)
        if args.keep:
            print(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
