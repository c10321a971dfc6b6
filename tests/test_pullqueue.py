"""`Deadlines`, the one heap and timer that expire every held pull of a supernode (a `Clock`, no HTTP).

A pull held again (``REEVALUATE`` found nothing) keeps one entry, not one
per re-hold; newer pulls of a cid leave stale entries that stay bounded;
and each pull still gives up exactly at its own deadline.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dfly.supernode.pullqueue import REEVALUATE, TIMED_OUT, WAIT_NOW, Deadlines, PullQueue, Woken
from dfly.supernode.scheduler import TaskSchedule

CDN = "cdnnode:"


class DeadlinesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.deadlines = Deadlines(self.clock)
        self.schedule = TaskSchedule(CDN)  # no piece ready: nothing to assign, every wake is REEVALUATE
        self.schedule.add_peer("a", "192.0.2.1", 15001)
        self.queue = PullQueue(self.schedule)

    def hold(self, when: float) -> Deferred[Woken]:
        """Hold a's pull until ``when``, as `TaskManager` does."""
        d = self.queue.hold("a")
        self.deadlines.add(when, self.queue, "a", d)
        return d

    def test_pull_held_again_keeps_one_heap_entry(self) -> None:
        """A thousand slot_freed wakeups of one held pull, each held again, leave one entry and one timer."""
        d = self.hold(30.0)
        for _ in range(1000):
            self.queue.slot_freed("a")
            self.assertIs(self.successResultOf(d), REEVALUATE)
            d = self.hold(30.0)  # the same pull: the same deadline
        self.assertEqual((len(self.deadlines), len(self.clock.getDelayedCalls())), (1, 1))

    def test_pull_held_again_expires_at_its_deadline(self) -> None:
        """The last Deferred of a re-held pull is the one its deadline lets go, then the heap is empty."""
        d = self.hold(30.0)
        for _ in range(3):
            self.queue.slot_freed("a")
            d = self.hold(30.0)
        self.clock.advance(29.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.assertEqual((self.successResultOf(d), len(self.deadlines), self.clock.getDelayedCalls()),
                         (TIMED_OUT, 0, []))

    def test_newer_pulls_leave_a_bounded_heap(self) -> None:
        """A thousand newer pulls of one cid, each with a later deadline, keep the heap within twice the live pulls."""
        sizes = []
        for n in range(1000):
            self.hold(30.0 + n)  # each hold answers the one before WAIT_NOW
            sizes.append(len(self.deadlines))
        self.assertLessEqual(max(sizes), 3)

    def test_stale_entry_does_not_expire_the_newer_pull(self) -> None:
        """The older pull's deadline passing leaves the newer pull held until its own."""
        older = self.hold(10.0)
        newer = self.hold(20.0)
        self.assertIs(self.successResultOf(older), WAIT_NOW)
        self.clock.advance(10)
        self.assertNoResult(newer)
        self.clock.advance(10)
        self.assertIs(self.successResultOf(newer), TIMED_OUT)

    def test_stop_leaves_no_timer(self) -> None:
        """stop cancels the timer and forgets every entry; a later hold arms a new one."""
        self.hold(30.0)
        self.deadlines.stop()
        self.assertEqual((len(self.deadlines), self.clock.getDelayedCalls()), (0, []))
        d = self.hold(30.0)
        self.clock.advance(30)
        self.assertIs(self.successResultOf(d), TIMED_OUT)
