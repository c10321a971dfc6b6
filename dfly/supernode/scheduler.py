"""Which piece each peer fetches next, and from whom (pure: no I/O, no clock).

One `TaskSchedule` per task.  Every operation costs a bound that does not
depend on how many peers hold a piece or are in the task:

- ``buckets`` maps a holder count ``k`` to the sorted pieces that exactly
  ``k`` usable peers hold, with only non-empty counts present, so "rarest
  first" walks the non-empty buckets (at most one per piece) and "nearest to
  the centre" is a bisect and an outward walk inside one; moving a piece
  between buckets is O(log pieces);
- each piece keeps its holders and, apart, its *free view*: the holders
  that may have a free upload slot (`IndexedSet`: O(1) add, remove and
  random pick).  The view is cleaned lazily: a source whose slots fill
  stays in the views of its pieces until a pick meets it there, which
  evicts it (O(1)) and notes the piece on the source; when a slot frees
  it goes back only into the views it was evicted from.  So a source
  filling and freeing costs O(1) amortized instead of O(its pieces) each
  time (at 10,000 peers that was 9 % of the supernode's CPU), picking a
  source costs O(1 + the picker's blacklist) amortized, and a departing
  peer costs O(pieces it held);
- every peer knows its own pieces, running pieces (with their source),
  upload load, failures and local blacklist.

Rules (Dragonfly's, with its 0.4 bugs fixed), limits from `SchedulerPolicy`:
at most ``max_running`` pieces per downloading peer; a source serves at most
``max_uploads`` at once; the CDN serves at most ``cdn_task_limit`` pieces of
a task at once, each to one peer at a time, and only when no peer can; a
source that failed a peer is never offered to that peer again (local
blacklist); a source with ``elimination`` faults, reported from at least
two addresses, is offered to nobody (global blacklist); a peer with more than ``isolation`` failed pieces gets
CDN pieces only; a peer that is gone is dropped with everything it held and
ran.
"""

from __future__ import annotations

import random
from typing import Any, Container, Generic, Hashable, Iterable, Iterator, Mapping, TypeVar

import attrs
from sortedcontainers import SortedDict, SortedList

from dfly.supernode.policy import SchedulerPolicy

_DEFAULT = SchedulerPolicy()
#: Defaults of the policy, kept as names for the tests and the docs.
MAX_RUNNING = _DEFAULT.max_running
MAX_UPLOADS = _DEFAULT.max_uploads
ELIMINATION = _DEFAULT.elimination
ISOLATION = _DEFAULT.isolation
CDN_TASK_LIMIT = _DEFAULT.cdn_task_limit
#: Distinct reporting addresses needed before a source is offered to nobody.
ELIMINATION_HOSTS = 2
SCAN_BUDGET = _DEFAULT.scan_budget

#: Failure kinds that are the source's fault, and how much each costs it
#: ("eliminate": the policy's whole elimination budget at once).
SOURCE_FAULTS = {
    "unreachable": "eliminate",  # nothing listens there: it is gone
    "refused": 1,
    "not found": 1,
    "digest mismatch": 1,
    "short body": 1,
    "timeout": 1,
}

#: A pull with at most this many candidate pieces has them sorted (rarest,
#: nearest); one with more walks the holder buckets, which finds its few
#: quickly (a new peer of a large file lacks them all).
SORT_LIMIT = 64

K = TypeVar("K", bound=Hashable)


