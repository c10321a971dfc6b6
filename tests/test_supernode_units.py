"""The supernode's state units, one at a time: no HTTP, a `Clock`, temp dirs only.

`SchedulerPolicy` from its mapping; `PullQueue` over a real `TaskSchedule`
(who is parked, who is hungry, how far an event reaches, and with a
thousand held pulls that one report still wakes only a few); `PeerLiveness`
boundaries and its O(expired) sweep; the hashed, expiring, bounded memories
of `access`; the `CdnFetch` transition table and its ``.meta``; resuming a
partial cache entry; the disk quota's scan and eviction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random

import attrs
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dfly.supernode import liveness
from dfly.supernode.access import ExpiringMemory, SourceAccess, access_fingerprint
from dfly.supernode.cdn import CacheMeta, CdnCache, FetchState
from dfly.supernode.diskgc import DiskQuota, scan
from dfly.supernode.fetch import TRANSITIONS, BadTransition, CdnFetch, FetchEnv
from dfly.supernode.liveness import PeerLiveness
from dfly.supernode.policy import SchedulerPolicy, policy_from_mapping
from dfly.supernode.pullqueue import REEVALUATE, WAIT_NOW, PullQueue
from dfly.supernode.scheduler import TaskSchedule
from dfly.supernode.tasks import Task, TaskManager

CDN = "cdnnode:"
IP = "192.0.2.1"
SECRET = "Bearer s3cret-t0ken"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tid_of(name: str) -> str:
    """A task id (64 hex digits) for a readable name."""
    return sha256(name.encode())


# --- policy ----------------------------------------------------------------------------


class PolicyTests(SynchronousTestCase):
    def test_no_section_is_the_default_policy(self) -> None:
        """A missing or empty ``scheduler:`` section gives every default."""
        self.assertEqual((policy_from_mapping(None), policy_from_mapping({})), (SchedulerPolicy(), SchedulerPolicy()))

    def test_every_key_is_parsed_into_its_field(self) -> None:
        """Each camelCase key sets its field; durations accept units."""
        policy = policy_from_mapping({
            "maxRunning": 2, "maxUploads": 3, "cdnTaskLimit": 7, "elimination": 9, "isolation": 11,
            "silence": "1m30s", "hungUpGrace": "250ms", "finishedSilence": 600, "scanBudget": 64,
        })
        self.assertEqual(policy, SchedulerPolicy(
            max_running=2, max_uploads=3, cdn_task_limit=7, elimination=9, isolation=11,
            silence=90.0, hung_up_grace=0.25, finished_silence=600.0, scan_budget=64,
        ))

    def test_unknown_key_is_a_value_error_naming_it(self) -> None:
        """A key the policy does not have is refused, by name."""
        with self.assertRaises(ValueError) as caught:
            policy_from_mapping({"maxRuning": 4})
        self.assertIn("'maxRuning'", str(caught.exception))

    def test_bad_counts_are_value_errors_naming_the_key(self) -> None:
        """Zero, negatives, booleans, floats, None and words are no count; the error names the key."""
        for value in (0, -1, True, 2.5, "four", "-1", None):
            with self.assertRaises(ValueError, msg=repr(value)) as caught:
                policy_from_mapping({"maxUploads": value})
            self.assertIn("scheduler.maxUploads", str(caught.exception), value)

    def test_bad_durations_are_value_errors_naming_the_key(self) -> None:
        """Zero, negative, boolean and unparsable durations are refused; the error names the key."""
        for value in (0, "0s", -3, True, "soon", "5 minutes", None):
            with self.assertRaises(ValueError, msg=repr(value)) as caught:
                policy_from_mapping({"silence": value})
            self.assertIn("scheduler.silence", str(caught.exception), value)

    def test_nan_duration_is_a_value_error(self) -> None:
        """YAML's ``.nan`` is no duration (every comparison with it is false: every peer would be gone at once)."""
        with self.assertRaises(ValueError) as caught:
            policy_from_mapping({"silence": math.nan})
        self.assertIn("scheduler.silence", str(caught.exception))

    def test_section_that_is_not_a_mapping_is_a_value_error(self) -> None:
        """``scheduler: [1]`` is refused with a reason."""
        self.assertRaises(ValueError, policy_from_mapping, [1])  # type: ignore[arg-type]


# --- pull queue ------------------------------------------------------------------------


@attrs.define(eq=False)
class LoggedSchedule(TaskSchedule):
    """A real schedule that remembers for whom ``assign`` was called, in order."""

    tried: list[str] = attrs.Factory(list)

    def assign(self, cid: str) -> list[tuple[int, str]]:
        self.tried.append(cid)
        return TaskSchedule.assign(self, cid)

    def assign_from(self, cid: str, source: str) -> tuple[int, str] | None:
        self.tried.append(cid)
        return TaskSchedule.assign_from(self, cid, source)


def blocked(policy: SchedulerPolicy = SchedulerPolicy()) -> LoggedSchedule:
    """One ready piece, which the CDN is sending to ``r``: nobody else can get it yet.

    ``x`` (serving nothing) already has it, so ``x`` can use nothing at all.
    """
    s = LoggedSchedule(CDN, policy=policy, rng=random.Random(0))
    s.piece_ready(0)
    s.add_peer("x", IP, 0)
    assert s.assign("x") == [(0, CDN)]
    s.succeeded("x", 0)
    s.add_peer("r", IP, 15000)
    assert s.assign("r") == [(0, CDN)]
    s.tried.clear()
    return s


def hold_new(s: TaskSchedule, q: PullQueue, cid: str, port: int = 15001) -> Deferred:
    """``cid`` joins, its pull finds nothing to do, and is held."""
    s.add_peer(cid, IP, port)
    assert s.assign(cid) == [], cid
    if isinstance(s, LoggedSchedule):
        s.tried.pop()  # only the queue's tries are of interest
    return q.hold(cid)


def full_and_hungry() -> tuple[LoggedSchedule, PullQueue, Deferred, list[Deferred]]:
    """Eight ready pieces; ``full`` runs four from the CDN (all its slots and all the CDN's).

    ``full``'s next pull is parked; ``h1``'s and ``h2``'s are hungry (only the busy CDN has pieces).
    """
    s = LoggedSchedule(CDN, rng=random.Random(0))
    s.piece_ready(7)
    q = PullQueue(s)
    s.add_peer("full", IP, 15000)
    assert len(s.assign("full")) == 4
    parked = q.hold("full")
    hungry = [hold_new(s, q, cid) for cid in ("h1", "h2")]
    s.tried.clear()
    return s, q, parked, hungry


