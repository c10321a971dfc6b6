"""Held pulls of one task, woken only when an event gives them work.

A pull that finds nothing to do is held here until it can be handed pieces.
Waking every held pull on every event (what dfly did first) costs
held pulls × events, which is peers² × pieces for a task; here an event wakes
at most a constant number of pulls:

- a peer whose running slots are all full is *parked*: only its own report
  (which frees one of its slots) can give it work, so nothing else looks at
  it; its own report wakes its held pull either way (parked or hungry), with
  pieces or to look again, since it may have every piece now;
- a peer with a free slot and nothing assignable is *hungry*, in FIFO order.
  An event that creates ``k`` opportunities (a newly cached piece, a freed
  upload slot, a new holder with spare uploads) tries the hungry pulls from
  the head, assigning on the supernode side from the event's source, and
  stops after ``k`` pieces were handed out or ``k + 2`` pulls were tried.  A pull that was tried and
  could not use the event goes to the back, so no pull is tried twice before
  every other one was tried once (none starves), and a head that can use
  nothing does not eat every event's budget.

A woken pull gets its pieces already assigned (no second round trip through
the scheduler), ``REEVALUATE`` when the task changed as a whole (fetch ended,
peer dropped) so the pull loop looks again, ``WAIT_NOW`` when a newer pull
of the same cid took its place, or ``TIMED_OUT`` when its wait passed.

Those waits are kept by one `Deadlines` for the whole supernode (a heap
and a single timer), not a DelayedCall and a timeout chain per held pull:
at 10,000 peers every peer holds one, and each gives up every 30 s.
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from typing import Any, Union

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from dfly.supernode.scheduler import TaskSchedule

Assignment = list[tuple[int, str]]


class _Signal:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: The task changed as a whole: look again (assign, finished, failed, dropped).
REEVALUATE = _Signal("REEVALUATE")
#: A newer pull of the same cid replaced this one: answer "wait" at once.
WAIT_NOW = _Signal("WAIT_NOW")
#: The pull's wait passed with nothing for it: answer "wait".
TIMED_OUT = _Signal("TIMED_OUT")

Woken = Union[Assignment, _Signal]


@attrs.define
class PullCounters:
    """What the queue did, for /metrics and the fan-out tests."""

    wakeups: int = 0  # held pulls resumed by an event (not by their timeout)
    assign_calls: int = 0  # TaskSchedule.assign calls made for held pulls


@attrs.define(eq=False)
class PullQueue:
    schedule: TaskSchedule
    counters: PullCounters = attrs.Factory(PullCounters)  # shared by every task of a supernode
    _parked: dict[str, Deferred[Woken]] = attrs.Factory(dict)
    _hungry: "OrderedDict[str, Deferred[Woken]]" = attrs.Factory(OrderedDict)

    def __len__(self) -> int:
        return len(self._parked) + len(self._hungry)

    def holding(self, cid: str) -> bool:
        return cid in self._parked or cid in self._hungry

    def hold(self, cid: str) -> Deferred[Woken]:
        """Hold ``cid``'s pull (its assign just found nothing); cancel to let go."""
        self.drop(cid, WAIT_NOW)
        d: Deferred[Woken] = Deferred(lambda d: self._forget(cid, d))
        if self.schedule.need(cid) <= 0:
            self._parked[cid] = d
        else:
            self._hungry[cid] = d
        return d

    def slot_freed(self, cid: str) -> None:
        """One of ``cid``'s own running pieces ended: its held pull may take more, or be done."""
        d = self._parked.pop(cid, None) or self._hungry.pop(cid, None)
        if d is None:
            return
        chosen = self._assign(cid) if cid in self.schedule.peers else []
        # Nothing to hand out: the pull loop looks again (it may have every
        # piece now) and holds itself again if not.
        self._wake(d, chosen or REEVALUATE)

    def settle(self, cid: str) -> None:
        """``cid`` was just handed pieces outside its held pull (in its report's answer): re-file that pull by its need.

        Parked when its slots are full again, hungry when it still has a
        free one (at the back if it was parked; a hungry one keeps its place).
        """
        if self.schedule.need(cid) <= 0:
            d = self._hungry.pop(cid, None)
            if d is not None:
                self._parked[cid] = d
        else:
            d = self._parked.pop(cid, None)
            if d is not None:
                self._hungry[cid] = d

    def offer(self, k: int, source: str) -> None:
        """``k`` new chances to fetch from ``source`` (a peer cid or the CDN's): hand them to the first hungry pulls.

        From a peer, each try is `TaskSchedule.assign_from` (a set
        difference over that peer's pieces), and a pull it wakes is topped up
        with a full assign; from the CDN, a full assign, which the CDN's free
        slot makes succeed early in its walk.  Only pieces from ``source``
        count against ``k``.
        """
        if k <= 0:
            return
        budget = k + 2
        from_cdn = source == self.schedule.cdn_cid
        while self._hungry and budget > 0 and k > 0:
            budget -= 1
            cid, d = next(iter(self._hungry.items()))
            if cid not in self.schedule.peers:
                del self._hungry[cid]
                self._wake(d, REEVALUATE)
                continue
            self.counters.assign_calls += 1
            if from_cdn:
                chosen = self.schedule.assign(cid)
            else:
                one = self.schedule.assign_from(cid, source)
                # Topped up with what else it may run now, so one answer
                # carries it all (a pull less; and a free CDN slot is used).
                chosen = [one, *self.schedule.assign(cid)] if one else []
            if chosen:
                del self._hungry[cid]
                k -= sum(1 for _, src in chosen if src == source)
                self._wake(d, chosen)
            else:
                self._hungry.move_to_end(cid)

    def expire(self, cid: str, d: Deferred[Woken]) -> None:
        """``d``'s wait passed: if it is still ``cid``'s held pull, let it go with ``TIMED_OUT``."""
        for table in (self._parked, self._hungry):
            if table.get(cid) is d:
                del table[cid]
                d.callback(TIMED_OUT)
                return

    def drop(self, cid: str, why: _Signal = REEVALUATE) -> None:
        """Let go of ``cid``'s held pull, if any (the peer left, or pulled again)."""
        d = self._parked.pop(cid, None) or self._hungry.pop(cid, None)
        if d is not None:
            d.callback(why)

    def wake_all(self, why: _Signal = REEVALUATE) -> None:
        """The task changed as a whole (its fetch ended): every held pull looks again.

        ``TIMED_OUT`` instead lets every one go with "wait" (the supernode
        stops): ``REEVALUATE`` would have most hold themselves again.
        """
        held = [*self._parked.values(), *self._hungry.values()]
        self._parked.clear()
        self._hungry.clear()
        for d in held:
            d.callback(why)

    def _assign(self, cid: str) -> Assignment:
        self.counters.assign_calls += 1
        return self.schedule.assign(cid)

    def _wake(self, d: Deferred[Woken], result: Woken) -> None:
        self.counters.wakeups += 1
        d.callback(result)

    def _forget(self, cid: str, d: Deferred[Woken]) -> None:
        for table in (self._parked, self._hungry):
            if table.get(cid) is d:
                del table[cid]


