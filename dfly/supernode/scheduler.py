"""Which piece each peer fetches next, and from whom (pure: no I/O, no clock).

One `TaskSchedule` per task.  Its state is kept incremental so that a pull
costs about the number of pieces it hands out, however many peers there are:

- ``buckets[k]`` is the sorted list of ready pieces that exactly ``k`` usable
  peers hold, so "rarest first" is a walk up the buckets and "nearest to the
  centre" a bisect and an outward walk inside one;
- every peer knows its own pieces, running pieces (with their source), upload
  load, failures and local blacklist;
- each piece knows its holders, so picking a source probes holders, not peers.

Rules (Dragonfly's, with its 0.4 bugs fixed): at most `MAX_RUNNING` pieces
per downloading peer; a source serves at most `MAX_UPLOADS` at once; the CDN
serves at most ``cdn_limit`` pieces of a task at once, each to one peer at a
time, and only when no peer can; a source that failed a peer is never offered to that peer again (local
blacklist); a source with `ELIMINATION` failures is offered to nobody (global
blacklist); a peer with more than `ISOLATION` failed pieces gets CDN pieces
only; a peer that is gone is dropped with everything it held and ran.
"""

from __future__ import annotations

import bisect
import random
from typing import Iterable

import attrs

#: Pieces one peer downloads at once (Dragonfly's PeerDownLimit).
MAX_RUNNING = 4
#: Pieces one peer uploads at once (PeerUpLimit).
MAX_UPLOADS = 5
#: Failures as a source after which a peer is offered to nobody.
ELIMINATION = 5
#: A peer with more failed pieces than this is served by the CDN only.
ISOLATION = 5
#: Pieces of one task the CDN serves at once.
CDN_TASK_LIMIT = 4
#: Candidate pieces (lacked, not running) one pull examines at most: bounds
#: the cost of a pull when most candidates have no free source.
SCAN_BUDGET = 256

#: Failure kinds that are the source's fault, and how much each costs it.
SOURCE_FAULTS = {
    "unreachable": ELIMINATION,  # nothing listens there: it is gone
    "refused": 1,
    "not found": 1,
    "digest mismatch": 1,
    "short body": 1,
    "timeout": 1,
}


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
    blacklist: set[str] = attrs.Factory(set)
    last_piece: int = 0
    # Bookkeeping of the TaskManager (the schedule itself never reads a clock):
    finished: bool = False
    pulls: int = 0  # pulls held open right now
    seen: float = 0.0  # when it last pulled or reported
    hung_up: bool = False  # its last held pull was closed by the peer

    @property
    def can_serve(self) -> bool:
        return self.port > 0 and self.service_errors < ELIMINATION


