"""Refusals logged once a minute per client and reason, whatever port refuses.

A client that is refused (a peer secret missing, a registration over its
rate, a request without the cluster token) may send thousands of requests
a second; a log line for each would fill the disk and hide everything
else.  `RefusalLog` writes the first, then at most one a minute for the same
client and reason.  Shared by the supernode (`dfly.supernode.peerauth`) and
by every port behind `dfly.webbounds.BoundedSite` (`dfly.clustertoken`).
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

#: Clients (with reasons) remembered; a spray of addresses forgets the oldest.
MAX_CLIENTS = 10_000
#: A refusal is logged at most once per client and reason in this many seconds.
LOG_EVERY = 60.0


@attrs.define(eq=False)
class RefusalLog:
    """Logs a refusal once per (client, reason) and `LOG_EVERY` seconds: a flood is one line a minute."""

    clock: IReactorTime
    log: Logger = attrs.field(factory=lambda: Logger(namespace="dfly.refusals"))
    _last: OrderedDict[tuple[str, str], float] = attrs.Factory(OrderedDict)

    def refused(self, client: str, what: str, why: str) -> None:
        key = (client, what)
        now = self.clock.seconds()
        last = self._last.pop(key, None)
        self._last[key] = now if last is None or now - last >= LOG_EVERY else last
        while len(self._last) > MAX_CLIENTS:
            self._last.popitem(last=False)
        if last is None or now - last >= LOG_EVERY:
            self.log.warn("refused {what} from {client}: {why} (logged once a minute per client)",
                          what=what, client=client, why=why)
