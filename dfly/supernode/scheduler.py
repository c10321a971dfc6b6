"""Which pieces a peer fetches next (pure: no I/O, no clock).

This first scheduler hands out CDN pieces in order, at most
``MAX_RUNNING`` at a time per peer, re-offering failed pieces first.  Its
cost per pull is the number of pieces it hands out: a cursor walks the
ready pieces once, and only re-offers live in a set.
"""

from __future__ import annotations

import attrs

#: Pieces one peer downloads at once (Dragonfly's PeerDownLimit).
MAX_RUNNING = 4


@attrs.define(eq=False)
class PeerProgress:
    """One download run (cid) of one task, as the supernode sees it."""

    cid: str
    ip: str
    port: int
    host_name: str = ""
    have: set[int] = attrs.Factory(set)
    running: dict[int, str] = attrs.Factory(dict)  # piece -> cid of its source
    retry: set[int] = attrs.Factory(set)
    cursor: int = 0
    failures: int = 0

    def succeeded(self, piece: int) -> None:
        self.running.pop(piece, None)
        self.retry.discard(piece)
        self.have.add(piece)

    def failed(self, piece: int) -> None:
        if self.running.pop(piece, None) is not None and piece not in self.have:
            self.failures += 1
            self.retry.add(piece)


def assign(peer: PeerProgress, ready: int, source_cid: str, limit: int = MAX_RUNNING) -> list[int]:
    """Mark and return the next pieces ``peer`` should fetch from ``source_cid``.

    ``ready`` is how many pieces (from piece 0 on) the CDN holds.
    """
    chosen: list[int] = []
    while len(peer.running) < limit:
        if peer.retry:
            piece = min(peer.retry)
            peer.retry.discard(piece)
        elif peer.cursor < ready:
            piece = peer.cursor
            peer.cursor += 1
        else:
            break
        if piece in peer.have or piece in peer.running:
            continue
        peer.running[piece] = source_cid
        chosen.append(piece)
    return chosen
