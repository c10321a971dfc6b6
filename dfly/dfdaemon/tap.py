"""``twistd dfdaemon``: options and the service tree.

The dfdaemon embeds a peer engine (no ``dfget`` process per blob) with its
own uploader, so the layers it fetched are served to other hosts exactly as
a peer daemon serves its files.  Its working tree is ``<home>/dfdaemon``
(``data/``, ``meta/``), its log ``<home>/logs/dfdaemon.log``.
``build_service(config, reactor)`` is pure wiring, so tests can build a real
dfdaemon on port 0 without twistd.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from typing import Any, Sequence

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.client import HTTPConnectionPool

import dfly
from dfly.config import (
    DEFAULT_DFDAEMON_CONFIG,
    DfdaemonFileConfig,
    Home,
    check_ip,
    check_registry,
    load_dfdaemon_config,
    parse_nodes,
    parse_port_flag,
    parse_size,
)
from dfly.dfdaemon.ca import CertificateAuthority
from dfly.dfdaemon.forward import agent_for
from dfly.dfdaemon.server import Dfdaemon, DfdaemonSite
from dfly.httpclient import cluster_client, make_http_client, upstream_policy
from dfly.logs import line_observer, make_sign, open_log
from dfly.peer.engine import PeerEngine
from dfly.peer.localapi import LocalApi
from dfly.peer.options import PeerConfig
from dfly.peer.tap import GC_INTERVAL, PeerDaemon, remove_residue, uploader_gate
from dfly.peer.uploader import UploadStore
from dfly.ratelimit import HostLimit
from dfly.services import ListeningService, LogObserverService, tcp_endpoint
from dfly.webbounds import BoundedSite

log = Logger(namespace="dfly.dfdaemon")


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run dfdaemon: a registry mirror and HTTP(S) proxy on --port (default 65001) that fetches image "
        "layers (and URLs matching p2p rules) through the dfly supernodes given with --node, and passes "
        "everything else through.  Values from --config are overridden by flags.  "
        "'dfdaemon gen-ca' makes the CA for HTTPS interception."
    )
    optFlags = [
        ["insecure", None, "Do not verify the TLS certificates of --registry and proxied hosts (labs and tests only)."],
    ]
    optParameters = [
        ["config", "c", DEFAULT_DFDAEMON_CONFIG, "YAML config file (optional when left at the default path)."],
        ["port", "p", None, "Port of the mirror/proxy [default: 65001]."],
        ["listen", None, None, "Address it listens on [default: 127.0.0.1]."],
        ["registry", None, None, "Registry that mirror requests (/v2/...) go to, http:// or https:// [default: none]."],
        ["home", None, None, "dfly home directory [default: ~/.small-dragonfly]."],
        ["localrepo", None, None, "Where finished blobs are placed before they are sent [default: <home>/dfdaemon/data]."],
        ["ratelimit", None, None, "Download limit per blob and for all of this host's P2P traffic each way, "
                                  "e.g. 20M; 0 = unlimited [default: 20M]."],
        ["peer-port", None, None, "Port of the uploader that serves pieces to other peers [default: 0, any free port]."],
        ["ca-bundle", None, None, "PEM file of CA certificates to trust for --registry and proxied hosts "
                                  "[default: the system's]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["node"] = []

    def opt_node(self, value: str) -> None:
        """Supernode host[:port] (default port 8002); repeat or separate with commas. Each task goes to the node its hash picks; the others are fallbacks."""
        self["node"].append(value)

    opt_n = opt_node

    def opt_version(self) -> None:
        print(f"dfdaemon version:{dfly.__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self["config_obj"] = dfdaemon_config(self)
        except ValueError as e:
            raise usage.UsageError(str(e)) from None


def dfdaemon_config(options: dict[str, Any]) -> DfdaemonFileConfig:
    """The file's values with the given flags on top; ValueError on bad input."""
    path = options["config"]
    config = load_dfdaemon_config(path, required=path != DEFAULT_DFDAEMON_CONFIG)
    changes: dict[str, Any] = {}
    if options["port"] is not None:
        changes["port"] = parse_port_flag(options["port"], "port")
    if options["listen"] is not None:
        changes["listen"] = check_ip(options["listen"])
    if options["registry"] is not None:
        changes["registry"] = check_registry(options["registry"])
    if options["node"]:
        changes["nodes"] = parse_nodes(options["node"])
    for flag in ("home", "localrepo", "ca-bundle"):
        if options[flag] is not None:
            changes[flag.replace("-", "_")] = options[flag]
    if options["ratelimit"] is not None:
        try:
            changes["ratelimit"] = parse_size(options["ratelimit"])
        except ValueError as e:
            raise ValueError(f"--ratelimit: {e}") from None
    if options["peer-port"] is not None:
        changes["peer_port"] = parse_port_flag(options["peer-port"], "peer-port")
    if options["insecure"]:
        changes["insecure"] = True
    config = attrs.evolve(config, **changes)
    if not config.nodes:
        raise ValueError("no supernode: give --node host[:port] or nodes in the config file")
    if config.ca_bundle is not None:
        upstream_policy(config.ca_bundle, False)  # an unreadable bundle stops the start with its reason
    if config.cluster_ca is not None:
        upstream_policy(config.cluster_ca, False)  # clusterCa too
    if config.hijack_cert is not None:
        check_hijack_ca(config)
    home = os.path.abspath(os.path.expanduser(config.home))
    localrepo = os.path.abspath(os.path.expanduser(config.localrepo)) if config.localrepo else None
    return attrs.evolve(config, home=home, localrepo=localrepo)