TID = tid_of("task")


@attrs.define(eq=False)
class CheckedQueue(PullQueue):
    """A real `PullQueue` that checks, on every offer, the bounds its docstring promises."""

    def offer(self, k: int, source: str) -> None:
        calls, wakeups = self.counters.assign_calls, self.counters.wakeups
        PullQueue.offer(self, k, source)
        tries, woken = self.counters.assign_calls - calls, self.counters.wakeups - wakeups
        assert tries <= max(k + 2, 0) if k > 0 else tries == 0, (k, source, tries)
        assert woken <= max(k, 0), (k, source, woken)


def managed(s: TaskSchedule, queue: type[PullQueue] = PullQueue) -> tuple[TaskManager, PullQueue]:
    """A TaskManager holding one running task over ``s`` (no source, no disk).

    Reports (`TaskManager.piece_result`), departures (``service_down``) and
    new pieces then make the very queue events the supernode makes.
    """
    tasks = TaskManager(CdnCache("unused"), None, Clock(), policy=s.policy)
    q = queue(s, tasks.counters)
    fetch = CdnFetch(task_id=TID, url="http://origin.test/f", piece_size=16)
    fetch.state = FetchState.FETCHING
    tasks.tasks[TID] = Task(fetch=fetch, base_id=TID, schedule=s, queue=q)
    return tasks, q


def results(ds: list[Deferred]) -> list[object]:
    """What each Deferred fired with (None: not yet)."""
    out: list[object] = []
    for d in ds:
        got: list[object] = []
        d.addBoth(lambda r, got=got: (got.append(r), r)[1])
        out.append(got[0] if got else None)
    return out


class PullQueueTests(SynchronousTestCase):
    def test_pull_of_a_peer_with_full_slots_is_parked_and_offers_skip_it(self) -> None:
        """A peer running max_running pieces is parked: offers do not even try it."""
        s, q, parked, _ = full_and_hungry()
        q.offer(5, CDN)
        self.assertEqual((sorted(set(s.tried)), q.holding("full")), (["h1", "h2"], True))
        self.assertNoResult(parked)

    def test_slot_freed_of_another_peer_leaves_a_parked_pull(self) -> None:
        """Only a peer's own report can wake its parked pull: another's wakes only that other."""
        s, q, parked, hungry = full_and_hungry()
        q.slot_freed("h1")
        self.assertIs(self.successResultOf(hungry[0]), REEVALUATE)
        self.assertNoResult(parked)

    def test_own_slot_freed_wakes_a_parked_pull_with_pieces(self) -> None:
        """The peer's report frees its slot (and the CDN's): its parked pull gets the next piece."""
        s = LoggedSchedule(CDN, rng=random.Random(0))
        s.piece_ready(7)
        q = PullQueue(s)
        s.add_peer("a", IP, 15001)
        first = [n for n, _ in s.assign("a")]
        parked = q.hold("a")
        s.succeeded("a", first[0])
        q.slot_freed("a")
        woken = self.successResultOf(parked)
        self.assertEqual((len(woken), woken[0][1], q.holding("a")), (1, CDN, False))

    def test_own_slot_freed_with_nothing_to_assign_wakes_with_reevaluate(self) -> None:
        """A report that leaves nothing to hand out still wakes the pull, to look again (it may be done)."""
        s = LoggedSchedule(CDN, rng=random.Random(0))
        s.piece_ready(3)
        q = PullQueue(s)
        s.add_peer("a", IP, 15001)
        s.assign("a")  # all four pieces
        parked = q.hold("a")
        s.succeeded("a", 0)
        q.slot_freed("a")
        self.assertIs(self.successResultOf(parked), REEVALUATE)

    def test_offer_wakes_at_most_k_pulls(self) -> None:
        """With r's five free upload slots and ten hungry pulls, offer(2, r) wakes exactly two."""
        s = blocked()
        q = PullQueue(s)
        held = [hold_new(s, q, f"p{n}", 16000 + n) for n in range(10)]
        s.succeeded("r", 0)  # r can serve five
        q.offer(2, "r")
        woken = [r for r in results(held) if r is not None]
        self.assertEqual((len(woken), len(q)), (2, 8), woken)

    def test_offer_tries_at_most_k_plus_2_pulls(self) -> None:
        """When no held pull can use an offer, offer(k) calls assign k + 2 times and wakes nobody."""
        s = blocked()
        q = PullQueue(s)
        held = [hold_new(s, q, f"p{n}", 16000 + n) for n in range(20)]
        tried = []
        for k in (1, 3):
            s.tried.clear()
            q.offer(k, CDN)
            tried.append(len(s.tried))
        self.assertEqual((tried, results(held).count(None)), ([3, 5], 20))

    def test_offer_zero_tries_nobody(self) -> None:
        """offer(0) (a departing peer that ran nothing) costs nothing."""
        s = blocked()
        q = PullQueue(s)
        hold_new(s, q, "p0")
        s.succeeded("r", 0)
        q.offer(0, "r")
        self.assertEqual(s.tried, [])

    def test_hungry_pulls_are_woken_first_in_first_out(self) -> None:
        """Among pulls that can all use an offer, the one held longest goes first."""
        s = blocked()
        q = PullQueue(s)
        for cid in ("p1", "p2", "p3"):
            hold_new(s, q, cid)
        s.succeeded("r", 0)
        q.offer(1, "r")
        q.offer(1, "r")
        self.assertEqual(list(dict.fromkeys(s.tried)), ["p1", "p2"])  # a woken pull is also topped up

    def test_tried_and_useless_pull_goes_to_the_back(self) -> None:
        """A head that cannot use an offer moves behind the others: the next offer does not try it first."""
        s = blocked()
        q = PullQueue(s)
        useless = q.hold("x")  # x has the only piece already
        for cid in ("p1", "p2"):
            hold_new(s, q, cid)
        s.succeeded("r", 0)
        q.offer(1, "r")
        first = list(s.tried)
        s.tried.clear()
        q.offer(1, "r")
        # A woken pull is topped up with a second assign: count each pull once.
        self.assertEqual((list(dict.fromkeys(first)), list(dict.fromkeys(s.tried))), (["x", "p1"], ["p2"]))
        self.assertNoResult(useless)

    def test_offer_reevaluates_a_held_pull_whose_peer_left(self) -> None:
        """A held pull of a cid no longer in the schedule is told to look again (it will be told 404)."""
        s = blocked()
        q = PullQueue(s)
        gone = hold_new(s, q, "p1")
        s.remove_peer("p1")
        s.succeeded("r", 0)
        q.offer(1, "r")
        self.assertIs(self.successResultOf(gone), REEVALUATE)

    def test_wake_all_answers_every_held_pull_with_reevaluate(self) -> None:
        """The task changed as a whole: parked and hungry pulls all look again, and the queue is empty."""
        _, q, parked, hungry = full_and_hungry()
        q.wake_all()
        self.assertEqual((results([parked, *hungry]), len(q)), ([REEVALUATE] * 3, 0))

    def test_drop_answers_the_pull_with_reevaluate_and_forgets_it(self) -> None:
        """A departing peer's held pull is let go."""
        s = blocked()
        q = PullQueue(s)
        held = hold_new(s, q, "p1")
        q.drop("p1")
        self.assertEqual((self.successResultOf(held), q.holding("p1"), len(q)), (REEVALUATE, False, 0))

    def test_second_hold_of_a_cid_answers_the_first_with_wait_now(self) -> None:
        """A newer pull of the same cid replaces the held one, which answers "wait" at once."""
        s = blocked()
        q = PullQueue(s)
        first = hold_new(s, q, "p1")
        second = q.hold("p1")
        self.assertIs(self.successResultOf(first), WAIT_NOW)
        self.assertNoResult(second)
        self.assertEqual(len(q), 1)

    def test_cancelled_hold_leaves_the_queue(self) -> None:
        """Cancelling a held pull (the peer hung up) removes it; later offers do not try it."""
        s = blocked()
        q = PullQueue(s)
        held = hold_new(s, q, "p1")
        held.cancel()
        self.failureResultOf(held, CancelledError)
        s.succeeded("r", 0)
        s.tried.clear()
        q.offer(1, "r")
        self.assertEqual((q.holding("p1"), len(q), s.tried), (False, 0, []))

    def test_cancelled_hold_does_not_remove_a_newer_hold(self) -> None:
        """Cancelling a replaced pull leaves the newer pull of the same cid held."""
        s = blocked()
        q = PullQueue(s)
        first = hold_new(s, q, "p1")
        second = q.hold("p1")
        first.cancel()  # already answered WAIT_NOW: nothing to do
        self.assertEqual((q.holding("p1"), self.successResultOf(first)), (True, WAIT_NOW))
        self.assertNoResult(second)


