"""N hosts pull one image at once: straight from the registry vs through dfdaemon.

``python3 bench/registry.py`` runs it with the defaults: N = 4 hosts, an
image of 3 layers of 16 MiB.  Needs Debian's ``docker-registry`` and
``skopeo`` (``.ci/run`` installs them).

Method.  Everything runs on 127.0.0.1, with no link shaping: one CNCF
distribution registry (``docker-registry serve``, its own config, filesystem
storage) holds an image made for the run (an OCI layout with ``--layers``
gzip'd tar layers of random bytes, ``--layer-mib`` MiB each, pushed with
``skopeo copy``).  Two phases, one after the other:

1. **direct**: N ``skopeo copy docker://127.0.0.1:R/test/app:1 dir:OUT``
   start at the same moment;
2. **dfly**: a fresh supernode and N dfdaemons (``--ratelimit 0``; its
   default of 20M would cap every blob) are started before the clock starts.
   Host k's skopeo gets a ``registries.conf`` that maps
   ``unreachable.invalid/test`` to a port that refuses connections, with
   dfdaemon k as the only mirror, so nothing can fall back to the registry;
   then the N ``skopeo copy docker://unreachable.invalid/test/app:1 dir:OUT``
   start at the same moment.

Reading the output:

- ``slowest`` is the wall-clock time from the common start to the last
  skopeo's exit: it includes skopeo's start, the manifest round trips and,
  for dfly, registering each blob with the supernode.
- ``registry egress`` sums the bytes of the registry's blob responses in
  the phase (its access log: one line per response, with the bytes it
  wrote); ``x image`` is that over the image's blob bytes.  Direct costs N
  images; dfly should cost one (the supernode fetches each blob once and the
  hosts share it), plus a few bytes per blob for the supernode's access probes.
- ``hosts ok`` counts pulls that exited 0 with every blob matching its
  digest; ``from peers`` is the share of the piece bytes the dfdaemons
  requested from each other rather than from the supernode's CDN (from the
  ``downloading piece`` lines of each ``dfdaemon.log``).
- On loopback the links are free, so the times show dfly's overhead (every
  blob passes through the supernode, a dfdaemon and its working file, on the
  same CPUs), not the speed-up a registry uplink shared by N hosts would see;
  the egress column is the point.  ``bench/cluster.py`` measures time over
  emulated links.

The exit status is 1 when a pull failed or its bytes are wrong.  Processes
and files are removed at the end (``--keep`` keeps the files).
"""

from __future__ import annotations

import argparse
import hashlib
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
from functools import partial
from typing import TypeVar

import attrs

#: The checkout this script belongs to: its dfly is the one measured.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 1 << 20
TWISTD = [sys.executable, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"]
PACKAGES = "docker-registry skopeo"
_BLOB_RESPONSE = re.compile(r'"(?:GET|HEAD) /v2/\S+/blobs/sha256:[0-9a-f]{64} HTTP/[\d.]+" (\d{3}) (\d+) ')
_PIECE = re.compile(r'downloading piece:(\{.*\})$', re.MULTILINE)

from benchlib import Children
from benchlib import wait_for as _wait_for

sys.path.insert(0, REPO)  # for tests.oci, the image the system tests push too
from tests.oci import make_image  # noqa: E402

T = TypeVar("T")
wait_for = partial(_wait_for, name='registry bench')


def environment(home: str) -> dict[str, str]:
    """Children find dfly (and its twistd plugin) in this checkout; no proxies, HOME in the run's directory."""
    env = {k: v for k, v in os.environ.items()
           if not k.lower().endswith("_proxy") and k not in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))
    env["HOME"] = home
    return env


def log_match(process: subprocess.Popen[bytes], log: str, pattern: str, what: str) -> re.Match[str]:
    """Wait until ``log`` (``process``'s output) matches ``pattern``."""

    def found() -> re.Match[str] | None:
        if process.poll() is not None:
            raise SystemExit(f"registry bench: {what} exited, see {log}")
        with open(log, errors="replace") as f:
            return re.search(pattern, f.read())

    return wait_for(found, what)


# --- the image and the registry --------------------------------------------------


