"""Tasks on the supernode: where registrations, pulls and reports meet.

A task is born when the first peer registers its URL.  The supernode opens
the source once with that peer's headers; the same response is the CDN
fetch (`dfly.supernode.fetch`), each piece pullable the moment it is on disk.
The other concerns live in their own units, which this module only wires:

- `access.SourceAccess`: who may read a task (bounded, expiring, hashed) and
  the 404 memory;
- `fetch.CdnFetch`: the fetch as a state machine, with resume and ``.meta``;
- `scheduler.TaskSchedule`: which piece from whom;
- `pullqueue.PullQueue`: held pulls, woken only when an event gives them work;
- `liveness.PeerLiveness`: which peers went silent.

Everything ends: a peer that goes silent or says goodbye leaves at once
with everything it held; a task with no peer left leaves memory after
``task_expire_time`` (its cache entry stays on disk for the disk GC); the
memories of `SourceAccess` expire and are bounded.

A registration for a finished task revalidates it with the source (one
conditional GET in flight per task, answers shared for
``revalidate_window``).  A changed source makes a new task *version* with
its own id, key and cache file: new registrants get the new bytes, peers of
the old version finish the old one, and no download mixes the two.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import OrderedDict
from typing import Any, Mapping, NoReturn

import attrs
import hyperlink
from twisted.internet.defer import CancelledError, Deferred, DeferredSemaphore, gatherResults
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly import codes
from dfly.jsonapi import ApiError
from dfly.pieces import format_range, piece_range, piece_size_for
from dfly.source import SourceClient, SourceError, SourceResponse, abort_body
from dfly.supernode import liveness
from dfly.supernode.access import SourceAccess, access_fingerprint
from dfly.supernode.cdn import CdnCache, FetchState
from dfly.supernode.diskgc import DiskQuota
from dfly.supernode.fetch import CdnFetch, FetchEnv
from dfly.supernode.liveness import PeerLiveness
from dfly.supernode.peerauth import secret_matches
from dfly.supernode.policy import SchedulerPolicy
from dfly.supernode.pullqueue import (
    REEVALUATE, TIMED_OUT, WAIT_NOW, Assignment, Deadlines, PullCounters, PullQueue, Woken,
)
from dfly.supernode.scheduler import Peer, TaskSchedule

log = Logger(namespace="dfly.supernode")

#: The scheduler's name for the CDN; peers see ``cdnnode:<ip>~<taskId>``.
CDN = "cdnnode:"
_DEFAULT_POLICY = SchedulerPolicy()
#: Kept as names for the tests and docs: the policy's defaults.
SILENCE = _DEFAULT_POLICY.silence
HUNG_UP_GRACE = _DEFAULT_POLICY.hung_up_grace
#: The longest a pull may ask to be held (its ``wait``): a proxy or NAT on
#: the way may cut a connection idle for longer.
MAX_POLL_WAIT = 60.0


@attrs.frozen
class Registration:
    """A validated ``POST /peer/registry``."""

    url: str
    task_url: str
    task_id: str  # the base id: what this URL (and md5/identifier/digest) computes
    headers: Mapping[str, str]
    md5: str | None
    identifier: str | None
    digest: tuple[str, str] | None  # (algorithm, hex): the whole file is checked against it
    cid: str
    ip: str
    port: int
    host_name: str


@attrs.define(eq=False)
class Limits:
    """Bounds against abuse and accidents; each refusal is a JSON 4xx/5xx and a log line."""

    max_tasks: int = 10_000  # tasks in memory (versions count)
    max_peers_per_task: int = 20_000
    max_fetches: int = 32  # source fetches running at once
    max_fetch_queue: int = 1_000  # registrations waiting for a fetch slot
    max_file_size: int = -1  # bytes; -1: unlimited


@attrs.define(eq=False)
class Task:
    """One task version in memory: its bytes, its peers and their held pulls."""

    fetch: CdnFetch
    base_id: str  # what registrations for this URL compute; the id of the first version
    schedule: TaskSchedule
    queue: PullQueue
    # Handed to registrants only (after their access check); the CDN port and
    # the peers' uploaders serve this version's bytes only to requests
    # carrying it, so knowing or computing a task id reads nothing.
    key: str = attrs.Factory(lambda: secrets.token_hex(16))
    revalidated_at: float = 0.0

    @property
    def task_id(self) -> str:
        return self.fetch.task_id

    @property
    def url(self) -> str:
        return self.fetch.url

    @property
    def state(self) -> FetchState:
        return self.fetch.state

    @property
    def error(self) -> str:
        return self.fetch.error

    @property
    def length(self) -> int:
        return self.fetch.length

    @property
    def piece_size(self) -> int:
        return self.fetch.piece_size

    @property
    def digests(self) -> list[str]:
        return self.fetch.digests

    @property
    def ready(self) -> int:
        return self.fetch.ready

    @property
    def total_pieces(self) -> int | None:
        return self.fetch.total_pieces

    @property
    def peers(self) -> dict[str, Peer]:
        return self.schedule.peers


def peer_path(task_id: str) -> str:
    """Where a peer serves a task's pieces (its uploader finds files by task, never by path)."""
    return f"/peer/file/{task_id}"


