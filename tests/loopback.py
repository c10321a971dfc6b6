"""Helpers shared by the tests that use real sockets on 127.0.0.1."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure


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