def fan_out(peers: int) -> tuple[int, int, int]:
    """One piece/suc while ``peers`` pulls are held: (wakeups, assign calls, pulls given pieces).

    ``r`` runs the only piece from the CDN; every other peer has pulled and
    is held, hungry for it; so is ``r``'s own next pull.  Then ``r``
    reports success to the `TaskManager`.
    """
    s = TaskSchedule(CDN, rng=random.Random(0))
    s.piece_ready(0)
    tasks, q = managed(s)
    s.add_peer("r", IP, 15000)
    assert s.assign("r") == [(0, CDN)]
    held = [q.hold("r")]
    held += [hold_new(s, q, f"p{n}", 16000 + n % 40000) for n in range(peers)]
    assert len(q) == peers + 1
    q.counters.wakeups = q.counters.assign_calls = 0
    tasks.piece_result(TID, "r", 0, True)
    given = sum(1 for r in results(held) if isinstance(r, list))
    return q.counters.wakeups, q.counters.assign_calls, given


class FanOutTests(SynchronousTestCase):
    def test_one_report_wakes_a_constant_number_of_a_thousand_held_pulls(self) -> None:
        """With 1,000 held pulls, one report wakes at most 8 and calls assign at most 20 times."""
        wakeups, assign_calls, _ = fan_out(1000)
        self.assertLessEqual(wakeups, 8)
        self.assertLessEqual(assign_calls, 20)

    def test_one_reports_cost_is_the_same_at_100_and_1000_held_pulls(self) -> None:
        """The cost of an event does not grow with the number of held pulls."""
        self.assertEqual(fan_out(100), fan_out(1000))

    def test_one_report_hands_out_every_chance_it_made(self) -> None:
        """r's report makes six chances (r's five upload slots, the CDN's freed slot): six held pulls get piece 0."""
        _, _, given = fan_out(1000)
        self.assertEqual(given, 6)

    def test_cdn_slot_freed_by_a_report_reaches_a_pull_that_needs_the_cdn(self) -> None:
        """One upload slot each: p1's report of a CDN piece lets p2 fetch it from p1 and p3 from the CDN."""
        s = TaskSchedule(CDN, policy=SchedulerPolicy(max_running=2, max_uploads=1, cdn_task_limit=1),
                         rng=random.Random(0))
        s.piece_ready(0)
        tasks, q = managed(s)
        s.add_peer("p1", IP, 15001)
        self.assertEqual(s.assign("p1"), [(0, CDN)])
        p2, p3 = hold_new(s, q, "p2", 15002), hold_new(s, q, "p3", 15003)
        tasks.piece_result(TID, "p1", 0, True)
        self.assertEqual(results([p2, p3]), [[(0, "p1")], [(0, CDN)]])


# A property over the queue, driven the way TaskManager drives it.

POLICY = SchedulerPolicy(max_running=2, max_uploads=1, cdn_task_limit=1)
MAX_PEERS = 3  # with at most 3 held pulls, offer(k >= 1)'s k + 2 tries reach every one
MAX_PIECES = 5


