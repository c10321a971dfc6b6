"""Who may speak for a peer: secrets, advertised addresses, registration rates.

Without these any client of the register API could send ``service/down``
for a cid it learned from a pull answer (its victims fall back to the
origin), register "holders" at any internal ``host:port`` for honest peers
to connect to, or flood registrations.  So:

- every registration gets a fresh secret for its cid; pulls, reports and
  ``service/down`` about that cid must carry it (header
  ``X-Dfly-Peer-Secret``), compared in constant time;
- the address a peer advertises must be the one its registration came
  from, unless that source is in ``trustedPeerNetworks`` (NAT, pod
  networks: an operator's statement that those clients tell the truth);
  loopback clients may advertise any loopback address (one host's lab);
  with ``peerNetworks`` set, an advertised address must lie inside it;
- registrations are limited per client address (a token bucket each,
  ``registrationRate`` a second, bursts of ten seconds' worth);
- each refusal is logged once per client address and reason a minute,
  not once per request (`dfly.refusals.RefusalLog`, shared with every port).
"""

from __future__ import annotations

import hmac
import ipaddress
from collections import OrderedDict
from typing import Any, Sequence

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dfly.refusals import MAX_CLIENTS

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

log = Logger(namespace="dfly.supernode")



def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _inside(ip: Any, networks: Sequence[Network]) -> bool:
    return any(ip.version == n.version and ip in n for n in networks)


@attrs.frozen
class PeerNetworks:
    """``peerNetworks`` and ``trustedPeerNetworks`` of ``supernode.yml``."""

    allowed: tuple[Network, ...] = ()  # empty: any address (that passes the source check)
    trusted: tuple[Network, ...] = ()

    def refusal(self, advertised: str, client: str) -> str | None:
        """Why a registration from ``client`` may not advertise ``advertised``; None: it may."""
        try:
            ip, source = _ip(advertised), _ip(client)
        except ValueError:
            return f"cannot check the address {advertised!r} against the client {client!r}"
        if ip.is_unspecified or ip.is_multicast:
            return f"the advertised address {advertised} is not a peer's"
        if ip != source and not _inside(source, self.trusted) and not (ip.is_loopback and source.is_loopback):
            return (f"the advertised address {advertised} is not this client's ({client}); "
                    "clients behind NAT need trustedPeerNetworks")
        if self.allowed and not _inside(ip, self.allowed):
            return f"the advertised address {advertised} is outside peerNetworks"
        return None


def secret_matches(given: bytes | str | None, expected: str) -> bool:
    """Constant-time comparison; a peer without a secret (never issued) matches nothing."""
    if not given or not expected:
        return False
    if isinstance(given, str):
        given = given.encode("latin-1", "replace")
    return hmac.compare_digest(given, expected.encode("ascii"))


@attrs.define(eq=False)
class RegistrationLimit:
    """A token bucket per client address: ``rate`` registrations a second, ``10 x rate`` at once."""

    clock: IReactorTime
    rate: float = 20.0
    _buckets: OrderedDict[str, tuple[float, float]] = attrs.Factory(OrderedDict)  # ip -> (tokens, at)

    def take(self, client: str) -> bool:
        """One registration from ``client``: allowed now?  (LRU-bounded: a spray of addresses forgets the oldest.)"""
        if self.rate <= 0:
            return True
        burst = 10 * self.rate
        now = self.clock.seconds()
        tokens, at = self._buckets.pop(client, (burst, now))
        tokens = min(burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        self._buckets[client] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > MAX_CLIENTS:
            self._buckets.popitem(last=False)
        return allowed