class Registry:
    """``docker-registry serve`` on 127.0.0.1, its access log read by phase."""

    def __init__(self, children: Children, binary: str, work: str) -> None:
        root = os.path.join(work, "registry")
        os.makedirs(root)
        config = os.path.join(root, "config.yml")
        with open(config, "w") as f:
            json.dump({"version": "0.1", "log": {"level": "info", "accesslog": {"disabled": False}},
                       "storage": {"filesystem": {"rootdirectory": os.path.join(root, "data")}},
                       "http": {"addr": "127.0.0.1:0", "secret": "not-a-secret-bench-only"}}, f)  # JSON is YAML
        self.log = os.path.join(root, "registry.log")
        self.process = children.start([binary, "serve", config], self.log)
        self.port = 0  # known once it listens

    def wait_listening(self) -> None:
        def port() -> int | None:
            if self.process.poll() is not None:
                raise SystemExit(f"registry bench: the registry exited, see {self.log}")
            with open(self.log, errors="replace") as f:
                text = f.read()
            match = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
            return int(match.group(1)) if match else None

        self.port = wait_for(port, "the registry")

    def offset(self) -> int:
        return os.path.getsize(self.log)

    def blob_egress(self, since: int) -> tuple[int, int]:
        """(bytes, responses) of blob responses logged after offset ``since``, once the log has been quiet 0.3 s."""
        size = -1
        while size != self.offset():
            size = self.offset()
            time.sleep(0.3)
        with open(self.log, "rb") as f:
            f.seek(since)
            text = f.read().decode(errors="replace")
        sizes = [int(n) for status, n in _BLOB_RESPONSE.findall(text) if status in ("200", "206")]
        return sum(sizes), len(sizes)


# --- pulls -----------------------------------------------------------------------


@attrs.frozen
class Pull:
    """One skopeo of a phase: seconds from the common start to its exit, its status, its output."""

    seconds: float
    code: int
    output: str


@attrs.define
class Phase:
    name: str
    pulls: list[Pull]
    egress: int
    responses: int
    ok: int
    from_peers: float | None = None


