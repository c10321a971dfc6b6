"""Refusals logged once per client and reason a minute, not once per request.

A flood of refused requests (a registration storm, a client that opens
range after range over its cap, one that never reads) must not become a
flood of log lines: `RefusalLog` writes the first refusal of each (client,
reason) and then stays quiet for `LOG_EVERY` seconds.  Shared by the
supernode (peer authentication, the CDN port) and the peer's uploader, which
may not import each other.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="dfly.refusals")

#: Client addresses remembered by the rate limit and the log limiter.
MAX_CLIENTS = 10_000
#: A refusal is logged at most once per client and reason in this many seconds.
LOG_EVERY = 60.0


@attrs.define(eq=False)
class RefusalLog:
    """Logs a refusal once per (client, reason) and `LOG_EVERY` seconds: a flood is one line a minute."""

    clock: IReactorTime
    _last: OrderedDict[tuple[str, str], float] = attrs.Factory(OrderedDict)

    def refused(self, client: str, what: str, why: str) -> None:
        key = (client, what)
        now = self.clock.seconds()
        last = self._last.pop(key, None)
        self._last[key] = now if last is None or now - last >= LOG_EVERY else last
        while len(self._last) > MAX_CLIENTS:
            self._last.popitem(last=False)
        if last is None or now - last >= LOG_EVERY:
            log.warn("refused {what} from {client}: {why} (logged once a minute per client)",
                     what=what, client=client, why=why)
