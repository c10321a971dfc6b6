"""``twistd supernode``: options and the service tree.

``build_service(config, reactor)`` is pure wiring, so tests can build a real
supernode on port 0 without twistd.
"""

from __future__ import annotations

import os
from typing import Any

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

from dfly import __version__
from dfly.config import (
    DEFAULT_SUPERNODE_CONFIG,
    SupernodeFileConfig,
    check_ip,
    load_supernode_config,
    parse_count,
    parse_duration,
    parse_port_flag,
    parse_positive_duration,
    parse_size,
)
from dfly.clustertls import TLSServerEndpoint, server_tls
from dfly.clustertoken import ClusterGate, all_but_ping, every_path
from dfly.httpclient import make_http_client, upstream_policy
from dfly.logs import line_observer, open_log
from dfly.webbounds import BoundedSite
from dfly.services import ListeningService, LogObserverService, tcp_endpoint
from dfly.ratelimit import TokenBucket, describe_limit
from dfly.source import SourceClient
from dfly.diskpool import DiskPool
from dfly.private import private_dir
from dfly.supernode.api import SupernodeApi
from dfly.supernode.cdn import CdnCache, CdnFiles
from dfly.supernode.diskgc import DiskQuota
from dfly.supernode.peerauth import PeerNetworks
from dfly.supernode.policy import policy_from_mapping
from dfly.supernode.sources import describe as describe_sources, parse_sources
from dfly.supernode.tasks import Limits, TaskManager

log = Logger(namespace="dfly.supernode")

#: How often silent peers, idle tasks and old memories are looked for.
SWEEP_INTERVAL = 2.0
#: How often the cache's disk quota is checked (also after every finished fetch).
DISK_GC_INTERVAL = 30.0
#: How long a stop waits for cancelled fetches to write their last .meta.
STOP_TIMEOUT = 10.0


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the dfly supernode: the register/scheduling API (default port 8002) and the CDN "
        "piece server (default port 8001).  Values from --config are overridden by flags."
    )
    optFlags = [
        ["access-log", None, "Log one line per HTTP request on both ports [default: off; accessLog]."],
    ]
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
        ["task-expire-time", None, None,
         "A task with no peer leaves memory after this (its cache stays on disk) [default: 3m]."],
        ["access-expire-time", None, None,
         "How long a source's answer to one caller's credentials is trusted before it is asked again "
         "[default: 60s]."],
        ["revalidate-window", None, None,
         "Registrations of a finished task within this share one revalidation with the source [default: 5s]."],
        ["cache-limit", None, None,
         "Size of the cache on disk (e.g. 500G); 0 = keep 20% of the cache's filesystem free [default: 0]."],
        ["max-tasks", None, None, "Tasks held in memory at most; more registrations get 503 [default: 10000]."],
        ["max-peers-per-task", None, None, "Peers of one task at most; more get 503 [default: 20000]."],
        ["max-fetches", None, None, "Source fetches at once; more wait in a queue [default: 32]."],
        ["max-file-size", None, None,
         "Largest source file fetched (e.g. 20G; also stops endless chunked sources); 0 = unlimited [default: 0]."],
        ["disk-threads", None, None, "Threads for disk work (hashing, writes, .meta) [default: 4]."],
        ["write-idle-timeout", None, None,
         "Abort a CDN send whose client has read nothing for this long [default: 60s; writeIdleTimeout]."],
        ["max-uploads-per-client", None, None,
         "CDN sends one client address may hold at once; more get 503 [default: 32; maxUploadsPerClient]."],
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
    if options.get("access-log"):
        changes["access_log"] = True
    for flag, field, parse in _MORE_FLAGS:
        if options[flag] is not None:
            try:
                changes[field] = parse(options[flag])
            except ValueError as e:
                raise ValueError(f"--{flag}: {e}") from None
    config = attrs.evolve(config, **changes)
    try:
        policy_from_mapping(config.scheduler)
        parse_sources(config.sources, config.listen)
    except ValueError as e:
        raise ValueError(f"config file {path}: {e}") from None
    if config.ca_bundle is not None:
        upstream_policy(config.ca_bundle, False)  # an unreadable bundle stops the start with its reason
    if config.tls_cert is not None and config.tls_key is not None:
        server_tls(config.tls_cert, config.tls_key)  # so does a bad certificate or key, or a pair that does not match
    return attrs.evolve(config, home=os.path.abspath(os.path.expanduser(config.home)))


