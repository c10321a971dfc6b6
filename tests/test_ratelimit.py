"""Token buckets, the paced file-range producer, and BodyWriter's paced reads.

Everything runs on a `Clock`: the bucket arithmetic by hand, its bounds with
Hypothesis, `FileRangeProducer` against a `StringTransport` consumer, and
`BodyWriter` with a bucket against a `StringTransport` whose pauses are
recorded.
"""

from __future__ import annotations

import errno
import os
import random

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseFailed

from dfly.ratelimit import (
    BURST_SECONDS,
    CHUNK,
    MIN_BURST,
    READ_AHEAD,
    FileRangeProducer,
    FileShrank,
    TokenBucket,
)
from dfly.stream import BodyWriter, WriteError, run_inline
from tests.test_stream import DONE, IDLE, DeferredRunner, expected_pieces

MIB = 1 << 20
#: Bytes a bound may be exceeded by through float rounding.
TOLERANCE = 1e-3
#: What `reactor.seconds()` reads these days (a Unix timestamp).
REACTOR_NOW = 1.8e9


def bucket_with(rate: float, tokens: float, clock: Clock, parent: TokenBucket | None = None) -> TokenBucket:
    """A bucket of ``rate`` holding exactly ``tokens`` of credit, reached through reserve().

    With a ``parent``, what it takes is taken from the parent too.
    """
    bucket = TokenBucket(rate, clock, parent=parent)
    take = bucket.burst - tokens
    if take > 0:
        assert bucket.reserve(take) == 0.0
    return bucket


def steady_rate(bucket: TokenBucket, clock: Clock, receiver: bool = False, chunks: int = 200) -> float:
    """Bytes/s a transfer that always wants more gets once its burst is spent.

    A sender reserves a chunk and, when told to wait, waits exactly that
    long; a receiver (``receiver=True``) is charged for every chunk and then
    pauses exactly as long as told.  Fails if waiting the time given does not
    bring the credit back.
    """
    draw = bucket.charge if receiver else bucket.reserve
    for _ in range(1_000_000):
        wait = draw(CHUNK)
        if wait > 0:
            clock.advance(wait)
            break
    else:
        raise AssertionError("the burst never ran out")
    start, got = clock.seconds(), 0
    for _ in range(3 * chunks):
        if got >= chunks * CHUNK:
            break
        wait = draw(CHUNK)
        if receiver or wait == 0:
            got += CHUNK
        if wait > 0:
            clock.advance(wait)
    else:
        raise AssertionError(f"{got // CHUNK} of {chunks} chunks after {3 * chunks} draws: waits that bring no credit")
    return got / (clock.seconds() - start)


class TokenBucketTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()

    # --- burst and refill --------------------------------------------------------------

    def test_new_bucket_holds_its_burst(self) -> None:
        """A new bucket starts full."""
        bucket = TokenBucket(10 * MIB, self.clock)
        self.assertEqual(bucket.tokens(), bucket.burst)

    def test_default_burst_is_burst_seconds_of_the_rate(self) -> None:
        """Without an explicit burst, a fast bucket holds BURST_SECONDS of its rate."""
        self.assertEqual(TokenBucket(10 * MIB, self.clock).burst, 10 * MIB * BURST_SECONDS)

    def test_explicit_burst(self) -> None:
        """An explicit burst above MIN_BURST is used as given."""
        self.assertEqual(TokenBucket(MIB, self.clock, burst=3 * MIB).burst, 3 * MIB)

    def test_explicit_burst_below_min_burst_is_raised(self) -> None:
        """A burst smaller than MIN_BURST becomes MIN_BURST, so a CHUNK always fits."""
        self.assertEqual(TokenBucket(MIB, self.clock, burst=1000).burst, MIN_BURST)

    def test_slow_rate_burst_is_min_burst(self) -> None:
        """A rate whose BURST_SECONDS is under MIN_BURST still gets MIN_BURST."""
        self.assertEqual(TokenBucket(1000, self.clock).burst, MIN_BURST)

    def test_chunk_reservable_at_a_tiny_rate(self) -> None:
        """At 1 byte/s a new bucket still grants a CHUNK at once, and the next one after CHUNK seconds."""
        bucket = TokenBucket(1, self.clock)
        self.assertEqual([bucket.reserve(CHUNK), bucket.reserve(CHUNK), bucket.reserve(CHUNK)], [0.0, 0.0, CHUNK])

    def test_refills_at_rate(self) -> None:
        """An empty bucket earns rate bytes per second."""
        bucket = bucket_with(10 * MIB, 0, self.clock)
        self.clock.advance(1 / 16)
        self.assertEqual(bucket.tokens(), 10 * MIB / 16)

    def test_refill_capped_at_burst(self) -> None:
        """Credit never grows beyond the burst, however long the bucket is idle."""
        bucket = bucket_with(10 * MIB, 0, self.clock)
        self.clock.advance(3600)
        self.assertEqual(bucket.tokens(), bucket.burst)

    def test_no_refill_without_time(self) -> None:
        """Reading the credit twice at the same instant earns nothing."""
        bucket = bucket_with(10 * MIB, 1000, self.clock)
        bucket.tokens()
        self.assertEqual(bucket.tokens(), 1000)

    # --- reserve -------------------------------------------------------------------------

    def test_reserve_within_credit_takes_it(self) -> None:
        """A grant returns 0 and takes exactly n bytes."""
        bucket = TokenBucket(10 * MIB, self.clock)
        self.assertEqual(bucket.reserve(CHUNK), 0.0)
        self.assertEqual(bucket.tokens(), bucket.burst - CHUNK)

    def test_reserve_returns_the_exact_wait(self) -> None:
        """Short of credit, reserve returns the seconds until n bytes are there."""
        bucket = bucket_with(MIB, 1024, self.clock)
        self.assertEqual(bucket.reserve(CHUNK), (CHUNK - 1024) / MIB)

    def test_refused_reserve_takes_nothing(self) -> None:
        """A reserve that has to wait leaves the credit alone."""
        bucket = bucket_with(MIB, 1024, self.clock)
        bucket.reserve(CHUNK)
        self.assertEqual(bucket.tokens(), 1024)

    def test_reserve_after_the_wait_succeeds(self) -> None:
        """Waiting exactly the time returned is enough."""
        bucket = bucket_with(3 * MIB, 0, self.clock)
        self.clock.advance(bucket.reserve(CHUNK))
        self.assertEqual(bucket.reserve(CHUNK), 0.0)

    def test_reserve_just_before_the_wait_still_waits(self) -> None:
        """A little less than the time returned is not enough."""
        bucket = bucket_with(MIB, 0, self.clock)
        wait = bucket.reserve(CHUNK)
        self.clock.advance(wait * 0.99)
        self.assertApproximates(bucket.reserve(CHUNK), wait * 0.01, 1e-12)

    def test_reserve_after_the_wait_succeeds_on_a_reactor_clock(self) -> None:
        """At a real reactor's clock reading, waiting the time returned is enough: no second, near-zero wait."""
        self.clock.advance(REACTOR_NOW)
        bucket = TokenBucket(10 * MIB, self.clock)
        second_waits = []
        for _ in range(100):
            wait = bucket.reserve(CHUNK)
            if wait > 0:
                self.clock.advance(wait)
                again = bucket.reserve(CHUNK)
                if again > 0:
                    second_waits.append(again)
        self.assertEqual(second_waits[:3], [], f"{len(second_waits)} chunks had to wait twice")

    def test_saturated_sender_gets_the_rate(self) -> None:
        """A sender that always wants more gets the rate once the burst is spent."""
        bucket = TokenBucket(10 * MIB, self.clock)
        self.assertApproximates(steady_rate(bucket, self.clock) / (10 * MIB), 1.0, 0.01)

    # --- nesting ---------------------------------------------------------------------------

    def test_tighter_parent_governs(self) -> None:
        """A fast task bucket under a slow host bucket gets the host's rate."""
        host = TokenBucket(MIB, self.clock)
        task = TokenBucket(8 * MIB, self.clock, parent=host)
        self.assertApproximates(steady_rate(task, self.clock) / MIB, 1.0, 0.01)

    def test_tighter_child_governs(self) -> None:
        """A slow task bucket under a fast host bucket gets its own rate."""
        host = TokenBucket(8 * MIB, self.clock)
        task = TokenBucket(MIB, self.clock, parent=host)
        self.assertApproximates(steady_rate(task, self.clock) / MIB, 1.0, 0.01)

    def test_wait_is_the_longest_in_the_chain(self) -> None:
        """When several buckets are short, reserve waits for the one that takes longest."""
        host = TokenBucket(4 * MIB, self.clock)
        task = bucket_with(MIB, CHUNK / 2, self.clock, parent=host)
        host.reserve(host.tokens())  # empty, and earning 4 MiB/s
        self.assertEqual(task.reserve(CHUNK), max(CHUNK / (4 * MIB), (CHUNK / 2) / MIB))

    def test_refused_reserve_takes_nothing_from_the_parent(self) -> None:
        """When the task bucket is short, the host keeps its credit."""
        host = TokenBucket(MIB, self.clock, burst=MIB)
        task = bucket_with(MIB, 0, self.clock, parent=host)
        before = host.tokens()
        self.assertGreater(task.reserve(CHUNK), 0)
        self.assertEqual(host.tokens(), before)

    def test_unlimited_child_with_limited_parent_still_limits(self) -> None:
        """A task with no limit of its own is held to the host's."""
        host = TokenBucket(MIB, self.clock)
        task = TokenBucket(0, self.clock, parent=host)
        self.assertEqual([task.reserve(CHUNK) for _ in range(3)], [0.0, 0.0, CHUNK / MIB])

    def test_unlimited_child_draws_from_parent(self) -> None:
        """What an unlimited task sends is taken from the host's credit."""
        host = TokenBucket(MIB, self.clock)
        TokenBucket(0, self.clock, parent=host).reserve(CHUNK)
        self.assertEqual(host.tokens(), host.burst - CHUNK)

    def test_siblings_share_parent_credit(self) -> None:
        """Credit one task took from the host is gone for the other task."""
        host = TokenBucket(MIB, self.clock)
        first = TokenBucket(10 * MIB, self.clock, parent=host)
        second = TokenBucket(10 * MIB, self.clock, parent=host)
        first.reserve(CHUNK)
        first.reserve(CHUNK)
        self.assertEqual(second.reserve(CHUNK), CHUNK / MIB)

    def test_chain_lists_only_limiting_buckets(self) -> None:
        """chain() is the bucket and its ancestors, leaving out the unlimited ones."""
        root = TokenBucket(7, self.clock)
        top = TokenBucket(0, self.clock, parent=root)
        middle = TokenBucket(5, self.clock, parent=top)
        leaf = TokenBucket(0, self.clock, parent=middle)
        self.assertEqual(leaf.chain(), [middle, root])

    def test_unlimited_chain_never_waits(self) -> None:
        """With no limit anywhere, neither reserve nor charge ever waits."""
        bucket = TokenBucket(0, self.clock, parent=TokenBucket(0, self.clock))
        self.assertEqual((bucket.reserve(100 * MIN_BURST), bucket.charge(100 * MIN_BURST)), (0.0, 0.0))

    # --- charge --------------------------------------------------------------------------------

    def test_charge_within_credit_does_not_wait(self) -> None:
        """A read within the credit needs no pause."""
        bucket = TokenBucket(MIB, self.clock)
        self.assertEqual(bucket.charge(CHUNK), 0.0)

    def test_charge_goes_into_debt(self) -> None:
        """A read beyond the credit is taken anyway, leaving the bucket in debt."""
        bucket = TokenBucket(MIB, self.clock)
        bucket.charge(bucket.burst + MIB)
        self.assertEqual(bucket.tokens(), -MIB)

    def test_charge_returns_time_to_repay_the_debt(self) -> None:
        """The wait is the debt over the rate."""
        bucket = TokenBucket(MIB, self.clock)
        self.assertEqual(bucket.charge(bucket.burst + MIB // 4), 0.25)

    def test_debt_repaid_after_the_wait(self) -> None:
        """After the wait the bucket is exactly out of debt."""
        bucket = TokenBucket(MIB, self.clock)
        self.clock.advance(bucket.charge(bucket.burst + MIB // 4))
        self.assertEqual(bucket.tokens(), 0.0)

    def test_charges_accumulate_debt(self) -> None:
        """A second read during the debt lengthens the wait by its own size over the rate."""
        bucket = bucket_with(MIB, 0, self.clock)
        bucket.charge(MIB // 4)
        self.clock.advance(0.125)
        self.assertEqual(bucket.charge(MIB // 2), 0.625)

    def test_charge_waits_for_the_deepest_debt_in_the_chain(self) -> None:
        """A read is paid off only when every bucket in the chain is out of debt."""
        host = TokenBucket(2 * MIB, self.clock)
        task = TokenBucket(MIB, self.clock, parent=host)
        host.reserve(host.burst)
        # The host ends MIB in debt (0.5 s at its rate), the task MIB - MIN_BURST (0.875 s).
        self.assertEqual(task.charge(MIB), max(MIB / (2 * MIB), (MIB - MIN_BURST) / MIB))

    def test_charge_reaches_parent_through_unlimited_child(self) -> None:
        """An unlimited task's reads put the host in debt."""
        host = TokenBucket(MIB, self.clock)
        task = TokenBucket(0, self.clock, parent=host)
        self.assertEqual(task.charge(host.burst + MIB // 2), 0.5)

    def test_saturated_receiver_gets_the_rate(self) -> None:
        """A receiver that pauses exactly as long as told gets the rate."""
        bucket = TokenBucket(10 * MIB, self.clock)
        self.assertApproximates(steady_rate(bucket, self.clock, receiver=True) / (10 * MIB), 1.0, 0.01)

    # --- set_rate ---------------------------------------------------------------------------------

    def test_set_rate_keeps_earned_credit(self) -> None:
        """Changing the rate keeps the credit the bucket holds."""
        bucket = bucket_with(MIB, 1000, self.clock)
        bucket.set_rate(2 * MIB)
        self.assertEqual(bucket.tokens(), 1000)

    def test_set_rate_credits_time_before_the_change_at_the_old_rate(self) -> None:
        """Time that passed before set_rate earns credit at the old rate."""
        bucket = bucket_with(MIB, 0, self.clock)
        self.clock.advance(0.0625)
        bucket.set_rate(4 * MIB)
        self.assertEqual(bucket.tokens(), MIB * 0.0625)

    def test_set_rate_refills_at_the_new_rate(self) -> None:
        """After set_rate, credit comes at the new rate."""
        bucket = bucket_with(MIB, 0, self.clock)
        bucket.set_rate(4 * MIB)
        self.clock.advance(0.0625)
        self.assertEqual(bucket.tokens(), 4 * MIB * 0.0625)

    def test_set_rate_caps_credit_at_the_new_burst(self) -> None:
        """Lowering the rate lowers the burst, and the credit with it."""
        bucket = TokenBucket(100 * MIB, self.clock)
        bucket.set_rate(MIB)
        self.assertEqual((bucket.burst, bucket.tokens()), (MIN_BURST, MIN_BURST))

    def test_set_rate_raising_the_burst_grants_nothing(self) -> None:
        """Raising the rate raises the burst but not the credit held."""
        bucket = TokenBucket(MIB, self.clock)
        bucket.set_rate(100 * MIB)
        self.assertEqual((bucket.burst, bucket.tokens()), (10 * MIB, MIN_BURST))

    def test_set_rate_keeps_an_explicit_burst(self) -> None:
        """A burst given at construction survives a rate change."""
        bucket = TokenBucket(MIB, self.clock, burst=3 * MIB)
        bucket.set_rate(100 * MIB)
        self.assertEqual(bucket.burst, 3 * MIB)

    def test_set_rate_zero_lifts_the_limit(self) -> None:
        """A rate of 0 takes the bucket out of the chain: an empty bucket no longer waits."""
        bucket = bucket_with(MIB, 0, self.clock)
        bucket.set_rate(0)
        self.assertEqual((bucket.chain(), bucket.reserve(CHUNK)), ([], 0.0))

    # --- bad values ------------------------------------------------------------------------------

    def test_negative_rate_rejected(self) -> None:
        """A negative rate is a ValueError."""
        self.assertRaises(ValueError, TokenBucket, -1, self.clock)

    def test_zero_burst_rejected(self) -> None:
        """A burst of 0 is a ValueError (0 is not 'unlimited' for a burst)."""
        self.assertRaises(ValueError, TokenBucket, MIB, self.clock, burst=0)

    def test_negative_burst_rejected(self) -> None:
        """A negative burst is a ValueError."""
        self.assertRaises(ValueError, TokenBucket, MIB, self.clock, burst=-5)

    def test_set_negative_rate_rejected_and_rate_kept(self) -> None:
        """set_rate with a negative rate is a ValueError and leaves the limit as it was."""
        bucket = TokenBucket(MIB, self.clock)
        self.assertRaises(ValueError, bucket.set_rate, -1)
        self.assertEqual((bucket.rate, bucket.burst), (MIB, MIN_BURST))


# --- properties ------------------------------------------------------------------------------

#: 1 byte/s to 1 GiB/s.
RATES = st.floats(min_value=1.0, max_value=float(1 << 30))
#: A level of the chain: unlimited (0) or a rate.
LEVELS = st.one_of(st.just(0.0), RATES)
BURSTS = st.one_of(st.none(), st.floats(min_value=1.0, max_value=8.0 * MIN_BURST))
#: Same instant, a moment, or a long pause.
ADVANCES = st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1e-3), st.floats(min_value=0.0, max_value=5.0))
#: 64 KiB/s to 1 GiB/s, spread evenly over the orders of magnitude.
TRANSFER_RATES = st.floats(min_value=16.0, max_value=30.0).map(lambda e: 2.0**e)


def worst_excess(draws: list[tuple[float, float]], rate: float, burst: float, last_read_free: bool) -> float:
    """The most that the draws within any interval [t_i, t_j] exceed ``burst + rate * (t_j - t_i)`` by.

    Intervals between two draws are the only ones to check: widening an
    interval to a time without a draw adds allowance and no bytes.  With
    ``last_read_free`` the last draw of each interval is not counted.
    """
    worst = float("-inf")
    for i, (start, _) in enumerate(draws):
        total = 0.0
        for at, n in draws[i:]:
            total += n
            counted = total - n if last_read_free else total
            worst = max(worst, counted - (burst + rate * (at - start)))
    return worst


class TokenBucketPropertyTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        host_rate=RATES,
        host_burst=BURSTS,
        task_rates=st.tuples(LEVELS, LEVELS),
        steps=st.lists(st.tuples(ADVANCES, st.integers(0, 1), st.integers(1, MIN_BURST)), max_size=60),
    )
    def test_reserve_grants_at_most_burst_plus_rate_times_interval(self, host_rate, host_burst, task_rates, steps) -> None:
        """Over any interval, no bucket grants more than burst + rate * its length, siblings included."""
        clock = Clock()
        host = TokenBucket(host_rate, clock, burst=host_burst)
        tasks = [TokenBucket(rate, clock, parent=host) for rate in task_rates]
        buckets = [host, *tasks]
        granted: list[list[tuple[float, float]]] = [[] for _ in buckets]
        for advance, which, n in steps:
            clock.advance(advance)
            wait = tasks[which].reserve(n)
            self.assertGreaterEqual(wait, 0.0)
            if wait == 0:
                for bucket in tasks[which].chain():
                    granted[buckets.index(bucket)].append((clock.seconds(), n))
        for bucket, draws in zip(buckets, granted):
            if bucket.limited:
                self.assertLessEqual(worst_excess(draws, bucket.rate, bucket.burst, False), TOLERANCE)

    @settings(max_examples=200, deadline=None)
    @given(
        host_rate=LEVELS,
        host_burst=BURSTS,
        task_rate=LEVELS,
        steps=st.lists(st.tuples(ADVANCES, st.integers(1, 4 * MIN_BURST)), max_size=60),
    )
    def test_charge_lets_through_at_most_one_read_more(self, host_rate, host_burst, task_rate, steps) -> None:
        """A receiver that waits as told reads, over any interval, burst + rate * its length plus its last read.

        The receiver learns a read's size only after it arrived, so the last
        read of an interval may overshoot by itself; every read before it was
        taken with no bucket in debt, exactly like a reserve.  (Which implies
        the looser burst + rate * t + the largest single read.)
        """
        assume(host_rate > 0 or task_rate > 0)
        clock = Clock()
        host = TokenBucket(host_rate, clock, burst=host_burst)
        task = TokenBucket(task_rate, clock, parent=host)
        buckets = task.chain()
        charged: list[list[tuple[float, float]]] = [[] for _ in buckets]
        wait = 0.0
        for extra, n in steps:
            clock.advance(wait + extra)
            wait = task.charge(n)
            self.assertGreaterEqual(wait, 0.0)
            for draws in charged:
                draws.append((clock.seconds(), n))
        for bucket, draws in zip(buckets, charged):
            self.assertLessEqual(worst_excess(draws, bucket.rate, bucket.burst, True), TOLERANCE)

    @settings(max_examples=200, deadline=None)
    @given(rate=RATES, burst=BURSTS, steps=st.lists(st.tuples(ADVANCES, st.integers(1, 4 * MIN_BURST)), max_size=40))
    def test_charge_wait_repays_exactly_the_debt(self, rate, burst, steps) -> None:
        """The wait charge returns is the debt over the rate: after it the bucket holds nothing, give or take rounding."""
        clock = Clock()
        bucket = TokenBucket(rate, clock, burst=burst)
        for advance, n in steps:
            clock.advance(advance)
            wait = bucket.charge(n)
            if wait > 0:
                clock.advance(wait)
                self.assertApproximates(bucket.tokens(), 0.0, TOLERANCE)

    @settings(max_examples=100, deadline=None)
    @given(levels=st.lists(st.one_of(st.just(0.0), TRANSFER_RATES), min_size=1, max_size=3))
    def test_saturated_sender_reaches_the_tightest_rate(self, levels) -> None:
        """A sender that always wants more, waiting exactly as told, gets the chain's tightest rate within 5%."""
        assume(any(levels))
        clock = Clock()
        bucket = None
        for rate in levels:  # host first, task last
            bucket = TokenBucket(rate, clock, parent=bucket)
        tightest = min(rate for rate in levels if rate > 0)
        self.assertApproximates(steady_rate(bucket, clock) / tightest, 1.0, 0.05)

    @settings(max_examples=100, deadline=None)
    @given(levels=st.lists(st.one_of(st.just(0.0), TRANSFER_RATES), min_size=1, max_size=3))
    def test_saturated_receiver_reaches_the_tightest_rate(self, levels) -> None:
        """A receiver that always has data, pausing exactly as told, gets the chain's tightest rate within 5%."""
        assume(any(levels))
        clock = Clock()
        bucket = None
        for rate in levels:
            bucket = TokenBucket(rate, clock, parent=bucket)
        tightest = min(rate for rate in levels if rate > 0)
        self.assertApproximates(steady_rate(bucket, clock, receiver=True) / tightest, 1.0, 0.05)


# --- FileRangeProducer -------------------------------------------------------------------------

FILE_SIZE = 5 * CHUNK + 1234
OFFSET = 1000
LENGTH = 4 * CHUNK + 500


class SocketLikeTransport(StringTransport):
    """A consumer that records its producer's life and, like a socket's send
    buffer, pauses the producer once ``high_water`` bytes wait to be sent."""

    def __init__(self, high_water: int | None = None) -> None:
        super().__init__()
        self.high_water = high_water
        self.writes: list[int] = []
        self.events: list[tuple[object, ...]] = []
        self.stop_on_write = False
        self.resume_inside_write = False
        self.depth = self.max_depth = 0

    def registerProducer(self, producer, streaming) -> None:
        super().registerProducer(producer, streaming)
        self.events.append(("register", streaming))

    def unregisterProducer(self) -> None:
        super().unregisterProducer()
        self.events.append(("unregister",))

    def write(self, data: bytes) -> None:
        self.depth += 1
        self.max_depth = max(self.max_depth, self.depth)
        try:
            self._write(data)
        finally:
            self.depth -= 1

    def _write(self, data: bytes) -> None:
        super().write(data)
        self.writes.append(len(data))
        if self.resume_inside_write:
            self.producer.resumeProducing()  # e.g. a buffer that drained at once
        elif self.stop_on_write:
            self.producer.stopProducing()  # the connection dropped while sending
        elif self.high_water is not None and len(self.value()) >= self.high_water:
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """Send what is buffered and, if a producer is still there, ask it for more."""
        sent = self.value()
        self.clear()
        if self.producer is not None:
            self.producer.resumeProducing()
        return sent


class SteppingClock(Clock):
    """A Clock that can fire just its next call.

    `Clock.advance` runs calls until none is due, so a timer that re-arms
    itself for the same instant would spin it for ever.
    """

    def fire_next(self) -> None:
        call = min(self.calls, key=lambda c: c.getTime())
        self.calls.remove(call)
        self.rightNow = max(self.rightNow, call.getTime())
        call.called = 1
        call.func(*call.args, **call.kw)


class FileRangeProducerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.data = random.Random(3).randbytes(FILE_SIZE)
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.clock = Clock()
        self.transport = SocketLikeTransport()

    def start(self, offset=OFFSET, length=LENGTH, bucket=None, flags=os.O_RDONLY):
        """Open the file and start a producer on it; the fd it owns is ``self.opened``."""
        self.opened = os.open(self.path, flags)
        producer = FileRangeProducer(self.transport, self.opened, offset, length, self.clock, bucket)
        self.addCleanup(lambda: producer.fd >= 0 and os.close(producer.fd))
        return producer, producer.start()

    def assertClosed(self, fd: int) -> None:
        error = self.assertRaises(OSError, os.fstat, fd)
        self.assertEqual(error.errno, errno.EBADF)

    def run_clock(self, done, limit: int = 10_000) -> int:
        """Fire the producer's timers until ``done`` has a result; how many fired."""
        for fired in range(limit):
            if done.called:
                return fired
            calls = self.clock.getDelayedCalls()
            self.assertEqual(len(calls), 1)
            self.clock.advance(calls[0].getTime() - self.clock.seconds())
        self.fail(f"not done after {limit} timers")

    # --- unpaced ---------------------------------------------------------------------------

    def test_writes_the_range_without_bucket(self) -> None:
        """With no bucket the whole range is written at once and done fires None."""
        _, done = self.start()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.transport.value(), self.data[OFFSET : OFFSET + LENGTH])

    def test_writes_in_chunks(self) -> None:
        """Bytes go out CHUNK at a time, the last write holding the rest."""
        self.start()
        self.assertEqual(self.transport.writes, [CHUNK] * 4 + [500])

    def test_registers_as_push_producer_and_unregisters_at_the_end(self) -> None:
        """The producer registers as streaming and lets the consumer go once done."""
        self.start()
        self.assertEqual(self.transport.events, [("register", True), ("unregister",)])

    def test_closes_fd_when_done(self) -> None:
        """The fd is closed once the range is written."""
        self.start()
        self.assertClosed(self.opened)

    def test_unlimited_bucket_does_not_pace(self) -> None:
        """A bucket with no limit anywhere in its chain writes everything at once."""
        _, done = self.start(bucket=TokenBucket(0, self.clock))
        self.successResultOf(done)
        self.assertEqual((len(self.transport.value()), self.clock.getDelayedCalls()), (LENGTH, []))

    def test_empty_range(self) -> None:
        """A zero-length range writes nothing, fires done, closes the fd and unregisters."""
        _, done = self.start(length=0)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.transport.events, [("register", True), ("unregister",)])
        self.assertEqual(self.transport.value(), b"")
        self.assertClosed(self.opened)

    # --- consumer flow control -----------------------------------------------------------

    def test_consumer_pause_stops_writing(self) -> None:
        """A consumer that pauses during a write gets no further writes."""
        self.transport.high_water = CHUNK
        _, done = self.start()
        self.assertEqual(self.transport.writes, [CHUNK])
        self.assertNoResult(done)

    def test_consumer_resume_continues(self) -> None:
        """Each resume after a pause sends the next chunk, until the range is done."""
        self.transport.high_water = CHUNK
        _, done = self.start()
        sent = b""
        while not done.called:
            sent += self.transport.drain()
        sent += self.transport.value()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual((sent, self.transport.writes), (self.data[OFFSET : OFFSET + LENGTH], [CHUNK] * 4 + [500]))

    def test_resume_inside_write_does_not_nest_writes(self) -> None:
        """A consumer resuming the producer from within write gets the next chunk after write returns, not inside it."""
        self.transport.resume_inside_write = True
        _, done = self.start()
        self.successResultOf(done)
        self.assertEqual((self.transport.max_depth, self.transport.value()), (1, self.data[OFFSET : OFFSET + LENGTH]))

    def test_resume_without_pause_is_harmless(self) -> None:
        """An extra resumeProducing after the end writes nothing more."""
        producer, _ = self.start()
        producer.resumeProducing()
        self.assertEqual(len(self.transport.value()), LENGTH)

    # --- rate pacing -------------------------------------------------------------------------

    def test_writes_exactly_the_burst_then_waits(self) -> None:
        """With a bucket, the producer writes its burst and sets one timer for the next chunk."""
        self.start(bucket=TokenBucket(MIB, self.clock, burst=3 * CHUNK))
        self.assertEqual(len(self.transport.value()), 3 * CHUNK)
        self.assertEqual([call.getTime() for call in self.clock.getDelayedCalls()], [CHUNK / MIB])

    def test_no_write_before_the_credit_is_back(self) -> None:
        """Advancing the clock short of the wait releases nothing."""
        self.start(bucket=TokenBucket(MIB, self.clock, burst=3 * CHUNK))
        self.clock.advance(CHUNK / MIB / 2)
        self.assertEqual(len(self.transport.value()), 3 * CHUNK)

    def test_credit_releases_the_next_chunk(self) -> None:
        """When the timer fires the next chunk goes out, and another single timer is set."""
        self.start(bucket=TokenBucket(MIB, self.clock, burst=2 * CHUNK))
        self.clock.advance(CHUNK / MIB)
        self.assertEqual(len(self.transport.value()), 3 * CHUNK)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_paced_bytes_are_the_file_range(self) -> None:
        """Paced or not, what arrives is exactly the file's bytes from offset."""
        _, done = self.start(bucket=TokenBucket(MIB, self.clock))
        self.run_clock(done)
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.transport.value(), self.data[OFFSET : OFFSET + LENGTH])

    def test_paced_transfer_takes_the_length_beyond_the_burst_over_the_rate(self) -> None:
        """A range finishes when the bytes beyond the burst have been earned, not earlier or later."""
        _, done = self.start(bucket=TokenBucket(MIB, self.clock))
        self.run_clock(done)
        self.assertApproximates(self.clock.seconds(), (LENGTH - MIN_BURST) / MIB, 1e-9)

    def test_paced_producer_unregisters_and_closes_at_the_end(self) -> None:
        """A paced range, too, lets the consumer go and closes its fd."""
        _, done = self.start(bucket=TokenBucket(MIB, self.clock))
        self.run_clock(done)
        self.assertEqual(self.transport.events[-1], ("unregister",))
        self.assertClosed(self.opened)

    def test_paced_on_a_reactor_clock_needs_one_timer_per_chunk(self) -> None:
        """At a real reactor's clock reading, each chunk past the burst costs exactly one timer."""
        self.clock = SteppingClock()
        self.clock.advance(REACTOR_NOW)
        _, done = self.start(offset=0, length=FILE_SIZE, bucket=TokenBucket(1e6, self.clock))
        fired = 0
        while self.clock.calls and fired < 100:
            self.clock.fire_next()
            fired += 1
        chunks = -(-FILE_SIZE // CHUNK)
        self.assertEqual((fired, len(self.transport.value())), (chunks - MIN_BURST // CHUNK, FILE_SIZE))
        self.assertIsNone(self.successResultOf(done))

    def test_consumer_pause_holds_after_credit_returns(self) -> None:
        """Credit coming back does not write while the consumer is still paused."""
        producer, _ = self.start(bucket=TokenBucket(MIB, self.clock))
        producer.pauseProducing()
        self.clock.advance(1)
        self.assertEqual((len(self.transport.value()), self.clock.getDelayedCalls()), (MIN_BURST, []))

    def test_consumer_resume_after_credit_returns_writes(self) -> None:
        """Once both the credit and the consumer are back, writing goes on."""
        producer, _ = self.start(bucket=TokenBucket(MIB, self.clock))
        producer.pauseProducing()
        self.clock.advance(CHUNK / MIB)
        producer.resumeProducing()
        self.assertEqual(len(self.transport.value()), MIN_BURST + CHUNK)

    def test_consumer_resume_during_rate_pause_writes_nothing(self) -> None:
        """A consumer resume while credit is missing neither writes nor sets a second timer."""
        producer, _ = self.start(bucket=TokenBucket(MIB, self.clock))
        producer.pauseProducing()
        producer.resumeProducing()
        self.assertEqual((len(self.transport.value()), len(self.clock.getDelayedCalls())), (MIN_BURST, 1))

    # --- ends other than success ---------------------------------------------------------------

    def test_stop_producing_fails_with_connection_lost(self) -> None:
        """The consumer stopping the producer fails done with ConnectionLost."""
        producer, done = self.start(bucket=TokenBucket(MIB, self.clock))
        producer.stopProducing()
        self.failureResultOf(done, ConnectionLost)

    def test_stop_producing_closes_fd_and_cancels_timer(self) -> None:
        """A stopped producer closes its fd and leaves no timer behind."""
        producer, done = self.start(bucket=TokenBucket(MIB, self.clock))
        producer.stopProducing()
        self.failureResultOf(done)
        self.assertClosed(self.opened)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_producing_inside_write(self) -> None:
        """A consumer that stops the producer from within write gets no more writes."""
        self.transport.stop_on_write = True
        _, done = self.start()
        self.failureResultOf(done, ConnectionLost)
        self.assertEqual(self.transport.writes, [CHUNK])
        self.assertClosed(self.opened)

    def test_stop_producing_after_done_is_harmless(self) -> None:
        """A late stopProducing does not change a finished result."""
        producer, done = self.start()
        producer.stopProducing()
        self.assertIsNone(self.successResultOf(done))

    def test_file_shorter_than_range_fails_with_file_shrank(self) -> None:
        """A range past the end of the file fails with FileShrank after the bytes there are."""
        _, done = self.start(offset=4 * CHUNK, length=2 * CHUNK)
        self.failureResultOf(done, FileShrank)
        self.assertEqual(self.transport.value(), self.data[4 * CHUNK :])

    def test_file_shrank_closes_fd_and_unregisters(self) -> None:
        """Cut short, the producer still closes its fd and lets the consumer go."""
        _, done = self.start(offset=4 * CHUNK, length=2 * CHUNK)
        self.failureResultOf(done, FileShrank)
        self.assertClosed(self.opened)
        self.assertEqual(self.transport.events[-1], ("unregister",))

    def test_file_truncated_during_rate_pause(self) -> None:
        """A file truncated while the producer waits for credit fails it with FileShrank when it resumes."""
        _, done = self.start(bucket=TokenBucket(MIB, self.clock))
        os.truncate(self.path, OFFSET + MIN_BURST)
        self.clock.advance(CHUNK / MIB)
        self.failureResultOf(done, FileShrank)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_read_error_fails_with_os_error(self) -> None:
        """A file that cannot be read fails done with the OSError, and the fd is still closed."""
        _, done = self.start(flags=os.O_WRONLY)
        self.failureResultOf(done, OSError)
        self.assertClosed(self.opened)

    def test_cancel_stops_the_producer(self) -> None:
        """Cancelling done fails it, closes the fd, lets the consumer go and cancels the timer."""
        _, done = self.start(bucket=TokenBucket(MIB, self.clock))
        done.cancel()
        self.failureResultOf(done, ConnectionLost, CancelledError)
        self.assertClosed(self.opened)
        self.assertEqual(self.transport.events[-1], ("unregister",))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancelled_producer_writes_no_more(self) -> None:
        """After a cancel, time passing sends nothing."""
        _, done = self.start(bucket=TokenBucket(MIB, self.clock))
        done.cancel()
        self.failureResultOf(done)
        self.clock.advance(60)
        self.assertEqual(len(self.transport.value()), MIN_BURST)


# --- BodyWriter with a bucket ------------------------------------------------------------------

RATE = MIB  # its default burst is MIN_BURST
SLOW = CHUNK  # 64 KiB/s: a pause of twice IDLE costs only 1.25 MiB
PIECE = MIB


class ReadAheadTests(SynchronousTestCase):
    """FileRangeProducer with ``read``: the file is read off the reactor thread, READ_AHEAD bytes at a time."""

    def setUp(self) -> None:
        self.path = self.mktemp()
        self.data = random.Random(5).randbytes(3 * READ_AHEAD + 777)
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.clock = Clock()
        self.transport = SocketLikeTransport()
        self.disk = DeferredRunner()  # a disk pool the test drives
        self.reads = self.disk.pending

    def finish_read(self) -> None:
        self.disk.run_one()

    def start(self, offset: int = 100, length: int | None = None):  # type: ignore[no-untyped-def]
        length = len(self.data) - offset if length is None else length
        self.opened = os.open(self.path, os.O_RDONLY)
        producer = FileRangeProducer(self.transport, self.opened, offset, length, self.clock, read=self.disk)
        return producer, producer.start()

    def test_nothing_is_written_until_the_read_returns(self) -> None:
        """The reactor side writes only bytes a finished read brought."""
        self.start()
        self.assertEqual((self.transport.value(), len(self.reads)), (b"", 1))

    def test_the_range_arrives_byte_exact(self) -> None:
        """Reads in turn deliver exactly the asked range, and done fires."""
        _, done = self.start(offset=100)
        while self.reads:
            self.finish_read()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(self.transport.value(), self.data[100:])

    def test_one_read_per_read_ahead_bytes(self) -> None:
        """3 MiB + a bit cost four reads, not one per 64 KiB chunk."""
        _, done = self.start(offset=0)
        count = 0
        while self.reads:
            self.finish_read()
            count += 1
        self.assertEqual((count, done.called), (4, True))

    def test_fd_stays_open_for_a_read_in_flight(self) -> None:
        """Stopped during a read, the producer closes its fd only when the read returns."""
        producer, done = self.start()
        producer.stopProducing()
        self.failureResultOf(done, ConnectionLost)
        os.fstat(self.opened)  # still open: the disk thread may be reading it
        self.finish_read()
        error = self.assertRaises(OSError, os.fstat, self.opened)
        self.assertEqual((error.errno, self.transport.value()), (errno.EBADF, b""))

    def test_file_shorter_than_the_range_fails(self) -> None:
        """A read that finds no bytes left ends the transfer with FileShrank."""
        _, done = self.start(offset=0, length=len(self.data) + 10)
        while self.reads:
            self.finish_read()
        self.failureResultOf(done, FileShrank)


class PauseRecordingTransport(StringTransport):
    """A StringTransport that also remembers each pause and resume it was asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self.calls.append("resume")
        super().resumeProducing()


class PacedBodyWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.addCleanup(os.close, self.fd)
        self.clock = Clock()
        self.bucket = TokenBucket(RATE, self.clock)
        self.pieces: list[tuple[int, int, str]] = []
        self.transport = PauseRecordingTransport()

    def connect(self, expected=8 * MIB, bucket=None, run_blocking=run_inline, fd=None, transport=None):
        writer = BodyWriter(
            self.fd if fd is None else fd,
            0,
            PIECE,
            expected,
            lambda *piece: self.pieces.append(piece),
            self.clock,
            IDLE,
            run_blocking,
            self.bucket if bucket is None else bucket,
        )
        writer.makeConnection(self.transport if transport is None else transport)
        return writer

    def debt_of(self, debt: int) -> bytes:
        """A read that leaves a full bucket ``debt`` bytes in debt."""
        return b"x" * (MIN_BURST + debt)

    def test_read_within_credit_does_not_pause(self) -> None:
        """A read the bucket can pay for leaves the transport producing."""
        writer = self.connect()
        writer.dataReceived(b"x" * MIN_BURST)
        self.assertEqual((self.transport.producerState, self.transport.calls), ("producing", []))

    def test_read_beyond_credit_pauses(self) -> None:
        """A read that puts the bucket in debt pauses the transport."""
        writer = self.connect()
        writer.dataReceived(self.debt_of(CHUNK))
        self.assertEqual(self.transport.producerState, "paused")

    def test_still_paused_before_the_debt_is_repaid(self) -> None:
        """Until the debt is repaid the transport stays paused."""
        writer = self.connect()
        writer.dataReceived(self.debt_of(CHUNK))
        self.clock.advance(CHUNK / RATE - 2**-20)
        self.assertEqual(self.transport.producerState, "paused")

    def test_resumes_when_the_debt_is_repaid(self) -> None:
        """The transport resumes exactly when the debt is repaid."""
        writer = self.connect()
        writer.dataReceived(self.debt_of(CHUNK))
        self.clock.advance(CHUNK / RATE - 2**-20)
        self.clock.advance(2**-20)
        self.assertEqual((self.transport.producerState, self.transport.calls), ("producing", ["pause", "resume"]))

    def test_reads_while_paused_extend_the_pause(self) -> None:
        """Bytes that still arrive during a pause are charged too and push the resume back."""
        writer = self.connect()
        writer.dataReceived(self.debt_of(CHUNK))  # repaid at 1/16 s
        self.clock.advance(1 / 32)
        writer.dataReceived(b"x" * CHUNK)  # now repaid at 1/32 + 3/32 = 1/8 s
        self.clock.advance(1 / 16)
        self.assertEqual(self.transport.producerState, "paused")
        self.clock.advance(1 / 32)
        self.assertEqual((self.transport.producerState, self.transport.calls), ("producing", ["pause", "resume"]))

    def test_one_pace_timer_however_many_reads(self) -> None:
        """Several reads during a pause keep one pace timer (beside the idle timer)."""
        writer = self.connect()
        for _ in range(5):
            writer.dataReceived(self.debt_of(CHUNK))
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)

    def test_reads_are_charged_to_the_parent(self) -> None:
        """A download's reads use up the host's credit, pausing another download under the same host."""
        host = TokenBucket(RATE, self.clock)
        first = self.connect(bucket=TokenBucket(0, self.clock, parent=host))
        other = PauseRecordingTransport()
        second = self.connect(bucket=TokenBucket(0, self.clock, parent=host), transport=other)
        first.dataReceived(b"x" * MIN_BURST)
        second.dataReceived(b"x" * CHUNK)
        self.assertEqual((self.transport.producerState, other.producerState), ("producing", "paused"))

    def test_paced_body_is_written_and_reported_whole(self) -> None:
        """Pacing changes when bytes come, not what is written or reported."""
        body = random.Random(5).randbytes(3 * MIB + 77)
        writer = self.connect(expected=len(body))
        for start in range(0, len(body), 100_000):
            while self.transport.producerState == "paused":
                self.clock.advance(self.clock.getDelayedCalls()[0].getTime() - self.clock.seconds())
            writer.dataReceived(body[start : start + 100_000])
        writer.connectionLost(DONE)
        self.assertEqual(self.successResultOf(writer.done), len(body))
        self.assertEqual(self.pieces, expected_pieces(body, PIECE))
        self.assertEqual(os.pread(self.fd, len(body) + 1, 0), body)

    def test_paced_body_takes_the_bytes_beyond_the_burst_over_the_rate(self) -> None:
        """A receiver paced by the bucket ends when the bytes past the burst have been paid for."""
        writer = self.connect(expected=2 * MIB)
        for _ in range(2 * MIB // CHUNK):
            while self.transport.producerState == "paused":
                self.clock.advance(min(call.getTime() for call in self.clock.getDelayedCalls()) - self.clock.seconds())
            writer.dataReceived(b"x" * CHUNK)
        self.clock.advance(min(call.getTime() for call in self.clock.getDelayedCalls()) - self.clock.seconds())
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual(self.clock.seconds(), (2 * MIB - MIN_BURST) / RATE)

    # --- timers and the end of the stream -------------------------------------------------

    def test_rate_pause_longer_than_idle_timeout_is_not_a_stall(self) -> None:
        """A pace pause longer than idle_timeout does not stop the transport."""
        writer = self.connect(bucket=TokenBucket(SLOW, self.clock))
        writer.dataReceived(self.debt_of(int(2 * IDLE * SLOW)))
        self.clock.advance(2 * IDLE)
        self.assertEqual(self.transport.producerState, "producing")

    def test_idle_timeout_counts_from_the_resume(self) -> None:
        """After a pace pause the idle timer runs from the resume: silence for idle_timeout then stops."""
        writer = self.connect(bucket=TokenBucket(SLOW, self.clock))
        writer.dataReceived(self.debt_of(int(2 * IDLE * SLOW)))
        self.clock.advance(2 * IDLE)
        self.clock.advance(IDLE - 0.5)
        self.assertEqual(self.transport.producerState, "producing")
        self.clock.advance(0.5)
        self.assertEqual(self.transport.producerState, "stopped")

    def test_connection_lost_cancels_the_pace_timer(self) -> None:
        """A body that ends during a pace pause leaves no timer, and nothing resumes it later."""
        body = self.debt_of(CHUNK)
        writer = self.connect(expected=len(body))
        writer.dataReceived(body)
        writer.connectionLost(DONE)
        self.assertEqual(self.successResultOf(writer.done), len(body))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failed_connection_cancels_the_pace_timer(self) -> None:
        """A connection dropped during a pace pause leaves no timer."""
        writer = self.connect()
        writer.dataReceived(self.debt_of(CHUNK))
        writer.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(writer.done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cancel_cancels_the_pace_timer(self) -> None:
        """Cancelling done during a pace pause leaves no timer and does not resume the transport."""
        writer = self.connect()
        writer.dataReceived(self.debt_of(CHUNK))
        writer.done.cancel()
        self.failureResultOf(writer.done, CancelledError)
        self.clock.advance(60)
        self.assertEqual((self.clock.getDelayedCalls(), self.transport.calls), ([], ["pause"]))

    def test_overlong_read_during_pause_cancels_the_pace_timer(self) -> None:
        """A body that turns out too long stops the transport and drops the pace timer."""
        writer = self.connect(expected=MIN_BURST + 2 * CHUNK)
        writer.dataReceived(self.debt_of(CHUNK))
        writer.dataReceived(b"x" * (2 * CHUNK))
        self.assertEqual((self.transport.producerState, self.clock.getDelayedCalls()), ("stopped", []))

    def test_write_error_on_a_paced_read_leaves_the_transport_stopped(self) -> None:
        """A read whose write fails at once stops the transport; its charge must not pause it again."""
        fd = os.open(self.path, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        writer = self.connect(fd=fd, bucket=TokenBucket(RATE, self.clock), transport=StringTransport())
        writer.dataReceived(b"x" * (2 * PIECE))  # one piece past a full bucket, and the write fails inline
        self.assertEqual(writer.transport.producerState, "stopped")
        writer.connectionLost(DONE)
        self.failureResultOf(writer.done, WriteError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    # --- rate and queue pauses together ---------------------------------------------------

    def test_credit_back_while_the_worker_lags_stays_paused(self) -> None:
        """The end of a pace pause does not resume a transport also paused for the write queue."""
        runner = DeferredRunner()
        writer = self.connect(run_blocking=runner)
        for _ in range(5):
            writer.dataReceived(b"x" * MIB)
        self.clock.advance((5 * MIB - MIN_BURST) / RATE)
        self.assertEqual(self.transport.producerState, "paused")

    def test_worker_catching_up_during_rate_pause_stays_paused(self) -> None:
        """The write queue draining does not resume a transport still in a pace pause."""
        runner = DeferredRunner()
        writer = self.connect(run_blocking=runner)
        for _ in range(5):
            writer.dataReceived(b"x" * MIB)
        while runner.pending:
            runner.run_one()
        self.assertEqual(self.transport.producerState, "paused")

    def test_resumes_when_both_queue_and_debt_clear(self) -> None:
        """With the queue drained and the debt repaid, the transport produces again, paused and resumed once."""
        runner = DeferredRunner()
        writer = self.connect(run_blocking=runner)
        for _ in range(5):
            writer.dataReceived(b"x" * MIB)
        while runner.pending:
            runner.run_one()
        self.clock.advance((5 * MIB - MIN_BURST) / RATE)
        self.assertEqual((self.transport.producerState, self.transport.calls), ("producing", ["pause", "resume"]))
