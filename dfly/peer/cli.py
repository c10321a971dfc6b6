"""``dfget``: the command users type.

It validates the arguments, finds the host's peer daemon through
``meta/host.meta`` (starting one when none answers), asks it for the
download, shows progress, prints Dragonfly's result line and exits 0 only
when the output file is complete and verified.  When no daemon can run, it
downloads in-process with the same engine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence
from urllib.parse import unquote, urlsplit

import treq
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, globalLogBeginner
from twisted.python import usage
from twisted.python.failure import Failure

import dfly
from dfly import codes
from dfly.config import (
    DEFAULT_DFGET_CONFIG,
    Home,
    default_home,
    load_dfget_config,
    parse_duration,
    parse_nodes,
    parse_size,
)
from dfly.logs import CLIENT_NAMESPACE, is_dfly_event, line_observer, make_sign, open_log
from dfly.pieces import is_md5, parse_digest, parse_filter
from dfly.peer import storage
from dfly.peer.engine import DownloadRequest, DownloadResult
from dfly.peer.localapi import TOKEN_HEADER
from dfly.peer.tap import Options as ServerOptions
from dfly.source import check_url, parse_header_lines

log = Logger(namespace=CLIENT_NAMESPACE)

#: How long dfget waits for a daemon it started to answer.
DAEMON_START_TIMEOUT = 10.0


class Options(usage.Options):
    synopsis = "-u URL [-o FILE] [options]    |    dfget server [options]"
    longdesc = (
        "Download URL to FILE through the dfly supernodes given with --node (or in "
        f"{DEFAULT_DFGET_CONFIG}).  Prints 'download SUCCESS(0) ...' or 'download FAIL(code) ...' and exits "
        "0 only when FILE is complete and verified.  'dfget server' runs the peer daemon in the foreground."
    )
    optFlags = [
        ["notbs", None, "Never download from the source itself when the supernodes cannot help."],
        ["showbar", "b", "Show a progress bar."],
        ["console", None, "Also print the log lines on the console."],
    ]
    optParameters = [
        ["url", "u", None, "URL to download (http:// or https://)."],
        ["output", "o", None, "Output file [default: the last segment of the URL path]."],
        ["md5", "m", None, "Expected MD5 of the whole file; also part of the task identity."],
        ["digest", None, None, "Expected digest of the whole file, sha256:<hex> (or md5:<hex>)."],
        ["identifier", "i", None, "Task identifier: same URL + identifier = same task (not with --md5)."],
        ["filter", "f", None, "Query keys to ignore for the task identity, e.g. 'sig&expires'."],
        ["timeout", "e", None, "Give up after this long (e.g. 300, 90s, 10m) [default: length/minrate + 10s, or 5m]."],
        ["minrate", None, None, "Slowest acceptable rate, for the default timeout [default: 64K]."],
        ["home", None, None, "dfly home directory [default: ~/.small-dragonfly]."],
        ["config", None, DEFAULT_DFGET_CONFIG, "YAML config file with nodes and minRate."],
    ]
    subCommands = [["server", None, ServerOptions, "Run the peer daemon in the foreground."]]

    def __init__(self) -> None:
        super().__init__()
        self["node"] = []
        self["header"] = []

    def opt_node(self, value: str) -> None:
        """Supernode host[:port] (default port 8002); repeat or separate with commas."""
        self["node"].append(value)

    opt_n = opt_node

    def opt_header(self, value: str) -> None:
        """HTTP header 'Name: value' sent to the source (repeatable)."""
        self["header"].append(value)

    def opt_version(self) -> None:
        print(f"dfget version:{dfly.__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self.subCommand is not None:
            return
        try:
            self["request"] = build_request(self, make_sign(os.getpid(), time.time()))
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def build_request(opts: dict[str, Any], sign: str) -> DownloadRequest:
    """Turn the flags (and dfget.yml) into a request; ValueError with the reason."""
    if not opts["url"]:
        raise ValueError("missing -u URL")
    url = check_url(opts["url"])
    if opts["md5"] and opts["identifier"]:
        raise ValueError("--md5 and --identifier cannot be used together")
    if opts["md5"] and not is_md5(opts["md5"]):
        raise ValueError(f"invalid --md5 {opts['md5']!r}: expected 32 hex digits")
    digest = parse_digest(opts["digest"]) if opts["digest"] else None
    config_path = opts["config"]
    file_config = load_dfget_config(config_path, required=config_path != DEFAULT_DFGET_CONFIG)
    nodes = parse_nodes(opts["node"]) if opts["node"] else file_config.nodes
    output = opts["output"]
    if not output:
        segments = [s for s in urlsplit(url).path.split("/") if s]
        if not segments:
            raise ValueError("the URL has no file name to save as: give -o FILE")
        output = unquote(segments[-1])
    timeout = parse_duration(opts["timeout"]) if opts["timeout"] else file_config.timeout
    min_rate = parse_size(opts["minrate"]) if opts["minrate"] else file_config.min_rate
    return DownloadRequest(
        url=url,
        output=storage.check_output(output),
        sign=sign,
        nodes=nodes,
        headers=parse_header_lines(opts["header"]),
        md5=opts["md5"].lower() if opts["md5"] else None,
        identifier=opts["identifier"],
        digest=digest,
        filter=parse_filter(opts["filter"]),
        timeout=timeout,
        min_rate=min_rate,
        back_source=not opts["notbs"],
    )


def request_json(req: DownloadRequest) -> dict[str, Any]:
    return {
        "url": req.url,
        "output": req.output,
        "sign": req.sign,
        "nodes": [f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in req.nodes],
        "headers": [f"{k}: {v}" for k, v in req.headers.items()],
        "md5": req.md5,
        "identifier": req.identifier,
        "digest": f"{req.digest[0]}:{req.digest[1]}" if req.digest else None,
        "filter": list(req.filter),
        "timeout": req.timeout,
        "minRate": req.min_rate,
        "notbs": not req.back_source,
    }


# --- finding or starting the daemon ---------------------------------------------


def read_host_meta(home: Home) -> dict[str, Any] | None:
    try:
        with open(home.host_meta) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("servicePort"), int) or not meta.get("token"):
        return None
    return meta


async def ping_daemon(reactor: Any, meta: dict[str, Any]) -> bool:
    try:
        response = await treq.get(f"http://127.0.0.1:{meta['servicePort']}/_ping", timeout=2, reactor=reactor)
        body = await response.json()
    except Exception:
        return False
    return response.code == 200 and body.get("data", {}).get("pid") == meta.get("pid")


def spawn_daemon(home: Home) -> subprocess.Popen[bytes]:
    """Start ``dfget server`` detached from this terminal, logging to dfserver.log."""
    out = open(home.log_file("dfserver.out"), "wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "dfly.peer.cli", "server", "--home", home.root],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # its log is dfserver.log; stderr keeps start-up errors
            stderr=out,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        out.close()


async def find_daemon(reactor: Any, home: Home) -> dict[str, Any] | None:
    """A live daemon's host.meta, starting a daemon if needed; None if none comes up."""
    meta = read_host_meta(home)
    if meta is not None and await ping_daemon(reactor, meta):
        return meta
    try:
        process = spawn_daemon(home)
    except OSError as e:
        log.warn("cannot start the peer daemon: {error}", error=e)
        return None
    deadline = reactor.seconds() + DAEMON_START_TIMEOUT
    while reactor.seconds() < deadline:
        await task.deferLater(reactor, 0.05)
        meta = read_host_meta(home)
        if meta is not None and await ping_daemon(reactor, meta):
            return meta
        if process.poll() is not None and process.returncode != 0 and meta is None:
            # It lost the race for the lock to another starting daemon, or failed:
            # keep waiting for whoever holds the lock to publish host.meta.
            continue
    log.warn("the peer daemon did not come up within {t:g}s", t=DAEMON_START_TIMEOUT)
    return None


