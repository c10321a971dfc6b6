"""Configuration: size and duration units, the home layout, YAML files.

Everything here is pure: a YAML text or a flag value goes in, a frozen attrs
object or a ``ValueError`` with a one-line reason comes out.  The ``tap``
modules turn those errors into ``usage.UsageError``.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

import attrs
import yaml

from dfly.clustertoken import check_token
from dfly.private import private_dir
from dfly.urls import check_url

DEFAULT_SUPERNODE_PORT = 8002
DEFAULT_DOWNLOAD_PORT = 8001
DEFAULT_DFGET_CONFIG = "/etc/dragonfly/dfget.yml"
DEFAULT_SUPERNODE_CONFIG = "/etc/dragonfly/supernode.yml"
#: Bytes/s one download may take unless told otherwise (the FAQ's 10 MB/s).
DEFAULT_LOCAL_LIMIT = 10 << 20
#: Seconds an upload (uploader, CDN port) may go without writing a byte, its
#: client not reading, before the connection is aborted (``writeIdleTimeout``).
WRITE_IDLE_TIMEOUT = 60.0
#: Uploads one client address may hold at once on an uploader or the CDN port
#: (``maxUploadsPerClient``): twice what a peer's engine opens to one host.
MAX_UPLOADS_PER_CLIENT = 32
#: Seconds a blind CONNECT tunnel may carry nothing either way (``tunnelIdleTimeout``).
TUNNEL_IDLE_TIMEOUT = 300.0

_SIZE = re.compile(r"\A\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*\Z", re.IGNORECASE)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def parse_size(value: str | int) -> int:
    """Bytes from ``10M``, ``512K``, ``1G``, ``20MB`` or a plain number; ``0`` means unlimited.

    Units are binary (``1K`` = 1024), as Dragonfly's were.
    """
    if isinstance(value, bool):
        raise ValueError(f"invalid size {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value}: must not be negative")
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f"invalid size {value!r}: use a number with an optional K, M or G suffix, e.g. 10M")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def parse_duration(value: str | int | float) -> float:
    """Seconds from ``300``, ``90s``, ``5m``, ``3m0s``, ``1h30m`` or ``250ms``."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"invalid duration {value}: must be a finite number of seconds, not negative")
        return float(value)
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {value!r}: use e.g. 90s, 5m, 1h30m or a number of seconds")
    return sum(float(n) * _SECONDS[u] for n, u in parts)


