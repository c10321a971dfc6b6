"""The supernode's piece scheduler (`TaskSchedule`): examples, then properties.

The examples build their state through the public calls only (``add_peer``,
``piece_ready``, ``assign``, ``succeeded``, ``failed``, ``remove_peer``).
The properties drive random sequences of those calls against a small model
of the rules (who holds what, who blamed whom) and check, after every step,
the loads, the holder buckets and that each pull is the greedy choice the
rules describe; a last simulation checks that every peer finishes.
"""

from __future__ import annotations

import random
from typing import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from twisted.trial.unittest import SynchronousTestCase

from dfly.supernode.scheduler import (
    CDN_TASK_LIMIT,
    ELIMINATION,
    ISOLATION,
    MAX_RUNNING,
    MAX_UPLOADS,
    Peer,
    TaskSchedule,
)

CDN = "cdnnode:"


def schedule(ready: int = 30, cdn_limit: int = CDN_TASK_LIMIT, seed: int = 0) -> TaskSchedule:
    """A schedule whose CDN holds pieces ``0..ready-1``."""
    s = TaskSchedule(CDN, cdn_limit=cdn_limit, rng=random.Random(seed))
    if ready:
        s.piece_ready(ready - 1)
    return s


def join(s: TaskSchedule, cid: str, port: int = 15001, ip: str = "192.0.2.1") -> Peer:
    return s.add_peer(cid, ip, port)


def complete(s: TaskSchedule, cid: str) -> None:
    """``cid`` fetches every ready piece from whoever it is offered, all successfully."""
    peer = s.peers[cid]
    for _ in range(2 * s.ready + 2):
        for piece, _source in s.assign(cid):
            s.succeeded(cid, piece)
        if len(peer.have) == s.ready:
            return
    raise AssertionError(f"{cid} could not complete: has {sorted(peer.have)} of {s.ready}")


def drop_running(s: TaskSchedule, cid: str) -> None:
    """Give back ``cid``'s running pieces with a failure that blames nobody."""
    for piece in list(s.peers[cid].running):
        s.failed(cid, piece, "write")


def fail_from_cdn(s: TaskSchedule, cid: str, times: int) -> None:
    """``cid`` fails ``times`` CDN pieces (timeouts), then runs nothing."""
    while s.peers[cid].failures < times:
        chosen = s.assign(cid)
        assert chosen and all(source == CDN for _, source in chosen), chosen
        for piece, _source in chosen[: times - s.peers[cid].failures]:
            s.failed(cid, piece, "timeout")
        drop_running(s, cid)


def blame(s: TaskSchedule, source: str, times: int, kind: str = "refused") -> None:
    """``times`` fresh peers, on hosts of their own, each get a piece from ``source`` and report ``kind`` for it."""
    for n in range(times):
        cid = f"blamer-{source}-{n}-{len(s.peers)}"
        join(s, cid, ip=f"198.51.100.{len(s.peers) % 250}")
        chosen = dict(s.assign(cid))
        piece = next(p for p, src in chosen.items() if src == source)
        s.failed(cid, piece, kind)
        drop_running(s, cid)


def running_from(s: TaskSchedule, source: str) -> int:
    return sum(1 for peer in s.peers.values() for src in peer.running.values() if src == source)


def consistency_errors(s: TaskSchedule) -> list[str]:
    """What is wrong with the schedule's incremental state, judged from scratch."""
    errors = []
    entries = [(peer.cid, piece, src) for peer in s.peers.values() for piece, src in peer.running.items()]
    for peer in s.peers.values():
        if len(peer.running) > MAX_RUNNING:
            errors.append(f"{peer.cid} runs {len(peer.running)} > {MAX_RUNNING}")
        if peer.uploads > MAX_UPLOADS:
            errors.append(f"{peer.cid} uploads {peer.uploads} > {MAX_UPLOADS}")
        serving = sum(1 for _, _, src in entries if src == peer.cid)
        if peer.uploads != serving:
            errors.append(f"{peer.cid} counts {peer.uploads} uploads but serves {serving}")
        if set(peer.running) & peer.have:
            errors.append(f"{peer.cid} runs pieces it has: {sorted(set(peer.running) & peer.have)}")
        if any(not 0 <= n < s.ready for n in [*peer.running, *peer.have]):
            errors.append(f"{peer.cid} runs or has a piece that is not ready")
    from_cdn = [piece for _, piece, src in entries if src == s.cdn_cid]
    if s.cdn_uploads != len(from_cdn):
        errors.append(f"cdn_uploads {s.cdn_uploads} but {len(from_cdn)} pieces come from the CDN")
    if s.cdn_uploads > s.cdn_limit:
        errors.append(f"cdn_uploads {s.cdn_uploads} > cdn_limit {s.cdn_limit}")
    if len(set(from_cdn)) != len(from_cdn):
        errors.append(f"the CDN sends one piece to two peers: {sorted(from_cdn)}")
    if s.cdn_pieces != set(from_cdn):
        errors.append(f"cdn_pieces {sorted(s.cdn_pieces)} != pieces from the CDN {sorted(from_cdn)}")
    for piece in range(s.ready):
        holders = s.holders.get(piece)
        if holders is None:
            errors.append(f"ready piece {piece} has no holder list")
            continue
        usable = {p.cid for p in s.peers.values() if p.can_serve and piece in p.have}
        if len(holders) != len(set(holders)) or set(holders) != usable:
            errors.append(f"holders of {piece}: {list(holders)}, usable peers holding it: {sorted(usable)}")
        # The free view is lazy: every holder with a free slot is in it; a
        # member may have filled since; a holder out of it knows the piece.
        free = {cid for cid in usable if s.peers[cid].uploads < MAX_UPLOADS}
        view = s.free_holders[piece]
        if not free <= set(view) or not set(view) <= usable or len(view) != len(set(view)):
            errors.append(f"free view of {piece}: {list(view)}, holders with a free slot: {sorted(free)}")
        for cid in usable - set(view):
            if piece not in s.peers[cid].evicted:
                errors.append(f"{cid} holds {piece}, is out of its free view, and would never return to it")
    for peer in s.peers.values():
        if len(peer.evicted) != len(set(peer.evicted)):
            errors.append(f"{peer.cid} was evicted twice from one view: {peer.evicted}")
        if peer.evicted and peer.uploads < MAX_UPLOADS:
            errors.append(f"{peer.cid} has a free slot but is still out of the views of {peer.evicted}")
        for piece in peer.evicted:
            if piece not in peer.have or peer.cid in s.free_holders[piece]:
                errors.append(f"{peer.cid} evicted from {piece}, but it {'is in its view' if piece in peer.have else 'does not hold it'}")
    available = {n for n in range(s.ready) if len(s.free_holders[n])}
    if s.available != available:
        errors.append(f"available {sorted(s.available)}, pieces with a free holder {sorted(available)}")
    for k, bucket in s.buckets.items():
        want = [n for n in range(s.ready) if s.holder_count(n) == k]
        if list(bucket) != want or not want:
            errors.append(f"bucket {k} is {list(bucket)}, the ready pieces with {k} holders are {want}")
    counts = {s.holder_count(n) for n in range(s.ready)}
    if set(s.buckets) != counts:
        errors.append(f"buckets for holder counts {list(s.buckets)}, the ready pieces have counts {sorted(counts)}")
    return errors