class _EventLines(Protocol):
    """Reads the daemon's JSON-lines answer, handing each event to ``on_event``."""

    def __init__(self, on_event: Any) -> None:
        self.on_event = on_event
        self.buffer = b""
        self.done: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.strip():
                self.on_event(json.loads(line))

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.done.callback(None)


async def download_via_daemon(reactor: Any, meta: dict[str, Any], req: DownloadRequest, show: Any) -> DownloadResult | None:
    """Ask the daemon; None when it broke off without a result."""
    result: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("event") == "result":
            result.append(event)
        else:
            show(event)

    response = await treq.post(
        f"http://127.0.0.1:{meta['servicePort']}/local/download",
        json=request_json(req),
        headers={TOKEN_HEADER: meta["token"]},
        unbuffered=True,
        reactor=reactor,
    )
    if response.code != 200:
        try:
            reason = (await response.json())["msg"]
        except Exception:
            reason = f"the peer daemon answered {response.code}"
        raise ValueError(reason)
    lines = _EventLines(on_event)
    response.deliverBody(lines)
    await lines.done
    if not result:
        return None
    r = result[0]
    return DownloadResult(
        success=r["success"], cost=r["cost"], length=r["length"], reason=r["reason"], code=r["code"], error=r["error"],
        from_peers=r["fromPeers"], from_supernode=r["fromSupernode"], from_source=r["fromSource"],
    )