#: Flags that map one to one onto a config field: (flag, field, parser).
_MORE_FLAGS = (
    ("task-expire-time", "task_expire_time", parse_duration),
    ("access-expire-time", "access_expire_time", parse_duration),
    ("revalidate-window", "revalidate_window", parse_duration),
    ("cache-limit", "cache_limit", parse_size),
    ("max-tasks", "max_tasks", parse_count),
    ("max-peers-per-task", "max_peers_per_task", parse_count),
    ("max-fetches", "max_fetches", parse_count),
    ("max-file-size", "max_file_size", parse_size),
    ("disk-threads", "disk_threads", parse_count),
    ("write-idle-timeout", "write_idle_timeout", parse_positive_duration),
    ("max-uploads-per-client", "max_uploads_per_client", parse_count),
)


class _Supernode(Service):
    """Owns the task state, the HTTP pool and the disk pool; sweeps silent peers; stops them in order.

    The disk pool is started first and stopped last, after every cancelled
    fetch wrote its last ``.meta`` (a sibling service would be stopped at
    the same time, and the final writes of a resumable fetch lost).
    """

    def __init__(self, tasks: TaskManager, pool: HTTPConnectionPool, clock: Any, config: SupernodeFileConfig,
                 disk: DiskPool) -> None:
        self.config = config
        self.tasks = tasks
        self.pool = pool
        self.disk = disk
        self.clock = clock
        self._sweep = LoopingCall(tasks.sweep)
        self._sweep.clock = clock
        self._disk_gc = LoopingCall(self._collect_disk)
        self._disk_gc.clock = clock

    def _collect_disk(self) -> None:
        if self.tasks.quota is not None:
            self.tasks.quota.collect(self.tasks.in_use).addErrback(
                lambda f: log.failure("cache: the disk quota check failed", f))

    def startService(self) -> None:
        super().startService()
        self.disk.startService()
        log.info(
            "bandwidth limits: source fetches {fetch}, CDN uploads {upload}",
            fetch=describe_limit(self.config.max_bandwidth), upload=describe_limit(self.config.max_upload_bandwidth),
        )
        self._sweep.start(SWEEP_INTERVAL, now=False)
        quota = self.tasks.quota
        if quota is not None:
            log.info("cache: {quota}", quota=(f"at most {quota.limit} bytes" if quota.limit
                                              else "keeps 20% of its filesystem free"))
            quota.start().addCallback(self._start_disk_gc).addErrback(
                lambda f: log.failure("cache: cannot read the cache directory", f))

    def _start_disk_gc(self, _: object) -> None:
        if self.running:  # not when the supernode was stopped while the cache was read
            self._disk_gc.start(DISK_GC_INTERVAL, now=True)

    def stopService(self) -> Any:
        super().stopService()
        for loop in (self._sweep, self._disk_gc):
            if loop.running:
                loop.stop()
        fetches = self.tasks.stop().addTimeout(STOP_TIMEOUT, self.clock).addErrback(
            lambda f: log.warn("stopping: fetches still running after {t:g}s; their last pieces will be fetched "
                               "again", t=STOP_TIMEOUT))
        fetches.addBoth(lambda _: self.disk.stopService())
        return gatherResults([fetches, self.pool.closeCachedConnections()])


@attrs.frozen
class SupernodeParts:
    service: MultiService
    tasks: TaskManager
    api: ListeningService
    cdn: ListeningService



