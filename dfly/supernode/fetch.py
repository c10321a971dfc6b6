"""One task's bytes in the CDN cache: the source fetch as an explicit state machine.

::

    opening --200/206--> fetching --all bytes in--> verifying --digest ok--> done
       |  \\--304 (cache valid)--------------------------------------------> done
       \\------------------ any error, cancel or limit -------------------> failed
                                                 done --cache file gone--> failed

The states are `FetchState`, the same words the ``.meta`` records.  A
transition the table does not list is a bug and raises.  While fetching,
each piece is cached (and pullable) as soon as its last byte is written and
hashed; the ``.meta`` is rewritten off the reactor thread as pieces land,
so a fetch cut off by a restart resumes from its verified prefix
(``Range`` + ``If-Range``).  A failed fetch leaves nothing in the cache.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly.pieces import file_digest, piece_count
from dfly.ratelimit import TokenBucket
from dfly.source import SourceResponse
from dfly.stream import BodyWriter, RunBlocking, StreamError, run_inline
from dfly.supernode.cdn import CacheMeta, CdnCache, FetchState

log = Logger(namespace="dfly.supernode")

S = FetchState
TRANSITIONS: dict[FetchState, frozenset[FetchState]] = {
    S.OPENING: frozenset({S.FETCHING, S.DONE, S.FAILED}),
    S.FETCHING: frozenset({S.VERIFYING, S.FAILED}),
    S.VERIFYING: frozenset({S.DONE, S.FAILED}),
    S.DONE: frozenset({S.FAILED}),  # its cache file vanished (removed by hand)
    S.FAILED: frozenset(),
}


def _reason(failure: Failure, task_id: str) -> str:
    """Why a fetch failed, as the task's peers are told it (in their pulls' 502).

    A `StreamError` is the source's doing (short, long, stalled body, wrong
    digest) or a refused write, and says so without paths.  Anything else is
    the supernode's own trouble: a cache file that vanished (its error names
    the path) or a bug; the details go to the log only.
    """
    if failure.check(StreamError):
        return failure.getErrorMessage()
    if failure.check(OSError):
        log.error("cache of taskID:{task_id} unreadable: {error}", task_id=task_id, error=failure.value)
        return "the supernode cannot read its cache"
    log.failure("fetch of taskID:{task_id} failed unexpectedly", failure, task_id=task_id)
    return "internal error"


class BadTransition(Exception):
    """The fetch was asked to move along an edge the table does not have."""


@attrs.define(eq=False)
class FetchEnv:
    """What every fetch of one supernode shares."""

    cache: CdnCache
    clock: IReactorTime
    idle_timeout: float = 30.0
    run_blocking: RunBlocking = run_inline  # hashing and writing piece bodies
    disk: RunBlocking = run_inline  # .meta writes and cache deletions
    bucket: TokenBucket | None = None  # --max-bandwidth, shared by every fetch
    max_file_size: int = -1  # -1: unlimited


@attrs.define(eq=False)
class CdnFetch:
    """What the cache holds of one task version, and how its fetch is going."""

    task_id: str
    url: str  # the task URL (what the task id was computed from)
    md5: str | None = None
    identifier: str | None = None
    digest: tuple[str, str] | None = None  # (algorithm, hex) the whole file must match
    piece_size: int = 0
    length: int = -1  # -1 until known
    digests: list[str] = attrs.Factory(list)
    etag: str | None = None
    last_modified: str | None = None
    state: FetchState = FetchState.OPENING
    error: str = ""
    #: Fires (with None) when the fetch has ended and its file is closed.
    ended: Deferred[None] = attrs.Factory(Deferred)
    _writer: BodyWriter | None = None
    _save_queued: "Deferred[None] | None" = None  # fires when the queued, not yet started save is written
    _stopped: bool = False
    _disk_tail: Deferred[None] = attrs.Factory(lambda: succeed(None))

    @classmethod
    def from_cache(cls, meta: CacheMeta) -> "CdnFetch":
        """A complete cache entry the source confirmed (304): nothing to fetch."""
        fetch = cls(
            task_id=meta.task_id, url=meta.url, md5=meta.md5, identifier=meta.identifier,
            piece_size=meta.piece_size, length=meta.length, digests=list(meta.piece_digests),
            etag=meta.etag, last_modified=meta.last_modified,
        )
        fetch._advance(S.DONE)
        fetch.ended.callback(None)
        return fetch

    @property
    def ready(self) -> int:
        return len(self.digests)

    @property
    def total_pieces(self) -> int | None:
        """Known once the length is."""
        return None if self.length < 0 else piece_count(self.length, self.piece_size)

    @property
    def running(self) -> bool:
        return self.state in (S.OPENING, S.FETCHING, S.VERIFYING)

    def meta(self) -> CacheMeta:
        return CacheMeta(
            task_id=self.task_id, url=self.url, length=self.length, piece_size=self.piece_size,
            piece_digests=tuple(self.digests), etag=self.etag, last_modified=self.last_modified,
            state=self.state, md5=self.md5, identifier=self.identifier,
        )

    def _advance(self, new: FetchState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise BadTransition(f"taskID:{self.task_id} cannot go from {self.state.value} to {new.value}")
        self.state = new

    # --- fetching ---------------------------------------------------------------

    def start(
        self,
        env: FetchEnv,
        opened: SourceResponse,
        source_url: str,
        on_piece: Callable[[int], None],
        on_end: Callable[["CdnFetch"], None],
        resume_pieces: int = 0,
    ) -> None:
        """Stream ``opened``'s body into the cache.

        ``resume_pieces`` > 0: ``opened`` is a 206 from byte
        ``resume_pieces * piece_size`` and ``digests`` already hold the
        verified prefix; otherwise the data file starts empty.
        """
        offset = resume_pieces * self.piece_size
        if resume_pieces:
            fd = env.cache.open_for_resume(self.task_id)  # OSError: still OPENING, the caller fails it
        else:
            fd = env.cache.open_for_write(self.task_id)
        self._advance(S.FETCHING)
        self._save_meta(env)
        remaining = self.length - offset if self.length >= 0 else -1
        log.info(
            "start to download taskID:{task_id} from {url}, length:{length} pieceSize:{piece_size}"
            "{resumed}",
            task_id=self.task_id, url=source_url, length=self.length, piece_size=self.piece_size,
            resumed=f" (resumed at piece {resume_pieces}, byte {offset})" if resume_pieces else "",
        )

        def piece_ready(index: int, length: int, digest: str) -> None:
            n = resume_pieces + index
            if length < self.piece_size:
                # Only the last piece is short: now the length is known.
                self.length = n * self.piece_size + length
            self.digests.append(digest)
            self._save_meta(env)
            on_piece(n)

        writer = BodyWriter(fd, offset, self.piece_size, remaining, piece_ready, env.clock, env.idle_timeout,
                            env.run_blocking, env.bucket, env.max_file_size - offset if env.max_file_size >= 0 else -1)
        self._writer = writer
        opened.response.deliverBody(writer)

        def verify(received: int) -> Deferred[int] | int:
            self._advance(S.VERIFYING)
            length = offset + received
            if self.digest is None:
                return length
            algorithm, expected = self.digest
            path = env.cache.data_path(self.task_id)

            def compare(actual: str) -> int:
                if actual != expected:
                    raise StreamError(f"{algorithm} of the source is {actual}, expected {expected}")
                return length

            return env.run_blocking(lambda: file_digest(path, algorithm)).addCallback(compare)

        def finished(length: int) -> None:
            self.length = length
            self._advance(S.DONE)
            log.info("success to get taskID:{task_id} fileLength:{length} pieces:{n}",
                     task_id=self.task_id, length=length, n=self.ready)

        def failed(failure: Failure) -> None:
            if self._stopped:
                # The supernode is stopping: the state stays "fetching" and
                # the meta keeps the verified prefix, so the next run resumes.
                log.info("fetch of taskID:{task_id} stopped after {n} pieces", task_id=self.task_id, n=self.ready)
                return
            self.fail(f"CDN fetch of {source_url} failed: {_reason(failure, self.task_id)}")

        def closed(_: object) -> Deferred[Any]:
            os.close(fd)
            self._writer = None
            on_end(self)
            if self.state == S.FAILED:
                # Nothing half-fetched or wrong stays cached.
                return self._on_disk(env, lambda: lambda: env.cache.remove(self.task_id))
            return self._save_meta(env)

        (writer.done.addCallback(verify).addCallbacks(finished, failed).addBoth(closed)
         .addBoth(lambda _: self.ended.callback(None)))

    def fail(self, error: str) -> None:
        """End in FAILED (from a running state, or DONE when the cache file is gone)."""
        if self.state == S.FAILED:
            return
        self._advance(S.FAILED)
        self.error = error
        log.error("{error}", error=error)

    def cancel(self) -> None:
        """Stop a running fetch (a stopping supernode: its meta stays 'fetching', resumable)."""
        if self._writer is not None:
            self._stopped = True
            self._writer.done.cancel()

    def _save_meta(self, env: FetchEnv) -> Deferred[None]:
        """Write the meta on the disk pool after what is queued; saves not yet started merge."""
        if self._save_queued is not None:
            # The queued save will write the newest state: wait for it, so
            # whoever waits on this one (the fetch's end) waits for the disk.
            merged: Deferred[None] = Deferred()
            self._save_queued.addBoth(lambda result: (merged.callback(None), result)[1])
            return merged

        def save() -> Callable[[], None]:
            self._save_queued = None
            meta = self.meta()  # taken on the reactor thread, when the write starts
            return lambda: env.cache.save_meta(meta)

        queued: Deferred[None] = Deferred()
        self._save_queued = queued  # before _on_disk: it may start the save at once
        self._on_disk(env, save).addBoth(lambda _: queued.callback(None))
        return queued

    def _on_disk(self, env: FetchEnv, make: Callable[[], Callable[[], None]]) -> Deferred[None]:
        """Run disk work for this fetch in order (a removal never races a meta write)."""
        done: Deferred[None] = Deferred()

        def run(_: object) -> Deferred[None]:
            op = make()
            return env.disk(op).addErrback(
                lambda f: log.failure("cache bookkeeping of taskID:{task_id} failed", f, task_id=self.task_id)
            )

        self._disk_tail.addBoth(run).addBoth(lambda _: done.callback(None))
        return done
