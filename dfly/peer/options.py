"""Options of the peer daemon (``dfget server``, ``twistd dfget``).

Separate from `dfly.peer.tap` so the ``dfget`` CLI can parse ``dfget server``
without importing the daemon's HTTP stack.
"""

from __future__ import annotations

import os

import attrs
from twisted.python import usage

import dfly
from dfly.config import (
    DEFAULT_DFGET_CONFIG,
    MAX_UPLOADS_PER_CLIENT,
    WRITE_IDLE_TIMEOUT,
    NodeTimeouts,
    check_ip,
    default_home,
    load_dfget_config,
    parse_count,
    parse_duration,
    parse_port_flag,
    parse_positive_duration,
    parse_size,
)


@attrs.frozen
class PeerConfig:
    home: str
    port: int = 0
    listen: str = "0.0.0.0"
    ip: str | None = None
    alivetime: float = 300.0
    expiretime: float = 180.0
    total_limit: int = 0  # bytes/s each way for the whole host; 0 = unlimited
    timeouts: NodeTimeouts = NodeTimeouts()
    write_idle_timeout: float = WRITE_IDLE_TIMEOUT  # an upload whose client reads nothing this long is aborted
    max_uploads_per_client: int = MAX_UPLOADS_PER_CLIENT  # uploads one client address holds at once
    cluster_token: str | None = attrs.field(default=None, repr=False)  # clusterToken of dfget.yml
    cluster_ca: str | None = None  # clusterCa of dfget.yml: https to the supernode, verified against it


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run the dfly peer daemon in the foreground: it downloads for local dfget runs and serves "
        "the pieces it holds to other peers.  dfget starts one on demand; run it yourself to choose "
        "its port.  It exits after --alivetime without downloads or uploads."
    )
    optParameters = [
        ["home", None, None, "dfly home directory [default: ~/.small-dragonfly]."],
        ["port", None, "0", "Port of the peer server; 0 picks a free one."],
        ["listen", None, "0.0.0.0", "Address the peer server (uploader and local API) listens on."],
        ["ip", None, None, "IP to advertise to the supernode [default: the address that reaches it]."],
        ["alivetime", None, "5m", "Exit after this long without downloads or uploads (e.g. 90s, 5m; 0 = never)."],
        ["expiretime", None, "3m", "Keep serving a downloaded file until nobody asked for it for this long."],
        ["totallimit", None, None,
         "Limit of this host's P2P traffic in bytes/s, each way (downloads and uploads), e.g. 40M; 0 = unlimited "
         "[default: totalLimit from --config, else 0]. A dfget run given --totallimit changes it."],
        ["connecttimeout", None, None,
         "Give up a TCP connection (supernode, peer, source) after this long [default: connectTimeout, else 3s]."],
        ["apitimeout", None, None,
         "Give up a supernode API call or a peer's piece answer after this long [default: apiTimeout, else 5s]."],
        ["hangcheck", None, None,
         "Ping a supernode that has not answered a registration or poll for this long; one that does not "
         "answer the ping is left for the next [default: hangCheck, else 3s]."],
        ["rejoinwait", None, None,
         "When a download's supernode is lost, retry the nodes this long (a restart) before going to the "
         "source [default: rejoinWait, else 10s]."],
        ["config", None, DEFAULT_DFGET_CONFIG,
         "dfget.yml to take totalLimit, the timeouts, the upload bounds, clusterToken and clusterCa from "
         "(optional at the default path)."],
        ["writeidletimeout", None, None,
         "Abort an upload whose client has read nothing for this long [default: writeIdleTimeout, else 60s]."],
        ["maxuploadsperclient", None, None,
         "Uploads one client address may hold at once; more get 503 [default: maxUploadsPerClient, else 32]."],
    ]

    #: Timeout flags and the `NodeTimeouts` field each sets.
    timeout_flags = {"connecttimeout": "connect", "apitimeout": "api", "hangcheck": "hang_check", "rejoinwait": "rejoin"}

    def opt_version(self) -> None:
        print(f"dfly peer daemon {dfly.__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            config_path = self["config"]
            file_config = load_dfget_config(config_path, required=config_path != DEFAULT_DFGET_CONFIG)
            total_limit = file_config.total_limit
            if self["totallimit"]:
                try:
                    total_limit = parse_size(self["totallimit"])
                except ValueError as e:
                    raise ValueError(f"--totallimit: {e}") from None
            port = parse_port_flag(self["port"], "port")
            given = {}
            for flag, field in self.timeout_flags.items():
                if self[flag] is not None:
                    try:
                        seconds = parse_duration(self[flag])
                    except ValueError as e:
                        raise ValueError(f"--{flag}: {e}") from None
                    if seconds <= 0 and flag != "rejoinwait":
                        raise ValueError(f"--{flag}: expected a duration above 0, got {self[flag]!r}")
                    given[field] = seconds
            bounds = {"write_idle_timeout": file_config.write_idle_timeout,
                      "max_uploads_per_client": file_config.max_uploads_per_client}
            for flag, field, parse in (("writeidletimeout", "write_idle_timeout", parse_positive_duration),
                                       ("maxuploadsperclient", "max_uploads_per_client", parse_count)):
                if self[flag] is not None:
                    try:
                        bounds[field] = parse(self[flag])
                    except ValueError as e:
                        raise ValueError(f"--{flag}: {e}") from None
            self["config_obj"] = PeerConfig(
                home=os.path.abspath(os.path.expanduser(self["home"] or default_home())),
                port=port,
                listen=check_ip(self["listen"]),
                ip=check_ip(self["ip"]) if self["ip"] else None,
                alivetime=parse_duration(self["alivetime"]),
                expiretime=parse_duration(self["expiretime"]),
                total_limit=total_limit or 0,
                timeouts=attrs.evolve(file_config.timeouts, **given),
                **bounds,
                cluster_token=file_config.cluster_token,
                cluster_ca=file_config.cluster_ca,
            )
            if file_config.cluster_ca is not None:
                from dfly.httpclient import upstream_policy  # here: dfget's own runs need no HTTP stack

                upstream_policy(file_config.cluster_ca, False)  # an unreadable CA stops the start with its reason
        except ValueError as e:
            raise usage.UsageError(str(e)) from None
