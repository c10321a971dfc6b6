"""``twistd dfget`` (and ``dfget server``): the host's peer daemon.

One daemon per home directory: it holds ``meta/daemon.lock`` while it runs,
announces its port and local-API token in ``meta/host.meta``, runs the
downloads that ``dfget`` asks for, and exits after ``--alivetime`` without
work.  ``build_service(config, reactor)`` is the pure wiring tests use.
"""

from __future__ import annotations

import fcntl
import os
import re
import secrets
import shutil
from typing import Any, Callable

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

import dfly
from dfly.config import Home
from dfly.clustertoken import ClusterGate, uploader_paths
from dfly.httpclient import cluster_client, make_http_client
from dfly.logs import is_client_event, line_observer, make_sign, open_log
from dfly.peer.engine import PeerEngine
from dfly.peer.hostmeta import remove_host_meta, write_host_meta
from dfly.peer.localapi import LocalApi
from dfly.peer.storage import remove_quietly
from dfly.peer.uploader import UploadStore
from dfly.peer.options import Options, PeerConfig
from dfly.ratelimit import HostLimit, describe_limit
from dfly.services import ListeningService, LogObserverService, tcp_endpoint
from dfly.webbounds import BoundedSite

log = Logger(namespace="dfly.peer")


#: How often data/ is collected.
GC_INTERVAL = 15.0
#: How often a finished download tells its supernode it still serves (its
#: ``finishedSilence`` is 90 s by default: three heartbeats).
HEARTBEAT_INTERVAL = 30.0
#: Files in data/ that belong to no download and are older than this go.
RESIDUE_AGE = 3600.0
#: How long stopping waits for the service-down reports.
LEAVE_TIMEOUT = 3.0


def remove_residue(directory: str, keep: set[str], now: float, ours: re.Pattern[str] | None = None) -> None:
    """Remove what is in ``directory`` (but ``keep``) and older than `RESIDUE_AGE`, e.g. after a crash.

    With ``ours``, only plain files whose names match it: for a directory the
    user chose, which may hold other things.
    """
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        if ours is not None and (not ours.fullmatch(name) or not os.path.isfile(path) or os.path.islink(path)):
            continue
        try:
            stale = path not in keep and now - os.lstat(path).st_mtime > RESIDUE_AGE
        except OSError:
            continue
        if stale:
            log.info("removing residual file {path}", path=path)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                remove_quietly(path)


def uploader_gate(token: str | None, clock: Any) -> ClusterGate | None:
    """The cluster token's check on a peer server: its uploader (``/peer/``), not the local API."""
    return ClusterGate(token, clock, "uploader", uploader_paths) if token is not None else None


class DaemonLockHeld(Exception):
    pass


