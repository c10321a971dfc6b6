"""``dfget``: the command users type.

It validates the arguments, finds the host's peer daemon through
``meta/host.meta`` (starting one when none answers), asks it for the
download, shows progress, prints Dragonfly's result line and exits 0 only
when the output file is complete and verified.  When no daemon can run, it
downloads in-process with the same engine.

The usual path is deliberately thin: plain ``http.client`` to the daemon and
no reactor, so a run costs little more than the download itself.  Twisted's
reactor and HTTP stack are imported only for the in-process fallback and for
``dfget server``.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from twisted.python import usage

import dfly
from dfly import codes
from dfly.config import (
    DEFAULT_DFGET_CONFIG,
    DfgetFileConfig,
    Home,
    default_home,
    NodeTimeouts,
    load_dfget_config,
    parse_duration,
    parse_nodes,
    parse_size,
)
from dfly.logs import make_sign, open_log, plain_line
from dfly.peer import storage
from dfly.peer.hostmeta import TOKEN_HEADER, read_host_meta, service_host
from dfly.peer.options import Options as ServerOptions
from dfly.peer.request import DownloadRequest, DownloadResult, request_to_json
from dfly.pieces import is_md5, parse_digest, parse_filter
from dfly.urls import check_url, move_userinfo, parse_header_lines, redact_userinfo

#: How long dfget waits for a daemon it started to answer.
DAEMON_START_TIMEOUT = 10.0

Show = Callable[[dict[str, Any]], None]


class Options(usage.Options):
    synopsis = "Usage: dfget -u URL [-o FILE] [options]    |    dfget server [options]"
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
        ["output", "o", None,
         "Output file; replaced if it exists [default: the base name of the URL path's last segment, "
         "in the working directory, which must not exist yet]."],
        ["md5", "m", None, "Expected MD5 of the whole file; also part of the task identity."],
        ["digest", None, None, "Expected digest of the whole file, sha256:<hex> (or md5:<hex>)."],
        ["identifier", "i", None, "Task identifier: same URL + identifier = same task (not with --md5)."],
        ["filter", "f", None, "Query keys to ignore for the task identity, e.g. 'sig&expires'."],
        ["timeout", "e", None, "Give up after this long (e.g. 300, 90s, 10m) [default: length/minrate + 10s, or 5m]."],
        ["locallimit", "s", None,
         "Bandwidth limit of this download in bytes/s, e.g. 20M, 512K; 0 = unlimited [default: 10M]."],
        ["totallimit", None, None,
         "Limit of this host's whole P2P traffic, each way (download and upload), e.g. 40M; "
         "0 = unlimited. Sets the peer daemon's limit for every download and upload [default: unchanged]."],
        ["minrate", None, None, "Slowest acceptable rate, for the default timeout [default: 64K]."],
        ["home", None, None, "dfly home directory [default: ~/.small-dragonfly]."],
        ["config", None, DEFAULT_DFGET_CONFIG,
         "YAML config file (keys nodes, localLimit, totalLimit, minRate, timeout)."],
    ]
    subCommands = [["server", None, ServerOptions, "Run the peer daemon in the foreground."]]

    def __init__(self) -> None:
        super().__init__()
        self["node"] = []
        self["header"] = []

    def opt_node(self, value: str) -> None:
        """Supernode host[:port] (default port 8002); repeat or separate with commas. Each task goes to the node its hash picks; the others are fallbacks."""
        self["node"].append(value)

    opt_n = opt_node

    def opt_header(self, value: str) -> None:
        """HTTP header 'Name: value' sent to the source (repeatable)."""
        self["header"].append(value)

    def opt_version(self) -> None:
        print(f"dfget version:{dfly.__version__}")
        raise SystemExit(0)

    def getSynopsis(self) -> str:
        # A subcommand's usage line is ours + its name + its own: say only "dfget".
        return "Usage: dfget" if self.subCommand else super().getSynopsis()

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
    # ``-u http://user:password@host/f`` works as with curl: the credentials go
    # in an Authorization header (a --header one wins); the URL without them is
    # what is registered, fetched, printed and logged.
    url, headers = move_userinfo(opts["url"], parse_header_lines(opts["header"]))
    url = check_url(url)
    if opts["md5"] and opts["identifier"]:
        raise ValueError("--md5 and --identifier cannot be used together")
    if opts["md5"] and not is_md5(opts["md5"]):
        raise ValueError(f"invalid --md5 {opts['md5']!r}: expected 32 hex digits")
    digest = parse_digest(opts["digest"]) if opts["digest"] else None
    config_path = opts["config"]
    file_config = load_dfget_config(config_path, required=config_path != DEFAULT_DFGET_CONFIG)
    opts["timeouts"] = file_config.timeouts  # for a download in this process (no daemon)
    opts["cluster"] = file_config  # its clusterToken and clusterCa, likewise
    nodes = parse_nodes(opts["node"]) if opts["node"] else file_config.nodes
    if opts["output"]:
        # The user's own -o: ``~`` means their home, and an existing file is replaced.
        output = storage.check_output(os.path.expanduser(opts["output"]))
    else:
        # The URL's choice: a plain name here, never expanded, never replacing a file.
        output = storage.check_new_output(os.path.join(os.getcwd(), storage.name_from_url(url)))
    timeout = parse_duration(opts["timeout"]) if opts["timeout"] else file_config.timeout
    min_rate = parse_size(opts["minrate"]) if opts["minrate"] else file_config.min_rate
    local_limit = _limit(opts["locallimit"], "locallimit") if opts["locallimit"] else file_config.local_limit
    total_limit = _limit(opts["totallimit"], "totallimit") if opts["totallimit"] else file_config.total_limit
    return DownloadRequest(
        url=url,
        output=output,
        sign=sign,
        nodes=nodes,
        headers=headers,
        md5=opts["md5"].lower() if opts["md5"] else None,
        identifier=opts["identifier"],
        digest=digest,
        filter=parse_filter(opts["filter"]),
        timeout=timeout,
        min_rate=min_rate,
        back_source=not opts["notbs"],
        local_limit=local_limit,
        total_limit=total_limit,
    )


def loggable_argv(argv: Sequence[str]) -> list[str]:
    """The command line for dfclient.log: URL credentials and every ``--header`` value hidden.

    Only the names of ``--header`` lines are shown (``X-Token: ***``):
    which header carries a secret is the caller's business (a token may be
    called anything), so no value is kept, not only ``Authorization``'s.
    """
    shown = []
    header_next = False
    for arg in argv:
        if header_next:
            arg = _header_name_only(arg)
        elif arg.startswith("--header="):
            arg = "--header=" + _header_name_only(arg.removeprefix("--header="))
        header_next = arg == "--header"
        shown.append(redact_userinfo(arg))
    return shown


def _header_name_only(line: str) -> str:
    name, sep, _ = line.partition(":")
    return f"{name.strip()}: ***" if sep else "***"


def _limit(value: str, flag: str) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise ValueError(f"--{flag}: {e}") from None


class ClientLog:
    """The CLI's lines in dfclient.log (the daemon adds its own for the same sign)."""

    def __init__(self, home: Home, sign: str, console: bool) -> None:
        self.file = open_log(home.log_file("dfclient.log"))
        self.sign = sign
        self.console = console

    def write(self, level: str, message: str) -> None:
        line = plain_line(time.time(), level, self.sign, message)
        self.file.write(line)
        if self.console:
            sys.stdout.write(line)

    def close(self) -> None:
        self.file.close()


