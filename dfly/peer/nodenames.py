"""Node names that stand for several supernodes, looked up again as they change.

A Kubernetes headless Service (or any DNS name with several A records) names
a whole set of supernodes: ``--node supernode.dfly:8002`` stands for every
address the name resolves to, each one a node of its own for rendezvous
placement, the health memory and the logs.  Peers that resolve the same name
see the same addresses, so they still agree on each task's supernode.  The
answer is kept for `RESOLVE_EVERY` seconds, then looked up again on the next
use, so supernodes added or removed behind the name are seen within that
time, without a restart.  A failed lookup keeps the last answer (a DNS blip
must not empty the node list); a name never resolved stays as given, and
the connection to it reports why it fails.
"""

from __future__ import annotations

from typing import Any, Sequence

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from dfly.logs import CLIENT_NAMESPACE
from dfly.resolve import is_address, lookup

log = Logger(namespace=CLIENT_NAMESPACE)

Node = tuple[str, int]

#: How long one lookup of a name is used (seconds).
RESOLVE_EVERY = 30.0


@attrs.define(eq=False)
class NodeNames:
    """Expands node names to their addresses; ``reactor`` gives time and ``nameResolver``."""

    reactor: Any
    every: float = RESOLVE_EVERY
    timeout: float = 3.0  # a lookup that takes longer counts as failed
    _known: dict[str, tuple[float, tuple[str, ...]]] = attrs.Factory(dict)  # name -> (looked up at, addresses)
    _pending: dict[str, Deferred[tuple[str, ...]]] = attrs.Factory(dict)

    async def expand(self, nodes: Sequence[Node]) -> tuple[Node, ...]:
        """Every address behind ``nodes``, in their order, each once."""
        names = list(dict.fromkeys(host for host, _ in nodes if not is_address(host)))
        lookups = {name: self._addresses(name) for name in names}  # all at once; they never fail
        found = {name: await lookup for name, lookup in lookups.items()}
        out: dict[Node, None] = {}
        for host, port in nodes:
            for address in found.get(host, (host,)):
                out[(address, port)] = None
        return tuple(out)

    def _addresses(self, name: str) -> Deferred[tuple[str, ...]]:
        if getattr(self.reactor, "nameResolver", None) is None:
            return succeed((name,))  # a reactor that cannot resolve (a test's Clock): names stay names
        known = self._known.get(name)
        if known is not None and self.reactor.seconds() - known[0] < self.every:
            return succeed(known[1])
        pending = self._pending.get(name)
        if pending is None:
            pending = self._lookup(name)
            if not pending.called:  # a resolver may answer at once
                self._pending[name] = pending
        # Each caller gets its own Deferred: one caller cancelled stops no other's lookup.
        mine: Deferred[tuple[str, ...]] = Deferred()

        def share(addresses: tuple[str, ...]) -> tuple[str, ...]:
            mine.callback(addresses)
            return addresses

        pending.addCallback(share)  # `_lookup` never fails: it falls back to older answers or the name
        return mine

    def _lookup(self, name: str) -> Deferred[tuple[str, ...]]:
        # IPv4 addresses when there are any (the usual cluster), else IPv6.
        answer = lookup(self.reactor, name).addCallback(lambda found: tuple(sorted(found.v4 or found.v6)))
        answer.addTimeout(self.timeout, self.reactor)

        def done(result: Any) -> tuple[str, ...]:
            self._pending.pop(name, None)
            previous = self._known.get(name)
            addresses = result if isinstance(result, tuple) else ()
            if addresses:
                if previous is None or previous[1] != addresses:
                    log.info("supernode name {name} stands for {addresses}", name=name, addresses=", ".join(addresses))
                self._known[name] = (self.reactor.seconds(), addresses)
                return addresses
            why = "no address" if isinstance(result, tuple) else result.getErrorMessage() or type(result.value).__name__
            if previous is not None:
                log.warn("cannot look up supernode name {name} ({why}): keeping {addresses}",
                         name=name, why=why, addresses=", ".join(previous[1]))
                return previous[1]
            log.warn("cannot look up supernode name {name} ({why})", name=name, why=why)
            return (name,)

        return answer.addBoth(done)