@attrs.define(eq=False)
class TaskSchedule:
    cdn_cid: str
    cdn_limit: int = CDN_TASK_LIMIT
    rng: random.Random = attrs.Factory(random.Random)
    peers: dict[str, Peer] = attrs.Factory(dict)
    ready: int = 0
    cdn_uploads: int = 0
    cdn_pieces: set[int] = attrs.Factory(set)  # pieces the CDN is sending right now
    holders: dict[int, list[str]] = attrs.Factory(dict)
    buckets: list[list[int]] = attrs.Factory(lambda: [[]])
    _removed: set[str] = attrs.Factory(set)  # cids dropped at some point

    # --- membership -------------------------------------------------------------

    def add_peer(self, cid: str, ip: str, port: int) -> Peer:
        peer = self.peers.get(cid)
        if peer is None:
            peer = self.peers[cid] = Peer(cid, ip, port)
            if cid in self._removed:
                # Others may still be fetching from this cid's earlier run; their
                # ends release slots, so the count must include them.
                self._removed.discard(cid)
                peer.uploads = sum(1 for p in self.peers.values() for src in p.running.values() if src == cid)
        return peer

    def remove_peer(self, cid: str) -> None:
        """The peer is gone: free what it ran, forget what it held."""
        peer = self.peers.pop(cid, None)
        if peer is None:
            return
        self._removed.add(cid)
        for piece, source in peer.running.items():
            self._release(piece, source)
        peer.running.clear()
        if peer.can_serve:
            self._unhold_all(peer)

    def piece_ready(self, piece: int) -> None:
        """The CDN holds pieces ``0..piece`` now (they arrive in order)."""
        while self.ready <= piece:
            bisect.insort(self.buckets[0], self.ready)
            self.holders[self.ready] = []
            self.ready += 1

    # --- pulls --------------------------------------------------------------------

    def assign(self, cid: str) -> list[tuple[int, str]]:
        """Pieces for ``cid`` to fetch now, each with its source cid; marks them running."""
        peer = self.peers[cid]
        need = MAX_RUNNING - len(peer.running)
        if need <= 0:
            return []
        isolated = peer.failures > ISOLATION
        cdn_free = self.cdn_uploads < self.cdn_limit
        center = sum(peer.running) // len(peer.running) if peer.running else peer.last_piece
        chosen: list[tuple[int, str]] = []
        budget = SCAN_BUDGET
        for held_by, bucket in enumerate(self.buckets):
            if not bucket:
                continue
            if (held_by == 0 or isolated) and not cdn_free:
                if isolated:
                    break
                continue  # nobody but the CDN has these, and it is busy
            for piece in self._nearest(bucket, center):
                if piece in peer.have or piece in peer.running:
                    continue  # cheap, and not a candidate: does not count against the budget
                budget -= 1
                if budget < 0:
                    return chosen
                source = self._source_for(peer, piece, isolated)
                if source is None:
                    continue
                self._start(peer, piece, source)
                chosen.append((piece, source))
                if len(chosen) == need:
                    return chosen
                cdn_free = self.cdn_uploads < self.cdn_limit
                if (held_by == 0 or isolated) and not cdn_free:
                    break
        return chosen

    def _nearest(self, bucket: list[int], center: int) -> Iterable[int]:
        """The bucket's pieces by distance to ``center``, ties broken at random.

        Lazy: a pull usually needs only the first few.  ``bucket`` changes
        only between pulls, never while this runs (we only start pieces).
        """
        right = bisect.bisect_left(bucket, center)
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
            holders = self.holders.get(piece, ())
            if holders:
                start = self.rng.randrange(len(holders))
                for i in range(len(holders)):
                    cid = holders[(start + i) % len(holders)]
                    if cid == peer.cid or cid in peer.blacklist:
                        continue
                    source = self.peers[cid]
                    if source.uploads < MAX_UPLOADS:
                        return cid
        # The CDN sends a piece to one peer at a time: the others get it from
        # that peer once it is verified, so the CDN sends each piece about once.
        if piece < self.ready and self.cdn_uploads < self.cdn_limit and piece not in self.cdn_pieces:
            return self.cdn_cid
        return None

    def _start(self, peer: Peer, piece: int, source: str) -> None:
        peer.running[piece] = source
        peer.last_piece = piece
        if source == self.cdn_cid:
            self.cdn_uploads += 1
            self.cdn_pieces.add(piece)
        else:
            self.peers[source].uploads += 1

    # --- reports ------------------------------------------------------------------

    def succeeded(self, cid: str, piece: int) -> bool:
        """``cid`` verified ``piece``; False when it was never assigned to it."""
        peer = self.peers[cid]
        if piece not in peer.running:
            return piece in peer.have
        self._release(piece, peer.running.pop(piece))
        peer.have.add(piece)
        if peer.can_serve:
            self._hold(piece, cid)
        return True

    def failed(self, cid: str, piece: int, kind: str) -> None:
        """``cid`` could not get ``piece`` from its source; blame it if it is its fault."""
        peer = self.peers[cid]
        source = peer.running.pop(piece, None)
        if source is None:
            return
        self._release(piece, source)
        cost = SOURCE_FAULTS.get(kind, 0)
        if not cost:
            return  # our own trouble (disk, bad task): try again, blame nobody
        peer.failures += 1
        if source == self.cdn_cid:
            return
        peer.blacklist.add(source)
        blamed = self.peers.get(source)
        if blamed is not None and blamed.can_serve:
            blamed.service_errors += cost
            if not blamed.can_serve:
                self._unhold_all(blamed)

    def _release(self, piece: int, source: str) -> None:
        if source == self.cdn_cid:
            self.cdn_uploads -= 1
            self.cdn_pieces.discard(piece)
        else:
            peer = self.peers.get(source)
            if peer is not None and peer.uploads > 0:
                peer.uploads -= 1

    # --- holder buckets -------------------------------------------------------------

    def _hold(self, piece: int, cid: str) -> None:
        holders = self.holders[piece]
        self._move(piece, len(holders), len(holders) + 1)
        holders.append(cid)

    def _unhold_all(self, peer: Peer) -> None:
        for piece in peer.have:
            holders = self.holders.get(piece)
            if holders and peer.cid in holders:
                holders.remove(peer.cid)
                self._move(piece, len(holders) + 1, len(holders))

    def _move(self, piece: int, old: int, new: int) -> None:
        bucket = self.buckets[old]
        del bucket[bisect.bisect_left(bucket, piece)]
        while len(self.buckets) <= new:
            self.buckets.append([])
        bisect.insort(self.buckets[new], piece)

    # --- for tests and invariant checks -----------------------------------------------

    def holder_count(self, piece: int) -> int:
        return len(self.holders.get(piece, ()))