def run_all(commands: list[list[str]], env: dict[str, str], timeout: float) -> list[Pull]:
    """Start every command at once; each one's time from the common start to its exit."""
    pulls: list[Pull | None] = [None] * len(commands)
    start = time.monotonic()
    processes = [subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT) for argv in commands]

    def wait(i: int, process: subprocess.Popen[bytes]) -> None:
        try:
            out, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        pulls[i] = Pull(time.monotonic() - start, process.returncode, out.decode(errors="replace"))

    threads = [threading.Thread(target=wait, args=(i, p)) for i, p in enumerate(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [p for p in pulls if p is not None]


def check_output(directory: str, blobs: dict[str, int]) -> bool:
    """skopeo's dir: output holds exactly the image's blobs, each matching its digest."""
    try:
        names = {n for n in os.listdir(directory) if n not in ("manifest.json", "version")}
    except OSError:
        return False
    if names != set(blobs):
        return False
    for name in names:
        digest = hashlib.sha256()
        with open(os.path.join(directory, name), "rb") as f:
            for chunk in iter(lambda: f.read(MIB), b""):
                digest.update(chunk)
        if digest.hexdigest() != name:
            return False
    return True


def phase(name: str, registry: Registry, commands: list[list[str]], outputs: list[str], blobs: dict[str, int],
          env: dict[str, str], timeout: float) -> Phase:
    since = registry.offset()
    pulls = run_all(commands, env, timeout)
    egress, responses = registry.blob_egress(since)
    ok = sum(1 for pull, out in zip(pulls, outputs) if pull.code == 0 and check_output(out, blobs))
    for i, pull in enumerate(pulls):
        if pull.code != 0:
            print(f"registry bench: {name} pull {i + 1} exited {pull.code}:\n{pull.output}", file=sys.stderr)
    return Phase(name, pulls, egress, responses, ok)


def piece_sources(logs: list[str]) -> tuple[int, int]:
    """(bytes from other dfdaemons, bytes from the supernode) of the piece requests in these dfdaemon.logs."""
    peers = cdn = 0
    for path in logs:
        with open(path, errors="replace") as f:
            for match in _PIECE.finditer(f.read()):
                piece = json.loads(match.group(1))
                start, end = (int(x) for x in piece["range"].split("-"))
                if piece["dstCid"].startswith("cdnnode:"):
                    cdn += end - start + 1
                else:
                    peers += end - start + 1
    return peers, cdn


def run(args: argparse.Namespace, work: str, skopeo: str, registry_bin: str) -> tuple[list[Phase], int]:
    env = environment(work)
    timeout = 120 + args.hosts * args.layers * args.layer_mib / 10  # generous: 10 MiB/s per pull would do
    with Children(env) as children:
        registry = Registry(children, registry_bin, work)
        image = make_image(os.path.join(work, "image"), args.layers, args.layer_mib * MIB)
        blobs = {blob["digest"][7:]: blob["size"] for blob in image["blobs"]}
        registry.wait_listening()
        push = subprocess.run([skopeo, "copy", "--dest-tls-verify=false", f"oci:{os.path.join(work, 'image')}:v1",
                               f"docker://127.0.0.1:{registry.port}/test/app:1"], env=env, capture_output=True, check=False)
        if push.returncode != 0:
            raise SystemExit(f"registry bench: the push failed:\n{push.stdout.decode()}{push.stderr.decode()}")

        outputs = [os.path.join(work, f"direct-{i + 1}") for i in range(args.hosts)]
        direct = phase("direct", registry, [
            [skopeo, "copy", "--src-tls-verify=false", f"docker://127.0.0.1:{registry.port}/test/app:1", f"dir:{out}"]
            for out in outputs], outputs, blobs, env, timeout)

        supernode_log = os.path.join(work, "supernode.log")
        supernode = children.start([
            *TWISTD, "-n", "--pidfile=", "-l", "-", "supernode", "--port", "0", "--download-port", "0",
            "--listen", "127.0.0.1", "--advertise-ip", "127.0.0.1", "--home", os.path.join(work, "supernode")],
            supernode_log)
        node = "127.0.0.1:" + log_match(supernode, supernode_log, r"register API listening on 127\.0\.0\.1:(\d+)",
                                        "the supernode").group(1)
        daemons = []
        for i in range(args.hosts):
            log = os.path.join(work, f"dfdaemon-{i + 1}.log")
            process = children.start([
                *TWISTD, "-n", "--pidfile=", "-l", "-", "dfdaemon", "--port", "0", "--node", node,
                "--registry", f"http://127.0.0.1:{registry.port}", "--home", os.path.join(work, f"host-{i + 1}"),
                "--ratelimit", "0"], log)
            daemons.append((process, log))
        commands, outputs = [], []
        for i, (process, log) in enumerate(daemons):
            port = log_match(process, log, r"dfdaemon proxy listening on 127\.0\.0\.1:(\d+)", f"dfdaemon {i + 1}").group(1)
            conf = os.path.join(work, f"registries-{i + 1}.conf")
            with open(conf, "w") as f:
                f.write('unqualified-search-registries = []\n[[registry]]\nprefix = "unreachable.invalid/test"\n'
                        f'location = "127.0.0.1:1/test"\n[[registry.mirror]]\nlocation = "127.0.0.1:{port}/test"\n'
                        'insecure = true\n')
            outputs.append(os.path.join(work, f"dfly-{i + 1}"))
            commands.append([skopeo, "--registries-conf", conf, "copy", "docker://unreachable.invalid/test/app:1",
                             f"dir:{outputs[-1]}"])
        dfly = phase("dfly", registry, commands, outputs, blobs, env, timeout)
        peers, cdn = piece_sources([os.path.join(work, f"host-{i + 1}", "logs", "dfdaemon.log")
                                    for i in range(args.hosts)])
        dfly.from_peers = peers / (peers + cdn) if peers + cdn else None
    return [direct, dfly], sum(blobs.values())


def report(phases: list[Phase], image: int, hosts: int) -> None:
    print(f"{'':8} {'slowest':>8} {'registry egress':>16} {'x image':>8} {'blob GETs':>10} {'hosts ok':>9} "
          f"{'from peers':>11}")
    for p in phases:
        peers = "-" if p.from_peers is None else f"{p.from_peers:.1%}"
        print(f"{p.name:8} {max(x.seconds for x in p.pulls):7.2f}s {p.egress:16,} {p.egress / image:8.2f} "
              f"{p.responses:10} {p.ok:>6}/{hosts:<2} {peers:>11}")
    direct, dfly = phases
    print(f"dfly / direct: registry egress {dfly.egress / direct.egress:.3f}, slowest pull "
          f"{max(x.seconds for x in dfly.pulls) / max(x.seconds for x in direct.pulls):.2f}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--hosts", type=int, default=4, help="concurrent pulls, and dfdaemons [4]")
    parser.add_argument("--layers", type=int, default=3, help="layers in the image [3]")
    parser.add_argument("--layer-mib", type=int, default=16, help="size of each layer in MiB [16]")
    parser.add_argument("--tmpdir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the files go [/dev/shm: every host writes there, in RAM they do not queue "
                             "behind each other on one disk]")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if not 1 <= args.hosts <= 64 or not 1 <= args.layers <= 32 or not 1 <= args.layer_mib <= 1024:
        parser.error("--hosts 1-64, --layers 1-32, --layer-mib 1-1024")
    return args


def stopped(signum: int, frame: object) -> None:
    """SIGTERM: leave through the finally blocks, which remove everything this run made."""
    sys.exit(128 + signum)


def main() -> int:
    args = parse_args()
    skopeo, registry_bin = shutil.which("skopeo"), shutil.which("docker-registry")
    if skopeo is None or registry_bin is None:
        raise SystemExit(f"registry bench: needs Debian's {PACKAGES}: apt-get install {PACKAGES}")
    signal.signal(signal.SIGTERM, stopped)
    image_mib = args.layers * args.layer_mib
    print(f"registry bench: N = {args.hosts} hosts, image {args.layers} layers x {args.layer_mib} MiB "
          f"(~{image_mib} MiB), everything on 127.0.0.1, no link shaping")
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="dfly-registry-bench-", dir=args.tmpdir)
    try:
        phases, image = run(args, work, skopeo, registry_bin)
        print(f"image blobs: {image:,} bytes")
        report(phases, image, args.hosts)
        ok = all(p.ok == args.hosts for p in phases)
    finally:
        if args.keep:
            print(f"registry bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"registry bench: {'done' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit("registry bench: interrupted")