def parse_node(text: str, default_port: int = DEFAULT_SUPERNODE_PORT) -> tuple[str, int]:
    """``host[:port]`` of a supernode; the port defaults to 8002."""
    text = text.strip()
    host, port = text, default_port
    if text.startswith("["):
        if "]" not in text:
            raise ValueError(f"invalid node {text!r}: missing ']'")
        host, _, rest = text[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid node {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = _port(port_text, text)
    elif ":" in text:
        try:
            ipaddress.IPv6Address(text)
        except ValueError:
            raise ValueError(f"invalid node {text!r}: expected host, host:port or [ipv6]:port") from None
    if not host or not re.fullmatch(r"[A-Za-z0-9._:-]+", host):
        raise ValueError(f"invalid node {text!r}: expected host or host:port")
    return host, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"invalid port in {whole!r}: expected 1-65535")
    return int(text)


def parse_nodes(values: str | list[str] | tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """Nodes from ``--node a,b --node c`` or a YAML list, in the order given."""
    items = [values] if isinstance(values, str) else list(values)
    nodes: list[tuple[str, int]] = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"invalid node {item!r}: expected host or host:port")
        nodes.extend(parse_node(part) for part in item.split(",") if part.strip())
    return tuple(nodes)


def format_node(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"invalid IP address {text!r}") from None


def default_home() -> str:
    return os.path.join(os.path.expanduser("~"), ".small-dragonfly")


@attrs.frozen
class Home:
    """The per-user directory tree: ``logs/``, ``meta/``, ``data/``."""

    root: str

    @property
    def logs(self) -> str:
        return os.path.join(self.root, "logs")

    @property
    def meta(self) -> str:
        return os.path.join(self.root, "meta")

    @property
    def data(self) -> str:
        return os.path.join(self.root, "data")

    @property
    def host_meta(self) -> str:
        return os.path.join(self.meta, "host.meta")

    @property
    def daemon_lock(self) -> str:
        return os.path.join(self.meta, "daemon.lock")

    def log_file(self, name: str) -> str:
        return os.path.join(self.logs, name)

    def ensure(self) -> "Home":
        """Create the tree, or tighten an existing one: owner-only (host.meta holds the local API token).

        The root and its three directories are made 0700; what is inside
        them keeps its mode (see `dfly.private`).
        """
        for path in (self.root, self.logs, self.meta, self.data):
            private_dir(path)
        return self


# --- YAML files ---------------------------------------------------------------


def _read_yaml(path: str, required: bool) -> Mapping[str, Any]:
    """The mapping in ``path``; ``{}`` when an optional default file is absent."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        if required:
            raise ValueError(f"config file {path} does not exist") from None
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot read config file {path}: {reason}") from None
    except RecursionError:  # PyYAML composes nested collections recursively
        raise ValueError(f"cannot read config file {path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of keys at the top")
    return data


def _apply(path: str, data: Mapping[str, Any], keys: Mapping[str, tuple[str, Callable[[Any], Any]]]) -> dict[str, Any]:
    """Map file keys to attribute names, converting and rejecting unknown keys."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key not in keys:
            known = ", ".join(sorted(keys))
            raise ValueError(f"config file {path}: unknown key {key!r} (known keys: {known})")
        name, convert = keys[key]
        try:
            out[name] = convert(value)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config file {path}: key {key!r}: {e}") from None
    return out


def parse_port_flag(value: str, name: str) -> int:
    """A ``--<name>`` port flag, 0-65535 (0: any free port)."""
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise ValueError(f"invalid --{name} {value!r}: expected 0-65535")
    return int(value)


def _positive_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 65536:
        raise ValueError(f"invalid port {value!r}: expected 0-65535")
    return value


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration above 0, got {value!r}")
    return seconds


#: For flags: a duration above 0 (a timeout of 0 would cut everything off at once).
parse_positive_duration = _positive_duration


@attrs.frozen
class NodeTimeouts:
    """How long a peer waits on the network before it moves on.

    A dead or hung supernode must cost a few seconds, once per daemon (its
    health memory does the "once"), never a download's whole timeout.  The
    registration waits for the source's headers and the long poll for
    work, so those keep long budgets, but they ping the node after
    ``hang_check`` seconds without an answer and give up on one that does
    not answer the ping either.
    """

    connect: float = 3.0  # a TCP (and TLS) connection: supernode, peer or source
    api: float = 5.0  # a supernode's answer to an API call; a peer's answer to a piece request
    hang_check: float = 3.0  # a slow registration or poll pings the supernode after this long
    rejoin: float = 10.0  # a migration retries the nodes this long (a restart) before the source


#: ``dfget.yml``/``dfdaemon.yml`` keys of `NodeTimeouts` (as ``timeouts.<field>``).
_TIMEOUT_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "connectTimeout": ("timeouts.connect", _positive_duration),
    "apiTimeout": ("timeouts.api", _positive_duration),
    "hangCheck": ("timeouts.hang_check", _positive_duration),
    "rejoinWait": ("timeouts.rejoin", parse_duration),
}


def _gather_timeouts(values: dict[str, Any]) -> dict[str, Any]:
    """Fold the ``timeouts.*`` values `_apply` produced into one `NodeTimeouts`."""
    fields = {name.split(".", 1)[1]: values.pop(name) for name in list(values) if name.startswith("timeouts.")}
    values["timeouts"] = NodeTimeouts(**fields)
    return values


@attrs.frozen
class DfgetFileConfig:
    """What ``dfget.yml`` may set; flags override each field."""

    nodes: tuple[tuple[str, int], ...] = ()
    min_rate: int = 64 << 10
    timeout: float = 0.0
    local_limit: int = DEFAULT_LOCAL_LIMIT
    total_limit: int | None = None  # None: not set here (the daemon's own value holds)
    timeouts: NodeTimeouts = NodeTimeouts()
    write_idle_timeout: float = WRITE_IDLE_TIMEOUT  # of the daemon's uploader
    max_uploads_per_client: int = MAX_UPLOADS_PER_CLIENT
    cluster_token: str | None = attrs.field(default=None, repr=False)  # sent to the supernode, CDN and peers
    cluster_ca: str | None = None  # PEM of the CA that signed the supernode's certificate: https to it