# --- the peer daemon --------------------------------------------------------------


def ping_daemon(meta: dict[str, Any]) -> bool:
    """Is the daemon of this host.meta alive (and the one that wrote it)?"""
    conn = http.client.HTTPConnection(service_host(meta), meta["servicePort"], timeout=2)
    try:
        conn.request("GET", "/_ping")
        response = conn.getresponse()
        body = json.loads(response.read())
    except (OSError, ValueError, RecursionError, http.client.HTTPException):
        return False
    finally:
        conn.close()
    data = body.get("data") if isinstance(body, dict) else None
    return response.status == 200 and isinstance(data, dict) and data.get("pid") == meta.get("pid")


def spawn_daemon(home: Home) -> subprocess.Popen[bytes]:
    """Start ``dfget server`` detached from this terminal; its log is dfserver.log."""
    with open(home.log_file("dfserver.out"), "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "dfly.peer.cli", "server", "--home", home.root],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,  # start-up failures, before the daemon's own log exists
            start_new_session=True,
            close_fds=True,
        )


def find_daemon(home: Home, log: ClientLog) -> dict[str, Any] | None:
    """A live daemon's host.meta, starting a daemon if needed; None if none comes up."""
    meta = read_host_meta(home)
    if meta is not None and ping_daemon(meta):
        return meta
    try:
        spawn_daemon(home)
    except OSError as e:
        log.write("warn", f"cannot start the peer daemon: {e}")
        return None
    # The new daemon, or another one that won the race for the home lock,
    # publishes host.meta once it listens.
    deadline = time.monotonic() + DAEMON_START_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.02)
        meta = read_host_meta(home)
        if meta is not None and ping_daemon(meta):
            return meta
    log.write("warn", f"the peer daemon did not come up within {DAEMON_START_TIMEOUT:g}s")
    return None


class DaemonRefused(Exception):
    """The daemon answered the request with an error (bad request, no access)."""


