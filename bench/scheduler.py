"""What one report costs the supernode's scheduler and pull queue, and whether it grows with peers.

``python3 bench/scheduler.py [--pieces 64] [--peers 100,1000,10000] [--reports 50000]``

For each peer count it builds one `TaskSchedule` with every piece ready at the
CDN and a `PullQueue` over it, then replays a distribution as the supernode
runs it for dfly's peers: every peer pulls once (an ``assign``; a pull that
gets nothing is held in the queue); each completed piece is a report
(``succeeded``) with ``next=1``, handled exactly as
``TaskManager.piece_result(take_next=True)`` does: the reporter's next
pieces are assigned for the report's answer and its held pull is re-filed
(``settle``; ``slot_freed`` when it has every piece), then ``offer`` for the
new holder's spare uploads and for the freed source slot; a woken pull gets
its pieces at once (and the peer pulls again), and a pull woken to look
again pulls again.  Only the scheduler and the queue are
timed: no HTTP, no clock, no I/O.

Printed per row: reports per second, the median and p99 time of one report
(with its wake-ups), wake-ups and assign calls per report, and the largest
number of held pulls.  Every peer keeps one pull outstanding, as the engine
does, so nearly every peer is held at any time.  The aim: cost per report flat from 100 to 10,000
peers (wake-ups per report a small constant; dfly's first long-poll woke
every held pull on every report).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet.defer import Deferred  # noqa: E402

from dfly.supernode.pullqueue import REEVALUATE, WAIT_NOW, PullQueue  # noqa: E402
from dfly.supernode.scheduler import TaskSchedule  # noqa: E402


def run(peers: int, pieces: int, reports: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    schedule = TaskSchedule("cdnnode:", rng=random.Random(seed))
    schedule.piece_ready(pieces - 1)
    queue = PullQueue(schedule)
    cids = [f"10.0.{n // 250}.{n % 250}-{n}-1.000" for n in range(peers)]
    for n, cid in enumerate(cids):
        schedule.add_peer(cid, "127.0.0.1", 20000 + n)
    in_flight: collections.deque[tuple[str, int]] = collections.deque()
    timings: list[float] = []
    peak_held = 0

    def running(cid: str, chosen: list[tuple[int, str]]) -> None:
        # Transfers of different speeds finish in random order.
        for piece, _ in chosen:
            in_flight.insert(rng.randrange(len(in_flight) + 1), (cid, piece))

    def started(cid: str, chosen: list[tuple[int, str]]) -> None:
        running(cid, chosen)
        pull(cid)  # a pull answered: the engine keeps one pull outstanding, it pulls again at once

    def pull(cid: str) -> None:
        queue.counters.assign_calls += 1
        chosen = schedule.assign(cid)
        if chosen:
            started(cid, chosen)
        elif len(schedule.peers[cid].have) < pieces:
            held = queue.hold(cid)
            held.addCallback(woken, cid)

    def woken(result: object, cid: str) -> None:
        if result is REEVALUATE:
            pull(cid)
        elif result is not WAIT_NOW:
            started(cid, result)  # type: ignore[arg-type]

    for cid in cids:
        pull(cid)
    before = (queue.counters.wakeups, queue.counters.assign_calls)
    while in_flight and len(timings) < reports:
        cid, piece = in_flight.popleft()
        t0 = time.perf_counter()
        source = schedule.peers[cid].running[piece]
        schedule.succeeded(cid, piece)
        queue.counters.assign_calls += 1
        chosen = schedule.assign(cid)  # the report's own answer (next=1)
        if chosen or len(schedule.peers[cid].have) < pieces:
            queue.settle(cid)
        else:
            queue.slot_freed(cid)  # it has every piece: its held pull answers 600
        queue.offer(schedule.spare_uploads(cid), cid)
        queue.offer(1, source)
        timings.append(time.perf_counter() - t0)
        running(cid, chosen)  # the simulation's bookkeeping, not the supernode's: not timed
        peak_held = max(peak_held, len(queue))
    wakeups = queue.counters.wakeups - before[0]
    assigns = queue.counters.assign_calls - before[1]
    timings.sort()
    n = len(timings)
    return {
        "reports": n,
        "per_s": n / sum(timings),
        "median_us": statistics.median(timings) * 1e6,
        "p99_us": timings[max(int(n * 0.99) - 1, 0)] * 1e6,
        "wakeups": wakeups / n,
        "assigns": assigns / n,
        "held": peak_held,
        "finished": sum(1 for c in cids if len(schedule.peers[c].have) == pieces),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=64)
    parser.add_argument("--peers", default="100,1000,10000", help="comma-separated peer counts")
    parser.add_argument("--reports", type=int, default=50000, help="timed reports per peer count")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"scheduler + pull queue: {args.pieces} pieces, up to {args.reports} reports per row")
    print(f"{'peers':>6} {'reports/s':>10} {'median us':>10} {'p99 us':>8} {'wakeups/rep':>12} "
          f"{'assigns/rep':>12} {'peak held':>10} {'finished':>9}")
    for peers in (int(p) for p in args.peers.split(",")):
        r = run(peers, args.pieces, args.reports, args.seed)
        print(f"{peers:>6} {r['per_s']:>10.0f} {r['median_us']:>10.1f} {r['p99_us']:>8.1f} {r['wakeups']:>12.2f} "
              f"{r['assigns']:>12.2f} {r['held']:>10} {r['finished']:>9}")


if __name__ == "__main__":
    main()