class OrderTests(SynchronousTestCase):
    """Which piece comes first."""

    def test_fresh_peer_gets_the_first_pieces_from_the_cdn(self) -> None:
        """With nobody holding anything, a new peer gets pieces 0-3 from the CDN."""
        s = schedule()
        join(s, "a")
        self.assertEqual(s.assign("a"), [(0, CDN), (1, CDN), (2, CDN), (3, CDN)])

    def test_rarest_piece_first(self) -> None:
        """Pieces with one holder come before nearer pieces with two."""
        s = schedule(ready=8)
        join(s, "h1")
        join(s, "h2")
        join(s, "a")
        complete(s, "h1")
        for piece, _ in s.assign("h2"):
            s.succeeded("h2", piece)
        self.assertEqual((s.peers["h2"].have, s.assign("a")), ({0, 1, 2, 3}, [(n, "h1") for n in (4, 5, 6, 7)]))

    def test_pieces_nobody_holds_come_before_held_ones(self) -> None:
        """A piece only the CDN has is rarer than one a peer holds, so it is taken first."""
        s = schedule(ready=8)
        join(s, "h")
        join(s, "a")
        for piece, _ in s.assign("h"):
            s.succeeded("h", piece)
        self.assertEqual(s.assign("a"), [(n, CDN) for n in (4, 5, 6, 7)])

    def test_nearest_to_the_centre_of_the_running_pieces(self) -> None:
        """Running 4, 6 and 7 (centre 5), the free piece nearest is 3: not 8 (next to the last), not 0 (lowest)."""
        s = schedule(ready=30, cdn_limit=8)
        join(s, "a")
        join(s, "b")
        self.assertEqual([n for n, _ in s.assign("b")], [0, 1, 2, 3])
        self.assertEqual([n for n, _ in s.assign("a")], [4, 5, 6, 7])  # 0-3 are in flight to b
        s.succeeded("a", 5)
        drop_running(s, "b")
        self.assertEqual(s.assign("a"), [(3, CDN)])

    @staticmethod
    def tie(seed: int) -> int:
        """Running 1-3 (centre 2), pieces 0 and 4 are as near: which one does a pull take?"""
        s = schedule(seed=seed)
        join(s, "a")
        s.assign("a")
        s.failed("a", 0, "write")
        [(piece, _)] = s.assign("a")
        return piece

    def test_equidistant_pieces_are_chosen_at_random(self) -> None:
        """Between two pieces as near to the centre, the seed decides, and both happen."""
        self.assertEqual({self.tie(seed) for seed in range(40)}, {0, 4})

    def test_same_seed_same_choices(self) -> None:
        """The tie-break draws from the schedule's rng only: one seed, one choice."""
        self.assertEqual([self.tie(seed) for seed in range(40)], [self.tie(seed) for seed in range(40)])


