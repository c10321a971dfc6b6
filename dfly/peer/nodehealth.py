"""Which supernodes a peer daemon currently believes dead, shared by all its downloads.

A node that is certainly down (refused the connection, or took it and
answered nothing, not even ``/_ping``) is skipped at once; one that timed
out or answered 5xx is skipped after ``failures`` in a row.  Skipped means
that for ``skip_for`` seconds every download of the daemon (and of
dfdaemon's embedded engine) tries it last, so a dead node costs one short
timeout per daemon, not one per file or per blob.  After that it is tried
again (a probe: one more failure skips it again at once); one success
clears its record.  Skipped nodes go to the end of the order, not away:
when every node is skipped they are still tried.
"""

from __future__ import annotations

from typing import Iterable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from dfly.config import format_node
from dfly.logs import CLIENT_NAMESPACE

log = Logger(namespace=CLIENT_NAMESPACE)

Node = tuple[str, int]

#: Failures in a row that make a node skipped ...
FAILURES = 3
#: ... for this long (seconds).
SKIP_FOR = 300.0


@attrs.define(eq=False)
class NodeHealth:
    clock: IReactorTime
    failures: int = FAILURES
    skip_for: float = SKIP_FOR
    _failed: dict[Node, int] = attrs.Factory(dict)
    _skipped_until: dict[Node, float] = attrs.Factory(dict)

    def failed(self, node: Node, why: str, down: bool = False) -> None:
        """``node`` failed a call; ``down``: it is certainly not serving (skip it now)."""
        count = max(self._failed.get(node, 0) + 1, self.failures if down else 0)
        self._failed[node] = count
        if count >= self.failures and not self.skipped(node):
            self._skipped_until[node] = self.clock.seconds() + self.skip_for
            log.warn("supernode {node} failed {n} times in a row ({why}): skipped for {t:g}s",
                     node=format_node(node), n=count, why=why, t=self.skip_for)

    def succeeded(self, node: Node) -> None:
        self._failed.pop(node, None)
        self._skipped_until.pop(node, None)

    def skipped(self, node: Node) -> bool:
        until = self._skipped_until.get(node)
        if until is None:
            return False
        if self.clock.seconds() >= until:
            del self._skipped_until[node]  # time for a probe; one more failure skips it again
            self._failed[node] = self.failures - 1
            return False
        return True

    def order(self, nodes: Iterable[Node]) -> list[Node]:
        """``nodes`` in their order, the skipped ones moved to the end (still tried when nothing else is left)."""
        nodes = list(nodes)
        healthy = [node for node in nodes if not self.skipped(node)]
        return healthy + [node for node in nodes if node not in healthy]
