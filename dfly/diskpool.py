"""A sized thread pool for blocking disk work, owned by a service.

Hashing and writing piece bodies, ``.meta`` fsyncs and cache deletions
block; on the reactor thread they would stall every connection, and on the
reactor's default pool they would queue behind (and in front of) DNS
lookups.  `DiskPool` is its own pool, started and stopped with its service,
and its queue length is visible (``queued``) for health checks and metrics.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

T = TypeVar("T")

#: Threads for disk work: two cores, and most of the work is I/O wait.
DEFAULT_THREADS = 4


class DiskPool(Service):
    def __init__(self, reactor: Any, threads: int = DEFAULT_THREADS, name: str = "dfly-disk") -> None:
        self._reactor = reactor
        self._pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)

    def startService(self) -> None:
        super().startService()
        self._pool.start()

    def stopService(self) -> None:
        super().stopService()
        # Waits for the work already handed over (a .meta being replaced must
        # finish, or a half-written temporary file is all that is left).
        self._pool.stop()

    def run(self, f: Callable[[], T]) -> Deferred[T]:
        """Run ``f`` on a disk thread; fires on the reactor thread with its result."""
        return deferToThreadPool(self._reactor, self._pool, f)

    @property
    def queued(self) -> int:
        """Calls waiting for a thread right now."""
        return self._pool._queue.qsize()
