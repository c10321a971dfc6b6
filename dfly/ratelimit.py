"""Token buckets, and the producer that paces a file range through them.

A `TokenBucket` holds up to ``burst`` bytes of credit and earns ``rate``
bytes of it per second of its clock.  Buckets nest: a download's task bucket
has the host's bucket as its parent, and every byte is drawn from each
bucket in the chain, so whichever limit is tighter at the moment governs.
A rate of 0 means "no limit" at that level (the chain above still counts).

There are two ways to draw, for the two directions data moves:

- `TokenBucket.reserve` is for producers, which choose how much to send: it
  takes ``n`` bytes of credit only if every bucket has them, and otherwise
  says how long to wait.  What it grants over any interval of length ``t``
  is at most ``burst + rate * t``.
- `TokenBucket.charge` is for receivers, which learn the size of a read only
  after it arrived: the bytes are taken even into debt, and the answer is
  how long to pause the transport until the debt is repaid.  Over any
  interval this lets through at most one read more than ``reserve`` would.

Neither needs a timer per byte or a polling loop: a paused transfer sets a
single ``callLater`` for the moment its credit is back.

A client that opens a range and stops reading would hold its transfer (an
fd, an upload slot, a read-ahead buffer) forever: `FileRangeProducer`
with ``write_idle`` gives up once its consumer has kept it paused that long,
and `send_range` then aborts the connection.
"""

from __future__ import annotations

import math
import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from zope.interface import implementer

from dfly.refusals import RefusalLog

log = Logger(namespace="dfly.ratelimit")

#: Bytes a producer reads and sends at once.
CHUNK = 64 * 1024
#: Bytes one read off the reactor thread fetches ahead (FileRangeProducer with ``read``):
#: one thread hop per MiB, not per chunk.
READ_AHEAD = 1 << 20
#: Default burst, in seconds of the rate: small, so a limit holds over short
#: transfers too (a 1 s burst would make a 16 s transfer finish in 15 s).
BURST_SECONDS = 0.1
#: No bucket holds less than this, so one `CHUNK` can always be reserved.
MIN_BURST = 2 * CHUNK
#: Credit within this many bytes of a request counts as enough (see `_slack`).
_SLACK = 1e-6


class TokenBucket:
    """A rate limit that can sit inside another one (task inside host)."""

    def __init__(
        self,
        rate: float,
        clock: IReactorTime,
        burst: float | None = None,
        parent: TokenBucket | None = None,
    ) -> None:
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        if burst is not None and burst <= 0:
            raise ValueError(f"burst must be > 0, got {burst!r}")
        self.clock = clock
        self._burst_given = burst
        self.parent = parent
        self.rate = float(rate)
        self.burst = self._burst_for(self.rate)
        self._tokens = self.burst
        self._stamp = clock.seconds()

    def _burst_for(self, rate: float) -> float:
        if self._burst_given is not None:
            return max(float(self._burst_given), MIN_BURST)
        return max(rate * BURST_SECONDS, MIN_BURST)

    @property
    def limited(self) -> bool:
        return self.rate > 0

    def set_rate(self, rate: float) -> None:
        """Change the limit from now on; credit earned so far is kept (up to the new burst)."""
        if rate < 0:
            raise ValueError(f"rate must be >= 0, got {rate!r}")
        self._refill()
        self.rate = float(rate)
        self.burst = self._burst_for(self.rate)
        self._tokens = min(self._tokens, self.burst)

    def tokens(self) -> float:
        """Credit in this bucket alone (negative while in debt)."""
        self._refill()
        return self._tokens

    def chain(self) -> list[TokenBucket]:
        """This bucket and those above it that actually limit."""
        out = []
        bucket: TokenBucket | None = self
        while bucket is not None:
            if bucket.limited:
                out.append(bucket)
            bucket = bucket.parent
        return out

    def reserve(self, n: int) -> float:
        """Take ``n`` bytes from every bucket and return 0, or return the seconds to wait.

        ``n`` must not exceed any bucket's burst (`CHUNK` never does).
        """
        chain = self.chain()
        wait = 0.0
        for bucket in chain:
            bucket._refill()
            missing = n - bucket._tokens
            if missing > bucket._slack():
                wait = max(wait, missing / bucket.rate)
        if wait > 0:
            return wait
        for bucket in chain:
            bucket._tokens -= n
        return 0.0

    def charge(self, n: int) -> float:
        """Take ``n`` bytes that already arrived; the seconds until no bucket is in debt."""
        wait = 0.0
        for bucket in self.chain():
            bucket._refill()
            bucket._tokens -= n
            if bucket._tokens < -bucket._slack():
                wait = max(wait, -bucket._tokens / bucket.rate)
        return wait

    def _slack(self) -> float:
        """Bytes the refill may be short by through float rounding of the clock.

        A reactor's clock is a Unix time (~1.8e9 s, resolution ~2.4e-7 s), so
        ``elapsed * rate`` can miss by ``rate`` times that; a shortfall that
        small would otherwise ask for a wait the clock cannot even express.
        """
        return max(_SLACK, 4 * math.ulp(self._stamp) * self.rate)

    def _refill(self) -> None:
        now = self.clock.seconds()
        if self.rate > 0 and now > self._stamp:
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now


