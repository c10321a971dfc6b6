"""How many piece fetches one peer engine runs towards one host at once.

Uploaders and the CDN port refuse a client address past
``maxUploadsPerClient`` (32 by default) uploads at once.  The supernode's
scheduler gives each download at most ``maxRunning`` (4) pieces at a time,
but a host runs many downloads (a dfdaemon pulling every layer of an image),
and a supernode may be configured otherwise: so the engine itself keeps to
`PER_HOST_FETCHES` per (host, port), half the default cap.  Fetches past it
wait for a slot (the supernode sees them as running) rather than being
refused by the holder and reported as its failure.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore

#: Piece fetches at once from one (host, port); comfortably under MAX_UPLOADS_PER_CLIENT.
PER_HOST_FETCHES = 16

Host = tuple[str, int]


@attrs.define(eq=False)
class HostSlot:
    """One fetch's place at a host; `release` it exactly once."""

    _slots: HostFetchSlots
    _host: Host

    def release(self) -> None:
        self._slots._release(self._host)


@attrs.define(eq=False)
class HostFetchSlots:
    """A semaphore per host, kept only while that host has fetches running or waiting."""

    per_host: int = PER_HOST_FETCHES
    _hosts: dict[Host, DeferredSemaphore] = attrs.Factory(dict)

    def acquire(self, host: Host) -> Deferred[HostSlot]:
        """Fires with a slot at ``host`` once one is free; cancelling a wait takes none."""
        semaphore = self._hosts.get(host)
        if semaphore is None:
            semaphore = self._hosts[host] = DeferredSemaphore(self.per_host)
        return semaphore.acquire().addCallback(lambda _: HostSlot(self, host))

    def _release(self, host: Host) -> None:
        semaphore = self._hosts[host]
        semaphore.release()
        if semaphore.tokens == self.per_host and not semaphore.waiting:
            del self._hosts[host]

    def busy(self) -> dict[Host, int]:
        """Slots in use per host (for tests and logs)."""
        return {host: self.per_host - semaphore.tokens for host, semaphore in self._hosts.items()}
