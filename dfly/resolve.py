"""Host name lookups through the reactor's pluggable resolver, as a Deferred.

Twisted's `IHostnameResolver` reports addresses one by one to a receiver;
the peer (node names that stand for several supernodes) and the supernode
(the source policy, which must see every address a name stands for before it
connects to one) both want the whole answer at once.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostResolution, IResolutionReceiver
from zope.interface import implementer


@implementer(IResolutionReceiver)
class _Collect:
    def __init__(self) -> None:
        self.done: Deferred[Addresses] = Deferred()
        self.found = Addresses()

    def resolutionBegan(self, resolution: IHostResolution) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        found = self.found.v4 if isinstance(address, IPv4Address) else self.found.v6
        if address.host not in found:
            found.append(address.host)

    def resolutionComplete(self) -> None:
        self.done.callback(self.found)


class Addresses:
    """One lookup's answer: its IPv4 and its IPv6 addresses, each in the resolver's order, each once."""

    def __init__(self) -> None:
        self.v4: list[str] = []
        self.v6: list[str] = []

    @property
    def all(self) -> list[str]:
        return self.v4 + self.v6


def lookup(reactor: Any, name: str, port: int = 0) -> Deferred[Addresses]:
    """Every address ``name`` resolves to (none: an empty answer, not an error).

    An address literal answers itself.  The Deferred has no timeout of its
    own: callers add theirs (``addTimeout``).
    """
    collect = _Collect()
    reactor.nameResolver.resolveHostName(collect, name, port, addressTypes=[IPv4Address, IPv6Address])
    return collect.done


def is_address(host: str) -> bool:
    """Is ``host`` an IPv4 or IPv6 literal (not a name to look up)?"""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