class LimitTests(SynchronousTestCase):
    """Caps on running pieces, uploads and the CDN."""

    def test_never_more_than_max_running(self) -> None:
        """A peer running MAX_RUNNING pieces gets nothing more, however much is free."""
        s = schedule(cdn_limit=100)
        join(s, "a")
        s.assign("a")
        self.assertEqual((s.assign("a"), len(s.peers["a"].running)), ([], MAX_RUNNING))

    def test_a_finished_piece_frees_one_slot(self) -> None:
        """After one success a full peer gets exactly one more piece."""
        s = schedule(cdn_limit=100)
        join(s, "a")
        s.assign("a")
        s.succeeded("a", 0)
        self.assertEqual(s.assign("a"), [(4, CDN)])

    def test_a_source_never_serves_more_than_max_uploads(self) -> None:
        """Once a holder serves MAX_UPLOADS pieces, the next pulls get the CDN instead."""
        s = schedule(ready=8)
        for cid in ("h", "d1", "d2", "d3"):
            join(s, cid)
        complete(s, "h")
        first = s.assign("d1")
        second = s.assign("d2")
        third = s.assign("d3")
        self.assertEqual(
            (first, second, third, s.peers["h"].uploads, running_from(s, "h")),
            ([(n, "h") for n in range(4)], [(0, "h"), (1, CDN), (2, CDN), (3, CDN)], [(0, CDN)],
             MAX_UPLOADS, MAX_UPLOADS),
        )

    def test_cdn_never_sends_more_than_cdn_limit(self) -> None:
        """With cdn_limit 3, one peer gets 3 CDN pieces and the next gets none."""
        s = schedule(cdn_limit=3)
        join(s, "a")
        join(s, "b")
        self.assertEqual((len(s.assign("a")), s.assign("b"), s.cdn_uploads), (3, [], 3))

    def test_cdn_sends_a_piece_to_one_peer_at_a_time(self) -> None:
        """While piece 0 is in flight from the CDN to one peer, no other peer gets it from the CDN."""
        s = schedule(ready=1)
        join(s, "a")
        join(s, "b")
        self.assertEqual((s.assign("a"), s.assign("b")), ([(0, CDN)], []))

    def test_a_piece_in_flight_from_the_cdn_comes_from_its_receiver_next(self) -> None:
        """Once the receiver has verified it, the next peer gets the piece from that receiver."""
        s = schedule(ready=1)
        join(s, "a")
        join(s, "b")
        s.assign("a")
        s.assign("b")
        s.succeeded("a", 0)
        self.assertEqual(s.assign("b"), [(0, "a")])

    def test_cdn_is_the_last_resort_for_a_held_piece(self) -> None:
        """A piece a free holder has comes from that holder, not from the CDN."""
        s = schedule(ready=4)
        join(s, "h")
        join(s, "a")
        complete(s, "h")
        self.assertEqual(s.assign("a"), [(n, "h") for n in range(4)])


class SourceTests(SynchronousTestCase):
    """A source has the piece; the peer does not."""

    def test_cdn_offers_only_ready_pieces(self) -> None:
        """With 2 pieces ready only those are offered; more come when they are ready."""
        s = schedule(ready=2)
        join(s, "a")
        first = s.assign("a")
        s.piece_ready(9)
        self.assertEqual((first, s.assign("a")), ([(0, CDN), (1, CDN)], [(2, CDN), (3, CDN)]))

    def test_nothing_ready_assigns_nothing(self) -> None:
        """Before the CDN has a piece there is nothing to hand out."""
        s = schedule(ready=0)
        join(s, "a")
        self.assertEqual(s.assign("a"), [])

    def test_a_peer_is_offered_only_for_the_pieces_it_holds(self) -> None:
        """Once the CDN's one slot is taken, h gives pieces it holds (0-3), never 5-7."""
        s = schedule(ready=8, cdn_limit=1)
        join(s, "h")
        join(s, "a")
        for _ in range(4):
            for piece, _ in s.assign("h"):
                s.succeeded("h", piece)
        self.assertEqual(
            (sorted(s.peers["h"].have), s.assign("a")),
            ([0, 1, 2, 3], [(4, CDN), (0, "h"), (1, "h"), (2, "h")]),
        )

    def test_never_a_piece_the_peer_has_or_runs(self) -> None:
        """After piece 0 succeeded and 1-3 run, the next piece is 4."""
        s = schedule(ready=6, cdn_limit=100)
        join(s, "a")
        s.assign("a")
        s.succeeded("a", 0)
        self.assertEqual(s.assign("a"), [(4, CDN)])

    def test_port_zero_peer_is_never_a_source(self) -> None:
        """A peer that serves nothing holds every piece, yet nobody is sent to it."""
        s = schedule(ready=4)
        join(s, "z", port=0)
        join(s, "a")
        complete(s, "z")
        self.assertEqual(
            ([s.holder_count(n) for n in range(4)], s.assign("a")),
            ([0, 0, 0, 0], [(n, CDN) for n in range(4)]),
        )