_DFGET_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "nodes": ("nodes", parse_nodes),
    "minRate": ("min_rate", parse_size),
    "timeout": ("timeout", parse_duration),
    "localLimit": ("local_limit", parse_size),
    "totalLimit": ("total_limit", parse_size),
    "clusterToken": ("cluster_token", check_token),
    "clusterCa": ("cluster_ca", _string),
    **_TIMEOUT_KEYS,
    "writeIdleTimeout": ("write_idle_timeout", _positive_duration),
    "maxUploadsPerClient": ("max_uploads_per_client", lambda v: parse_count(v)),  # parse_count comes below
}


def load_dfget_config(path: str = DEFAULT_DFGET_CONFIG, required: bool = False) -> DfgetFileConfig:
    return DfgetFileConfig(**_gather_timeouts(_apply(path, _read_yaml(path, required), _DFGET_KEYS)))


@attrs.frozen
class SupernodeFileConfig:
    """What ``supernode.yml`` may set; flags override each field."""

    port: int = DEFAULT_SUPERNODE_PORT
    download_port: int = DEFAULT_DOWNLOAD_PORT
    listen: str = "0.0.0.0"
    home: str = attrs.field(factory=lambda: os.path.join(default_home(), "supernode"))
    advertise_ip: str | None = None
    fail_access_interval: float = 180.0
    poll_timeout: float = 5.0
    max_bandwidth: int = 0  # bytes/s of all source fetches together; 0 = unlimited
    max_upload_bandwidth: int = 0  # bytes/s of all CDN uploads together; 0 = unlimited
    ca_bundle: str | None = None  # PEM roots for https sources instead of the system's
    task_expire_time: float = 180.0  # a task with no peer leaves memory after this
    access_expire_time: float = 60.0  # how long a source's "yes" to one caller is trusted
    revalidate_window: float = 5.0  # registrations within this share one revalidation
    cache_limit: int = 0  # bytes of cache on disk; 0 = keep 20 % of the filesystem free
    max_tasks: int = 10_000
    max_peers_per_task: int = 20_000
    max_fetches: int = 32  # source fetches at once (more wait in a queue)
    max_file_size: int = 0  # bytes; 0 = unlimited
    disk_threads: int = 4
    access_log: bool = False  # one log line per HTTP request on both ports
    scheduler: Mapping[str, Any] = attrs.field(factory=dict)  # checked by dfly.supernode.policy
    sources: Mapping[str, Any] = attrs.field(factory=dict)  # allow/deny, checked by dfly.supernode.sources
    peer_networks: tuple[Network, ...] = ()  # advertised peer addresses must be inside; (): any
    trusted_peer_networks: tuple[Network, ...] = ()  # clients here may advertise another address (NAT)
    registration_rate: float = 20.0  # registrations a second per client address (bursts of 10 s); 0: no limit
    write_idle_timeout: float = WRITE_IDLE_TIMEOUT  # a CDN send whose client reads nothing this long is aborted
    max_uploads_per_client: int = MAX_UPLOADS_PER_CLIENT  # CDN sends one client address holds at once
    cluster_token: str | None = attrs.field(default=None, repr=False)  # required on the API (but /_ping) and CDN
    tls_cert: str | None = None  # PEM certificate (and chain) the API and the CDN port serve TLS with
    tls_key: str | None = None  # its PEM private key


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(value: Any, key: str) -> tuple[Network, ...]:
    """A YAML list of CIDRs or addresses (ValueError names the key and the bad entry)."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ValueError(f"{key} must be a list of CIDRs")
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            raise ValueError(f"{key}: {item!r} is not a CIDR or address") from None
    return tuple(networks)


def _rate(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1e6:
        raise ValueError(f"expected a number of registrations a second (0: no limit), got {value!r}")
    return float(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def parse_count(value: Any) -> int:
    """A whole number >= 1, from YAML (an int) or a flag (digits)."""
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number >= 1, got {value!r}")
    return value


def _mapping(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping, got {value!r}")
    return value


_SUPERNODE_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "port": ("port", _positive_port),
    "downloadPort": ("download_port", _positive_port),
    "listen": ("listen", check_ip),
    "home": ("home", _string),
    "advertiseIp": ("advertise_ip", check_ip),
    "failAccessInterval": ("fail_access_interval", parse_duration),
    "pollTimeout": ("poll_timeout", parse_duration),
    "maxBandwidth": ("max_bandwidth", parse_size),
    "maxUploadBandwidth": ("max_upload_bandwidth", parse_size),
    "caBundle": ("ca_bundle", _string),
    "taskExpireTime": ("task_expire_time", parse_duration),
    "accessExpireTime": ("access_expire_time", parse_duration),
    "revalidateWindow": ("revalidate_window", parse_duration),
    "cacheLimit": ("cache_limit", parse_size),
    "maxTasks": ("max_tasks", parse_count),
    "maxPeersPerTask": ("max_peers_per_task", parse_count),
    "maxFetches": ("max_fetches", parse_count),
    "maxFileSize": ("max_file_size", parse_size),
    "diskThreads": ("disk_threads", parse_count),
    "accessLog": ("access_log", _bool),
    "scheduler": ("scheduler", _mapping),
    "sources": ("sources", _mapping),
    "peerNetworks": ("peer_networks", lambda v: parse_networks(v, "peerNetworks")),
    "trustedPeerNetworks": ("trusted_peer_networks", lambda v: parse_networks(v, "trustedPeerNetworks")),
    "registrationRate": ("registration_rate", _rate),
    "writeIdleTimeout": ("write_idle_timeout", _positive_duration),
    "maxUploadsPerClient": ("max_uploads_per_client", parse_count),
    "clusterToken": ("cluster_token", check_token),
    "tlsCert": ("tls_cert", _string),
    "tlsKey": ("tls_key", _string),
}


def load_supernode_config(path: str = DEFAULT_SUPERNODE_CONFIG, required: bool = False) -> SupernodeFileConfig:
    values = _apply(path, _read_yaml(path, required), _SUPERNODE_KEYS)
    if ("tls_cert" in values) != ("tls_key" in values):
        raise ValueError(f"config file {path}: tlsCert and tlsKey go together (give both, or neither)")
    return SupernodeFileConfig(**values)


DEFAULT_DFDAEMON_CONFIG = "/etc/dragonfly/dfdaemon.yml"
DEFAULT_DFDAEMON_PORT = 65001
#: What a blob URL looks like: these go peer-to-peer unless a rule says otherwise.
BLOB_PATTERN = r"/v2/.+/blobs/sha256:[0-9a-f]{64}$"
PROXY_ACTIONS = ("p2p", "direct", "use_https")
#: Where a CONNECT may lead unless ``connectPorts`` says otherwise: HTTPS, so
#: the proxy is no way to reach SSH, SMTP or a database port behind it.
DEFAULT_CONNECT_PORTS = (443,)

_DNS_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
#: A host name as certificates and rules carry it: lower case A-labels, no trailing dot.
DNS_NAME = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")


def normalize_host(host: str) -> str:
    """``host`` as certificates, rules and caches compare it: lower case, A-labels, no brackets or trailing dot.

    IP literals come back in their short form.  ValueError for anything that
    is neither an IP address nor a DNS name.
    """
    name = host.strip().lower().rstrip(".")
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"not a valid host name: {host!r}") from None
    if len(name) > 253 or not DNS_NAME.fullmatch(name):
        raise ValueError(f"not a valid host name: {host!r}")
    return name


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@attrs.frozen
class HostPattern:
    """A host as a rule names it: ``registry.example.internal``, ``*.example.internal`` or an IP literal.

    It matches exactly (after `normalize_host`), never as a part of a longer
    name: ``registry.example.internal`` does not match
    ``registry.example.internal.evil.net``.  ``*.example.internal`` matches
    every name under ``example.internal``, at any depth, but not
    ``example.internal`` itself.  The same text is what ``dfdaemon gen-ca``
    writes into the CA's name constraints.
    """

    text: str  # normalized; "*." + a DNS name for a wildcard

    @classmethod
    def parse(cls, value: Any) -> HostPattern:
        text = _string(value)
        wildcard = text.startswith("*.")
        name = normalize_host(text[2:] if wildcard else text)
        if wildcard and _is_ip(name):
            raise ValueError(f"{text!r}: '*.' needs a domain name after it, not an IP address")
        return cls("*." + name if wildcard else name)

    def matches(self, host: str) -> bool:
        try:
            name = normalize_host(host)
        except ValueError:
            return False
        if self.text.startswith("*."):
            return name.endswith(self.text[1:])
        return name == self.text


#: A regex that spells one host: letters, digits, ``_``, ``-`` and escaped dots or dashes.
_LITERAL_REGEX_HOST = re.compile(r"(?:\\[.-]|[A-Za-z0-9_-])+")


def literal_host(pattern: str) -> str | None:
    r"""The one host a hijack regex stands for when it is a plain name, else None.

    ``registry\.example\.internal``, ``^registry\.example\.internal$`` and
    ``registry\.example\.internal:5000`` all spell ``registry.example.internal``;
    ``.*\.example\.internal`` or an unescaped dot is a pattern, which no name
    constraint can express.
    """
    body = pattern[1:] if pattern.startswith("^") else pattern
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    host, _, port = body.partition(":")
    if (port and not port.isdigit()) or not _LITERAL_REGEX_HOST.fullmatch(host):
        return None
    try:
        return normalize_host(re.sub(r"\\(.)", r"\1", host))
    except ValueError:
        return None


@attrs.frozen
class ProxyRule:
    r"""Decides what happens to a proxied request whose URL it matches.

    ``regex`` is *searched* in the full URL (``re.search``): the default
    `BLOB_PATTERN` relies on that, and a rule about a host must anchor itself
    (``^https?://downloads\.example\.internal[:/]``).  ``host`` (a
    `HostPattern`) must equal the URL's host.  A rule with both needs both.
    """

    regex: re.Pattern[str] | None
    action: str  # p2p | direct | use_https
    host: HostPattern | None = None

    def matches(self, url: str) -> bool:
        if self.host is not None:
            try:
                hostname = urlsplit(url).hostname
            except ValueError:
                return False
            if hostname is None or not self.host.matches(hostname):
                return False
        return self.regex is None or self.regex.search(url) is not None


@attrs.frozen
class HijackRule:
    r"""A CONNECT to a host this rule names is decrypted with a certificate from our CA.

    The rule names hosts by ``host`` (a `HostPattern`) or by ``regex``, which
    must match the whole host or the whole ``host:port`` (``re.fullmatch``:
    ``registry\.example\.internal`` does not match
    ``registry.example.internal.evil.net``).
    """

    regex: re.Pattern[str] | None = None
    insecure: bool = False  # do not verify the real host's certificate
    host: HostPattern | None = None

    def matches(self, host: str, port: int) -> bool:
        if self.host is not None:
            return self.host.matches(host)
        assert self.regex is not None
        return self.regex.fullmatch(host) is not None or self.regex.fullmatch(f"{host}:{port}") is not None

    @property
    def certificate_name(self) -> str | None:
        """What the CA's name constraints must permit for this rule; None for a regex that is a real pattern."""
        if self.host is not None:
            return self.host.text
        assert self.regex is not None
        return literal_host(self.regex.pattern)