def download_via_daemon(meta: dict[str, Any], req: DownloadRequest, show: Show) -> DownloadResult | None:
    """Ask the daemon and follow its event stream; None when it broke off without a result."""
    conn = http.client.HTTPConnection(service_host(meta), meta["servicePort"])
    try:
        conn.request(
            "POST", "/local/download", body=json.dumps(request_to_json(req)).encode(),
            headers={"Content-Type": "application/json", TOKEN_HEADER.decode(): meta["token"]},
        )
        response = conn.getresponse()
        if response.status != 200:
            try:
                reason = str(json.loads(response.read())["msg"])
            except (ValueError, KeyError, TypeError, RecursionError):
                reason = f"the peer daemon answered {response.status}"
            raise DaemonRefused(reason)
        while line := response.readline():
            if not line.strip():
                continue
            event = json.loads(line)
            if not isinstance(event, dict):
                return None
            if event.get("event") == "result":
                return DownloadResult.from_json(event)
            show(event)
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError, RecursionError):
        # Not our daemon's stream (RecursionError: an answer like ``[[[[...``).
        return None
    finally:
        conn.close()
    return None


def download_in_process(home: Home, req: DownloadRequest, show: Show,
                        timeouts: NodeTimeouts = NodeTimeouts(), cluster: DfgetFileConfig | None = None,
                        ) -> DownloadResult:
    """No daemon could run: the same engine, in this process, for this one download.

    ``cluster`` is dfget.yml's: its clusterToken and clusterCa (this engine
    serves no pieces, so it needs no uploader gate).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.logger import globalLogBeginner

    from dfly.httpclient import cluster_client, make_http_client
    from dfly.logs import is_dfly_event, line_observer
    from dfly.peer.engine import PeerEngine

    log_file = open_log(home.log_file("dfclient.log"))
    globalLogBeginner.beginLoggingTo([line_observer(log_file, req.sign, is_dfly_event)], redirectStandardIO=False)
    results: list[Any] = []

    async def go() -> None:
        http, pool = make_http_client(reactor, connect_timeout=timeouts.connect)
        ca = cluster.cluster_ca if cluster is not None else None
        cluster_http, cluster_pool = cluster_client(reactor, ca, timeouts.connect)
        engine = PeerEngine(reactor, http, home, timeouts=timeouts, cluster_http=cluster_http, cluster_tls=ca is not None,
                            cluster_token=cluster.cluster_token if cluster is not None else None)
        try:
            results.append(await engine.download(req, show))
        finally:
            await pool.closeCachedConnections()
            if cluster_pool is not None:
                await cluster_pool.closeCachedConnections()

    Deferred.fromCoroutine(go()).addErrback(results.append).addBoth(lambda _: reactor.stop())
    reactor.run()
    log_file.close()
    if not results or not isinstance(results[0], DownloadResult):
        error = results[0].getErrorMessage() if results else "interrupted"
        return DownloadResult(False, 0.0, -1, codes.REASON_DOWNLOAD_ERROR, codes.ERR_DOWNLOAD, error)
    return results[0]


class ProgressDisplay:
    """Turns download events into a tqdm bar on stderr (``--showbar``) or nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if event.get("event") == "progress":
            if self.bar is None:
                from tqdm import tqdm

                total = event.get("total", -1)
                self.bar = tqdm(total=total if total >= 0 else None, unit="B", unit_scale=True,
                                unit_divisor=1024, file=sys.stderr)
            self.bar.update(event["done"] - self.bar.n)
        elif event.get("event") == "source":
            self.close()
            print("download from source", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def run(opts: Options) -> int:
    req: DownloadRequest = opts["request"]
    home = Home(opts["home"] or default_home())
    try:
        home.ensure()
    except OSError as e:
        print(f"dfget: error: cannot create home {home.root}: {e.strerror}", file=sys.stderr)
        return 2
    log = ClientLog(home, req.sign, opts["console"])
    log.write("info", f"get cmd params:{json.dumps(loggable_argv(sys.argv))}")
    print(f"--{time.strftime('%Y-%m-%d %H:%M:%S')}--  {req.url}")
    print(f"dfget version:{dfly.__version__}")
    print(f"workspace:{home.root} sign:{req.sign}")
    show = ProgressDisplay(opts["showbar"])
    try:
        meta = find_daemon(home, log)
        if meta is not None:
            try:
                result = download_via_daemon(meta, req, show)
            except DaemonRefused as e:
                print(f"dfget: error: {e}", file=sys.stderr)
                return 2
            if result is None:
                result = DownloadResult(False, 0.0, -1, codes.REASON_DOWNLOAD_ERROR, codes.ERR_DOWNLOAD,
                                        "the peer daemon stopped during the download")
        else:
            log.write("info", "no peer daemon: downloading in this process")
            result = download_in_process(home, req, show, opts.get("timeouts", NodeTimeouts()), opts.get("cluster"))
    except KeyboardInterrupt:
        # Closing our connection is what cancels the daemon's download.
        print("dfget: interrupted", file=sys.stderr)
        return 130
    finally:
        show.close()
        log.close()
    print(result.line())
    if result.success:
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
    raise SystemExit(run(opts))


def run_server(sub: ServerOptions) -> None:
    """``dfget server``: the same daemon as ``twistd -n dfget``, in the foreground."""
    from twisted.application.app import startApplication
    from twisted.application.service import Application
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    from dfly.logs import line_observer
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