def build_service(config: SupernodeFileConfig, reactor: Any) -> SupernodeParts:
    # Owner-only home, logs/ and cache directories, also when an older dfly
    # left them 0755 (dfly.private says what is and is not tightened).
    cache = CdnCache(config.home).ensure()
    private_dir(os.path.join(config.home, "logs"))
    sources = parse_sources(config.sources, config.listen)
    for line in describe_sources(sources):
        log.info("source policy: {policy}", policy=line)
    http, pool = make_http_client(reactor, upstream_policy(config.ca_bundle, False), guard=sources.refusal)
    disk = DiskPool(reactor, config.disk_threads)
    tasks = TaskManager(
        cache=cache,
        source=SourceClient(http, reactor),
        clock=reactor,
        fail_access_interval=config.fail_access_interval,
        poll_timeout=config.poll_timeout,
        run_blocking=disk.run,
        disk=disk.run,
        source_bucket=TokenBucket(config.max_bandwidth, reactor),
        policy=policy_from_mapping(config.scheduler),
        limits=Limits(
            max_tasks=config.max_tasks,
            max_peers_per_task=config.max_peers_per_task,
            max_fetches=config.max_fetches,
            max_file_size=config.max_file_size or -1,
        ),
        access_ttl=config.access_expire_time,
        task_expire_time=config.task_expire_time,
        revalidate_window=config.revalidate_window,
        quota=DiskQuota(cache, config.cache_limit, disk.run),
    )
    api = SupernodeApi(tasks, config.download_port, config.advertise_ip,
                       networks=PeerNetworks(config.peer_networks, config.trusted_peer_networks),
                       registration_rate=config.registration_rate)
    top = MultiService()
    log_file = open_log(os.path.join(config.home, "logs", "supernode.log"))
    LogObserverService(line_observer(log_file, str(os.getpid())), log_file.close).setServiceParent(top)
    _Supernode(tasks, pool, reactor, config, disk).setServiceParent(top)
    api_endpoint = tcp_endpoint(reactor, config.port, config.listen)
    cdn_endpoint = tcp_endpoint(reactor, config.download_port, config.listen)
    if config.tls_cert is not None and config.tls_key is not None:
        tls = server_tls(config.tls_cert, config.tls_key)
        api_endpoint, cdn_endpoint = TLSServerEndpoint(api_endpoint, tls), TLSServerEndpoint(cdn_endpoint, tls)
        tasks.cdn_scheme = "https"  # pieces from the CDN say so: peers dial it with TLS
        log.info("TLS on the register API and the CDN port, with the certificate {cert}", cert=config.tls_cert)
    api_gate = cdn_gate = None
    if config.cluster_token is not None:
        api_gate = ClusterGate(config.cluster_token, reactor, "register API", all_but_ping)
        cdn_gate = ClusterGate(config.cluster_token, reactor, "CDN", every_path)
    api_listener = ListeningService(
        api_endpoint, BoundedSite(api.resource(), access_log=config.access_log, cluster_gate=api_gate), "register API"
    )
    cdn_listener = ListeningService(
        cdn_endpoint,
        BoundedSite(CdnFiles(cache, reactor, TokenBucket(config.max_upload_bandwidth, reactor), tasks.key_for,
                      tasks.cache_file_missing, disk.run, write_idle=config.write_idle_timeout,
                      per_client=config.max_uploads_per_client), access_log=config.access_log,
                cluster_gate=cdn_gate),
        "CDN",
    )
    # Peers must be told the CDN port actually bound (it may have been 0).
    cdn_listener.listening.addCallback(lambda port: setattr(api, "download_port", port.getHost().port) or port)
    api_listener.setServiceParent(top)
    cdn_listener.setServiceParent(top)
    return SupernodeParts(top, tasks, api_listener, cdn_listener)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    # twistd opens its own ``-l`` log (and pid file) after this returns, with
    # the process umask; under ``-n`` (containers, systemd) nothing else
    # narrows it.  Keep group and other out of every file made from now on;
    # bits the umask already masks stay masked, and ``--umask`` still applies
    # to what twistd creates once the application starts.
    os.umask(os.umask(0) | 0o077)
    return build_service(options["config_obj"], reactor).service