class Deadlines:
    """When held pulls give up: a heap of (deadline, pull) and one timer for its earliest.

    A pull woken before its deadline stays in the heap until then and is
    skipped (its Deferred has fired): O(log n) per hold, nothing per wake.

    One entry per (queue, cid).  A pull woken with ``REEVALUATE`` that still
    finds nothing holds itself again with a new Deferred and the same
    deadline, and a report with nothing to assign does that on every slot
    freed: the entry then just points at the new Deferred (O(1)), instead of
    a new entry per re-hold (1,000 wakeups of one pull left 1,001 entries).
    A newer pull of the cid (another deadline) leaves the old entry stale
    (``None`` in place of its Deferred): dropped when popped, and the heap is
    rebuilt once stale entries outnumber the live ones, so it holds at most
    about twice as many entries as (queue, cid) pairs with a deadline to come.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        #: [deadline, seq, queue, cid, Deferred or None (stale)]: lists, so an entry updates in place.
        self._heap: list[list[Any]] = []
        self._entries: dict[tuple[PullQueue, str], list[Any]] = {}  # the live entry of each (queue, cid)
        self._stale = 0
        self._seq = itertools.count()
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, when: float, queue: PullQueue, cid: str, d: Deferred[Woken]) -> None:
        """Expire ``cid``'s held pull ``d`` of ``queue`` at ``when`` unless it was woken first."""
        key = (queue, cid)
        entry = self._entries.get(key)
        if entry is not None:
            if entry[0] == when:
                # Held again with its deadline: the timer already covers it.
                entry[4] = d
                return
            entry[4] = None
            self._stale += 1
        entry = [when, next(self._seq), queue, cid, d]
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)
        if self._stale > len(self._entries):
            self._compact()
        delay = max(when - self.clock.seconds(), 0.0)
        if self._call is None:
            self._call = self.clock.callLater(delay, self._fire)
        elif when < self._call.getTime():
            self._call.reset(delay)

    def _compact(self) -> None:
        # In place: `_fire` may be iterating this very list (an expiry's
        # callbacks can hold a pull again).
        self._heap[:] = [entry for entry in self._heap if entry[4] is not None]
        heapq.heapify(self._heap)
        self._stale = 0

    def _fire(self) -> None:
        self._call = None
        now = self.clock.seconds()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, queue, cid, d = heapq.heappop(heap)
            if d is None:
                self._stale -= 1
                continue
            del self._entries[(queue, cid)]  # before expire: its callbacks may hold the cid again
            if not d.called:
                queue.expire(cid, d)
        if heap and self._call is None:
            self._call = self.clock.callLater(max(heap[0][0] - now, 0.0), self._fire)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._heap.clear()
        self._entries.clear()
        self._stale = 0