class HostLimit:
    """``--totallimit``: one rate for each direction of a host's P2P traffic.

    Every download's task bucket has ``rx`` as its parent and every upload
    draws from ``tx``, so all of a host's transfers share the limit.
    """

    def __init__(self, rate: float, clock: IReactorTime) -> None:
        self.rx = TokenBucket(rate, clock)
        self.tx = TokenBucket(rate, clock)

    @property
    def rate(self) -> float:
        return self.rx.rate

    def set_rate(self, rate: float) -> None:
        self.rx.set_rate(rate)
        self.tx.set_rate(rate)


class FileShrank(Exception):
    """The file ended before the range did: the response must be cut short."""


class WriteStalled(Exception):
    """The consumer kept the producer paused for its whole ``write_idle``: the client reads nothing."""


@implementer(IPushProducer)
class FileRangeProducer:
    """Sends ``length`` bytes of ``fd`` from ``offset``, 64 KiB at a time, paced by ``bucket``.

    A push producer: it writes while neither the consumer (its send buffer is
    full) nor the bucket (no credit) holds it back, each pause being a reason
    in a set, and it resumes when the set is empty again.  ``done`` fires with
    None once every byte is written, or fails with `FileShrank`, an `OSError`
    from reading, or `ConnectionLost` when the consumer stopped it.  It owns
    ``fd`` and closes it in every case.

    With ``read`` (a runner for blocking calls, e.g. a `DiskPool`), the file
    is read ``READ_AHEAD`` bytes at a time on that runner and written from
    the buffer, so the reactor thread never waits for the disk; pause reason
    ``"read"`` holds the producer meanwhile.  A read in flight when the
    transfer ends keeps ``fd`` open until it returns.

    With ``write_idle`` > 0, a pause by the consumer (its send buffer stayed
    full: the client does not read) that lasts that many seconds ends the
    transfer with `WriteStalled`.  Only the consumer's pauses count: waiting
    for credit or for the disk is not the client's doing.
    """

    def __init__(
        self,
        consumer: IConsumer,
        fd: int,
        offset: int,
        length: int,
        clock: IReactorTime,
        bucket: TokenBucket | None = None,
        read: Any = None,
        write_idle: float = 0.0,
    ) -> None:
        self.consumer = consumer
        self.fd = fd
        self.offset = offset
        self.remaining = length
        self.clock = clock
        self.bucket = bucket
        self.sent = 0
        self._read = read
        self._buffer = memoryview(b"")
        self._read_at = offset  # where the next read-ahead starts
        self._reading = False
        self._paused: set[str] = set()
        self._timer: IDelayedCall | None = None
        self._pumping = False
        self.write_idle = write_idle
        self._stall: IDelayedCall | None = None  # armed while the consumer holds us paused
        self.done: Deferred[None] = Deferred(lambda d: self._end(ConnectionLost("cancelled")))

    def start(self) -> Deferred[None]:
        self.consumer.registerProducer(self, True)
        self._pump()
        return self.done

    # IPushProducer ------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused.add("consumer")
        if self.write_idle > 0 and self._stall is None and self.fd >= 0:
            self._stall = self.clock.callLater(self.write_idle, self._stalled)

    def resumeProducing(self) -> None:
        self._paused.discard("consumer")
        self._cancel_stall()
        self._pump()

    def stopProducing(self) -> None:
        self._end(ConnectionLost("the consumer stopped the transfer"))

    # ---------------------------------------------------------------------------------

    def _stalled(self) -> None:
        self._stall = None
        self._end(WriteStalled(f"the client read nothing for {self.write_idle:g}s"))

    def _cancel_stall(self) -> None:
        if self._stall is not None:
            if self._stall.active():
                self._stall.cancel()
            self._stall = None

    def _credit(self) -> None:
        self._timer = None
        self._paused.discard("rate")
        self._pump()

    def _pump(self) -> None:
        # consumer.write may call pauseProducing or resumeProducing (and so
        # _pump) re-entrantly; the flag keeps one loop running at a time.
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and self.fd >= 0 and self.remaining > 0:
                if self._read is not None and not self._buffer:
                    self._read_ahead()
                    continue  # "read" pauses the loop unless the read already returned
                n = min(CHUNK, self.remaining)
                if self.bucket is not None:
                    wait = self.bucket.reserve(n)
                    if wait > 0:
                        self._paused.add("rate")
                        self._timer = self.clock.callLater(wait, self._credit)
                        return
                if self._read is not None:
                    data, self._buffer = bytes(self._buffer[:n]), self._buffer[n:]
                else:
                    data = os.pread(self.fd, n, self.offset)
                if not data:
                    self._end(FileShrank(f"file ended {self.remaining} bytes before the range"))
                    return
                self.offset += len(data)
                self.remaining -= len(data)
                self.sent += len(data)
                self.consumer.write(data)
        except OSError as e:
            self._end(e)
            return
        finally:
            self._pumping = False
        if self.remaining <= 0 and self.fd >= 0:
            self._end(None)

    def _read_ahead(self) -> None:
        size = min(READ_AHEAD, self.offset + self.remaining - self._read_at)
        fd, at = self.fd, self._read_at
        self._reading = True
        self._paused.add("read")

        def got(data: bytes) -> None:
            self._reading = False
            if self.fd < 0:
                os.close(fd)  # the transfer ended while we read: the fd was left for us
                return
            if not data:
                self._end(FileShrank(f"file ended {self.remaining} bytes before the range"))
                return
            self._read_at += len(data)
            self._buffer = memoryview(data)
            self._paused.discard("read")
            self._pump()

        def failed(failure: Failure) -> None:
            self._reading = False
            if self.fd < 0:
                os.close(fd)
            else:
                self._end(failure.value if isinstance(failure.value, Exception) else OSError(str(failure.value)))

        self._read(lambda: os.pread(fd, size, at)).addCallbacks(got, failed)

    def _end(self, error: Exception | None) -> None:
        """Close the file (after a read in flight), let the consumer go, and fire ``done`` once."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._cancel_stall()
        if self.fd >= 0:
            if not self._reading:
                os.close(self.fd)
            self.fd = -1
            self._buffer = memoryview(b"")
            self._paused.add("ended")
            try:
                self.consumer.unregisterProducer()
            except (AttributeError, RuntimeError):
                pass  # a request whose connection is gone has nothing to unregister
        if self.done.called:
            return
        if error is None:
            self.done.callback(None)
        else:
            self.done.errback(error)


def send_range(request: IRequest, fd: int, offset: int, length: int, clock: IReactorTime,
               bucket: TokenBucket | None = None, read: Any = None, write_idle: float = 0.0,
               refusals: RefusalLog | None = None) -> Deferred[None]:
    """Send a file range as the body of ``request`` (headers already set), paced by ``bucket``.

    Fires when the last byte is written.  The client going away stops the
    producer; a file that shrank or cannot be read drops the connection,
    because after the first body byte nothing else can tell the client that
    the body is short.  A client that reads nothing for ``write_idle``
    seconds (0: never given up) has its connection aborted, logged through
    ``refusals`` (once a minute per client).
    """
    producer = FileRangeProducer(request, fd, offset, length, clock, bucket, read, write_idle)
    if getattr(getattr(request, "channel", None), "_waitingForTransport", False):
        # A pipelined request behind a response the client has not read: the
        # transport paused the channel before this producer existed and will
        # not pause it again (HTTPChannel passes on only the next resume), so
        # it starts paused, or it would buffer its whole range in memory.
        producer.pauseProducing()
    request.notifyFinish().addErrback(lambda _: producer.stopProducing())

    def failed(failure: Failure) -> Failure:
        if failure.check(WriteStalled):
            client = getattr(request.getClientAddress(), "host", "?")
            if refusals is not None:
                refusals.refused(client, "a download it does not read", failure.getErrorMessage())
            else:
                log.info("aborted a download to {client}: {why}", client=client, why=failure.getErrorMessage())
            if request.channel is not None:
                request.channel.transport.abortConnection()
        elif failure.check(FileShrank, OSError):
            log.warn("cannot send {path}: {error}", path=request.path, error=failure.getErrorMessage())
            if request.channel is not None:
                request.channel.transport.abortConnection()
        return failure

    return producer.start().addErrback(failed)


def describe_limit(rate: float) -> str:
    """A rate for logs and messages: ``10.0 MiB/s`` or ``unlimited``."""
    if rate <= 0:
        return "unlimited"
    return f"{rate / (1 << 20):.1f} MiB/s"