class PeerDaemon(Service):
    """Holds the home lock, publishes host.meta, collects data/, and stops the daemon when idle."""

    def __init__(self, home: Home, engine: PeerEngine, uploads: UploadStore, listener: ListeningService,
                 token: str, config: PeerConfig, clock: Any, on_idle: Callable[[], None],
                 pool: HTTPConnectionPool, cluster_pool: HTTPConnectionPool | None = None) -> None:
        self.home = home
        self.engine = engine
        self.uploads = uploads
        self.listener = listener
        self.token = token
        self.alivetime = config.alivetime
        self.expiretime = config.expiretime
        self.listen = config.listen
        self.clock = clock
        self.on_idle = on_idle
        self.pool = pool
        self.cluster_pool = cluster_pool  # the cluster's own client (clusterCa), when it has one
        self._lock_fd: int | None = None
        self._idle_check: LoopingCall | None = None
        self._collect = LoopingCall(self.collect)
        self._collect.clock = clock
        self._last_busy = 0.0

    def startService(self) -> None:
        self.home.ensure()
        fd = os.open(self.home.daemon_lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DaemonLockHeld(f"another peer daemon already runs for {self.home.root}") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        super().startService()
        self.listener.listening.addCallback(self._publish)
        self._last_busy = self.clock.seconds()
        self._collect.start(GC_INTERVAL, now=True)
        if self.alivetime > 0:
            self._idle_check = LoopingCall(self._check_idle)
            self._idle_check.clock = self.clock
            self._idle_check.start(min(self.alivetime / 4, 15.0), now=False)

    def _publish(self, port: Any) -> Any:
        self.engine.port = port.getHost().port
        write_host_meta(self.home, self.engine.port, self.token, dfly.__version__, self.listen)
        log.info("peer daemon {pid} serving on port {port}, home {home}, host limit (--totallimit) {limit} each way",
                 pid=os.getpid(), port=self.engine.port, home=self.home.root,
                 limit=describe_limit(self.engine.limit.rate))
        return port

    def collect(self) -> None:
        """Stop serving files nobody asked for in --expiretime; remove residue older than an hour.

        Files still served get a heartbeat to their supernode every
        `HEARTBEAT_INTERVAL`, so it keeps offering this peer as a source.
        """
        now = self.clock.seconds()
        for held in self.uploads.held():
            if not held.finished:
                continue
            if not held.uploads and now - held.last_access >= self.expiretime:
                self.engine.expire(held)
            elif now - held.heartbeat >= HEARTBEAT_INTERVAL:
                self.engine.heartbeat(held)
        remove_residue(self.home.data, self.uploads.paths(), now)

    def _check_idle(self) -> None:
        now = self.clock.seconds()
        if self.engine.active or self.uploads.active:
            self._last_busy = now
        elif now - max(self._last_busy, self.uploads.last_upload, self.engine.last_active) >= self.alivetime:
            log.info("no downloads or uploads for {alive:g}s: peer daemon exits", alive=self.alivetime)
            self._idle_check.stop()  # type: ignore[union-attr]
            self._idle_check = None
            self.on_idle()

    def stopService(self) -> Any:
        super().stopService()
        for loop in (self._idle_check, self._collect):
            if loop is not None and loop.running:
                loop.stop()
        if self._lock_fd is not None:
            remove_host_meta(self.home)
            os.close(self._lock_fd)
            self._lock_fd = None
        # Served files go with the daemon; tell their supernodes (briefly).
        leaving = [self.engine.expire(held) for held in self.uploads.held() if held.finished]
        done = gatherResults(leaving, consumeErrors=True).addTimeout(LEAVE_TIMEOUT, self.clock)
        done.addErrback(lambda _: None)
        pools = [self.pool] + ([self.cluster_pool] if self.cluster_pool is not None else [])
        return done.addBoth(lambda _: gatherResults([p.closeCachedConnections() for p in pools]))


@attrs.frozen
class PeerParts:
    service: MultiService
    engine: PeerEngine
    listener: ListeningService
    daemon: PeerDaemon
    uploads: UploadStore


def build_service(config: PeerConfig, reactor: Any, on_idle: Callable[[], None] | None = None) -> PeerParts:
    home = Home(config.home)
    home.ensure()
    http, pool = make_http_client(reactor, connect_timeout=config.timeouts.connect)
    cluster_http, cluster_pool = cluster_client(reactor, config.cluster_ca, config.timeouts.connect)
    limit = HostLimit(config.total_limit, reactor)
    uploads = UploadStore(reactor, limit.tx, write_idle=config.write_idle_timeout,
                          per_client=config.max_uploads_per_client)
    engine = PeerEngine(reactor, http, home, ip=config.ip, uploads=uploads, limit=limit, timeouts=config.timeouts,
                        cluster_token=config.cluster_token, cluster_tls=config.cluster_ca is not None,
                        cluster_http=cluster_http)
    token = secrets.token_hex(16)
    endpoint = tcp_endpoint(reactor, config.port, config.listen)
    # Other peers and local clients reach this port: request bodies are
    # bounded before they are buffered (the local API takes small JSON).
    # The cluster token guards the uploader only: dfget has its own token.
    listener = ListeningService(endpoint, BoundedSite(LocalApi(engine, token, uploads).resource(),
                                                      cluster_gate=uploader_gate(config.cluster_token, reactor)),
                                "peer server")
    top = MultiService()
    sign = make_sign(os.getpid(), reactor.seconds())
    server_log = open_log(home.log_file("dfserver.log"))
    client_log = open_log(home.log_file("dfclient.log"))
    LogObserverService(line_observer(server_log, sign, lambda e: not is_client_event(e)), server_log.close).setServiceParent(top)
    LogObserverService(line_observer(client_log, sign, is_client_event), client_log.close).setServiceParent(top)
    daemon = PeerDaemon(home, engine, uploads, listener, token, config, reactor, on_idle or reactor.stop,
                        pool, cluster_pool)
    daemon.setServiceParent(top)
    listener.setServiceParent(top)
    return PeerParts(top, engine, listener, daemon, uploads)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options["config_obj"], reactor).service
