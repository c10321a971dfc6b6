"""``twistd supernode``: options and the service tree.

``build_service(config, reactor)`` is pure wiring, so tests can build a real
supernode on port 0 without twistd.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from dfly import __version__
from dfly.config import (
    DEFAULT_SUPERNODE_CONFIG,
    SupernodeFileConfig,
    check_ip,
    load_supernode_config,
    parse_duration,
    parse_port_flag,
    parse_size,
)
from dfly.httpclient import make_http_client, upstream_policy
from dfly.logs import line_observer, open_log
from dfly.services import ListeningService, LogObserverService, tcp_endpoint
from dfly.ratelimit import TokenBucket, describe_limit
from dfly.source import SourceClient
from dfly.stream import thread_runner
from dfly.supernode.api import SupernodeApi
from dfly.supernode.cdn import CdnCache, CdnFiles
from dfly.supernode.tasks import TaskManager

log = Logger(namespace="dfly.supernode")

#: How often silent peers are looked for.
SWEEP_INTERVAL = 2.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the dfly supernode: the register/scheduling API (default port 8002) and the CDN "
        "piece server (default port 8001).  Values from --config are overridden by flags."
    )
    optParameters = [
        ["config", "c", DEFAULT_SUPERNODE_CONFIG, "YAML config file (optional when left at the default path)."],
        ["port", "p", None, "Register API port [default: 8002]."],
        ["download-port", None, None, "CDN piece server port [default: 8001]."],
        ["listen", None, None, "Address both ports listen on [default: 0.0.0.0]."],
        ["home", None, None, "Cache and log directory [default: ~/.small-dragonfly/supernode]."],
        ["advertise-ip", None, None, "IP that peers use to reach the CDN port [default: the address each peer reached the API on]."],
        ["fail-access-interval", None, None, "How long a 404 source is remembered [default: 3m]."],
        ["poll-timeout", None, None, "How long a pull with nothing ready is held open [default: 5s]."],
        ["max-bandwidth", None, None,
         "Limit of all source fetches together, in bytes/s (e.g. 200M; 0 = unlimited) [default: 0]."],
        ["max-upload-bandwidth", None, None,
         "Limit of all CDN uploads to peers together, in bytes/s (e.g. 100M; 0 = unlimited) [default: 0]."],
        ["ca-bundle", None, None, "PEM file of CA certificates to trust for https sources [default: the system's]."],
    ]

    def opt_version(self) -> None:
        print(f"dfly supernode {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self["config_obj"] = supernode_config(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def supernode_config(options: dict[str, Any]) -> SupernodeFileConfig:
    """The file's values with the given flags on top; ValueError on bad input."""
    path = options["config"]
    config = load_supernode_config(path, required=path != DEFAULT_SUPERNODE_CONFIG)
    changes: dict[str, Any] = {}
    if options["port"] is not None:
        changes["port"] = parse_port_flag(options["port"], "port")
    if options["download-port"] is not None:
        changes["download_port"] = parse_port_flag(options["download-port"], "download-port")
    if options["listen"] is not None:
        changes["listen"] = check_ip(options["listen"])
    if options["home"] is not None:
        changes["home"] = options["home"]
    if options["advertise-ip"] is not None:
        changes["advertise_ip"] = check_ip(options["advertise-ip"])
    if options["fail-access-interval"] is not None:
        changes["fail_access_interval"] = parse_duration(options["fail-access-interval"])
    if options["poll-timeout"] is not None:
        changes["poll_timeout"] = parse_duration(options["poll-timeout"])
    if options["max-bandwidth"] is not None:
        changes["max_bandwidth"] = parse_size(options["max-bandwidth"])
    if options["ca-bundle"] is not None:
        changes["ca_bundle"] = options["ca-bundle"]
    if options["max-upload-bandwidth"] is not None:
        changes["max_upload_bandwidth"] = parse_size(options["max-upload-bandwidth"])
    config = attrs.evolve(config, **changes)
    if config.ca_bundle is not None:
        upstream_policy(config.ca_bundle, False)  # an unreadable bundle stops the start with its reason
    return attrs.evolve(config, home=os.path.abspath(os.path.expanduser(config.home)))


class _Supernode(Service):
    """Owns the task state and the HTTP pool; sweeps silent peers; stops both cleanly."""

    def __init__(self, tasks: TaskManager, pool: HTTPConnectionPool, clock: Any, config: SupernodeFileConfig) -> None:
        self.config = config
        self.tasks = tasks
        self.pool = pool
        self._sweep = LoopingCall(tasks.sweep)
        self._sweep.clock = clock

    def startService(self) -> None:
        super().startService()
        log.info(
            "bandwidth limits: source fetches {fetch}, CDN uploads {upload}",
            fetch=describe_limit(self.config.max_bandwidth), upload=describe_limit(self.config.max_upload_bandwidth),
        )
        self._sweep.start(SWEEP_INTERVAL, now=False)

    def stopService(self) -> Any:
        super().stopService()
        if self._sweep.running:
            self._sweep.stop()
        self.tasks.stop()
        return self.pool.closeCachedConnections()


@attrs.frozen
class SupernodeParts:
    service: MultiService
    tasks: TaskManager
    api: ListeningService
    cdn: ListeningService



def build_service(config: SupernodeFileConfig, reactor: Any) -> SupernodeParts:
    os.makedirs(os.path.join(config.home, "logs"), exist_ok=True)
    http, pool = make_http_client(reactor, upstream_policy(config.ca_bundle, False))
    cache = CdnCache(config.home)
    tasks = TaskManager(
        cache=cache,
        source=SourceClient(http, reactor),
        clock=reactor,
        fail_access_interval=config.fail_access_interval,
        poll_timeout=config.poll_timeout,
        run_blocking=thread_runner(reactor),
        source_bucket=TokenBucket(config.max_bandwidth, reactor),
    )
    api = SupernodeApi(tasks, config.download_port, config.advertise_ip)
    top = MultiService()
    log_file = open_log(os.path.join(config.home, "logs", "supernode.log"))
    LogObserverService(line_observer(log_file, str(os.getpid())), log_file.close).setServiceParent(top)
    _Supernode(tasks, pool, reactor, config).setServiceParent(top)
    api_listener = ListeningService(
        tcp_endpoint(reactor, config.port, config.listen), Site(api.resource()), "register API"
    )
    cdn_listener = ListeningService(
        tcp_endpoint(reactor, config.download_port, config.listen),
        Site(CdnFiles(cache, reactor, TokenBucket(config.max_upload_bandwidth, reactor), tasks.key_for)),
        "CDN",
    )
    # Peers must be told the CDN port actually bound (it may have been 0).
    cdn_listener.listening.addCallback(lambda port: setattr(api, "download_port", port.getHost().port) or port)
    api_listener.setServiceParent(top)
    cdn_listener.setServiceParent(top)
    return SupernodeParts(top, tasks, api_listener, cdn_listener)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options["config_obj"], reactor).service