def version_id(base_id: str, validator: str) -> str:
    """The id of the version of ``base_id`` whose source answered with ``validator``.

    Derived, not random, so after a restart the same answer finds the same
    cache entry instead of fetching it again.
    """
    return hashlib.sha256(f"{base_id}\0{validator}".encode("utf-8", "surrogateescape")).hexdigest()


@attrs.define(eq=False)
class TaskManager:
    cache: CdnCache
    source: SourceClient
    clock: IReactorTime
    fail_access_interval: float = 180.0
    poll_timeout: float = 5.0
    idle_timeout: float = 30.0
    run_blocking: Any = None  # where hashing and piece writes run (None: inline)
    disk: Any = None  # where .meta writes and cache deletions run (None: inline)
    source_bucket: Any = None  # --max-bandwidth, shared by every source fetch
    policy: SchedulerPolicy = _DEFAULT_POLICY
    limits: Limits = attrs.Factory(Limits)
    access_ttl: float = 60.0
    task_expire_time: float = 180.0
    revalidate_window: float = 5.0
    quota: DiskQuota | None = None  # None: no disk quota (tests of the rest)
    counters: PullCounters = attrs.Factory(PullCounters)
    cdn_scheme: str = "http"  # "https" when the CDN port speaks TLS: its piece tasks then carry ``scheme``
    reports: int = 0
    tasks: dict[str, Task] = attrs.Factory(dict)  # every version in memory, by its id
    current: dict[str, Task] = attrs.Factory(dict)  # base id -> the version new registrants get
    access: SourceAccess = attrs.field(init=False)
    liveness: PeerLiveness = attrs.field(init=False)
    deadlines: Deadlines = attrs.field(init=False)  # when held pulls give up
    _env: FetchEnv = attrs.field(init=False)
    _fetch_slots: DeferredSemaphore = attrs.field(init=False)
    _opening: dict[str, Deferred[Task]] = attrs.Factory(dict)
    _idle: "OrderedDict[str, float]" = attrs.Factory(OrderedDict)
    #: base id -> the ids of its versions in memory, oldest first.
    _versions: dict[str, dict[str, None]] = attrs.Factory(dict)
    _stopped: bool = attrs.field(default=False, init=False)  # stop() ran: no pull is held any more

    def __attrs_post_init__(self) -> None:
        self.access = SourceAccess(self.clock, self.access_ttl, self.fail_access_interval)
        self.liveness = PeerLiveness(self.policy)
        self.deadlines = Deadlines(self.clock)
        kwargs = {k: v for k, v in (("run_blocking", self.run_blocking), ("disk", self.disk)) if v is not None}
        self._env = FetchEnv(self.cache, self.clock, self.idle_timeout, bucket=self.source_bucket,
                             max_file_size=self.limits.max_file_size, **kwargs)
        self._fetch_slots = DeferredSemaphore(self.limits.max_fetches)

    # --- registration ---------------------------------------------------------

    def register(self, reg: Registration) -> Deferred[Task]:
        """Add ``reg.cid`` to its task, creating, revalidating or fetching it as needed.

        Fails with `ApiError` when the source refuses this caller (608), is
        missing (607, remembered for ``fail_access_interval``) or
        unreachable, or when a limit is reached (503).
        """
        return Deferred.fromCoroutine(self._register(reg))

    async def _register(self, reg: Registration) -> Task:
        for _ in range(3):
            task = await self._join(reg)
            if self.tasks.get(task.task_id) is task:
                return task
            # It expired (no peer yet) while we asked the source: ask again.
        raise ApiError(503, codes.SYSTEM_ERROR, f"task {reg.task_id} keeps leaving memory; try again")

    async def _join(self, reg: Registration) -> Task:
        fingerprint = access_fingerprint(reg.url, reg.headers)
        reason = self.access.missing(fingerprint)
        if reason is not None:
            raise ApiError(404, codes.URL_NOT_REACHABLE, reason)
        checked = False
        while reg.task_id in self._opening:
            # Someone else is opening or revalidating this task: wait for them,
            # then check our own access below.  A fresh Deferred, so our cancel
            # is ours alone.
            opening = self._opening[reg.task_id]
            waiter: Deferred[Any] = Deferred()
            opening.addBoth(lambda r: (waiter.callback(None), r)[1])
            await waiter
        task = self.current.get(reg.task_id)
        if task is None or task.state == FetchState.FAILED:
            task = await self._exclusive(reg.task_id, self._open_task(reg))
            checked = True
        elif self._due_for_revalidation(task):
            task = await self._exclusive(reg.task_id, self._revalidate(task, reg))
            checked = True
        if not checked and not self.access.allowed(task.task_id, fingerprint):
            await self._check_access(task, reg)
        self.access.allow(task.task_id, fingerprint)
        if reg.cid not in task.peers and len(task.peers) >= self.limits.max_peers_per_task:
            log.warn("taskID:{task_id} has {n} peers (--max-peers-per-task): refused cid:{cid}",
                     task_id=task.task_id, n=len(task.peers), cid=reg.cid)
            raise ApiError(503, codes.SYSTEM_ERROR,
                           f"task {task.task_id} has {len(task.peers)} peers, the limit (--max-peers-per-task)")
        if self.tasks.get(task.task_id) is not task:
            return task  # gone while we waited: _register asks again
        known = task.peers.get(reg.cid)
        if known is not None and (known.ip, known.port) != (reg.ip, reg.port):
            raise ApiError(409, codes.TASK_CONFLICT, f"cid {reg.cid} is registered for another address")
        peer = task.schedule.add_peer(reg.cid, reg.ip, reg.port)
        peer.seen = self.clock.seconds()
        # A fresh secret each registration: the last registrant of a cid (its
        # own address, checked by the API) holds the only valid one.
        peer.secret = secrets.token_urlsafe(24)
        self._heard(task, task.peers[reg.cid])
        self._idle.pop(task.task_id, None)
        log.info(
            "success to register peer cid:{cid} ip:{ip} port:{port} for taskID:{task_id}",
            cid=reg.cid, ip=reg.ip, port=reg.port, task_id=task.task_id,
        )
        return task

    async def _exclusive(self, base_id: str, work: Any) -> Task:
        """Run ``work`` (a coroutine) as the one opening of ``base_id``; others wait for it."""
        opening = Deferred.fromCoroutine(work)
        self._opening[base_id] = opening
        try:
            return await opening
        finally:
            self._opening.pop(base_id, None)

    def _due_for_revalidation(self, task: Task) -> bool:
        """A finished task is asked about again once its last answer is older than the window."""
        fetch = task.fetch
        return (
            fetch.state == FetchState.DONE
            and bool(fetch.etag or fetch.last_modified)  # without a validator nothing can be asked cheaply
            and self.clock.seconds() - task.revalidated_at > self.revalidate_window
        )

    def _room_for_a_task(self, task_id: str) -> None:
        """503 when ``--max-tasks`` versions are in memory (after expiring what can go)."""
        if len(self.tasks) >= self.limits.max_tasks:
            self.sweep()
            if len(self.tasks) >= self.limits.max_tasks:
                log.warn("{n} tasks in memory (--max-tasks): refused taskID:{task_id}",
                         n=len(self.tasks), task_id=task_id)
                raise ApiError(503, codes.SYSTEM_ERROR,
                               f"the supernode holds {len(self.tasks)} tasks, its limit (--max-tasks)")

    def _new_task(self, fetch: CdnFetch, base_id: str) -> Task:
        self._room_for_a_task(fetch.task_id)  # again: others may have taken the room meanwhile
        schedule = TaskSchedule(CDN, policy=self.policy)
        task = Task(fetch=fetch, base_id=base_id, schedule=schedule,
                    queue=PullQueue(schedule, self.counters), revalidated_at=self.clock.seconds())
        for n in range(fetch.ready):
            schedule.piece_ready(n)
        old = self.tasks.get(fetch.task_id)
        if old is not None and old is not task:
            self._forget_task(old)
        self.tasks[fetch.task_id] = task
        self.current[base_id] = task
        self._versions.setdefault(base_id, {})[fetch.task_id] = None
        self._touch(task)
        return task

    def _touch(self, task: Task) -> None:
        """The task's cache entry was just used (LRU order of the disk quota)."""
        if self.quota is not None:
            fetch = task.fetch
            self.quota.index.touch(task.task_id, fetch.length if fetch.length >= 0 else fetch.ready * fetch.piece_size)

    def in_use(self, task_id: str) -> bool:
        """A version in memory, or one being opened, is in use: the disk quota never removes its file."""
        return task_id in self.tasks or task_id in self._opening

    def cache_file_missing(self, task_id: str) -> None:
        """The CDN port found no data file for a task in memory: it was removed by hand."""
        task = self.tasks.get(task_id)
        if task is None or task.fetch.running or task.state == FetchState.FAILED:
            return
        task.fetch.fail(f"the cache file of taskID:{task_id} is gone; the next registration fetches it again")
        if self.quota is not None:
            self.quota.index.drop(task_id)
        task.queue.wake_all()

    async def _open_task(self, reg: Registration) -> Task:
        """The first registration of a task (or after it failed or left memory): one GET."""
        self._room_for_a_task(reg.task_id)  # before the source is asked anything
        old = self.tasks.get(reg.task_id)
        if old is not None and not old.fetch.ended.called:
            # A failed fetch removes its cache files after its pulls were told:
            # never let that removal land on the new fetch's files.
            ended: Deferred[Any] = Deferred()
            old.fetch.ended.addBoth(lambda r: (ended.callback(None), r)[1])
            await ended
        if self.quota is not None:
            await self.quota.settled(reg.task_id)  # the disk quota may be removing these very files
        stored = self.cache.load_meta(reg.task_id)
        if stored is not None and (stored.url, stored.md5, stored.identifier) != (reg.task_url, reg.md5, reg.identifier):
            stored = None
        partial = None if stored is not None else self.cache.load_partial(reg.task_id)
        if partial is not None and (partial.url, partial.md5, partial.identifier) != (reg.task_url, reg.md5, reg.identifier):
            partial = None
        resume = 0
        if partial is not None:
            resume = await self._env.disk(lambda: self.cache.verified_prefix(partial))
        slot = await self._fetch_slot(reg.task_id)
        try:
            if resume:
                assert partial is not None
                opened = await self._open_source(reg, byte_range=(resume * partial.piece_size, None),
                                                 if_range=partial.etag or partial.last_modified)
                if opened.status == 206 and opened.range_start == resume * partial.piece_size \
                        and opened.total_length == partial.length:
                    fetch = CdnFetch(
                        task_id=reg.task_id, url=reg.task_url, md5=reg.md5, identifier=reg.identifier,
                        digest=reg.digest, piece_size=partial.piece_size, length=partial.length,
                        digests=list(partial.piece_digests[:resume]),
                        etag=partial.etag, last_modified=partial.last_modified,
                    )
                    return self._start(fetch, reg, opened, slot, resume)
                if opened.status != 200:
                    # Not the rest we asked for: start over with a plain GET.
                    abort_body(opened.response)
                    log.warn("source {url} answered {status} to a resume of taskID:{task_id}: fetching it whole",
                             url=reg.url, status=opened.status, task_id=reg.task_id)
                    opened = await self._open_source(reg)
            else:
                opened = await self._open_source(reg, etag=stored.etag if stored else None,
                                                 last_modified=stored.last_modified if stored else None)
            if opened.not_modified and stored is not None:
                abort_body(opened.response)
                task = self._new_task(CdnFetch.from_cache(stored), reg.task_id)
                log.info("taskID:{task_id} cache is valid (source answered 304), {n} pieces",
                         task_id=reg.task_id, n=task.ready)
                slot.release()
                return task
            if opened.status != 200:
                abort_body(opened.response)
                raise ApiError(502, codes.SOURCE_FAILED, f"source {reg.url} answered {opened.status} to a plain GET")
            return self._start(self._fresh_fetch(reg, reg.task_id, opened), reg, opened, slot)
        except BaseException:
            slot.release()
            raise

    async def _revalidate(self, task: Task, reg: Registration) -> Task:
        """Ask the source whether the finished ``task`` changed, with the caller's headers."""
        fetch = task.fetch
        slot = await self._fetch_slot(task.base_id)
        try:
            opened = await self._open_source(reg, etag=fetch.etag, last_modified=fetch.last_modified)
            unchanged = opened.not_modified or (
                opened.status == 200 and fetch.etag is not None and opened.etag == fetch.etag
                and not fetch.etag.startswith("W/")
            )
            if unchanged or opened.status != 200:
                abort_body(opened.response)
                if not unchanged:
                    raise ApiError(502, codes.SOURCE_FAILED,
                                   f"source {reg.url} answered {opened.status} to a conditional GET")
                task.revalidated_at = self.clock.seconds()
                slot.release()
                return task
            validator = opened.etag or opened.last_modified or secrets.token_hex(8)
            new_id = version_id(task.base_id, validator)
            log.info("source of taskID:{task_id} changed (now {validator}): new version taskID:{new_id}",
                     task_id=task.task_id, validator=validator, new_id=new_id)
            existing = self.tasks.get(new_id)
            if existing is not None and existing.state != FetchState.FAILED:
                abort_body(opened.response)  # that version is in memory already (the source went back)
                self.current[task.base_id] = existing
                existing.revalidated_at = self.clock.seconds()
                slot.release()
                return existing
            if self.quota is not None:
                await self.quota.settled(new_id)
            stored = self.cache.load_meta(new_id)
            if stored is not None and stored.url == fetch.url and (stored.etag, stored.last_modified) == (
                    opened.etag, opened.last_modified) and opened.etag and not opened.etag.startswith("W/"):
                abort_body(opened.response)  # fetched before a restart: the same strong ETag
                slot.release()
                return self._new_task(CdnFetch.from_cache(stored), task.base_id)
            return self._start(self._fresh_fetch(reg, new_id, opened), reg, opened, slot)
        except BaseException:
            slot.release()
            raise

    def _fresh_fetch(self, reg: Registration, version: str, opened: SourceResponse) -> CdnFetch:
        max_size = self.limits.max_file_size
        if max_size >= 0 and opened.length > max_size:
            abort_body(opened.response)
            log.warn("source {url} is {length} bytes, over --max-file-size {limit}: refused",
                     url=reg.url, length=opened.length, limit=max_size)
            raise ApiError(413, codes.SOURCE_FAILED,
                           f"source {reg.url} is {opened.length} bytes, larger than the limit of {max_size} "
                           "(--max-file-size)")
        return CdnFetch(
            task_id=version, url=reg.task_url, md5=reg.md5, identifier=reg.identifier, digest=reg.digest,
            piece_size=piece_size_for(opened.length), length=opened.length,
            etag=opened.etag, last_modified=opened.last_modified,
        )

    def _start(self, fetch: CdnFetch, reg: Registration, opened: SourceResponse, slot: "_Slot",
               resume: int = 0) -> Task:
        try:
            task = self._new_task(fetch, reg.task_id)
        except ApiError:
            abort_body(opened.response)
            raise
        try:
            # Without its query: a signed query must not reach other peers
            # (in a 502) or the log.
            shown = hyperlink.URL.from_text(reg.url).replace(query=(), fragment="").to_text()
            fetch.start(self._env, opened, shown, lambda n: self._piece_cached(task, n),
                        lambda _: self._fetch_ended(task), resume)
        except OSError as e:
            # The error names the cache file: the log has it, the caller does not.
            log.error("cannot write the cache for taskID:{task_id}: {error}", task_id=fetch.task_id, error=e)
            abort_body(opened.response)
            fetch.fail(f"the supernode cannot write the cache for taskID:{fetch.task_id}")
            self._forget_task(task)
            raise ApiError(500, codes.SYSTEM_ERROR, "the supernode cannot write its cache") from None
        fetch.ended.addBoth(lambda _: slot.release())
        return task

    async def _fetch_slot(self, task_id: str) -> "_Slot":
        """One of ``max_fetches`` source fetches; 503 when too many already wait."""
        if len(self._fetch_slots.waiting) >= self.limits.max_fetch_queue:
            log.warn("{n} registrations wait for a source fetch slot: refused taskID:{task_id}",
                     n=len(self._fetch_slots.waiting), task_id=task_id)
            raise ApiError(503, codes.SYSTEM_ERROR,
                           f"{len(self._fetch_slots.waiting)} source fetches are queued already; try again later")
        await self._fetch_slots.acquire()
        return _Slot(self._fetch_slots)

    async def _open_source(self, reg: Registration, **kwargs: Any) -> SourceResponse:
        try:
            return await self.source.open(reg.url, reg.headers, **kwargs)
        except SourceError as e:
            self._refused(reg, e)

    async def _check_access(self, task: Task, reg: Registration) -> None:
        """Ask the source whether this caller may read the URL (cached bytes or not)."""
        try:
            opened = await self.source.open(reg.url, reg.headers, byte_range=(0, 0))
        except SourceError as e:
            # An empty file has no byte 0: its 416 says "readable", nothing else's does.
            if not (e.status == 416 and task.length == 0):
                self._refused(reg, e)
        else:
            abort_body(opened.response)

    def _refused(self, reg: Registration, error: SourceError) -> NoReturn:
        log.warn("source refused taskID:{task_id}: {reason}", task_id=reg.task_id, reason=error.reason)
        if error.code == codes.URL_NOT_REACHABLE:
            # Remembered for this URL and these headers, not for the task:
            # a content-addressed task is reached by many URLs (one per
            # repository holding the blob), and a 404 for one caller's URL
            # (a repository without the blob, a private file shown as 404 to
            # strangers) must not send everyone else back to the source.
            self.access.remember_missing(access_fingerprint(reg.url, reg.headers), error.reason)
            raise ApiError(404, error.code, error.reason)
        if error.code in (codes.NEED_AUTH, codes.SOURCE_REFUSED):
            raise ApiError(403, error.code, error.reason)
        raise ApiError(502, error.code, error.reason)

    # --- the CDN fetch's events ---------------------------------------------------

    def _piece_cached(self, task: Task, n: int) -> None:
        task.schedule.piece_ready(n)
        if task.schedule.cdn_free():
            task.queue.offer(1, CDN)

    def _fetch_ended(self, task: Task) -> None:
        task.queue.wake_all()  # done: finished peers get 600; failed: everyone gets 502
        if self.quota is not None:
            if task.state == FetchState.FAILED:
                self.quota.index.drop(task.task_id)
            else:
                self._touch(task)
                self.quota.collect(self.in_use)
        self._maybe_idle(task)

    # --- pulls and reports ------------------------------------------------------

    def key_for(self, task_id: str) -> str | None:
        """The key that reads ``task_id``'s bytes on the CDN port (None: no such task now)."""
        task = self.tasks.get(task_id)
        return task.key if task is not None else None

    def task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(404, codes.TARGET_NOT_FOUND, f"unknown task {task_id!r}: register first")
        return task

    def progress(self, task_id: str, cid: str) -> tuple[Task, Peer]:
        task = self.task(task_id)
        peer = task.peers.get(cid)
        if peer is None:
            raise ApiError(404, codes.TARGET_NOT_FOUND, f"cid {cid!r} is not registered for task {task_id}")
        return task, peer

    def pull(
        self, task_id: str, cid: str, cdn_ip: str, cdn_port: int, wait: float | None = None
    ) -> tuple[int, Any] | Deferred[tuple[int, Any]]:
        """Next pieces for ``cid``: (601, pieces), (600, summary) or (602, None).

        Answered at once when there is something to say (most pulls: no
        coroutine, no Deferred); otherwise a Deferred, the pull held until an
        event gives it work or ``wait`` seconds pass (the client's own
        budget, at most `MAX_POLL_WAIT`; ``--poll-timeout`` for a client that
        does not say).
        """
        task, peer = self.progress(task_id, cid)
        hold = self.poll_timeout if wait is None else min(max(wait, 0.0), MAX_POLL_WAIT)
        peer.hung_up = False
        self.liveness.forget((task_id, cid))  # a pull is a live peer
        try:
            answer = self._answer(task, peer, cdn_ip, cdn_port)
        except ApiError:
            self._pull_ended(task, peer)
            raise
        if answer is None and hold > 0 and not self._stopped:
            return self._held(task, peer, cdn_ip, cdn_port, self.clock.seconds() + hold)
        self._pull_ended(task, peer)
        return answer or (codes.PEER_WAIT, None)

    def _answer(self, task: Task, peer: Peer, cdn_ip: str, cdn_port: int) -> tuple[int, Any] | None:
        """What a pull of ``peer`` gets now; None: nothing yet (hold it)."""
        if task.state == FetchState.FAILED:
            raise ApiError(502, codes.SOURCE_ERROR, task.error)
        if task.peers.get(peer.cid) is not peer:
            raise ApiError(404, codes.TARGET_NOT_FOUND, f"cid {peer.cid!r} was dropped from task {task.task_id}")
        self.counters.assign_calls += 1
        chosen = task.schedule.assign(peer.cid)
        if chosen:
            return codes.PEER_CONTINUE, self.piece_infos(task, chosen, cdn_ip, cdn_port)
        if self._complete(task, peer):
            peer.finished = True
            return codes.PEER_FINISH, {
                "fileLength": task.length,
                "pieceSize": task.piece_size,
                "pieceCount": task.total_pieces,
            }
        return None

    @staticmethod
    def _complete(task: Task, peer: Peer) -> bool:
        return task.state == FetchState.DONE and len(peer.have) >= (task.total_pieces or 0)

    def _held(self, task: Task, peer: Peer, cdn_ip: str, cdn_port: int, deadline: float) -> Deferred[tuple[int, Any]]:
        """Hold ``peer``'s pull until an event gives it an answer or ``deadline`` passes.

        Callbacks, not a coroutine: every downloading peer holds one of these
        (10,000 at once in the swarm benchmark), so what each costs shows.
        Cancelled (the peer closed the connection): the peer hung up.
        """
        held: list[Deferred[Woken]] = []  # the queue's Deferred now, once held

        def cancel(_: Deferred[tuple[int, Any]]) -> None:
            # A live peer never closes a held pull; a killed one does at once
            # (its kernel closes the socket).
            peer.hung_up = True
            if not held[0].called:
                held[0].cancel()  # the queue forgets it

        answer: Deferred[tuple[int, Any]] = Deferred(cancel)

        def end(result: tuple[int, Any] | Failure) -> None:
            peer.pulls -= 1
            self._pull_ended(task, peer)
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        def hold() -> None:
            d = task.queue.hold(peer.cid)
            held[:] = [d]
            self.deadlines.add(deadline, task.queue, peer.cid, d)
            d.addCallbacks(woken, lambda failure: None)  # cancelled: ``cancel`` ends the pull

        def woken(signal: Woken) -> None:
            if answer.called:
                return
            if signal is WAIT_NOW or signal is TIMED_OUT:
                end((codes.PEER_WAIT, None))
            elif signal is not REEVALUATE:
                end((codes.PEER_CONTINUE, self.piece_infos(task, signal, cdn_ip, cdn_port)))
            else:
                try:
                    result = self._answer(task, peer, cdn_ip, cdn_port)
                except ApiError:
                    end(Failure())
                    return
                if result is not None:
                    end(result)
                elif self._stopped or self.clock.seconds() >= deadline:
                    # Held again after a stop, no timer would ever answer it.
                    end((codes.PEER_WAIT, None))
                else:
                    hold()

        peer.pulls += 1
        hold()
        answer.addErrback(self._hung_up, task, peer)
        return answer

    def _hung_up(self, failure: Failure, task: Task, peer: Peer) -> Failure:
        if failure.check(CancelledError):
            peer.pulls -= 1
            self._pull_ended(task, peer)
        return failure

    def _pull_ended(self, task: Task, peer: Peer) -> None:
        peer.seen = self.clock.seconds()
        if task.peers.get(peer.cid) is peer:
            self._heard(task, peer)

    def piece_infos(self, task: Task, chosen: Assignment, cdn_ip: str, cdn_port: int) -> list[dict[str, Any]]:
        """The 601 items for an assignment: where each piece is and how to check it."""
        return [self._piece_info(task, n, src, cdn_ip, cdn_port) for n, src in chosen]

    def _piece_info(self, task: Task, n: int, source: str, cdn_ip: str, cdn_port: int) -> dict[str, Any]:
        # While the length is unknown, every ready piece but the last is full;
        # the last ready one is full too, or the fetch would be done.
        length = task.length if task.length >= 0 else task.ready * task.piece_size
        start, end = piece_range(n, task.piece_size, length)
        info: dict[str, Any] = {
            "pieceNum": n,
            "range": format_range(start, end),
            "pieceSize": task.piece_size,
            "pieceDigest": task.digests[n],
        }
        if source == CDN:
            info.update(cid=f"{CDN}{cdn_ip}~{task.task_id}", peerIp=cdn_ip, peerPort=cdn_port,
                        path=self.cache.url_path(task.task_id))
            if self.cdn_scheme != "http":
                info["scheme"] = self.cdn_scheme  # absent: http (peers' uploaders, a CDN without TLS)
        else:
            holder = task.peers[source]
            info.update(cid=source, peerIp=holder.ip, peerPort=holder.port,
                        path=peer_path(task.task_id))
        return info

    def piece_result(
        self, task_id: str, cid: str, piece: int, success: bool, kind: str = "", take_next: bool = False
    ) -> Assignment:
        """A verified piece makes ``cid`` a holder; a failure blames its source.

        Either way a slot of ``cid`` and one of its source are free.  With
        ``take_next`` (dfly's peers) ``cid``'s next pieces are assigned here
        and returned, for the report's own answer, and its held pull stays
        held: one request per report, however many pieces a peer runs.
        Without it (Dragonfly's clients) ``cid``'s held pull is woken with
        them.  Then the freed source slot (and, on success, the new holder's
        spare uploads) go to the first hungry pulls.
        """
        task, peer = self.progress(task_id, cid)
        self.reports += 1
        peer.seen = self.clock.seconds()
        if not peer.pulls:
            self._heard(task, peer)
        source = peer.running.get(piece)
        if success:
            if not task.schedule.succeeded(cid, piece):
                raise ApiError(400, codes.PARAM_ERROR, f"piece {piece} was not assigned to {cid}")
        else:
            task.schedule.failed(cid, piece, kind)
        chosen: Assignment = []
        if take_next:
            self.counters.assign_calls += 1
            chosen = task.schedule.assign(cid)
            if chosen or not self._complete(task, peer):
                task.queue.settle(cid)
            else:
                task.queue.slot_freed(cid)  # it has every piece: its held pull answers 600
        elif source is not None:
            task.queue.slot_freed(cid)
        if source is not None:
            # The new holder first: an offer from the CDN runs a full assign,
            # which prefers free peers, so offered first it would spend the
            # CDN's chance on the reporter's new piece and leave the CDN idle.
            if success:
                task.queue.offer(task.schedule.spare_uploads(cid), cid)
            task.queue.offer(1, source)
        return chosen

    def authorize(self, task_id: str, cid: str, secret: bytes | None) -> None:
        """Only the registrant of ``cid`` may pull, report or leave for it (404: unknown; 401: wrong secret)."""
        _, peer = self.progress(task_id, cid)
        if not secret_matches(secret, peer.secret):
            raise ApiError(401, codes.PEER_UNAUTHORIZED,
                           f"missing or wrong {codes.PEER_SECRET_HEADER} for cid {cid}: register again")

    def service_down(self, task_id: str, cid: str) -> None:
        task, _ = self.progress(task_id, cid)
        self._remove_peer(task, cid)

    def _remove_peer(self, task: Task, cid: str) -> None:
        """``cid`` is gone: its state goes at once, and the slots it held go to others."""
        peer = task.peers.get(cid)
        if peer is None:
            return
        sources = list(peer.running.values())
        task.schedule.remove_peer(cid)
        task.queue.drop(cid)
        self.liveness.forget((task.task_id, cid))
        for source in sources:
            task.queue.offer(1, source)
        self._maybe_idle(task)

    def _heard(self, task: Task, peer: Peer) -> None:
        kind = liveness.HUNG_UP if peer.hung_up else liveness.FINISHED if peer.finished else liveness.DOWNLOADING
        self.liveness.heard((task.task_id, peer.cid), kind, peer.seen)

    # --- everything ends ------------------------------------------------------------

    def sweep(self) -> None:
        """Drop silent peers, expire idle tasks and old memories: O(what expires)."""
        now = self.clock.seconds()
        for task_id, cid in list(self.liveness.expired(now)):
            task = self.tasks.get(task_id)
            if task is None or cid not in task.peers or task.peers[cid].pulls:
                continue
            log.warn("cid:{cid} of taskID:{task_id} went silent: dropped", cid=cid, task_id=task_id)
            self._remove_peer(task, cid)
        while self._idle:
            task_id, since = next(iter(self._idle.items()))
            if now - since <= self.task_expire_time:
                break
            del self._idle[task_id]
            task = self.tasks.get(task_id)
            if task is not None and not task.peers and not task.fetch.running:
                log.info("taskID:{task_id} had no peer for {t:g}s: leaves memory (its cache stays on disk)",
                         task_id=task_id, t=self.task_expire_time)
                self._forget_task(task)
        self.access.expire()

    def _maybe_idle(self, task: Task) -> None:
        if not task.peers and not task.fetch.running and self.tasks.get(task.task_id) is task:
            self._idle.setdefault(task.task_id, self.clock.seconds())

    def _forget_task(self, task: Task) -> None:
        if self.tasks.get(task.task_id) is task:
            del self.tasks[task.task_id]
            if task.state != FetchState.FAILED:
                self._touch(task)
        versions = self._versions.get(task.base_id, {})
        if self.tasks.get(task.task_id) is None:
            versions.pop(task.task_id, None)
        if not versions:
            self._versions.pop(task.base_id, None)
        if self.current.get(task.base_id) is task:
            # An older version may still have peers: it becomes what new
            # registrants get (and revalidate), so nothing reopens its id.
            if versions:
                self.current[task.base_id] = self.tasks[next(reversed(versions))]
            else:
                del self.current[task.base_id]
        self._idle.pop(task.task_id, None)
        for cid in list(task.peers):
            self.liveness.forget((task.task_id, cid))
        task.queue.wake_all()

    def held_pulls(self) -> int:
        return sum(len(task.queue) for task in self.tasks.values())

    def stop(self) -> Deferred[None]:
        """Cancel running fetches (their metas stay 'fetching': resumable, no cache hit).

        Fires when every cancelled fetch has ended, its file closed and its
        last ``.meta`` written: the disk pool must not stop before that, or
        the resumable state of the last pieces is lost.

        Every held pull is answered "wait" (602) at once, as at its deadline,
        and no new one is held: the deadlines' timer is cancelled here, so a
        pull held after this (or held again on ``REEVALUATE``, as a
        cancelled fetch's end wakes them) would never be answered.
        """
        self._stopped = True
        ending: list[Deferred[None]] = []
        for task in list(self.tasks.values()):
            if task.fetch.running:
                done: Deferred[None] = Deferred()
                task.fetch.ended.addBoth(lambda result, done=done: (done.callback(None), result)[1])
                ending.append(done)
            task.fetch.cancel()
            task.queue.wake_all(TIMED_OUT)
        self.deadlines.stop()
        return gatherResults(ending).addCallback(lambda _: None)


@attrs.define(eq=False)
class _Slot:
    """One acquired source-fetch slot, released exactly once."""

    semaphore: DeferredSemaphore
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.semaphore.release()
