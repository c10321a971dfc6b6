"""The supernode's piece scheduler: examples, then properties over random runs."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dfly.supernode.scheduler import MAX_RUNNING, PeerProgress, assign

CDN = "cdnnode:10.0.0.9~task"


def peer() -> PeerProgress:
    return PeerProgress("peer-1", "192.0.2.1", 15001)


class AssignTests(SynchronousTestCase):
    def test_first_pieces_are_handed_out_in_order(self) -> None:
        """A fresh peer gets pieces 0 to MAX_RUNNING - 1."""
        self.assertEqual(assign(peer(), 10, CDN), list(range(MAX_RUNNING)))

    def test_assigned_pieces_are_running_from_the_source(self) -> None:
        """Assigned pieces are marked running, with the cid they come from."""
        p = peer()
        assign(p, 2, CDN)
        self.assertEqual(p.running, {0: CDN, 1: CDN})

    def test_nothing_ready_assigns_nothing(self) -> None:
        """With no ready piece there is nothing to hand out."""
        self.assertEqual(assign(peer(), 0, CDN), [])

    def test_pieces_stop_at_ready(self) -> None:
        """Only pieces below ``ready`` are handed out."""
        self.assertEqual(assign(peer(), 2, CDN), [0, 1])

    def test_limit_caps_running_pieces(self) -> None:
        """An explicit limit caps the pieces running at once."""
        self.assertEqual(assign(peer(), 10, CDN, limit=2), [0, 1])

    def test_full_peer_gets_nothing(self) -> None:
        """A peer already running MAX_RUNNING pieces gets no more."""
        p = peer()
        assign(p, 10, CDN)
        self.assertEqual(assign(p, 10, CDN), [])

    def test_success_frees_a_slot_for_the_next_piece(self) -> None:
        """After one success the next pull hands out the next piece."""
        p = peer()
        assign(p, 10, CDN)
        p.succeeded(0)
        self.assertEqual(assign(p, 10, CDN), [MAX_RUNNING])

    def test_newly_ready_pieces_are_handed_out_later(self) -> None:
        """Pieces that become ready after a pull are handed out by the next one."""
        p = peer()
        assign(p, 1, CDN)
        self.assertEqual(assign(p, 3, CDN), [1, 2])

    def test_failed_piece_is_offered_again_before_new_pieces(self) -> None:
        """A failed piece comes before the next unassigned piece."""
        p = peer()
        assign(p, 10, CDN)
        p.failed(2)
        p.succeeded(0)
        self.assertEqual(assign(p, 10, CDN), [2, MAX_RUNNING])

    def test_failed_pieces_are_offered_again_lowest_first(self) -> None:
        """Several failed pieces come back in piece order."""
        p = peer()
        assign(p, 10, CDN)
        p.failed(3)
        p.failed(1)
        self.assertEqual(assign(p, 10, CDN, limit=3), [1])

    def test_failure_is_counted(self) -> None:
        """Each failed running piece counts against the peer."""
        p = peer()
        assign(p, 10, CDN)
        p.failed(0)
        p.failed(1)
        self.assertEqual(p.failures, 2)

    def test_failure_of_a_piece_not_running_is_ignored(self) -> None:
        """A report on a piece the peer was not given changes nothing."""
        p = peer()
        assign(p, 10, CDN)
        p.failed(7)
        self.assertEqual((p.failures, p.retry, sorted(p.running)), (0, set(), [0, 1, 2, 3]))

    def test_failure_after_success_is_ignored(self) -> None:
        """A late failure report on a piece the peer has is not a retry."""
        p = peer()
        assign(p, 10, CDN)
        p.succeeded(0)
        p.failed(0)
        self.assertEqual((p.failures, p.retry), (0, set()))

    def test_piece_the_peer_already_has_is_skipped(self) -> None:
        """A piece the peer holds (got elsewhere) is not handed out."""
        p = peer()
        p.succeeded(1)
        self.assertEqual(assign(p, 10, CDN), [0, 2, 3, 4])

    def test_retry_of_a_piece_now_held_is_dropped(self) -> None:
        """A failed piece that the peer then got is not offered again."""
        p = peer()
        assign(p, 2, CDN)
        p.failed(0)
        p.succeeded(0)
        p.succeeded(1)
        self.assertEqual(assign(p, 2, CDN), [])


# One pull of a simulated download: pieces that became ready, then the
# peer's verdict on each running piece (True: success) and pieces it got
# elsewhere.  Verdicts run out: from then on the peer only succeeds.
_round = st.tuples(
    st.integers(min_value=0, max_value=6),
    st.lists(st.booleans(), max_size=MAX_RUNNING),
    st.lists(st.integers(min_value=0, max_value=40), max_size=2),
)


class SchedulerPropertyTests(SynchronousTestCase):
    def check_assign(self, p: PeerProgress, ready: int) -> list[int]:
        """Call assign and check every invariant of one pull."""
        have, running, retry = set(p.have), dict(p.running), sorted(p.retry)
        chosen = assign(p, ready, CDN)
        self.assertLessEqual(len(p.running), MAX_RUNNING)
        self.assertEqual(len(chosen), len(set(chosen)), "a piece handed out twice in one pull")
        self.assertFalse(set(chosen) & have, "handed out a piece the peer has")
        self.assertFalse(set(chosen) & set(running), "handed out a piece already running")
        self.assertTrue(all(0 <= n < ready for n in chosen), f"handed out a piece >= ready {ready}: {chosen}")
        first = min(len(retry), MAX_RUNNING - len(running))
        self.assertEqual(chosen[:first], retry[:first], "failed pieces were not offered first")
        self.assertEqual(set(p.running), set(running) | set(chosen))
        return chosen

    @settings(max_examples=300, deadline=None)
    @given(total=st.integers(min_value=0, max_value=40), rounds=st.lists(_round, max_size=40))
    def test_every_ready_piece_is_eventually_held(self, total: int, rounds: list) -> None:
        """Whatever the failures, a peer that keeps pulling and reporting ends up with every piece."""
        p = peer()
        ready = 0
        script = iter(rounds)
        for _ in range(len(rounds) + 3 * total + 2):
            grow, verdicts, elsewhere = next(script, (1, [], []))
            ready = min(total, ready + grow)
            self.check_assign(p, ready)
            for piece, ok in zip(sorted(p.running), verdicts + [True] * MAX_RUNNING):
                if ok:
                    p.succeeded(piece)
                else:
                    p.failed(piece)
            for piece in elsewhere:
                if piece < ready:
                    p.succeeded(piece)
            if p.have == set(range(total)):
                break
        self.assertEqual(p.have, set(range(total)))

    @settings(max_examples=200, deadline=None)
    @given(rounds=st.lists(_round, min_size=1, max_size=40))
    def test_failures_count_only_running_pieces_that_failed(self, rounds: list) -> None:
        """``failures`` counts failed reports of running pieces, nothing else."""
        p = peer()
        ready = 0
        expected = 0
        for grow, verdicts, elsewhere in rounds:
            ready = min(40, ready + grow)
            self.check_assign(p, ready)
            for piece, ok in zip(sorted(p.running), verdicts):
                if not ok:
                    expected += 1
                    p.failed(piece)
            for piece in elsewhere:
                if piece not in p.running:
                    p.failed(piece)  # ignored
        self.assertEqual(p.failures, expected)

    @settings(max_examples=200, deadline=None)
    @given(ready=st.integers(min_value=0, max_value=40), held=st.sets(st.integers(min_value=0, max_value=40)))
    def test_pieces_are_handed_out_lowest_first(self, ready: int, held: set[int]) -> None:
        """Without retries, a pull hands out the lowest pieces the peer lacks."""
        p = peer()
        for piece in held:
            p.succeeded(piece)
        lacking = [n for n in range(ready) if n not in held]
        self.assertEqual(self.check_assign(p, ready), lacking[:MAX_RUNNING])
