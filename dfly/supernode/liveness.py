"""Which peers are gone: silence, measured without walking every peer.

A peer shows it is alive by pulling or reporting.  While it has a pull held
open it is alive by definition (a killed peer's kernel closes the socket,
which ends the pull).  Otherwise it is in exactly one of three queues, by
what its silence means, each ordered by when it was last heard:

- ``downloading``: gone after ``policy.silence``;
- ``hung_up`` (it closed a held pull, as a killed peer's kernel does): gone
  after ``policy.hung_up_grace``;
- ``finished`` (a source only; peer daemons pull a finished task as a
  heartbeat): gone after ``policy.finished_silence``.

Touching a peer moves it to the back of its queue, so a sweep pops expired
peers from the fronts and stops at the first live one: O(expired), never
O(peers).  The clock only moves forward, so each queue stays sorted.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterator, TypeVar

import attrs

from dfly.supernode.policy import SchedulerPolicy

K = TypeVar("K", bound=Hashable)

DOWNLOADING = "downloading"
HUNG_UP = "hung_up"
FINISHED = "finished"


@attrs.define(eq=False)
class PeerLiveness:
    policy: SchedulerPolicy = attrs.Factory(SchedulerPolicy)
    _queues: dict[str, "OrderedDict[Hashable, float]"] = attrs.Factory(
        lambda: {kind: OrderedDict() for kind in (DOWNLOADING, HUNG_UP, FINISHED)}
    )
    _where: dict[Hashable, str] = attrs.Factory(dict)

    def __len__(self) -> int:
        return len(self._where)

    def heard(self, key: Hashable, kind: str, now: float) -> None:
        """``key`` spoke at ``now`` and is silent from here on as ``kind``."""
        self.forget(key)
        self._queues[kind][key] = now
        self._where[key] = kind

    def forget(self, key: Hashable) -> None:
        """``key`` has a pull held open (alive) or left: not watched."""
        kind = self._where.pop(key, None)
        if kind is not None:
            del self._queues[kind][key]

    def expired(self, now: float) -> Iterator[Hashable]:
        """Pop and yield every key silent for longer than its kind allows."""
        limits = {
            DOWNLOADING: self.policy.silence,
            HUNG_UP: self.policy.hung_up_grace,
            FINISHED: self.policy.finished_silence,
        }
        for kind, queue in self._queues.items():
            while queue:
                key, seen = next(iter(queue.items()))
                if now - seen <= limits[kind]:
                    break
                del queue[key]
                del self._where[key]
                yield key
