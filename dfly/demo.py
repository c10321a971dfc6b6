"""``python -m dfly.demo``: the main job end to end on this machine, on loopback only.

It makes a file, serves it over HTTP on 127.0.0.1, starts a real
``twistd supernode``, downloads the file with ``dfget`` through it, checks
the bytes and prints what happened.  Everything lives in a temporary
directory and is stopped at the end.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


#: twistd run by this interpreter (``python -m twisted`` is ``twist``, not twistd).
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]


def _wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: {url} did not come up within {timeout:g}s")
            time.sleep(0.1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="size of the demo file in MiB [64]")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="dfly-demo-")
    origin_dir = os.path.join(work, "origin")
    os.makedirs(origin_dir)
    source = os.path.join(origin_dir, "release.tar")
    digest = hashlib.sha256()
    with open(source, "wb") as f:
        for _ in range(args.size):
            block = os.urandom(1 << 20)
            digest.update(block)
            f.write(block)

    handler = functools.partial(_QuietHandler, directory=origin_dir)
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{origin.server_address[1]}/release.tar"

    api_port, cdn_port = _free_port(), _free_port()
    supernode = subprocess.Popen(
        [*TWISTD, "-n", "--pidfile=", "-l", os.path.join(work, "supernode.out"),
         "supernode", "--home", os.path.join(work, "supernode"), "--listen", "127.0.0.1",
         "--port", str(api_port), "--download-port", str(cdn_port), "--advertise-ip", "127.0.0.1"],
    )
    home = os.path.join(work, "home")
    output = os.path.join(work, "release.tar")
    try:
        _wait_for(f"http://127.0.0.1:{api_port}/_ping", 20)
        print(f"demo: origin {url} ({args.size} MiB), supernode on 127.0.0.1:{api_port} (CDN {cdn_port})")
        command = ["dfget", "-u", url, "-o", output, "--node", f"127.0.0.1:{api_port}", "--home", home]
        print("demo: $ " + " ".join(command))
        status = subprocess.call([sys.executable, "-m", "dfly.peer.cli", *command[1:]])
        with open(output, "rb") as f:
            same = hashlib.file_digest(f, "sha256").hexdigest() == digest.hexdigest()
        print(f"demo: dfget exited {status}; output sha256 {'matches' if same else 'DIFFERS from'} the source")
        print(f"demo: logs in {home}/logs/dfclient.log and {work}/supernode/logs/supernode.log")
        if status != 0 or not same:
            raise SystemExit(1)
    finally:
        _stop_daemon(home)
        supernode.send_signal(signal.SIGTERM)
        supernode.wait(10)
        origin.shutdown()


def _stop_daemon(home: str) -> None:
    try:
        with open(os.path.join(home, "meta", "host.meta")) as f:
            os.kill(json.load(f)["pid"], signal.SIGTERM)
    except (OSError, ValueError, KeyError):
        pass


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    main()