class BlameTests(SynchronousTestCase):
    """Failed pieces, blacklists and isolation."""

    def setUp(self) -> None:
        self.s = schedule(ready=8)
        join(self.s, "h")
        complete(self.s, "h")

    def test_failed_source_is_not_offered_to_that_peer_again(self) -> None:
        """After a digest mismatch from h, the peer gets that piece from the CDN."""
        s = schedule(ready=4)
        join(s, "h")
        join(s, "a")
        complete(s, "h")
        self.assertEqual(s.assign("a"), [(n, "h") for n in range(4)])
        s.failed("a", 0, "digest mismatch")
        self.assertEqual(s.assign("a"), [(0, CDN)])

    def test_failed_source_stays_off_for_that_peer(self) -> None:
        """The local blacklist outlives the piece: later pieces do not come from h either."""
        join(self.s, "a")
        self.s.assign("a")
        self.s.failed("a", 0, "short body")
        for piece in (1, 2, 3):
            self.s.succeeded("a", piece)
        self.assertEqual(sorted(self.s.assign("a")), [(0, CDN), (4, CDN), (5, CDN), (6, CDN)])

    def test_local_blacklist_is_local(self) -> None:
        """Another peer still gets pieces from a source that failed someone else once."""
        join(self.s, "a")
        join(self.s, "b")
        self.s.assign("a")
        self.s.failed("a", 0, "digest mismatch")
        drop_running(self.s, "a")
        self.assertEqual(self.s.assign("b"), [(n, "h") for n in range(4)])

    def test_four_faults_do_not_eliminate_a_source(self) -> None:
        """A source blamed ELIMINATION - 1 times is still offered to others."""
        blame(self.s, "h", ELIMINATION - 1)
        join(self.s, "c")
        self.assertEqual(self.s.assign("c"), [(n, "h") for n in range(4)])

    def test_five_faults_eliminate_a_source(self) -> None:
        """A source blamed ELIMINATION times is offered to nobody and holds nothing."""
        blame(self.s, "h", ELIMINATION)
        join(self.s, "c")
        self.assertEqual(
            (self.s.assign("c"), [self.s.holder_count(n) for n in range(8)]),
            ([(n, CDN) for n in range(4)], [0] * 8),
        )

    def test_unreachable_from_two_hosts_eliminates(self) -> None:
        """"Unreachable" reports from two hosts take a source off for everybody."""
        blame(self.s, "h", 2, kind="unreachable")
        join(self.s, "c")
        self.assertEqual(self.s.assign("c"), [(n, CDN) for n in range(4)])

    def test_one_host_cannot_eliminate_a_source(self) -> None:
        """A hostile client's cids all share its address: however many say "unreachable", others keep h."""
        for n in range(3):
            join(self.s, f"liar-{n}", ip="203.0.113.9")
            chosen = dict(self.s.assign(f"liar-{n}"))
            self.s.failed(f"liar-{n}", next(p for p, src in chosen.items() if src == "h"), "unreachable")
            drop_running(self.s, f"liar-{n}")
        join(self.s, "c")
        self.assertEqual((self.s.peers["h"].eliminated, self.s.assign("c")), (False, [(n, "h") for n in range(4)]))

    def test_eliminated_peer_does_not_become_a_holder_again(self) -> None:
        """A piece an eliminated peer verifies later does not make it a source."""
        blame(self.s, "h", 2, kind="unreachable")
        self.s.piece_ready(8)
        self.assertEqual(self.s.assign("h"), [(8, CDN)])
        self.s.succeeded("h", 8)
        self.assertEqual(self.s.holder_count(8), 0)

    def test_own_trouble_blames_nobody(self) -> None:
        """A "write" failure neither blacklists the source nor counts against anyone."""
        join(self.s, "a")
        self.s.assign("a")
        self.s.failed("a", 0, "write")
        a, h = self.s.peers["a"], self.s.peers["h"]
        sources = [src for _, src in self.s.assign("a")]
        self.assertEqual((a.blacklist, a.failures, h.service_errors, sources), (set(), 0, 0, ["h"]))

    def test_unknown_kind_blames_nobody(self) -> None:
        """A kind the schedule does not know (an old client's empty one) blames nobody."""
        join(self.s, "a")
        self.s.assign("a")
        self.s.failed("a", 0, "")
        self.assertEqual((self.s.peers["a"].blacklist, self.s.peers["h"].service_errors), (set(), 0))

    def test_cdn_failure_blacklists_nothing(self) -> None:
        """A failed CDN piece counts against the peer but the CDN stays available to it."""
        s = schedule()
        join(s, "a")
        fail_from_cdn(s, "a", 1)
        sources = [src for _, src in s.assign("a")]
        self.assertEqual((s.peers["a"].failures, s.peers["a"].blacklist, sources), (1, set(), [CDN] * 4))

    def test_isolated_peer_gets_cdn_pieces_only(self) -> None:
        """With more than ISOLATION failed pieces a peer is served by the CDN, even when h is free."""
        s = schedule(ready=8)
        join(s, "a")
        fail_from_cdn(s, "a", ISOLATION + 1)
        join(s, "h")
        complete(s, "h")
        self.assertEqual([src for _, src in s.assign("a")], [CDN] * 4)

    def test_isolation_starts_after_isolation_failures(self) -> None:
        """Exactly ISOLATION failed pieces are not yet isolation: h serves the peer."""
        s = schedule(ready=8)
        join(s, "a")
        fail_from_cdn(s, "a", ISOLATION)
        join(s, "h")
        complete(s, "h")
        self.assertEqual([src for _, src in s.assign("a")], ["h"] * 4)

    def test_isolated_peer_waits_for_the_cdn(self) -> None:
        """An isolated peer gets nothing while the CDN is full, though h could serve it."""
        s = schedule(ready=8, cdn_limit=1)
        join(s, "a")
        fail_from_cdn(s, "a", ISOLATION + 1)
        join(s, "h")
        complete(s, "h")
        s.piece_ready(8)
        join(s, "busy")
        self.assertEqual(s.assign("busy")[0], (8, CDN))  # the CDN's one slot
        self.assertEqual(s.assign("a"), [])