class IndexedSet(Generic[K]):
    """A set with O(1) add, discard, index and random pick (list + positions)."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[K] = []
        self._pos: dict[K, int] = {}

    def add(self, item: K) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: K) -> None:
        i = self._pos.pop(item, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._pos[last] = i

    def __contains__(self, item: object) -> bool:
        return item in self._pos

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[K]:
        return iter(self._items)

    def pick(self, rng: random.Random, not_this: K, nor_these: Container[K]) -> K | None:
        """A random item, neither ``not_this`` nor in ``nor_these``: from a random start, the first that is not."""
        items = self._items
        n = len(items)
        i = int(rng.random() * n)
        for _ in range(n):
            item = items[i]
            if item != not_this and item not in nor_these:
                return item
            i = i + 1 if i + 1 < n else 0
        return None

    @staticmethod
    def add_to_each(sets: Mapping[Any, "IndexedSet[K]"], keys: Iterable[Any], item: K) -> None:
        """``sets[key].add(item)`` for every key, in one loop (a source's slot freed: all its pieces)."""
        for key in keys:
            s = sets[key]
            pos = s._pos
            if item not in pos:
                pos[item] = len(s._items)
                s._items.append(item)


@attrs.define(eq=False)
class Peer:
    """One download run (cid) of one task, as a downloader and as a source."""

    cid: str
    ip: str
    port: int  # 0: this peer serves nothing
    have: set[int] = attrs.Factory(set)
    running: dict[int, str] = attrs.Factory(dict)  # piece -> source cid
    uploads: int = 0
    failures: int = 0
    service_errors: int = 0
    blamed_from: set[str] = attrs.Factory(set)  # addresses of the peers whose reports blamed it
    eliminated: bool = False
    blacklist: set[str] = attrs.Factory(set)
    #: Pieces whose free view this peer left (a pick found it full, or it was
    #: full when it got the piece): it returns to them when a slot frees.
    evicted: list[int] = attrs.Factory(list)
    last_piece: int = 0
    # Bookkeeping of the supernode (the schedule itself never reads a clock):
    finished: bool = False
    pulls: int = 0  # pulls held open right now
    seen: float = 0.0  # when it last pulled or reported
    hung_up: bool = False  # its last held pull was closed by the peer
    secret: str = ""  # its registration's peer secret (pulls, reports and down must carry it)

    @property
    def can_serve(self) -> bool:
        return self.port > 0 and not self.eliminated


@attrs.define(eq=False)
class TaskSchedule:
    cdn_cid: str
    cdn_limit: int | None = None  # None: the policy's cdn_task_limit
    rng: random.Random = attrs.Factory(random.Random)
    policy: SchedulerPolicy = _DEFAULT
    peers: dict[str, Peer] = attrs.Factory(dict)
    ready: int = 0
    ready_pieces: set[int] = attrs.Factory(set)  # 0..ready-1, for set differences
    cdn_uploads: int = 0
    cdn_pieces: set[int] = attrs.Factory(set)  # pieces the CDN is sending right now
    holders: dict[int, IndexedSet[str]] = attrs.Factory(dict)
    #: Per piece, its free view: every holder with a free upload slot, and
    #: maybe some that filled since (evicted when a pick meets them).
    free_holders: dict[int, IndexedSet[str]] = attrs.Factory(dict)
    #: The pieces whose free view is not empty (a pull that finds none of
    #: its lacked pieces here, with the CDN busy, ends at once).
    available: set[int] = attrs.Factory(set)
    #: holder count -> sorted ready pieces with that many holders (no empty buckets).
    buckets: SortedDict = attrs.Factory(SortedDict)
    #: Uploads still running from cids that were removed (their downloaders
    #: report the ends later); a cid registered again starts from this count.
    _ghost_uploads: dict[str, int] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        if self.cdn_limit is None:
            self.cdn_limit = self.policy.cdn_task_limit

    # --- membership -------------------------------------------------------------

    def add_peer(self, cid: str, ip: str, port: int) -> Peer:
        peer = self.peers.get(cid)
        if peer is None:
            peer = self.peers[cid] = Peer(cid, ip, port)
            # Others may still be fetching from this cid's earlier run; their
            # ends release slots, so the count must include them.
            peer.uploads = self._ghost_uploads.pop(cid, 0)
        return peer

    def remove_peer(self, cid: str) -> Peer | None:
        """The peer is gone: free what it ran, forget what it held.  Returns it (None: unknown)."""
        peer = self.peers.pop(cid, None)
        if peer is None:
            return None
        for piece, source in peer.running.items():
            self._release(piece, source)
        peer.running.clear()
        if peer.uploads:
            self._ghost_uploads[cid] = peer.uploads
        if peer.can_serve:
            self._unhold_all(peer)
        return peer

    def piece_ready(self, piece: int) -> None:
        """The CDN holds pieces ``0..piece`` now (they arrive in order)."""
        while self.ready <= piece:
            self._bucket(0).add(self.ready)
            self.ready_pieces.add(self.ready)
            self.holders[self.ready] = IndexedSet()
            self.free_holders[self.ready] = IndexedSet()
            self.ready += 1

    # --- pulls --------------------------------------------------------------------

    def need(self, cid: str) -> int:
        """How many more pieces ``cid`` may run now."""
        return self.policy.max_running - len(self.peers[cid].running)

    def cdn_free(self) -> bool:
        assert self.cdn_limit is not None
        return self.cdn_uploads < self.cdn_limit

    def assign(self, cid: str) -> list[tuple[int, str]]:
        """Pieces for ``cid`` to fetch now, each with its source cid; marks them running."""
        peer = self.peers[cid]
        need = self.need(cid)
        if need <= 0:
            return []
        isolated = peer.failures > self.policy.isolation
        cdn_free = self.cdn_free()
        if isolated and not cdn_free:
            return []
        # What it lacks: a set difference in C, and with the CDN busy only
        # pieces some holder can serve now, so few candidates fail (then from
        # ``available``, a subset of the ready pieces and often far smaller).
        lacking = (self.ready_pieces if cdn_free else self.available) - peer.have
        if peer.running:
            lacking -= peer.running.keys()
        if not lacking:
            return []
        center = sum(peer.running) // len(peer.running) if peer.running else peer.last_piece
        if len(lacking) <= SORT_LIMIT:
            # Few candidates (most pulls): order them by rarity, then distance;
            # the walk would step over every piece the peer has or cannot get.
            # One int per piece, the piece in its low digits; the left/right
            # tie at equal distance goes to a side chosen at random per pull.
            holders, ready, flip = self.holders, self.ready, self.rng.random() < 0.5
            span = 2 * ready + 2
            keyed = [((len(holders[n]) * span + 2 * abs(n - center) + ((n < center) is flip)) * ready + n)
                     for n in lacking]
            if need == 1:  # a report's freed slot: the best one is enough, if it has a source
                chosen = self._take(peer, (min(keyed) % ready,), 1, isolated, cdn_free)
                if chosen:
                    return chosen
            keyed.sort()
            order: Iterable[int] = [key % ready for key in keyed]
        else:
            order = self._walk(center)
        return self._take(peer, order, need, isolated, cdn_free)

    def _walk(self, center: int) -> Iterator[int]:
        """Every ready piece a source could send, rarest first, then nearest to ``center`` (lazily: a pull needs the first few).

        Bucket 0 (no holder) is walked only while the CDN has a free slot:
        nobody else can send those pieces, so with the CDN busy `_take` would
        skip each one, and a new peer of a large file lacks thousands of them
        (11 ms an assign instead of 0.02).  The CDN is checked again before
        each of its pieces, since the pull's own CDN starts may fill it; it
        cannot free up meanwhile (an assign only starts pieces).
        """
        for held_by, bucket in self.buckets.items():
            if held_by:
                yield from self._nearest(bucket, center)
                continue
            for piece in self._nearest(bucket, center):
                if not self.cdn_free():
                    break
                yield piece

    def _take(self, peer: Peer, order: Iterable[int], need: int, isolated: bool, cdn_free: bool) -> list[tuple[int, str]]:
        """Start up to ``need`` of the pieces in ``order`` that have a source now, trying at most the scan budget."""
        chosen: list[tuple[int, str]] = []
        budget = self.policy.scan_budget
        for piece in order:
            if piece in peer.have or piece in peer.running:
                continue  # cheap, and not a candidate: does not count against the budget
            if not cdn_free and (isolated or piece not in self.available):
                if isolated:
                    break
                continue  # nobody but the busy CDN could send it
            budget -= 1
            if budget < 0:
                break
            source = self._source_for(peer, piece, isolated)
            if source is None:
                continue
            self._start(peer, piece, source)
            chosen.append((piece, source))
            if len(chosen) == need:
                break
            cdn_free = self.cdn_free()
        return chosen

    def assign_from(self, cid: str, source: str) -> tuple[int, str] | None:
        """One piece peer ``source`` can give ``cid`` right now, rarest then nearest; marks it running.

        The pull queue hands a freed upload slot (or a new holder's spare
        ones) to a held pull with this: it costs a set difference over the
        source's pieces, where a full `assign` would walk every bucket.
        """
        peer = self.peers[cid]
        if self.need(cid) <= 0 or cid == source or source in peer.blacklist or source == self.cdn_cid:
            return None
        src = self.peers.get(source)
        if src is None or not src.can_serve or src.uploads >= self.policy.max_uploads:
            return None
        if peer.failures > self.policy.isolation:
            return None  # isolated: the CDN only
        candidates = src.have - peer.have - peer.running.keys()
        if not candidates:
            return None
        center = sum(peer.running) // len(peer.running) if peer.running else peer.last_piece
        piece = min(candidates, key=lambda n: (len(self.holders[n]), abs(n - center), self.rng.random()))
        self._start(peer, piece, source)
        return piece, source

    def _nearest(self, bucket: SortedList, center: int) -> Iterable[int]:
        """The bucket's pieces by distance to ``center``, ties broken at random.

        Lazy: a pull usually needs only the first few.  Starting a piece
        never moves it between buckets, so ``bucket`` does not change while
        this runs.
        """
        right = bucket.bisect_left(center)
        left = right - 1
        while left >= 0 or right < len(bucket):
            if right >= len(bucket):
                take_left = True
            elif left < 0:
                take_left = False
            else:
                d_left, d_right = center - bucket[left], bucket[right] - center
                take_left = d_left < d_right or (d_left == d_right and self.rng.random() < 0.5)
            if take_left:
                yield bucket[left]
                left -= 1
            else:
                yield bucket[right]
                right += 1

    def _source_for(self, peer: Peer, piece: int, cdn_only: bool) -> str | None:
        if not cdn_only:
            free = self.free_holders.get(piece)
            if free:
                # The first member not excluded wins if it has a free slot;
                # one that filled since is evicted (paid for by its return).
                max_uploads = self.policy.max_uploads
                while True:
                    cid = free.pick(self.rng, peer.cid, peer.blacklist)
                    if cid is None:
                        break
                    src = self.peers[cid]
                    if src.uploads < max_uploads:
                        return cid
                    free.discard(cid)
                    src.evicted.append(piece)
                if not free:
                    self.available.discard(piece)
        # The CDN sends a piece to one peer at a time: the others get it from
        # that peer once it is verified, so the CDN sends each piece about once.
        if piece < self.ready and self.cdn_free() and piece not in self.cdn_pieces:
            return self.cdn_cid
        return None

    def _start(self, peer: Peer, piece: int, source: str) -> None:
        peer.running[piece] = source
        peer.last_piece = piece
        if source == self.cdn_cid:
            self.cdn_uploads += 1
            self.cdn_pieces.add(piece)
        else:
            self.peers[source].uploads += 1  # full or not, it stays in the free views until a pick meets it

    # --- reports ------------------------------------------------------------------

    def succeeded(self, cid: str, piece: int) -> bool:
        """``cid`` verified ``piece``; False when it was never assigned to it."""
        peer = self.peers[cid]
        if piece not in peer.running:
            return piece in peer.have
        self._release(piece, peer.running.pop(piece))
        peer.have.add(piece)
        if peer.can_serve:
            self._hold(piece, peer)
        return True

    def failed(self, cid: str, piece: int, kind: str) -> str | None:
        """``cid`` could not get ``piece`` from its source; blame it if it is its fault.

        Returns the cid of a source this failure eliminated (it serves no one
        from now on), else None.
        """
        peer = self.peers[cid]
        source = peer.running.pop(piece, None)
        if source is None:
            return None
        self._release(piece, source)
        cost = SOURCE_FAULTS.get(kind, 0)
        if not cost:
            return None  # our own trouble (disk, bad task): try again, blame nobody
        peer.failures += 1
        if source == self.cdn_cid:
            return None
        peer.blacklist.add(source)
        blamed = self.peers.get(source)
        if blamed is None or not blamed.can_serve:
            return None
        blamed.service_errors += self.policy.elimination if cost == "eliminate" else int(cost)
        blamed.blamed_from.add(peer.ip)
        # One client's reports never take a source off for everyone: it could
        # register a cid and say "unreachable" about each honest holder.  Its
        # own blacklist already spares it; elimination needs a second host.
        if blamed.service_errors < self.policy.elimination or len(blamed.blamed_from) < ELIMINATION_HOSTS:
            return None
        self._unhold_all(blamed)
        blamed.eliminated = True
        return source

    def _release(self, piece: int, source: str) -> None:
        if source == self.cdn_cid:
            self.cdn_uploads -= 1
            self.cdn_pieces.discard(piece)
            return
        peer = self.peers.get(source)
        if peer is None:
            ghost = self._ghost_uploads.get(source, 0)
            if ghost > 1:
                self._ghost_uploads[source] = ghost - 1
            else:
                self._ghost_uploads.pop(source, None)
            return
        if peer.uploads <= 0:
            return
        peer.uploads -= 1
        if peer.evicted and peer.uploads < self.policy.max_uploads and peer.can_serve:
            # A slot again: back into the views picks evicted it from.
            IndexedSet.add_to_each(self.free_holders, peer.evicted, source)
            self.available.update(peer.evicted)
            peer.evicted.clear()

    # --- holder buckets -------------------------------------------------------------

    def _hold(self, piece: int, peer: Peer) -> None:
        holders = self.holders[piece]
        self._move(piece, len(holders), len(holders) + 1)
        holders.add(peer.cid)
        if peer.uploads < self.policy.max_uploads:
            self.free_holders[piece].add(peer.cid)
            self.available.add(piece)
        else:
            peer.evicted.append(piece)  # joins the view when a slot frees

    def _unhold_all(self, peer: Peer) -> None:
        for piece in peer.have:
            holders = self.holders.get(piece)
            if holders is not None and peer.cid in holders:
                holders.discard(peer.cid)
                free = self.free_holders[piece]
                free.discard(peer.cid)
                if not free:
                    self.available.discard(piece)
                self._move(piece, len(holders) + 1, len(holders))
        peer.evicted.clear()

    def _bucket(self, count: int) -> SortedList:
        bucket = self.buckets.get(count)
        if bucket is None:
            bucket = self.buckets[count] = SortedList()
        return bucket

    def _move(self, piece: int, old: int, new: int) -> None:
        bucket = self.buckets[old]
        bucket.remove(piece)
        if not bucket:
            del self.buckets[old]
        self._bucket(new).add(piece)

    # --- for the pull queue, tests and invariant checks -------------------------------

    def holder_count(self, piece: int) -> int:
        return len(self.holders.get(piece, ()))

    def spare_uploads(self, cid: str) -> int:
        """How many more pieces ``cid`` could serve right now (0: not a source)."""
        peer = self.peers.get(cid)
        if peer is None or not peer.can_serve:
            return 0
        return max(self.policy.max_uploads - peer.uploads, 0)