@attrs.frozen
class DfdaemonFileConfig:
    """What ``dfdaemon.yml`` may set; flags override the scalar fields."""

    port: int = DEFAULT_DFDAEMON_PORT
    listen: str = "127.0.0.1"
    registry: str | None = None
    nodes: tuple[tuple[str, int], ...] = ()
    home: str = attrs.field(factory=default_home)
    localrepo: str | None = None  # default <home>/dfdaemon/data
    ratelimit: int = 20 << 20
    peer_port: int = 0
    ca_bundle: str | None = None
    insecure: bool = False
    proxies: tuple[ProxyRule, ...] = (ProxyRule(re.compile(BLOB_PATTERN), "p2p"),)
    hijack_cert: str | None = None
    hijack_key: str | None = None
    hijack_hosts: tuple[HijackRule, ...] = ()
    timeouts: NodeTimeouts = NodeTimeouts()  # of the embedded peer engine
    connect_ports: tuple[int, ...] = DEFAULT_CONNECT_PORTS
    # b"user:password" each; kept out of repr so a logged config shows no password.
    proxy_auth: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    tunnel_idle_timeout: float = TUNNEL_IDLE_TIMEOUT  # a blind CONNECT tunnel silent this long is closed
    write_idle_timeout: float = WRITE_IDLE_TIMEOUT  # of the embedded uploader
    max_uploads_per_client: int = MAX_UPLOADS_PER_CLIENT
    cluster_token: str | None = attrs.field(default=None, repr=False)  # of the embedded peer engine
    cluster_ca: str | None = None  # likewise: https to the supernode, verified against this CA