class MembershipTests(SynchronousTestCase):
    """Peers leaving, and reports that do not match."""

    def test_removed_peer_frees_its_cdn_slots(self) -> None:
        """The CDN pieces a removed peer ran go to the next peer at once."""
        s = schedule()
        join(s, "a")
        join(s, "b")
        s.assign("a")
        s.remove_peer("a")
        freed = (s.cdn_uploads, set(s.cdn_pieces))
        self.assertEqual((freed, s.assign("b")), ((0, set()), [(n, CDN) for n in range(4)]))

    def test_removed_peer_frees_its_sources_upload_slots(self) -> None:
        """A holder's upload count drops by the pieces the removed peer was fetching from it."""
        s = schedule(ready=8)
        join(s, "h")
        join(s, "a")
        complete(s, "h")
        s.assign("a")
        s.remove_peer("a")
        self.assertEqual(s.peers["h"].uploads, 0)

    def test_removed_peer_is_no_longer_a_holder(self) -> None:
        """Its pieces move down to bucket 0 and the next peer gets them from the CDN."""
        s = schedule(ready=8)
        join(s, "h")
        join(s, "a")
        complete(s, "h")
        s.remove_peer("h")
        self.assertEqual(
            (s.buckets[0], [s.holder_count(n) for n in range(8)], s.assign("a")),
            (list(range(8)), [0] * 8, [(n, CDN) for n in range(4)]),
        )

    def test_removing_an_unknown_peer_changes_nothing(self) -> None:
        """remove_peer of a cid that is not there is harmless."""
        s = schedule()
        join(s, "a")
        s.assign("a")
        s.remove_peer("stranger")
        self.assertEqual((sorted(s.peers), s.cdn_uploads, consistency_errors(s)), (["a"], 4, []))

    def test_adding_a_peer_twice_keeps_its_state(self) -> None:
        """A second add_peer of the same cid returns the same peer, running pieces and all."""
        s = schedule()
        first = join(s, "a")
        s.assign("a")
        self.assertEqual((join(s, "a") is first, sorted(first.running)), (True, [0, 1, 2, 3]))

    def test_succeeded_is_false_for_a_piece_never_assigned(self) -> None:
        """A peer cannot claim a piece it was not given; nothing changes."""
        s = schedule()
        join(s, "a")
        s.assign("a")
        self.assertEqual((s.succeeded("a", 9), s.peers["a"].have, s.holder_count(9)), (False, set(), 0))

    def test_repeated_success_report_is_accepted(self) -> None:
        """A second report of a piece the peer has is True and counts it once."""
        s = schedule()
        join(s, "a")
        s.assign("a")
        s.succeeded("a", 0)
        self.assertEqual((s.succeeded("a", 0), s.holder_count(0)), (True, 1))

    def test_failure_of_a_piece_not_running_changes_nothing(self) -> None:
        """A late or bogus failure report neither counts nor blacklists."""
        s = schedule(ready=8)
        join(s, "h")
        join(s, "a")
        complete(s, "h")
        s.failed("a", 3, "digest mismatch")
        self.assertEqual((s.peers["a"].failures, s.peers["a"].blacklist, s.peers["h"].service_errors), (0, set(), 0))

    def test_buckets_follow_holders(self) -> None:
        """After successes and a departure, bucket k holds exactly the pieces with k holders."""
        s = schedule(ready=8)
        for cid in ("h1", "h2", "a"):
            join(s, cid)
        complete(s, "h1")
        for piece, _ in s.assign("h2"):
            s.succeeded("h2", piece)
        s.assign("a")
        s.succeeded("a", 4)
        s.remove_peer("h1")
        self.assertEqual(([list(s.buckets[k]) for k in (0, 1)], consistency_errors(s)), ([[5, 6, 7], [0, 1, 2, 3, 4]], []))


# --- properties ----------------------------------------------------------------------

PIECES = 12
#: What each kind of failure costs its source, as the design says (not read
#: from the module, so a changed table shows).
COSTS = {"unreachable": ELIMINATION, "refused": 1, "not found": 1, "digest mismatch": 1, "short body": 1, "timeout": 1}
#: Kinds a peer reports: the source's faults, our own trouble, and unknown ones.
KINDS = sorted(COSTS) + ["write", "invalid", ""]