class QueueMachine(RuleBasedStateMachine):
    """Random joins, pulls, reports, departures, hang-ups and new pieces on one task.

    Pulls are driven like `TaskManager._pull`: assign, else hold; a pull
    woken with REEVALUATE assigns again at once (and holds again if it got
    nothing).  Reports, departures and new pieces go to a real
    `TaskManager`, which makes the queue events; the queue checks each
    offer's bounds (`CheckedQueue`).
    """

    def __init__(self) -> None:
        super().__init__()
        self.s = TaskSchedule(CDN, policy=POLICY, rng=random.Random(0))
        self.tasks, self.q = managed(self.s, CheckedQueue)
        self.held: dict[str, Deferred] = {}
        self.serial = 0

    # driving ----------------------------------------------------------------------

    def _pull(self, cid: str) -> None:
        if self.s.assign(cid):
            return
        d = self.q.hold(cid)
        self.held[cid] = d
        d.addCallbacks(self._woken, self._cancelled, callbackArgs=(cid, d), errbackArgs=(cid, d))

    def _woken(self, result: object, cid: str, d: Deferred) -> None:
        if self.held.get(cid) is d:
            del self.held[cid]
        if result is REEVALUATE and cid in self.s.peers:
            self._pull(cid)

    def _cancelled(self, failure: object, cid: str, d: Deferred) -> None:
        if self.held.get(cid) is d:
            del self.held[cid]

    # rules --------------------------------------------------------------------------

    @initialize(serving=st.lists(st.booleans(), min_size=MAX_PEERS, max_size=MAX_PEERS))
    def first_piece_and_peers(self, serving: list[bool]) -> None:
        self.s.piece_ready(0)
        for serves in serving:
            self.join(serves)

    @precondition(lambda self: len(self.s.peers) < MAX_PEERS)
    @rule(serves=st.booleans())
    def join(self, serves: bool = True) -> None:
        self.serial += 1
        self.s.add_peer(f"p{self.serial}", IP, 15000 + self.serial if serves else 0)

    @precondition(lambda self: self.s.peers)
    @rule(data=st.data())
    def pull(self, data: st.DataObject) -> None:
        self._pull(data.draw(st.sampled_from(sorted(self.s.peers))))

    @precondition(lambda self: self.s.peers)
    @rule()
    def everyone_pulls(self) -> None:
        for cid in sorted(self.s.peers):
            if cid not in self.held and cid in self.s.peers:
                self._pull(cid)

    @precondition(lambda self: self.s.ready < MAX_PIECES)
    @rule()
    def piece_cached(self) -> None:
        self.tasks._piece_cached(self.tasks.task(TID), self.s.ready)  # the CDN fetch's callback

    @precondition(lambda self: any(p.running for p in self.s.peers.values()))
    @rule(data=st.data(), kind=st.sampled_from(["", "refused", "unreachable", "write"]), take_next=st.booleans())
    def report(self, data: st.DataObject, kind: str, take_next: bool) -> None:
        """A report, Dragonfly's way (its held pull is woken) or dfly's (``next=1``: pieces in the answer)."""
        cid = data.draw(st.sampled_from(sorted(c for c, p in self.s.peers.items() if p.running)))
        piece = data.draw(st.sampled_from(sorted(self.s.peers[cid].running)))
        chosen = self.tasks.piece_result(TID, cid, piece, not kind, kind, take_next=take_next)
        assert take_next or not chosen, chosen
        # What the answer carries is assigned (running from that source); the
        # invariant below checks that the reporter's held pull, re-filed, and
        # every other one were offered what they could use.
        assert all(self.s.peers[cid].running.get(n) == src for n, src in chosen), chosen

    @precondition(lambda self: len(self.s.peers) == MAX_PEERS)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        self.tasks.service_down(TID, data.draw(st.sampled_from(sorted(self.s.peers))))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def hang_up(self, data: st.DataObject) -> None:
        self.held[data.draw(st.sampled_from(sorted(self.held)))].cancel()

    @rule()
    def fetch_ended(self) -> None:
        self.q.wake_all()

    # invariants ---------------------------------------------------------------------

    @invariant()
    def queue_is_consistent(self) -> None:
        s = self.s
        for peer in s.peers.values():
            assert len(peer.running) <= POLICY.max_running, peer
            assert peer.uploads <= POLICY.max_uploads, peer
        assert 0 <= s.cdn_uploads <= POLICY.cdn_task_limit, s.cdn_uploads
        assert len(self.q) == len(self.held), (len(self.q), sorted(self.held))
        assert all(self.q.holding(cid) for cid in self.held)
        # Every event offered its chances to every held pull that could use them.
        for cid in self.held:
            piece = runnable(self.s, cid)
            assert piece is None, f"{cid} is held, yet could run piece {piece}"


def runnable(s: TaskSchedule, cid: str) -> int | None:
    """A piece ``cid`` could be given now by the scheduler's rules, judged from the peers' state alone."""
    peer = s.peers[cid]
    if len(peer.running) >= s.policy.max_running:
        return None
    isolated = peer.failures > s.policy.isolation
    cdn_free = s.cdn_uploads < (s.cdn_limit or 0)
    for piece in range(s.ready):
        if piece in peer.have or piece in peer.running:
            continue
        if cdn_free and piece not in s.cdn_pieces:
            return piece
        if isolated:
            continue
        for other in s.peers.values():
            if (other.cid != cid and other.cid not in peer.blacklist and other.can_serve and piece in other.have
                    and other.uploads < s.policy.max_uploads):
                return piece
    return None


class QueuePropertyTests(SynchronousTestCase):
    def test_random_event_sequences_leave_no_held_pull_that_could_work(self) -> None:
        """After any events, caps hold, offer(k) wakes <= k and tries <= k+2, and no held pull was skipped."""
        run_state_machine_as_test(
            QueueMachine,
            settings=settings(
                max_examples=120, stateful_step_count=25, deadline=None, report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow],
                # No shrinking: it takes tens of seconds here.  FanOutTests holds
                # small fixed examples of what this has found.
                phases=[Phase.explicit, Phase.reuse, Phase.generate],
            ),
        )

    @settings(max_examples=100, deadline=None)
    @given(order=st.lists(st.booleans(), min_size=1, max_size=30))
    def test_repeated_offers_wake_every_hungry_pull_that_can_use_them(self, order: list[bool]) -> None:
        """Whatever useless pulls are queued in front, len(queue) offers of 1 wake every pull that can use one."""
        policy = SchedulerPolicy(max_uploads=100)
        s = TaskSchedule(CDN, policy=policy, rng=random.Random(0))
        s.piece_ready(0)
        q = PullQueue(s)
        s.add_peer("r", IP, 15000)
        assert s.assign("r") == [(0, CDN)]
        useful: list[Deferred] = []
        useless: list[Deferred] = []
        for n, can_use in enumerate(order):
            cid = f"p{n}"
            s.add_peer(cid, IP, 16000 + n if can_use else 0)
            if not can_use:  # has the piece already (from the CDN, before r)
                s.peers[cid].have.add(0)
            assert s.assign(cid) == []
            (useful if can_use else useless).append(q.hold(cid))
        s.succeeded("r", 0)  # r can now serve the piece 100 times over
        for _ in range(len(order)):
            q.offer(1, "r")
        self.assertEqual(results(useful).count(None), 0)
        self.assertEqual(results(useless).count(None), len(useless))


