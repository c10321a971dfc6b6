"""Which sources the supernode may fetch: its defence against SSRF.

Anyone who reaches the register API names a URL and headers, and the
supernode fetches it and serves the body back.  Without a policy that makes
it an open fetcher into its own network: cloud metadata services
(``169.254.169.254``), admin APIs on its loopback, internal hosts.  The
policy (``sources:`` in ``supernode.yml``) decides per host name and per
address, and is asked by the connection itself (`dfly.connectguard`) for
every address the host resolves to, on every hop: redirects and a DNS
answer that changes between two lookups (rebinding) are checked like the
first request, because what is checked is the address connected to.

The rules, first match wins:

1. ``deny`` (names, domains, addresses, CIDRs) refuses;
2. link-local addresses (``169.254.0.0/16``, ``fe80::/10``) and the cloud
   metadata addresses are refused unless an ``allow`` entry that is an
   address or CIDR covers them (a name does not: an allowed name rebound to
   the metadata address stays refused);
3. so is loopback (and ``0.0.0.0/8``, ``::``), but only when the register
   API listens beyond loopback: a supernode on 127.0.0.1 has only local
   clients, who reach loopback anyway;
4. with a non-empty ``allow``, the host's name or its address must match an
   entry;
5. anything else is allowed.

A name entry matches that host exactly; one starting with ``.`` or ``*.``
matches every name under that domain (not the domain itself).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Iterable, Mapping

import attrs

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Refused unless allowed by address.  169.254.169.254: AWS, GCP, Azure,
#: OpenStack, DigitalOcean, Oracle; 169.254.170.2: ECS task credentials;
#: fd00:ec2::254: AWS over IPv6; 100.100.100.200: Alibaba Cloud.
METADATA = tuple(ipaddress.ip_network(n) for n in ("169.254.169.254/32", "169.254.170.2/32", "fd00:ec2::254/128",
                                                   "100.100.100.200/32"))
LINK_LOCAL = tuple(ipaddress.ip_network(n) for n in ("169.254.0.0/16", "fe80::/10"))
#: 0.0.0.0 and :: connect to the local host on Linux.
LOOPBACK = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "0.0.0.0/8", "::/128"))

_NAME = re.compile(r"\A(\*?\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\Z")


def _address(text: str) -> Address:
    """An address, IPv4-mapped IPv6 (``::ffff:169.254.169.254``) taken as the IPv4 it is."""
    address = ipaddress.ip_address(text.split("%", 1)[0])  # a zone index (fe80::1%eth0) changes nothing
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@attrs.frozen
class Entries:
    """One list of ``sources:``: exact names, domain suffixes, networks."""

    names: frozenset[str] = frozenset()
    domains: tuple[str, ...] = ()  # ".example.com": every name under example.com
    networks: tuple[Network, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.names or self.domains or self.networks)

    def has_name(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return host in self.names or any(host.endswith(d) for d in self.domains)

    def has_address(self, address: Address) -> bool:
        return any(address in n for n in self.networks if n.version == address.version)


def parse_entries(value: Any, key: str) -> Entries:
    """A YAML list of names, ``.domain``/``*.domain`` suffixes, addresses and CIDRs (ValueError: a bad one)."""
    if value is None:
        return Entries()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"sources.{key} must be a list of host names, domains, addresses or CIDRs")
    names, domains, networks = set(), [], []
    for item in value:
        text = item.strip().lower()
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if not _NAME.match(text.rstrip(".")):
            raise ValueError(f"sources.{key}: {item!r} is not a host name, domain, address or CIDR")
        text = text.rstrip(".")
        if text.startswith("*."):
            domains.append(text[1:])
        elif text.startswith("."):
            domains.append(text)
        else:
            names.add(text)
    return Entries(frozenset(names), tuple(domains), tuple(networks))


@attrs.frozen
class SourcePolicy:
    """``sources:`` of ``supernode.yml``, and whether loopback is refused by default."""

    allow: Entries = Entries()
    deny: Entries = Entries()
    refuse_loopback: bool = True

    def refusal(self, host: str, address: str) -> str | None:
        """Why connecting to ``address`` for the URL host ``host`` is refused; None: it is allowed."""
        try:
            ip = _address(address)
        except ValueError:
            return f"{address} is not an address"
        where = host if host == address else f"{host} ({address})"
        if self.deny.has_name(host) or self.deny.has_address(ip):
            return f"source {where} is denied by the supernode's sources.deny"
        by_address = self.allow.has_address(ip)
        if not by_address:
            if any(ip in n for n in METADATA if n.version == ip.version):
                return f"source {where} is a cloud metadata address, refused unless sources.allow lists it"
            if any(ip in n for n in LINK_LOCAL if n.version == ip.version):
                return f"source {where} is link-local, refused unless sources.allow lists it"
            if self.refuse_loopback and any(ip in n for n in LOOPBACK if n.version == ip.version):
                return (f"source {where} is a loopback address, refused while the supernode's API listens beyond "
                        "loopback unless sources.allow lists it")
            if self.allow and not self.allow.has_name(host):
                return f"source {where} is not in the supernode's sources.allow"
        return None


def listens_beyond_loopback(listen: str) -> bool:
    """Does an API bound to ``listen`` take connections from other hosts?"""
    if listen.lower() == "localhost":
        return False
    try:
        return not ipaddress.ip_address(listen).is_loopback
    except ValueError:
        return True  # a name: assume the worst


def parse_sources(value: Mapping[str, Any], listen: str) -> SourcePolicy:
    """The policy ``sources:`` describes for an API on ``listen`` (ValueError: a bad key or entry)."""
    unknown = set(value) - {"allow", "deny"}
    if unknown:
        raise ValueError(f"sources: unknown key {sorted(unknown)[0]!r} (allow, deny)")
    return SourcePolicy(parse_entries(value.get("allow"), "allow"), parse_entries(value.get("deny"), "deny"),
                        refuse_loopback=listens_beyond_loopback(listen))


def describe(policy: SourcePolicy) -> Iterable[str]:
    """Lines for the start-up log: what the policy lets through."""
    lists = {"allow": policy.allow, "deny": policy.deny}
    for key, entries in lists.items():
        if entries:
            shown = sorted(entries.names) + [f"*{d}" for d in entries.domains] + [str(n) for n in entries.networks]
            yield f"sources.{key}: {', '.join(shown)}"
    yield ("link-local and metadata addresses refused" +
           (", loopback refused (the API listens beyond loopback)" if policy.refuse_loopback else ""))