class ScheduleMachine(RuleBasedStateMachine):
    """Random calls against a model of the rules; every pull is checked against the model.

    The model knows, from the calls alone, what each peer has and runs, whom it
    blamed (local blacklist), how much each source was blamed (global
    blacklist) and how many failed pieces each peer had (isolation).
    """

    def __init__(self) -> None:
        super().__init__()
        self.s: TaskSchedule | None = None
        self.ports: dict[str, int] = {}
        self.have: dict[str, set[int]] = {}
        self.running: dict[str, dict[int, str]] = {}
        self.last: dict[str, int] = {}
        self.blamed: dict[str, set[str]] = {}  # cid -> sources it blamed
        self.faults: dict[str, int] = {}  # cid -> cost blamed on it while it served
        self.ips: dict[str, str] = {}
        self.blamers: dict[str, set[str]] = {}  # cid -> addresses of the peers that blamed it while it served
        self.eliminated: dict[str, bool] = {}
        self.failures: dict[str, int] = {}
        self.born = 0

    @initialize(
        cdn_limit=st.integers(min_value=1, max_value=5),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        serving=st.lists(st.booleans(), max_size=5),
        ready=st.integers(min_value=0, max_value=PIECES),
    )
    def start(self, cdn_limit: int, seed: int, serving: list[bool], ready: int) -> None:
        self.s = TaskSchedule(CDN, cdn_limit=cdn_limit, rng=random.Random(seed))
        if ready:
            self.s.piece_ready(ready - 1)
        for serves in serving:
            self.add_peer(serves)

    # --- the model ---

    def serves(self, cid: str) -> bool:
        return cid in self.ports and self.ports[cid] > 0 and not self.eliminated[cid]

    def holders(self, piece: int) -> set[str]:
        return {c for c in self.ports if self.serves(c) and piece in self.have[c]}

    def allowed(self, cid: str, piece: int, uploads: dict[str, int], cdn_pieces: set[int]) -> set[str]:
        """Sources the rules allow for ``cid`` and ``piece`` under these loads."""
        assert self.s is not None
        if self.failures[cid] <= ISOLATION:
            free = {
                h for h in self.holders(piece)
                if h != cid and h not in self.blamed[cid] and uploads[h] < MAX_UPLOADS
            }
            if free:
                return free  # the CDN is the last resort
        cdn_free = len(cdn_pieces) < self.s.cdn_limit and piece not in cdn_pieces and piece < self.s.ready
        return {CDN} if cdn_free else set()

    def cid(self, i: int) -> str:
        return sorted(self.ports)[i % len(self.ports)]

    def entry(self, i: int, j: int) -> tuple[str, int]:
        entries = sorted((c, p) for c, run in self.running.items() for p in run)
        return entries[(i * 7 + j) % len(entries)]

    # --- rules ---

    @precondition(lambda self: self.s is not None and len(self.ports) < 8)
    @rule(serves=st.booleans())
    def add_peer(self, serves: bool) -> None:
        assert self.s is not None
        # Always a fresh cid (the model keeps no history of removed cids);
        # a cid added again after its removal is covered by RegressionTests.
        cid = f"p{self.born}"
        self.born += 1
        port = 15000 + self.born if serves else 0
        ip = f"192.0.2.{self.born % 3}"  # some peers share a host
        self.s.add_peer(cid, ip, port)
        self.ports[cid], self.ips[cid] = port, ip
        self.have[cid], self.running[cid], self.last[cid] = set(), {}, 0
        self.blamed[cid], self.faults[cid], self.failures[cid] = set(), 0, 0
        self.blamers[cid], self.eliminated[cid] = set(), False

    @precondition(lambda self: self.s is not None and self.ports)
    @rule(i=st.integers(min_value=0, max_value=20))
    def add_peer_again(self, i: int) -> None:
        assert self.s is not None
        cid = self.cid(i)
        peer = self.s.peers[cid]
        assert self.s.add_peer(cid, "198.51.100.7", 1) is peer
        assert (peer.ip, peer.port) == (self.ips[cid], self.ports[cid])

    @precondition(lambda self: self.s is not None)
    @rule(piece=st.integers(min_value=0, max_value=PIECES - 1))
    def piece_ready(self, piece: int) -> None:
        assert self.s is not None
        self.s.piece_ready(piece)

    @precondition(lambda self: self.s is not None and self.ports)
    @rule(i=st.integers(min_value=0, max_value=20))
    def assign(self, i: int) -> None:
        self.check_assign(self.cid(i))

    @precondition(lambda self: self.s is not None and self.ports)
    @rule()
    def everyone_pulls(self) -> None:
        for cid in sorted(self.ports):
            self.check_assign(cid)

    def check_assign(self, cid: str) -> None:
        """One pull: each piece is a greedy (rarest, nearest) pick with a source the rules allow."""
        assert self.s is not None
        s = self.s
        running = self.running[cid]
        need = MAX_RUNNING - len(running)
        centre = sum(running) // len(running) if running else self.last[cid]
        uploads = {c: 0 for c in self.ports}
        for run in self.running.values():
            for source in run.values():
                if source in uploads:
                    uploads[source] += 1
        cdn_pieces = {p for run in self.running.values() for p, src in run.items() if src == CDN}
        rarity = {p: len(self.holders(p)) for p in range(s.ready)}
        chosen = s.assign(cid)
        assert len(chosen) <= max(need, 0), (need, chosen)
        taken: set[int] = set()

        def candidates() -> dict[int, set[str]]:
            found = {}
            for p in range(s.ready):
                if p in self.have[cid] or p in running or p in taken:
                    continue
                sources = self.allowed(cid, p, uploads, cdn_pieces)
                if sources:
                    found[p] = sources
            return found

        for piece, source in chosen:
            free = candidates()
            assert piece in free, f"{cid} got piece {piece} from {source}: not a candidate ({sorted(free)})"
            assert source in free[piece], f"{cid} got {piece} from {source}; the rules allow {free[piece]}"
            best = min((rarity[p], abs(p - centre)) for p in free)
            assert (rarity[piece], abs(piece - centre)) == best, (
                f"{cid} got {piece} (holders {rarity[piece]}, distance {abs(piece - centre)}), "
                f"but a piece with (holders, distance) {best} was free; centre {centre}"
            )
            taken.add(piece)
            if source == CDN:
                cdn_pieces.add(piece)
            else:
                uploads[source] += 1
        if len(chosen) < need:
            left = candidates()
            assert not left, f"{cid} got {chosen} but pieces {sorted(left)} had a free source"
        for piece, source in chosen:
            running[piece] = source
            self.last[cid] = piece

    @precondition(lambda self: self.s is not None and len(self.ports) >= 2)
    @rule(i=st.integers(min_value=0, max_value=20), j=st.integers(min_value=0, max_value=20))
    def assign_from(self, i: int, j: int) -> None:
        """A freed slot of one source handed to one pull: the rarest, nearest piece that source may give."""
        assert self.s is not None
        cid, source = self.cid(i), self.cid(j)
        running = self.running[cid]
        uploads = sum(1 for run in self.running.values() for src in run.values() if src == source)
        allowed = (
            cid != source and self.serves(source) and source not in self.blamed[cid]
            and uploads < MAX_UPLOADS and self.failures[cid] <= ISOLATION and len(running) < MAX_RUNNING
        )
        candidates = self.have[source] - self.have[cid] - set(running) if allowed else set()
        centre = sum(running) // len(running) if running else self.last[cid]
        got = self.s.assign_from(cid, source)
        if not candidates:
            assert got is None, (cid, source, got)
            return
        assert got is not None and got[1] == source and got[0] in candidates, (cid, source, got, candidates)
        best = min((len(self.holders(p)), abs(p - centre)) for p in candidates)
        assert (len(self.holders(got[0])), abs(got[0] - centre)) == best, (got, best)
        running[got[0]] = source
        self.last[cid] = got[0]

    @precondition(lambda self: any(self.running.values()))
    @rule(i=st.integers(min_value=0, max_value=20), j=st.integers(min_value=0, max_value=20))
    def succeed(self, i: int, j: int) -> None:
        assert self.s is not None
        cid, piece = self.entry(i, j)
        assert self.s.succeeded(cid, piece) is True
        del self.running[cid][piece]
        self.have[cid].add(piece)

    @precondition(lambda self: any(self.running.values()))
    @rule(ends=st.lists(st.sampled_from(["ok", "ok", "ok", "wait"] + KINDS), min_size=1, max_size=24))
    def fetches_end(self, ends: list[str]) -> None:
        """Running fetches end in order: "ok" succeeds, "wait" keeps running, a kind fails."""
        entries = sorted((c, p) for c, run in self.running.items() for p in run)
        for (cid, piece), end in zip(entries, ends):
            if end == "ok":
                assert self.s is not None and self.s.succeeded(cid, piece) is True
                del self.running[cid][piece]
                self.have[cid].add(piece)
            elif end != "wait":
                self.report_failure(cid, piece, end)

    @precondition(lambda self: self.s is not None and self.ports)
    @rule(i=st.integers(min_value=0, max_value=20), piece=st.integers(min_value=0, max_value=PIECES - 1))
    def claim_unassigned(self, i: int, piece: int) -> None:
        assert self.s is not None
        cid = self.cid(i)
        if piece in self.running[cid] or piece in self.have[cid] or piece >= self.s.ready:
            return
        before = (self.s.holder_count(piece), self.s.cdn_uploads)
        assert self.s.succeeded(cid, piece) is False
        after = (self.s.holder_count(piece), self.s.cdn_uploads)
        assert piece not in self.s.peers[cid].have and after == before, (piece, before, after)

    @precondition(lambda self: any(self.running.values()))
    @rule(
        i=st.integers(min_value=0, max_value=20), j=st.integers(min_value=0, max_value=20), kind=st.sampled_from(KINDS)
    )
    def fail(self, i: int, j: int, kind: str) -> None:
        cid, piece = self.entry(i, j)
        self.report_failure(cid, piece, kind)

    def report_failure(self, cid: str, piece: int, kind: str) -> None:
        assert self.s is not None
        self.s.failed(cid, piece, kind)
        source = self.running[cid].pop(piece)
        cost = COSTS.get(kind, 0)
        if not cost:
            return
        self.failures[cid] += 1
        if source == CDN:
            return
        self.blamed[cid].add(source)
        if self.serves(source):
            self.faults[source] += cost
            self.blamers[source].add(self.ips[cid])
            # Elimination needs the faults and reports from two hosts.
            self.eliminated[source] = self.faults[source] >= ELIMINATION and len(self.blamers[source]) >= 2

    @precondition(lambda self: self.s is not None and self.ports)
    @rule(i=st.integers(min_value=0, max_value=20), piece=st.integers(min_value=0, max_value=PIECES - 1),
          kind=st.sampled_from(KINDS))
    def fail_not_running(self, i: int, piece: int, kind: str) -> None:
        assert self.s is not None
        cid = self.cid(i)
        if piece in self.running[cid]:
            return
        self.s.failed(cid, piece, kind)  # ignored: the invariants check nothing moved

    @precondition(lambda self: self.s is not None and self.ports)
    @rule(i=st.integers(min_value=0, max_value=20))
    def remove_peer(self, i: int) -> None:
        assert self.s is not None
        cid = self.cid(i)
        self.s.remove_peer(cid)
        for table in (self.ports, self.have, self.running, self.last, self.blamed, self.faults, self.failures,
                      self.ips, self.blamers, self.eliminated):
            del table[cid]

    # --- invariants ---

    @invariant()
    def state_is_consistent(self) -> None:
        if self.s is None:
            return
        errors = consistency_errors(self.s)
        assert not errors, errors

    @invariant()
    def state_matches_the_model(self) -> None:
        if self.s is None:
            return
        s = self.s
        assert set(s.peers) == set(self.ports), (sorted(s.peers), sorted(self.ports))
        for cid, peer in s.peers.items():
            assert (peer.have, peer.running) == (self.have[cid], self.running[cid]), cid
            assert peer.blacklist == self.blamed[cid], (cid, peer.blacklist, self.blamed[cid])
            assert peer.failures == self.failures[cid], (cid, peer.failures, self.failures[cid])
            assert peer.can_serve == self.serves(cid), cid
        for piece in range(s.ready):
            assert set(s.holders[piece]) == self.holders(piece), piece


