"""N hosts fetch one file at once: plain downloads from the origin vs dfly.

``python3 bench/cluster.py [--peers 8] [--size-mib 64]``

In one run, on 127.0.0.1 only:

1. **native**: N ``curl`` processes fetch the file from the origin at once;
2. **dfly**: a fresh ``twistd supernode``, N peer daemons (each with its own
   home and port, as N hosts would have) and N ``dfget`` runs at once.

For each it prints the origin's egress (bytes and multiples of the file size)
and the slowest host's time; for dfly also the share of piece bytes that
came from other peers rather than the supernode's CDN, as ``dfget`` reports
them.  The origin is a small HTTP server in its own process that counts what
it sends.  All hosts share this machine's CPUs, so times say little about a
real network; the byte counts are exact.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
DFGET = [sys.executable, "-m", "dfly.peer.cli"]


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files and counts every byte it sends; GET /_stats reports it."""

    sent = 0
    lock = threading.Lock()

    def do_GET(self) -> None:
        if self.path == "/_stats":
            body = json.dumps({"sent": CountingHandler.sent}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def copyfile(self, source, outputfile) -> None:  # type: ignore[no-untyped-def]
        while chunk := source.read(1 << 16):
            outputfile.write(chunk)
            with CountingHandler.lock:
                CountingHandler.sent += len(chunk)

    def log_message(self, format: str, *args: object) -> None:
        pass


def serve_origin(directory: str, port_file: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(CountingHandler, directory=directory))
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    server.serve_forever()


def origin_sent(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stats", timeout=5) as r:
        return json.load(r)["sent"]


def wait_for(predicate, what: str, timeout: float = 20.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"cluster: {what} did not come up within {timeout:g}s")


def read_port(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read() or 0) or None
    except OSError:
        return None


def run_all(commands: list[list[str]]) -> list[tuple[float, int, str]]:
    """Start every command at once; (seconds, exit status, stdout) of each."""
    started = time.monotonic()
    results: list[tuple[float, int, str]] = [(0.0, 0, "")] * len(commands)

    def wait(n: int, process: subprocess.Popen[bytes]) -> None:
        out, _ = process.communicate()
        results[n] = (time.monotonic() - started, process.returncode, out.decode(errors="replace"))

    waiters = [
        threading.Thread(target=wait, args=(n, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for n, c in enumerate(commands)
    ]
    for w in waiters:
        w.start()
    for w in waiters:
        w.join()
    return results


def sha256_of(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=8, help="number of hosts [8]")
    parser.add_argument("--size-mib", type=int, default=64, help="file size in MiB [64]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dfly-cluster-")
    children: list[subprocess.Popen[bytes]] = []
    homes = [os.path.join(work, f"host{n}") for n in range(args.peers)]
    try:
        os.makedirs(os.path.join(work, "origin"))
        source = os.path.join(work, "origin", "file.bin")
        with open(source, "wb") as f:
            block = os.urandom(1 << 20)
            for n in range(args.size_mib):
                f.write(n.to_bytes(8, "big") + block[8:])
        size = os.path.getsize(source)
        digest = sha256_of(source)
        port_file = os.path.join(work, "origin.port")
        children.append(subprocess.Popen([sys.executable, __file__, "--serve-origin", os.path.join(work, "origin"), port_file]))
        origin = wait_for(lambda: read_port(port_file), "the origin")
        url = f"http://127.0.0.1:{origin}/file.bin"

        # native: every host pulls from the origin
        before = origin_sent(origin)
        native = run_all([["curl", "-sf", "-o", os.path.join(work, f"native{n}.bin"), url] for n in range(args.peers)])
        native_egress = origin_sent(origin) - before
        if any(code for _, code, _ in native):
            raise SystemExit("cluster: a native download failed")

        # dfly: one supernode, one peer daemon per host
        log = os.path.join(work, "supernode.out")
        children.append(subprocess.Popen([*TWISTD, "-n", "--pidfile=", "-l", log, "supernode", "--port", "0",
                                          "--download-port", "0", "--listen", "127.0.0.1", "--advertise-ip",
                                          "127.0.0.1", "--home", os.path.join(work, "supernode")]))

        def api_port() -> int | None:
            try:
                with open(log) as f:
                    match = re.search(r"register API listening on [\d.]+:(\d+)", f.read())
            except OSError:
                return None
            return int(match.group(1)) if match else None

        node = f"127.0.0.1:{wait_for(api_port, 'the supernode')}"
        for home in homes:
            children.append(subprocess.Popen([*DFGET, "server", "--home", home, "--listen", "127.0.0.1",
                                              "--ip", "127.0.0.1"], stdout=subprocess.DEVNULL))
        for home in homes:
            wait_for(lambda home=home: os.path.exists(os.path.join(home, "meta", "host.meta")), "a peer daemon")
        before = origin_sent(origin)
        dfly = run_all([[*DFGET, "-u", url, "-o", os.path.join(work, f"dfly{n}.bin"), "--node", node, "--home", home]
                        for n, home in enumerate(homes)])
        dfly_egress = origin_sent(origin) - before
        peers = supernode = 0
        for n, (_, code, out) in enumerate(dfly):
            match = re.search(r"from peers:(\d+) from supernode:(\d+)", out)
            if code or not match or sha256_of(os.path.join(work, f"dfly{n}.bin")) != digest:
                raise SystemExit(f"cluster: dfly download {n} failed:\n{out}")
            peers += int(match.group(1))
            supernode += int(match.group(2))

        print(f"cluster: {args.peers} hosts, {args.size_mib} MiB file, loopback")
        print(f"{'':8} {'origin egress':>16} {'x file':>7} {'slowest host':>13} {'from peers':>11}")
        print(f"{'native':8} {native_egress:>16,} {native_egress / size:>7.2f} {max(t for t, _, _ in native):>12.2f}s {'-':>11}")
        print(f"{'dfly':8} {dfly_egress:>16,} {dfly_egress / size:>7.2f} {max(t for t, _, _ in dfly):>12.2f}s "
              f"{peers / max(peers + supernode, 1):>10.0%}")
        print(f"dfly host times: {' '.join(f'{t:.2f}' for t, _, _ in dfly)}")
    finally:
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"cluster: kept {work}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-origin":
        serve_origin(sys.argv[2], sys.argv[3])
    else:
        main()