def _regex(value: Any) -> re.Pattern[str]:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a regular expression, got {value!r}")
    try:
        return re.compile(value)
    except re.error as e:
        raise ValueError(f"invalid regular expression {value!r}: {e}") from None


def _rules(value: Any) -> tuple[ProxyRule, ...]:
    """``[{regex: ..., host: ..., action: p2p|direct|use_https}, ...]``, in order; regex or host or both."""
    if not isinstance(value, list):
        raise ValueError("expected a list of {regex, host, action}")
    rules = []
    for item in value:
        if not isinstance(item, dict) or set(item) - {"regex", "host", "action"} or not {"regex", "host"} & set(item):
            raise ValueError(f"each rule is {{regex: ..., host: ..., action: ...}} with a regex or a host, got {item!r}")
        action = item.get("action", "p2p")
        if action not in PROXY_ACTIONS:
            raise ValueError(f"action must be one of {', '.join(PROXY_ACTIONS)}, got {action!r}")
        regex = _regex(item["regex"]) if "regex" in item else None
        host = HostPattern.parse(item["host"]) if "host" in item else None
        rules.append(ProxyRule(regex, action, host))
    return tuple(rules)


def _hijack(value: Any) -> dict[str, Any]:
    """``{cert: FILE, key: FILE, hosts: [{host: ... | regex: ..., insecure: false}]}``."""
    if not isinstance(value, dict) or set(value) - {"cert", "key", "hosts"}:
        raise ValueError("expected {cert, key, hosts}")
    if not value.get("cert") or not value.get("key"):
        raise ValueError("needs both cert and key (make them with 'dfdaemon gen-ca')")
    hosts = value.get("hosts") or []
    if not isinstance(hosts, list):
        raise ValueError("hosts must be a list of {host or regex, insecure}")
    rules = []
    for item in hosts:
        if not isinstance(item, dict) or set(item) - {"regex", "host", "insecure"} or len({"regex", "host"} & set(item)) != 1:
            raise ValueError(f"each host is {{host: ... or regex: ..., insecure: false}}, got {item!r}")
        insecure = _bool(item.get("insecure", False))
        if "host" in item:
            rules.append(HijackRule(insecure=insecure, host=HostPattern.parse(item["host"])))
        else:
            rules.append(HijackRule(_regex(item["regex"]), insecure))
    return {"hijack_cert": _string(value.get("cert")), "hijack_key": _string(value.get("key")),
            "hijack_hosts": tuple(rules)}