async def download_in_process(reactor: Any, home: Home, req: DownloadRequest, show: Any) -> DownloadResult:
    from dfly.httpclient import make_http_client
    from dfly.peer.engine import PeerEngine

    http, pool = make_http_client(reactor)
    engine = PeerEngine(reactor, http, home)
    try:
        return await engine.download(req, show)
    finally:
        await pool.closeCachedConnections()


class ProgressDisplay:
    """Turns download events into a tqdm bar (``--showbar``) or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event.get("event") == "progress":
            from tqdm import tqdm

            total = event.get("total", -1)
            if self.bar is None:
                self.bar = tqdm(total=total if total >= 0 else None, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)
            self.bar.update(event["done"] - self.bar.n)
        elif event.get("event") == "source":
            self.close()
            print("download from source", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


async def run(reactor: Any, opts: Options) -> int:
    req: DownloadRequest = opts["request"]
    home = Home(opts["home"] or default_home())
    try:
        home.ensure()
    except OSError as e:
        print(f"dfget: error: cannot create home {home.root}: {e.strerror}", file=sys.stderr)
        return 2
    client_log = open_log(home.log_file("dfclient.log"))
    observers = [line_observer(client_log, req.sign, is_dfly_event)]
    if opts["console"]:
        observers.append(line_observer(sys.stdout, req.sign, is_dfly_event))
    globalLogBeginner.beginLoggingTo(observers, redirectStandardIO=False)
    log.info("get cmd params:{argv}", argv=json.dumps(sys.argv))
    print(f"--{time.strftime('%Y-%m-%d %H:%M:%S')}--  {req.url}")
    print(f"dfget version:{dfly.__version__}")
    print(f"workspace:{home.root} sign:{req.sign}")
    show = ProgressDisplay(opts["showbar"])
    result: DownloadResult | None = None
    try:
        meta = await find_daemon(reactor, home)
        if meta is not None:
            try:
                result = await download_via_daemon(reactor, meta, req, show)
            except ValueError as e:
                print(f"dfget: error: {e}", file=sys.stderr)
                return 2
            if result is None:
                result = DownloadResult(False, 0.0, -1, codes.REASON_DOWNLOAD_ERROR, codes.ERR_DOWNLOAD, "the peer daemon stopped during the download")
        else:
            log.info("no peer daemon: downloading in this process")
            result = await download_in_process(reactor, home, req, show)
    finally:
        show.close()
    print(result.line())
    if result.success and (result.from_peers or result.from_supernode or result.from_source):
        print(f"from peers:{result.from_peers} from supernode:{result.from_supernode} from source:{result.from_source}")
    return 0 if result.success else 1


def main(argv: Sequence[str] | None = None) -> None:
    opts = Options()
    try:
        opts.parseOptions(list(sys.argv[1:] if argv is None else argv))
    except usage.UsageError as e:
        print(f"dfget: error: {e}", file=sys.stderr)
        print("Try 'dfget --help' for the options.", file=sys.stderr)
        raise SystemExit(2) from None
    if opts.subCommand == "server":
        run_server(opts.subOptions)
        return
    task.react(lambda reactor: defer.ensureDeferred(_exit_code(reactor, opts)))


async def _exit_code(reactor: Any, opts: Options) -> None:
    code = await run(reactor, opts)
    if code:
        raise SystemExit(code)


def run_server(sub: ServerOptions) -> None:
    """``dfget server``: the same daemon as ``twistd -n dfget``, in the foreground."""
    from twisted.application.app import startApplication
    from twisted.application.service import Application
    from twisted.internet import reactor

    from dfly.peer.tap import DaemonLockHeld, build_service

    config = sub["config_obj"]
    Home(config.home).ensure()
    sign = make_sign(os.getpid(), time.time())
    globalLogBeginner.beginLoggingTo([line_observer(sys.stdout, sign)], redirectStandardIO=False)
    application = Application("dfget server")
    build_service(config, reactor).service.setServiceParent(application)
    try:
        startApplication(application, False)
    except DaemonLockHeld as e:
        print(f"dfget server: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    reactor.run()


if __name__ == "__main__":
    main()