class ScheduleMachineTests(SynchronousTestCase):
    def test_random_call_sequences_keep_every_rule(self) -> None:
        """Any sequence of calls keeps the caps, the blacklists, the buckets and the greedy order."""
        run_state_machine_as_test(
            ScheduleMachine,
            settings=settings(
                max_examples=250, stateful_step_count=60, deadline=None, report_multiple_bugs=False,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )


def simulate(serving: list[bool], pieces: int, cdn_limit: int, seed: int, leave: bool) -> tuple[int, str]:
    """Peers pull and fetch until every one that stays has every piece.

    Every fetch succeeds, except fetches from a peer that has left, which
    fail as "unreachable" (the CDN is always there).  The CDN's pieces arrive
    a few at a time; each round every peer pulls (in random order), then
    some of the running fetches end (at least one).  Returns the rounds
    taken and, if the run stalled, why.
    """
    rng = random.Random(seed)
    s = TaskSchedule(CDN, cdn_limit=cdn_limit, rng=random.Random(seed + 1))
    for n, serves in enumerate(serving):
        s.add_peer(f"p{n}", "192.0.2.1", 15000 + n if serves else 0)
    gone: set[str] = set()
    limit = pieces * len(serving) * 2 + pieces + 10
    for rounds in range(1, limit + 1):
        if s.ready < pieces:
            s.piece_ready(min(pieces - 1, s.ready + rng.randrange(3)))
        if leave and len(s.peers) > 1 and rng.random() < 0.1:
            cid = rng.choice(sorted(s.peers))
            s.remove_peer(cid)
            gone.add(cid)
        cids = sorted(s.peers)
        rng.shuffle(cids)
        for cid in cids:
            s.assign(cid)
        errors = consistency_errors(s)
        if errors:
            return rounds, f"inconsistent: {errors}"
        if all(len(p.have) == pieces for p in s.peers.values()):
            return rounds, ""
        entries = [(cid, piece, src) for cid, p in s.peers.items() for piece, src in p.running.items()]
        if not entries:
            lacking = {cid: sorted(set(range(s.ready)) - p.have) for cid, p in s.peers.items()}
            if any(lacking.values()):
                return rounds, f"stalled: nothing runs, yet peers lack ready pieces {lacking}"
            continue
        ending = [e for e in entries if rng.random() < 0.5] or [rng.choice(entries)]
        for cid, piece, src in ending:
            if src in gone:
                s.failed(cid, piece, "unreachable")
            else:
                s.succeeded(cid, piece)
    return limit, f"not finished after {limit} rounds"


class LivenessTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, report_multiple_bugs=False)
    @given(
        serving=st.lists(st.booleans(), min_size=1, max_size=6),
        pieces=st.integers(min_value=1, max_value=24),
        cdn_limit=st.integers(min_value=1, max_value=4),
        seed=st.integers(min_value=0, max_value=2**32 - 1),
        leave=st.booleans(),
    )
    def test_every_peer_finishes(
        self, serving: list[bool], pieces: int, cdn_limit: int, seed: int, leave: bool
    ) -> None:
        """When fetches succeed, every peer that stays gets every piece within a bounded number of rounds."""
        rounds, problem = simulate(serving, pieces, cdn_limit, seed, leave)
        self.assertEqual(problem, "", f"after {rounds} rounds")

    def test_many_peers_share_the_cdn_load(self) -> None:
        """Twenty peers fetch a 40-piece file while the CDN sends about one copy of each piece."""
        s = TaskSchedule(CDN, rng=random.Random(3))
        s.piece_ready(39)
        for n in range(20):
            s.add_peer(f"p{n}", "192.0.2.1", 15000 + n)
        from_cdn = 0
        for _ in range(400):
            for cid in sorted(s.peers):
                from_cdn += sum(1 for _, src in s.assign(cid) if src == CDN)
            for cid, peer in s.peers.items():
                for piece in list(peer.running):
                    s.succeeded(cid, piece)
            if all(len(p.have) == 40 for p in s.peers.values()):
                break
        self.assertEqual((all(len(p.have) == 40 for p in s.peers.values()), from_cdn <= 2 * 40), (True, True), from_cdn)