# --- liveness --------------------------------------------------------------------------


class CountingTime(float):
    """A time stamp that counts how often arithmetic or comparison touches it."""

    touched = 0

    def _count(op):  # type: ignore[no-untyped-def]
        def counted(self, *args):  # type: ignore[no-untyped-def]
            CountingTime.touched += 1
            return op(float(self), *args)
        return counted

    __sub__ = _count(float.__sub__)
    __rsub__ = _count(float.__rsub__)
    __add__ = _count(float.__add__)
    __radd__ = _count(float.__radd__)
    __lt__ = _count(float.__lt__)
    __le__ = _count(float.__le__)
    __gt__ = _count(float.__gt__)
    __ge__ = _count(float.__ge__)
    __hash__ = float.__hash__
    __eq__ = _count(float.__eq__)
    del _count


POLICY_LIMITS = {
    liveness.DOWNLOADING: SchedulerPolicy().silence,
    liveness.HUNG_UP: SchedulerPolicy().hung_up_grace,
    liveness.FINISHED: SchedulerPolicy().finished_silence,
}


class PeerLivenessTests(SynchronousTestCase):
    def test_each_kind_is_kept_at_exactly_its_limit(self) -> None:
        """Silent for exactly its kind's limit, a key is still alive."""
        for kind, limit in POLICY_LIMITS.items():
            live = PeerLiveness()
            live.heard("k", kind, 100.0)
            self.assertEqual((list(live.expired(100.0 + limit)), len(live)), ([], 1), kind)

    def test_each_kind_expires_just_over_its_limit(self) -> None:
        """Silent for just longer than its kind's limit, a key is popped."""
        for kind, limit in POLICY_LIMITS.items():
            live = PeerLiveness()
            live.heard("k", kind, 100.0)
            self.assertEqual((list(live.expired(100.0 + limit + 0.001)), len(live)), (["k"], 0), kind)

    def test_limits_come_from_the_policy(self) -> None:
        """A policy with silence=2 expires a downloading key after 2 s, not 6."""
        live = PeerLiveness(SchedulerPolicy(silence=2.0))
        live.heard("k", liveness.DOWNLOADING, 0.0)
        self.assertEqual(list(live.expired(2.5)), ["k"])

    def test_heard_moves_a_key_to_the_back(self) -> None:
        """A key heard again is no longer in front of keys heard after its first word."""
        live = PeerLiveness()
        live.heard("a", liveness.DOWNLOADING, 0.0)
        live.heard("b", liveness.DOWNLOADING, 1.0)
        live.heard("a", liveness.DOWNLOADING, 2.0)
        self.assertEqual(list(live.expired(7.5)), ["b"])

    def test_heard_changes_a_keys_kind(self) -> None:
        """A downloading key heard as finished is judged by finished_silence."""
        live = PeerLiveness()
        live.heard("a", liveness.DOWNLOADING, 0.0)
        live.heard("a", liveness.FINISHED, 0.0)
        self.assertEqual((list(live.expired(60.0)), len(live)), ([], 1))

    def test_forgotten_key_never_expires(self) -> None:
        """forget() (a pull is held open, or the peer left) takes the key out of every queue."""
        live = PeerLiveness()
        live.heard("a", liveness.HUNG_UP, 0.0)
        live.forget("a")
        self.assertEqual((list(live.expired(1e9)), len(live)), ([], 0))

    def test_expired_key_is_popped_once(self) -> None:
        """A second sweep does not report the same key again."""
        live = PeerLiveness()
        live.heard("a", liveness.HUNG_UP, 0.0)
        list(live.expired(5.0))
        self.assertEqual(list(live.expired(10.0)), [])

    def test_expired_finds_one_silent_key_among_ten_thousand_live_ones(self) -> None:
        """One expired key among 10,000 live ones: found, and only the queues' fronts are looked at."""
        live = PeerLiveness()
        live.heard("old", liveness.DOWNLOADING, CountingTime(0.0))
        for n in range(10_000):
            live.heard(n, (liveness.DOWNLOADING, liveness.FINISHED)[n % 2], CountingTime(5.0))
        CountingTime.touched = 0
        self.assertEqual(list(live.expired(6.5)), ["old"])
        self.assertLessEqual(CountingTime.touched, 8)
        self.assertEqual(len(live), 10_000)


# --- access memories ---------------------------------------------------------------------


class ExpiringMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_entry_is_kept_at_exactly_its_ttl(self) -> None:
        """An entry exactly ttl seconds old is still there."""
        memory: ExpiringMemory[str, int] = ExpiringMemory(self.clock, 10.0, 5)
        memory.put("a", 1)
        self.clock.advance(10.0)
        self.assertEqual(memory.get("a"), 1)

    def test_entry_is_gone_after_its_ttl(self) -> None:
        """An entry older than ttl reads as missing and leaves memory."""
        memory: ExpiringMemory[str, int] = ExpiringMemory(self.clock, 10.0, 5)
        memory.put("a", 1)
        self.clock.advance(10.1)
        self.assertEqual((memory.get("a"), len(memory)), (None, 0))

    def test_expire_drops_only_old_entries(self) -> None:
        """expire() removes what is past its ttl and keeps the rest."""
        memory: ExpiringMemory[str, int] = ExpiringMemory(self.clock, 10.0, 5)
        memory.put("old", 1)
        self.clock.advance(6)
        memory.put("new", 2)
        self.clock.advance(6)
        memory.expire()
        self.assertEqual((len(memory), memory.get("new")), (1, 2))

    def test_limit_drops_the_least_recently_put(self) -> None:
        """Past ``limit`` entries the oldest goes; putting a key again makes it the newest."""
        memory: ExpiringMemory[str, int] = ExpiringMemory(self.clock, 100.0, 3)
        for key in ("a", "b", "c"):
            memory.put(key, 1)
        memory.put("a", 2)
        memory.put("d", 3)
        self.assertEqual(
            ([memory.get(k) for k in ("a", "b", "c", "d")], len(memory)), ([2, None, 1, 3], 3)
        )

    def test_put_again_renews_the_ttl(self) -> None:
        """A key put again lives ttl seconds from the second put."""
        memory: ExpiringMemory[str, int] = ExpiringMemory(self.clock, 10.0, 5)
        memory.put("a", 1)
        self.clock.advance(8)
        memory.put("a", 1)
        self.clock.advance(8)
        self.assertEqual(memory.get("a"), 1)


class SourceAccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    def test_decision_expires_after_access_ttl(self) -> None:
        """An allowed caller is allowed for access_ttl seconds, then must be asked about again."""
        access = SourceAccess(self.clock, access_ttl=60.0)
        access.allow("t", "fp")
        self.clock.advance(60.0)
        kept = access.allowed("t", "fp")
        self.clock.advance(0.1)
        self.assertEqual((kept, access.allowed("t", "fp")), (True, False))

    def test_decision_is_per_task_and_fingerprint(self) -> None:
        """Allowing one caller on one task allows neither another caller nor another task."""
        access = SourceAccess(self.clock)
        access.allow("t", "fp")
        self.assertEqual((access.allowed("t", "other"), access.allowed("u", "fp")), (False, False))

    def test_missing_source_is_remembered_for_fail_access_interval(self) -> None:
        """A 404 is remembered, with its reason, for fail_access_interval and not longer."""
        access = SourceAccess(self.clock, fail_access_interval=180.0)
        access.remember_missing("t", "404")
        self.clock.advance(180.0)
        kept = access.missing("t")
        self.clock.advance(0.1)
        self.assertEqual((kept, access.missing("t")), ("404", None))

    def test_missing_memory_is_bounded(self) -> None:
        """A stream of distinct missing URLs keeps only the newest max_missing."""
        access = SourceAccess(self.clock, max_missing=3)
        for n in range(10):
            access.remember_missing(f"t{n}", "404")
        self.assertEqual(
            (access.sizes[1], access.missing("t6"), access.missing("t7"), access.missing("t9")), (3, None, "404", "404")
        )

    def test_decision_memory_is_bounded(self) -> None:
        """A stream of distinct credentials keeps only the newest max_decisions."""
        access = SourceAccess(self.clock, max_decisions=2)
        for n in range(5):
            access.allow("t", f"fp{n}")
        self.assertEqual((access.sizes[0], access.allowed("t", "fp2"), access.allowed("t", "fp4")), (2, False, True))

    def test_expire_empties_both_memories_after_their_times(self) -> None:
        """expire() reclaims old decisions and old 404s (not only hides them)."""
        access = SourceAccess(self.clock, access_ttl=60.0, fail_access_interval=180.0)
        access.allow("t", "fp")
        access.remember_missing("u", "404")
        self.clock.advance(180.1)
        access.expire()
        self.assertEqual(access.sizes, (0, 0))

    def test_stored_decisions_never_hold_the_credential(self) -> None:
        """What SourceAccess keeps (and shows in its repr) is a hash, not the Authorization value."""
        access = SourceAccess(self.clock)
        fingerprint = access_fingerprint("http://origin.test/f", {"Authorization": SECRET})
        access.allow("t", fingerprint)
        stored = repr(access) + repr(list(access._allowed._entries))
        self.assertNotIn(SECRET, stored)
        self.assertNotIn("s3cret", stored)
        self.assertTrue(access.allowed("t", fingerprint))


class AccessFingerprintTests(SynchronousTestCase):
    URL = "http://origin.test/f?sig=abc"

    def test_fingerprint_is_a_sha256_without_the_credential(self) -> None:
        """The fingerprint is 64 hex digits and contains nothing of the secret."""
        fingerprint = access_fingerprint(self.URL, {"Authorization": SECRET})
        self.assertRegex(fingerprint, r"\A[0-9a-f]{64}\Z")
        self.assertNotIn("s3cret", fingerprint)

    def test_fingerprint_differs_for_another_header_value(self) -> None:
        """Another token is another caller."""
        self.assertNotEqual(
            access_fingerprint(self.URL, {"Authorization": SECRET}),
            access_fingerprint(self.URL, {"Authorization": SECRET + "x"}),
        )

    def test_fingerprint_differs_for_another_url(self) -> None:
        """Another signed query is another caller."""
        self.assertNotEqual(
            access_fingerprint(self.URL, {"Authorization": SECRET}),
            access_fingerprint(self.URL.replace("abc", "abd"), {"Authorization": SECRET}),
        )

    def test_fingerprint_differs_with_an_extra_header(self) -> None:
        """A header more is another request."""
        self.assertNotEqual(
            access_fingerprint(self.URL, {"A": "1"}), access_fingerprint(self.URL, {"A": "1", "B": "2"})
        )

    def test_fingerprint_does_not_mix_names_and_values(self) -> None:
        """Moving text between a header's name and value changes the fingerprint."""
        self.assertNotEqual(access_fingerprint(self.URL, {"ab": "c"}), access_fingerprint(self.URL, {"a": "bc"}))

    def test_fingerprint_ignores_header_order_and_name_case(self) -> None:
        """The same headers in another order, names in another case, are the same caller."""
        self.assertEqual(
            access_fingerprint(self.URL, {"Authorization": SECRET, "X-Trace": "1"}),
            access_fingerprint(self.URL, {"x-trace": "1", "AUTHORIZATION": SECRET}),
        )


# --- the CDN fetch state machine ------------------------------------------------------------


def fetch_in(state: FetchState) -> CdnFetch:
    fetch = CdnFetch(task_id=tid_of("t"), url="http://origin.test/f")
    fetch.state = state
    return fetch


def meta(**changes: object) -> CacheMeta:
    fields: dict[str, object] = dict(
        task_id=tid_of("t"), url="http://origin.test/f", length=40, piece_size=16,
        piece_digests=("d0", "d1", "d2"), etag='"e1"', last_modified=None, state=FetchState.DONE,
    )
    fields.update(changes)
    return CacheMeta(**fields)  # type: ignore[arg-type]


