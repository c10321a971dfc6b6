"""How much one pull costs the supernode's scheduler, and whether it grows with peers.

``python3 bench/scheduler.py [--pieces 1000] [--peers 100,300,1000] [--pulls 20000]``

For each peer count it builds one `TaskSchedule` with every piece ready at the
CDN, then replays a distribution: every peer pulls once; from then on each
completed piece (``succeeded``, which makes its peer a source for the
others) makes its peer pull again (``assign``), as the long-poll does, and
one waiting peer retries, until ``--pulls`` pulls are timed.  It prints pulls per second and the median, p99 and max time of one
``assign`` call.  The aim: p99 <= 1 ms, flat from 100 to 1,000 peers.
Only the scheduler is timed: no HTTP, no clock, no I/O.
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

from dfly.supernode.scheduler import TaskSchedule  # noqa: E402


def run(peers: int, pieces: int, pulls: int, seed: int) -> list[float]:
    """Each completed piece makes its peer pull again, as the long-poll does."""
    rng = random.Random(seed)
    schedule = TaskSchedule("cdnnode:", rng=random.Random(seed))
    schedule.piece_ready(pieces - 1)
    cids = [f"10.0.{n // 250}.{n % 250}-{n}-1.000" for n in range(peers)]
    for n, cid in enumerate(cids):
        schedule.add_peer(cid, "127.0.0.1", 20000 + n)
    in_flight: collections.deque[tuple[str, int]] = collections.deque()
    waiting: set[str] = set()
    timings: list[float] = []

    def pull(cid: str) -> None:
        started = time.perf_counter()
        chosen = schedule.assign(cid)
        timings.append(time.perf_counter() - started)
        if chosen:
            waiting.discard(cid)
            # Finish in random order, as transfers of different speeds do.
            for piece, _ in chosen:
                in_flight.insert(rng.randrange(len(in_flight) + 1), (cid, piece))
        elif len(schedule.peers[cid].have) < pieces and not schedule.peers[cid].running:
            waiting.add(cid)

    for cid in cids:
        pull(cid)
    while len(timings) < pulls and (in_flight or waiting):
        if in_flight:
            cid, piece = in_flight.popleft()
            schedule.succeeded(cid, piece)
            pull(cid)
        if waiting:
            pull(rng.choice(tuple(waiting)))
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pieces", type=int, default=1000)
    parser.add_argument("--peers", default="100,300,1000", help="comma-separated peer counts")
    parser.add_argument("--pulls", type=int, default=20000, help="timed pulls per peer count")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"scheduler: {args.pieces} pieces, {args.pulls} pulls per row")
    print(f"{'peers':>6} {'pulls/s':>10} {'median us':>10} {'p99 us':>8} {'max us':>8}")
    for peers in (int(p) for p in args.peers.split(",")):
        timings = run(peers, args.pieces, args.pulls, args.seed)
        timings.sort()
        p99 = timings[int(len(timings) * 0.99) - 1]
        print(f"{peers:>6} {len(timings) / sum(timings):>10.0f} {statistics.median(timings) * 1e6:>10.1f} "
              f"{p99 * 1e6:>8.1f} {timings[-1] * 1e6:>8.1f}")


if __name__ == "__main__":
    main()