class RegressionTests(SynchronousTestCase):
    """Bugs found while writing these tests, fixed in scheduler.py."""

    def test_pieces_the_peer_has_do_not_hide_the_pieces_it_lacks(self) -> None:
        """A peer holding 300 pieces alone still gets pieces 0-99 that two idle holders offer."""
        s = schedule(ready=100)
        for cid in ("y", "z", "x"):
            join(s, cid)
        complete(s, "y")
        complete(s, "z")  # pieces 0-99: two holders each, both idle
        s.piece_ready(399)
        for _ in range(75):  # x takes 100-399 from the CDN, four at a time
            for piece, _ in s.assign("x"):
                s.succeeded("x", piece)
        self.assertEqual(s.peers["x"].have, set(range(100, 400)))
        chosen = s.assign("x")
        self.assertEqual(
            (len(chosen), all(n < 100 and src in ("y", "z") for n, src in chosen)), (MAX_RUNNING, True), chosen
        )


    def test_cid_registered_again_does_not_let_its_source_exceed_max_uploads(self) -> None:
        """A cid removed and added again while others still fetch from it never serves over MAX_UPLOADS."""
        s = schedule(ready=8)
        join(s, "h")
        join(s, "d")
        complete(s, "h")
        s.assign("d")  # four pieces from h
        s.remove_peer("h")
        join(s, "h")  # the same cid registers again
        complete(s, "h")
        join(s, "e0")
        s.assign("e0")  # the new h serves e0
        for piece in list(s.peers["d"].running):
            s.succeeded("d", piece)  # d's fetches from the first h end: they must not free the new h's slots
        for cid in ("e1", "e2"):
            join(s, cid)
            s.assign(cid)
        self.assertLessEqual(running_from(s, "h"), MAX_UPLOADS)


class BusyCdnWalkTests(SynchronousTestCase):
    """With the CDN busy, a pull of many pieces never walks the pieces nobody holds (bucket 0)."""

    def setUp(self) -> None:
        # h and c hold pieces 0-99; 100-999 are cached but held by nobody.
        self.s = schedule(ready=100, cdn_limit=1)
        for cid in ("h", "c"):
            join(self.s, cid)
            complete(self.s, cid)
        self.s.piece_ready(999)
        self.walked: list[int] = []
        real = TaskSchedule._walk

        def counted(s: TaskSchedule, center: int) -> Iterator[int]:
            for piece in real(s, center):
                self.walked.append(piece)
                yield piece

        self.patch(TaskSchedule, "_walk", counted)

    def unheld_walked(self) -> int:
        return sum(1 for n in self.walked if self.s.holder_count(n) == 0)

    def test_busy_cdn_walk_yields_no_unheld_piece(self) -> None:
        """The CDN full, a new peer lacking 100 held pieces walks only those it is given."""
        self.s.assign("c")  # takes the CDN's only slot
        self.assertFalse(self.s.cdn_free())
        self.walked.clear()
        join(self.s, "d")
        chosen = self.s.assign("d")
        self.assertEqual(
            (len(chosen), {src for _, src in chosen} <= {"h", "c"}, self.unheld_walked(), len(self.walked)),
            (MAX_RUNNING, True, 0, MAX_RUNNING),
        )

    def test_walk_leaves_unheld_pieces_once_the_cdn_fills(self) -> None:
        """A peer lacking 900 unheld pieces takes the CDN's one slot, then walks none of the other 899."""
        chosen = self.s.assign("c")
        self.assertEqual((chosen, self.unheld_walked()), ([(100, CDN)], 1))
