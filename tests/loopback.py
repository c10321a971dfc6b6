"""Helpers shared by the tests that use real sockets on 127.0.0.1."""

from __future__ import annotations

import ipaddress
from typing import Any, Mapping, Sequence

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, implementer, providedBy


class ClosingFactory(WrappingFactory):
    """Tracks server connections so cleanup can wait until all are closed.

    Clients with connection pools keep connections open; trial calls a
    reactor with open connections dirty.
    """

    def __init__(self, wrapped: Any) -> None:
        super().__init__(wrapped)
        self._all_gone: list[Deferred[None]] = []

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if not self.protocols:
            waiters, self._all_gone = self._all_gone, []
            for d in waiters:
                d.callback(None)

    def close_all(self) -> Deferred[None]:
        if not self.protocols:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._all_gone.append(d)
        for p in list(self.protocols):
            p.transport.loseConnection()
        return d


class RawClient(Protocol):
    """HTTP by hand: records every byte, lets the test wait for some, and for the close."""

    transport: Any

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[None] = Deferred()
        self._wanted: tuple[bytes, Deferred[bytes]] | None = None

    def until(self, marker: bytes) -> Deferred[bytes]:
        """Fires with everything received so far once *marker* has arrived."""
        d: Deferred[bytes] = Deferred()
        self._wanted = (marker, d)
        self._check()
        return d

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self._check()

    def _check(self) -> None:
        if self._wanted is not None and self._wanted[0] in self.received:
            d, self._wanted = self._wanted[1], None
            d.callback(self.received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._wanted is not None:
            d, self._wanted = self._wanted[1], None
            d.errback(AssertionError(f"closed before {d!r}; got {self.received!r}"))
        self.closed.callback(None)


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
class LoopbackNames:
    """A name resolver that never asks DNS, so no lookup or connection leaves loopback.

    The names in *names* resolve to their (loopback) address, loopback IP
    literals to themselves, and everything else, other IP literals included,
    to no address at all (the connection fails as for an unknown host).
    ``asked`` records every name looked up.
    """

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self.names = {name.lower(): address for name, address in (names or {}).items()}
        self.asked: list[str] = []

    def resolveHostName(self, resolutionReceiver: IResolutionReceiver, hostName: str, portNumber: int = 0,
                        addressTypes: Sequence[Any] | None = None, transportSemantics: str = "TCP") -> IHostResolution:
        name = hostName.decode("ascii") if isinstance(hostName, bytes) else hostName
        self.asked.append(name)
        resolution = _Resolution(name)
        resolutionReceiver.resolutionBegan(resolution)
        try:
            address = ipaddress.ip_address(self.names.get(name.lower(), name))
        except ValueError:
            address = None
        if address is not None and address.is_loopback:
            kind = IPv4Address if address.version == 4 else IPv6Address
            resolutionReceiver.addressResolved(kind("TCP", str(address), portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


class ResolvingReactor:
    """The real reactor with *resolver* as its name resolver, for code under test that takes a reactor.

    Everything else (listening, connecting, timers) is the wrapped reactor's.
    """

    def __init__(self, reactor: Any, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = resolver
        directlyProvides(self, *providedBy(reactor))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)