class CdnFetchTests(SynchronousTestCase):
    def test_every_edge_missing_from_the_table_raises(self) -> None:
        """Any move the transition table does not list is a BadTransition."""
        illegal = [(a, b) for a in FetchState for b in FetchState if b not in TRANSITIONS[a]]
        self.assertEqual(len(illegal), 25 - sum(len(v) for v in TRANSITIONS.values()))
        for a, b in illegal:
            fetch = fetch_in(a)
            self.assertRaises(BadTransition, fetch._advance, b)
            self.assertEqual(fetch.state, a, (a, b))

    def test_every_edge_in_the_table_is_taken(self) -> None:
        """Each listed move is accepted and lands in its target state."""
        for a, targets in TRANSITIONS.items():
            for b in targets:
                fetch = fetch_in(a)
                fetch._advance(b)
                self.assertEqual(fetch.state, b)

    def test_failed_is_final(self) -> None:
        """Nothing leaves FAILED."""
        self.assertEqual(TRANSITIONS[FetchState.FAILED], frozenset())

    def test_from_cache_is_done_and_ended(self) -> None:
        """A cache entry the source confirmed is DONE, not running, with its digests ready."""
        fetch = CdnFetch.from_cache(meta())
        self.assertEqual((fetch.state, fetch.running, fetch.ready, fetch.total_pieces), (FetchState.DONE, False, 3, 3))
        self.successResultOf(fetch.ended)

    def test_starting_a_done_fetch_is_a_bad_transition(self) -> None:
        """A fetch served from the cache cannot be started again."""
        fetch = CdnFetch.from_cache(meta())
        env = FetchEnv(CdnCache(self.mktemp()), Clock())
        self.assertRaises(BadTransition, fetch.start, env, None, "http://origin.test/f", lambda n: None, lambda f: None)

    def test_fail_of_a_done_fetch_is_failed(self) -> None:
        """DONE -> FAILED is the cache file vanishing; the reason is kept."""
        fetch = CdnFetch.from_cache(meta())
        fetch.fail("gone")
        self.assertEqual((fetch.state, fetch.error), (FetchState.FAILED, "gone"))

    def test_second_fail_keeps_the_first_reason(self) -> None:
        """fail() on a failed fetch changes nothing."""
        fetch = fetch_in(FetchState.FETCHING)
        fetch.fail("first")
        fetch.fail("second")
        self.assertEqual(fetch.error, "first")

    def test_meta_round_trips_through_json_in_every_state(self) -> None:
        """meta() -> to_json -> JSON text -> from_json gives the same record, state included."""
        for state in FetchState:
            fetch = CdnFetch(task_id=tid_of("t"), url="http://origin.test/f", md5="0" * 32, piece_size=16,
                             length=40, digests=["a", "b"], etag='"e"', last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
            fetch.state = state
            record = fetch.meta()
            again = CacheMeta.from_json(json.loads(json.dumps(record.to_json())))
            self.assertEqual((again, again.state, record.to_json()["state"]), (record, state, state.value))

    def test_old_running_meta_loads_as_fetching(self) -> None:
        """A .meta of an older dfly that says "running" is a fetch in progress."""
        data = meta().to_json()
        data["state"] = "running"
        self.assertIs(CacheMeta.from_json(data).state, FetchState.FETCHING)

    def test_unknown_meta_state_is_a_value_error(self) -> None:
        """A state word dfly never wrote makes the meta unreadable (no cache hit)."""
        data = meta().to_json()
        data["state"] = "half-done"
        self.assertRaises(ValueError, CacheMeta.from_json, data)


# --- partial cache entries -----------------------------------------------------------------


PIECE = 16
BODY = bytes(range(PIECE)) * 2 + b"tail-of-it"  # two full pieces and a short third: 42 bytes


class PartialEntryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.cache = CdnCache(self.mktemp())
        self.tid = tid_of("partial")

    def write(self, data: bytes, pieces: int, **changes: object) -> CacheMeta:
        """A cut-off fetch: ``data`` on disk and a meta recording the first ``pieces`` digests."""
        path = self.cache.data_path(self.tid)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        digests = tuple(sha256(BODY[n * PIECE : (n + 1) * PIECE]) for n in range(pieces))
        fields: dict[str, object] = dict(task_id=self.tid, length=len(BODY), piece_size=PIECE,
                                         piece_digests=digests, state=FetchState.FETCHING)
        fields.update(changes)
        record = meta(**fields)
        self.cache.save_meta(record)
        return record

    def test_partial_entry_with_good_pieces_has_that_prefix(self) -> None:
        """Two recorded pieces that still match the disk: resumable from piece 2."""
        self.write(BODY[: 2 * PIECE + 3], 2)
        partial = self.cache.load_partial(self.tid)
        assert partial is not None
        self.assertEqual(self.cache.verified_prefix(partial), 2)

    def test_corrupted_piece_stops_the_prefix(self) -> None:
        """A piece whose bytes changed on disk ends the verified prefix before it."""
        data = bytearray(BODY[: 2 * PIECE])
        data[PIECE + 5] ^= 0xFF
        self.write(bytes(data), 2)
        partial = self.cache.load_partial(self.tid)
        assert partial is not None
        self.assertEqual(self.cache.verified_prefix(partial), 1)

    def test_short_data_file_stops_the_prefix(self) -> None:
        """A piece recorded but not wholly on disk does not count."""
        self.write(BODY[: PIECE + 4], 2)
        partial = self.cache.load_partial(self.tid)
        assert partial is not None
        self.assertEqual(self.cache.verified_prefix(partial), 1)

    def test_missing_data_file_has_no_prefix(self) -> None:
        """The meta without its data file: nothing is verified."""
        record = self.write(b"", 2)
        os.unlink(self.cache.data_path(self.tid))
        self.assertEqual(self.cache.verified_prefix(record), 0)

    def test_partial_without_a_validator_is_not_resumable(self) -> None:
        """No ETag and no Last-Modified: nothing to send as If-Range."""
        self.write(BODY[: 2 * PIECE], 2, etag=None, last_modified=None)
        self.assertIsNone(self.cache.load_partial(self.tid))

    def test_partial_with_only_last_modified_is_resumable(self) -> None:
        """A Last-Modified date is a validator too."""
        self.write(BODY[: 2 * PIECE], 2, etag=None, last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
        self.assertIsNotNone(self.cache.load_partial(self.tid))

    def test_complete_entry_is_not_partial(self) -> None:
        """A DONE entry is a cache hit, not a fetch to resume."""
        self.write(BODY, 3, state=FetchState.DONE)
        self.assertEqual((self.cache.load_partial(self.tid), self.cache.load_meta(self.tid) is not None), (None, True))

    def test_fetching_meta_with_every_piece_is_not_partial(self) -> None:
        """A fetch cut off after its last piece has nothing left to resume."""
        self.write(BODY, 3)
        self.assertIsNone(self.cache.load_partial(self.tid))

    def test_partial_without_any_piece_is_not_resumable(self) -> None:
        """Nothing verified yet: a plain GET."""
        self.write(b"", 0)
        self.assertIsNone(self.cache.load_partial(self.tid))

    def test_partial_is_no_cache_hit(self) -> None:
        """load_meta never takes a fetching entry for a complete one."""
        self.write(BODY[: 2 * PIECE], 2)
        self.assertIsNone(self.cache.load_meta(self.tid))


# --- disk quota ----------------------------------------------------------------------------


class DiskQuotaTests(SynchronousTestCase):
    """Five 100-byte entries, a-e, used in that order (a least recently)."""

    NAMES = ("a", "b", "c", "d", "e")

    def setUp(self) -> None:
        self.cache = CdnCache(self.mktemp())
        for n, name in enumerate(self.NAMES):
            self.entry(name, 100, 1_000_000 + 100 * n)

    def entry(self, name: str, size: int, mtime: float) -> str:
        task_id = tid_of(name)
        path = self.cache.data_path(task_id)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * size)
        self.cache.save_meta(meta(task_id=task_id, length=size, piece_size=size, piece_digests=("d",)))
        os.utime(self.cache.meta_path(task_id), (mtime, mtime))
        return task_id

    def foreign(self, *parts: str) -> str:
        """A file dfly did not write, somewhere in the cache directory."""
        path = os.path.join(self.cache.repo, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"not dfly's" * 100)
        return path

    def quota(self, limit: int) -> DiskQuota:
        quota = DiskQuota(self.cache, limit)
        self.successResultOf(quota.start())
        return quota

    def on_disk(self) -> list[str]:
        return [name for name in self.NAMES if os.path.exists(self.cache.data_path(tid_of(name)))]

    def test_scan_lists_entries_oldest_first_by_meta_mtime(self) -> None:
        """scan() orders the entries by their .meta's mtime, not by name."""
        self.entry("z-oldest", 7, 500_000)
        found = scan(self.cache)
        self.assertEqual([task_id for _, task_id, _ in found], [tid_of(n) for n in ("z-oldest", *self.NAMES)])
        self.assertEqual(found[0][2], 7)

    def test_scan_ignores_files_dfly_did_not_write(self) -> None:
        """Odd names, task-id names under the wrong prefix and stray files are no entries."""
        self.foreign("download", tid_of("a")[:3], "notes.txt")
        self.foreign("download", "zzz", tid_of("stray"))
        self.foreign("download", "loose-file")
        self.foreign("elsewhere.bin")
        self.assertEqual(len(scan(self.cache)), 5)

    def test_under_the_limit_nothing_is_evicted(self) -> None:
        """500 bytes under a 500-byte limit: collect frees nothing."""
        quota = self.quota(500)
        self.assertEqual((self.successResultOf(quota.collect(lambda t: False)), self.on_disk()), (0, list(self.NAMES)))

    def test_collect_frees_down_to_ninety_percent_of_the_limit(self) -> None:
        """Over a 350-byte limit, collect evicts until at most 315 bytes are used."""
        quota = self.quota(350)
        freed = self.successResultOf(quota.collect(lambda t: False))
        self.assertEqual((freed, quota.index.used, len(self.on_disk())), (200, 300, 3))

    def test_collect_evicts_least_recently_used_first(self) -> None:
        """The entries with the oldest .meta times go first."""
        quota = self.quota(350)
        self.successResultOf(quota.collect(lambda t: False))
        self.assertEqual(self.on_disk(), ["c", "d", "e"])

    def test_touched_entry_is_evicted_last(self) -> None:
        """An entry used since the scan (touched) is the most recently used."""
        quota = self.quota(350)
        quota.index.touch(tid_of("a"), 100)
        self.successResultOf(quota.collect(lambda t: False))
        self.assertIn("a", self.on_disk())

    def test_collect_never_evicts_an_entry_in_use(self) -> None:
        """Entries in memory stay even when everything else must go."""
        quota = self.quota(150)
        keep = {tid_of("a"), tid_of("e")}
        self.successResultOf(quota.collect(lambda t: t in keep))
        self.assertEqual(self.on_disk(), ["a", "e"])

    def test_evicted_entry_loses_its_meta_too(self) -> None:
        """An evicted entry leaves neither data nor .meta behind."""
        quota = self.quota(150)
        self.successResultOf(quota.collect(lambda t: False))
        leftovers = [n for n in self.NAMES if os.path.exists(self.cache.meta_path(tid_of(n)))]
        self.assertEqual(leftovers, self.on_disk())

    def test_collect_leaves_foreign_files(self) -> None:
        """Files dfly did not write stay, however much must be freed."""
        paths = [
            self.foreign("download", tid_of("a")[:3], "notes.txt"),
            self.foreign("download", "zzz", tid_of("stray")),
            self.foreign("elsewhere.bin"),
        ]
        quota = self.quota(1)
        self.successResultOf(quota.collect(lambda t: False))
        self.assertEqual(([os.path.exists(p) for p in paths], self.on_disk()), ([True] * 3, []))

    def test_foreign_files_do_not_count_towards_the_quota(self) -> None:
        """A kilobyte of someone else's files does not push dfly's 500 bytes over a 500-byte limit."""
        self.foreign("download", tid_of("a")[:3], "notes.txt")
        quota = self.quota(500)
        self.assertEqual((quota.index.used, self.successResultOf(quota.collect(lambda t: False))), (500, 0))