def check_hijack_ca(config: DfdaemonFileConfig) -> CertificateAuthority:
    """The hijack CA, when it may sign for every host a hijack rule names literally; ValueError otherwise.

    A rule that is a real regex is checked per CONNECT instead (a host the
    CA may not sign for is then tunnelled, not intercepted).
    """
    assert config.hijack_cert is not None and config.hijack_key is not None
    ca = CertificateAuthority.load(config.hijack_cert, config.hijack_key)
    for rule in config.hijack_hosts:
        name = rule.certificate_name
        if name is not None and not ca.permits(name.removeprefix("*.")):
            raise ValueError(f"hijackHttps: the CA {config.hijack_cert} may not sign for {name} (its name "
                             f"constraints leave it out): make one with 'dfdaemon gen-ca --host {name}'")
    return ca


#: The names dfdaemon gives files in --localrepo (a blob, or its temporary
#: name while placed): the sweep touches nothing else there.
LOCALREPO_NAMES = re.compile(r"\.?[0-9a-f]{32}(\.[^/]+\.tmp)?")


class _Housekeeping(Service):
    """Sweeps --localrepo (when it is not the engine's data/) and closes the proxy's pools."""

    def __init__(self, localrepo: str | None, uploads: UploadStore, pools: Sequence[HTTPConnectionPool],
                 clock: Any) -> None:
        self.localrepo = localrepo
        self.uploads = uploads
        self.pools = pools
        self._sweep = LoopingCall(self.sweep)
        self._sweep.clock = clock
        self.clock = clock

    def sweep(self) -> None:
        if self.localrepo is not None:
            remove_residue(self.localrepo, self.uploads.paths(), self.clock.seconds(), LOCALREPO_NAMES)

    def startService(self) -> None:
        super().startService()
        self._sweep.start(GC_INTERVAL, now=True)

    def stopService(self) -> Any:
        super().stopService()
        if self._sweep.running:
            self._sweep.stop()
        return gatherResults([pool.closeCachedConnections() for pool in self.pools])


@attrs.frozen
class DfdaemonParts:
    service: MultiService
    dfdaemon: Dfdaemon
    proxy: ListeningService
    peer: ListeningService
    engine: PeerEngine


def build_service(config: DfdaemonFileConfig, reactor: Any) -> DfdaemonParts:
    home = Home(os.path.join(config.home, "dfdaemon")).ensure()
    localrepo = config.localrepo or home.data
    os.makedirs(localrepo, mode=0o700, exist_ok=True)
    logs = os.path.join(config.home, "logs")
    os.makedirs(logs, mode=0o700, exist_ok=True)
    ca = CertificateAuthority.load(config.hijack_cert, config.hijack_key) if config.hijack_cert else None
    if ca is not None and ca.constraints is None:
        log.warn("the hijackHttps CA {cert} has no name constraints: a client that trusts it accepts its "
                 "certificates for any host; make a new one with 'dfdaemon gen-ca --host NAME'", cert=config.hijack_cert)
    if not ipaddress.ip_address(config.listen).is_loopback and not config.proxy_auth:
        log.warn("dfdaemon listens on {listen} without proxyAuth: it serves registry-mirror requests only, "
                 "and answers proxy requests and CONNECT with 403", listen=config.listen)

    # The engine's own fetches (back to source) trust what the proxy trusts.
    policy = upstream_policy(config.ca_bundle, config.insecure)
    http, pool = make_http_client(reactor, policy, connect_timeout=config.timeouts.connect)
    limit = HostLimit(config.ratelimit, reactor)
    uploads = UploadStore(reactor, limit.tx, write_idle=config.write_idle_timeout,
                          per_client=config.max_uploads_per_client)
    # The cluster (supernode, CDN, peers) is trusted by clusterCa alone, on a pool of its own.
    cluster_http, cluster_pool = cluster_client(reactor, config.cluster_ca, config.timeouts.connect)
    engine = PeerEngine(reactor, http, home, uploads=uploads, limit=limit, timeouts=config.timeouts,
                        cluster_token=config.cluster_token, cluster_tls=config.cluster_ca is not None,
                        cluster_http=cluster_http)
    token = secrets.token_hex(16)
    # The embedded local API parses JSON: bounded bodies.  The proxy port
    # below relays registry uploads of many MiB and keeps its plain Site.
    peer = ListeningService(tcp_endpoint(reactor, config.peer_port, "0.0.0.0"),
                            BoundedSite(LocalApi(engine, token, uploads).resource(),
                                        cluster_gate=uploader_gate(config.cluster_token, reactor)), "peer server")

    # Two agents, two pools: a connection made without verification never serves a verified request.
    agent, proxy_pool = agent_for(reactor, policy)
    insecure_agent, insecure_pool = agent_for(reactor, upstream_policy(config.ca_bundle, True))
    dfdaemon = Dfdaemon(reactor, config, engine, localrepo, agent, insecure_agent, ca)
    proxy = ListeningService(tcp_endpoint(reactor, config.port, config.listen), DfdaemonSite(dfdaemon), "dfdaemon proxy")

    top = MultiService()
    log_file = open_log(os.path.join(logs, "dfdaemon.log"))
    LogObserverService(line_observer(log_file, make_sign(os.getpid(), reactor.seconds())), log_file.close).setServiceParent(top)
    daemon_config = PeerConfig(home=home.root, port=config.peer_port, alivetime=0)
    PeerDaemon(home, engine, uploads, peer, token, daemon_config, reactor, lambda: None, pool,
               cluster_pool).setServiceParent(top)
    _Housekeeping(None if localrepo == home.data else localrepo, uploads, (proxy_pool, insecure_pool),
                  reactor).setServiceParent(top)
    peer.setServiceParent(top)
    proxy.setServiceParent(top)
    return DfdaemonParts(top, dfdaemon, proxy, peer, engine)


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options["config_obj"], reactor).service