def _connect_ports(value: Any) -> tuple[int, ...]:
    """``[443, 8443]``: the ports a CONNECT may reach; ``[]`` refuses every CONNECT."""
    if not isinstance(value, list):
        raise ValueError(f"expected a list of ports, e.g. [443], got {value!r}")
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 0 < item < 65536:
            raise ValueError(f"invalid port {item!r}: expected 1-65535")
    return tuple(dict.fromkeys(value))


def _credentials(value: Any) -> tuple[bytes, ...]:
    """``user:password`` or a list of them: what ``Proxy-Authorization: Basic`` must carry.

    The messages never repeat a value: it is a password.
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise ValueError("expected 'user:password' or a list of them")
    credentials = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected 'user:password' strings, got a {type(item).__name__}")
        user, sep, password = item.partition(":")
        if not sep or not user or not password:
            raise ValueError("each credential is 'user:password', with neither part empty")
        if any(ord(c) < 0x20 or c == "\x7f" for c in item):
            raise ValueError("a credential must not contain control characters")
        credentials.append(item.encode("utf-8"))
    return tuple(credentials)


def check_registry(value: Any) -> str:
    """An ``http://`` or ``https://`` base URL, without a trailing slash."""
    return check_url(_string(value)).rstrip("/")


_DFDAEMON_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "port": ("port", _positive_port),
    "listen": ("listen", check_ip),
    "registry": ("registry", check_registry),
    "nodes": ("nodes", parse_nodes),
    "home": ("home", _string),
    "localrepo": ("localrepo", _string),
    "ratelimit": ("ratelimit", parse_size),
    "peerPort": ("peer_port", _positive_port),
    "caBundle": ("ca_bundle", _string),
    "insecure": ("insecure", _bool),
    "proxies": ("proxies", _rules),
    "hijackHttps": ("hijack", _hijack),
    "connectPorts": ("connect_ports", _connect_ports),
    "proxyAuth": ("proxy_auth", _credentials),
    "clusterToken": ("cluster_token", check_token),
    "clusterCa": ("cluster_ca", _string),
    **_TIMEOUT_KEYS,
    "tunnelIdleTimeout": ("tunnel_idle_timeout", _positive_duration),
    "writeIdleTimeout": ("write_idle_timeout", _positive_duration),
    "maxUploadsPerClient": ("max_uploads_per_client", parse_count),
}


def load_dfdaemon_config(path: str = DEFAULT_DFDAEMON_CONFIG, required: bool = False) -> DfdaemonFileConfig:
    values = _apply(path, _read_yaml(path, required), _DFDAEMON_KEYS)
    values.update(values.pop("hijack", {}))
    return DfdaemonFileConfig(**_gather_timeouts(values))
