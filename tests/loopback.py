"""Helpers shared by the tests that use real sockets on 127.0.0.1."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.protocols.policies import WrappingFactory


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
