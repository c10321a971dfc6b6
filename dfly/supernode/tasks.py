"""Tasks on the supernode: registration, the CDN fetch, pulls and reports.

A task is born when the first peer registers its URL.  The supernode opens
the source once with that peer's headers; the same response is the CDN
fetch, cut into pieces as it streams (`dfly.stream.BodyWriter`), each piece
pullable the moment it is on disk.  A pull that finds nothing ready is held
open until a piece arrives, a slot frees, or ``poll_timeout`` passes.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, Mapping, NoReturn

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from dfly import codes
from dfly.jsonapi import ApiError
from dfly.pieces import format_range, piece_count, piece_range, piece_size_for
from dfly.source import SourceClient, SourceError, SourceResponse, abort_body
from dfly.ratelimit import TokenBucket
from dfly.peer.storage import file_digest
from dfly.stream import BodyWriter, RunBlocking, StreamError, run_inline
from dfly.supernode import scheduler
from dfly.supernode.cdn import CacheMeta, CdnCache

log = Logger(namespace="dfly.supernode")

#: The scheduler's name for the CDN; peers see ``cdnnode:<ip>~<taskId>``.
CDN = "cdnnode:"
#: A downloading peer that neither pulls nor reports for this long is gone.
#: A live one always has a pull held open or is about to send the next, so
#: this only needs to cover a busy host's pause between two pulls.
SILENCE = 6.0
#: A peer that hung up on a held pull and did not pull again within this is gone.
HUNG_UP_GRACE = 1.0


@attrs.frozen
class Registration:
    """A validated ``POST /peer/registry``."""

    url: str
    task_url: str
    task_id: str
    headers: Mapping[str, str]
    md5: str | None
    identifier: str | None
    digest: tuple[str, str] | None  # (algorithm, hex): the whole file is checked against it
    cid: str
    ip: str
    port: int
    host_name: str


@attrs.define(eq=False)
class Task:
    task_id: str
    url: str
    md5: str | None
    identifier: str | None
    piece_size: int
    length: int  # -1 until known
    state: str = "fetching"  # fetching | done | failed
    error: str = ""
    etag: str | None = None
    last_modified: str | None = None
    digests: list[str] = attrs.Factory(list)
    schedule: scheduler.TaskSchedule = attrs.Factory(lambda: scheduler.TaskSchedule(CDN))
    authorized: set[frozenset[tuple[str, str]]] = attrs.Factory(set)
    fetch: Deferred[int] | None = None
    digest: tuple[str, str] | None = None
    # Handed to registrants only (after their access check); the CDN port and
    # the peers' uploaders serve this task's bytes only to requests carrying
    # it, so knowing or computing a task id reads nothing.
    key: str = attrs.Factory(lambda: secrets.token_hex(16))
    _waiters: list[Deferred[None]] = attrs.Factory(list)

    @property
    def ready(self) -> int:
        return len(self.digests)

    @property
    def peers(self) -> dict[str, scheduler.Peer]:
        return self.schedule.peers

    def add_digest(self, digest: str) -> None:
        self.digests.append(digest)
        self.schedule.piece_ready(len(self.digests) - 1)

    @property
    def total_pieces(self) -> int | None:
        """Known once the length is; -1 length means still unknown."""
        return None if self.length < 0 else piece_count(self.length, self.piece_size)

    def meta(self) -> CacheMeta:
        return CacheMeta(
            task_id=self.task_id,
            url=self.url,
            length=self.length,
            piece_size=self.piece_size,
            piece_digests=tuple(self.digests),
            etag=self.etag,
            last_modified=self.last_modified,
            state=self.state,
            md5=self.md5,
            identifier=self.identifier,
        )

    def wait(self) -> Deferred[None]:
        """Fires on the next change (piece ready, report, end of fetch)."""
        d: Deferred[None] = Deferred(lambda d: self._waiters.remove(d) if d in self._waiters else None)
        self._waiters.append(d)
        return d

    def changed(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)


def peer_path(task_id: str) -> str:
    """Where a peer serves a task's pieces (its uploader finds files by task, never by path)."""
    return f"/peer/file/{task_id}"


def access_key(url: str, headers: Mapping[str, str]) -> frozenset[tuple[str, str]]:
    """What the source judged: the raw URL (signed query included) and the headers."""
    return frozenset([("", url), *((k.lower(), v) for k, v in headers.items())])


@attrs.define(eq=False)
class TaskManager:
    cache: CdnCache
    source: SourceClient
    clock: IReactorTime
    fail_access_interval: float = 180.0
    poll_timeout: float = 5.0
    idle_timeout: float = 30.0
    run_blocking: RunBlocking = run_inline  # where hashing and disk writes run
    source_bucket: TokenBucket | None = None  # --max-bandwidth, shared by every source fetch
    tasks: dict[str, Task] = attrs.Factory(dict)
    _opening: dict[str, Deferred[Task]] = attrs.Factory(dict)
    _unreachable: dict[str, tuple[float, str]] = attrs.Factory(dict)

    # --- registration ---------------------------------------------------------

    def register(self, reg: Registration) -> Deferred[Task]:
        """Add ``reg.cid`` to its task, creating and fetching the task if new.

        Fails with `ApiError` when the source refuses this caller (608), is
        missing (607, remembered for ``fail_access_interval``) or unreachable.
        """
        return Deferred.fromCoroutine(self._register(reg))

    async def _register(self, reg: Registration) -> Task:
        missing = self._unreachable.get(reg.task_id)
        if missing is not None:
            since, reason = missing
            if self.clock.seconds() - since < self.fail_access_interval:
                raise ApiError(404, codes.URL_NOT_REACHABLE, reason)
            del self._unreachable[reg.task_id]
        while reg.task_id in self._opening:
            # Someone else is opening this task: wait for them, then check our
            # own access below.  A fresh Deferred, so our cancel is ours alone.
            opening = self._opening[reg.task_id]
            waiter: Deferred[Any] = Deferred()
            opening.addBoth(lambda r: (waiter.callback(None), r)[1])
            await waiter
        task = self.tasks.get(reg.task_id)
        if task is None or task.state == "failed":
            opening = Deferred.fromCoroutine(self._open_task(reg))
            self._opening[reg.task_id] = opening
            try:
                task = await opening
            finally:
                self._opening.pop(reg.task_id, None)
        else:
            await self._check_access(task, reg)
        task.schedule.add_peer(reg.cid, reg.ip, reg.port).seen = self.clock.seconds()
        log.info(
            "success to register peer cid:{cid} ip:{ip} port:{port} for taskID:{task_id}",
            cid=reg.cid, ip=reg.ip, port=reg.port, task_id=reg.task_id,
        )
        return task

    async def _open_task(self, reg: Registration) -> Task:
        stored = self.cache.load_meta(reg.task_id)
        if stored is not None and (stored.url, stored.md5, stored.identifier) != (reg.task_url, reg.md5, reg.identifier):
            stored = None
        try:
            opened = await self.source.open(
                reg.url,
                reg.headers,
                etag=stored.etag if stored else None,
                last_modified=stored.last_modified if stored else None,
            )
        except SourceError as e:
            self._refused(reg.task_id, e)
        if opened.not_modified and stored is not None:
            abort_body(opened.response)
            task = Task(
                task_id=reg.task_id, url=reg.task_url, md5=reg.md5, identifier=reg.identifier,
                piece_size=stored.piece_size, length=stored.length, state="done",
                etag=stored.etag, last_modified=stored.last_modified,
            )
            for digest in stored.piece_digests:
                task.add_digest(digest)
            log.info("taskID:{task_id} cache is valid (source answered 304), {n} pieces", task_id=reg.task_id, n=task.ready)
        elif opened.status == 200:
            task = Task(
                task_id=reg.task_id, url=reg.task_url, md5=reg.md5, identifier=reg.identifier,
                piece_size=piece_size_for(opened.length), length=opened.length,
                etag=opened.etag, last_modified=opened.last_modified, digest=reg.digest,
            )
            self._start_fetch(task, opened, reg.url)
        else:
            abort_body(opened.response)
            raise ApiError(
                502, codes.SOURCE_FAILED, f"source {reg.url} answered {opened.status} to a plain GET"
            )
        task.authorized.add(access_key(reg.url, reg.headers))
        self.tasks[reg.task_id] = task
        return task

    async def _check_access(self, task: Task, reg: Registration) -> None:
        """Ask the source whether this caller may read the URL (cached bytes or not)."""
        fingerprint = access_key(reg.url, reg.headers)
        if fingerprint in task.authorized:
            return
        try:
            opened = await self.source.open(reg.url, reg.headers, byte_range=(0, 0))
        except SourceError as e:
            # An empty file has no byte 0: its 416 says "readable", nothing else's does.
            if not (e.status == 416 and task.length == 0):
                self._refused(reg.task_id, e)
        else:
            abort_body(opened.response)
        task.authorized.add(fingerprint)

    def _refused(self, task_id: str, error: SourceError) -> NoReturn:
        log.warn("source refused taskID:{task_id}: {reason}", task_id=task_id, reason=error.reason)
        if error.code == codes.URL_NOT_REACHABLE:
            self._unreachable[task_id] = (self.clock.seconds(), error.reason)
            raise ApiError(404, error.code, error.reason)
        if error.code == codes.NEED_AUTH:
            raise ApiError(403, error.code, error.reason)
        raise ApiError(502, error.code, error.reason)

    # --- the CDN fetch ----------------------------------------------------------

    def _start_fetch(self, task: Task, opened: SourceResponse, url: str) -> None:
        fd = self.cache.open_for_write(task.task_id)
        self.cache.save_meta(task.meta())
        log.info(
            "start to download taskID:{task_id} from {url}, length:{length} pieceSize:{piece_size}",
            task_id=task.task_id, url=url, length=task.length, piece_size=task.piece_size,
        )

        def piece_ready(index: int, length: int, digest: str) -> None:
            if length < task.piece_size:
                # Only the last piece is short: now the length is known, and
                # pulls woken below must offer this piece's real range.
                task.length = index * task.piece_size + length
            task.add_digest(digest)
            task.changed()

        writer = BodyWriter(fd, 0, task.piece_size, task.length, piece_ready, self.clock, self.idle_timeout,
                            self.run_blocking, self.source_bucket)
        task.fetch = writer.done
        opened.response.deliverBody(writer)

        def verify(length: int) -> Deferred[int] | int:
            if task.digest is None:
                return length
            algorithm, expected = task.digest
            path = self.cache.data_path(task.task_id)

            def compare(actual: str) -> int:
                if actual != expected:
                    raise StreamError(f"{algorithm} of the source is {actual}, expected {expected}")
                return length

            return self.run_blocking(lambda: file_digest(path, algorithm)).addCallback(compare)

        def finished(length: int) -> None:
            task.length = length
            task.state = "done"
            log.info(
                "success to get taskID:{task_id} fileLength:{length} pieces:{n}",
                task_id=task.task_id, length=length, n=task.ready,
            )

        def failed(failure: Failure) -> None:
            task.state = "failed"
            task.error = f"CDN fetch of {url} failed: {failure.getErrorMessage()}"
            log.error("{error}", error=task.error)

        def closed(_: object) -> None:
            os.close(fd)
            task.fetch = None
            if task.state == "failed":
                self.cache.remove(task.task_id)  # nothing half-fetched or wrong stays cached
            else:
                self.cache.save_meta(task.meta())
            task.changed()

        writer.done.addCallback(verify).addCallbacks(finished, failed).addBoth(closed)

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

    def progress(self, task_id: str, cid: str) -> tuple[Task, scheduler.Peer]:
        task = self.task(task_id)
        peer = task.peers.get(cid)
        if peer is None:
            raise ApiError(404, codes.TARGET_NOT_FOUND, f"cid {cid!r} is not registered for task {task_id}")
        return task, peer

    def pull(self, task_id: str, cid: str, cdn_ip: str, cdn_port: int) -> Deferred[tuple[int, Any]]:
        """Next pieces for ``cid``: (601, pieces), (600, summary) or (602, None)."""
        return Deferred.fromCoroutine(self._pull(task_id, cid, cdn_ip, cdn_port))

    async def _pull(self, task_id: str, cid: str, cdn_ip: str, cdn_port: int) -> tuple[int, Any]:
        task, peer = self.progress(task_id, cid)
        deadline = self.clock.seconds() + self.poll_timeout
        peer.pulls += 1
        peer.hung_up = False
        try:
            while True:
                if task.state == "failed":
                    raise ApiError(502, codes.SOURCE_ERROR, task.error)
                if task.peers.get(cid) is not peer:
                    raise ApiError(404, codes.TARGET_NOT_FOUND, f"cid {cid!r} was dropped from task {task_id}")
                chosen = task.schedule.assign(cid)
                if chosen:
                    return codes.PEER_CONTINUE, [
                        self._piece_info(task, n, source, cdn_ip, cdn_port) for n, source in chosen
                    ]
                if task.state == "done" and len(peer.have) >= (task.total_pieces or 0):
                    peer.finished = True
                    return codes.PEER_FINISH, {
                        "fileLength": task.length,
                        "pieceSize": task.piece_size,
                        "pieceCount": task.total_pieces,
                    }
                remaining = deadline - self.clock.seconds()
                if remaining <= 0:
                    return codes.PEER_WAIT, None
                try:
                    await task.wait().addTimeout(remaining, self.clock)
                except TimeoutError:
                    pass
        except CancelledError:
            # The peer closed a held pull: a live peer never does, a killed one
            # does at once (its kernel closes the socket).
            peer.hung_up = True
            raise
        finally:
            peer.pulls -= 1
            peer.seen = self.clock.seconds()

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
                        path=f"{self.cache.url_path(task.task_id)}?k={task.key}")
        else:
            holder = task.peers[source]
            info.update(cid=source, peerIp=holder.ip, peerPort=holder.port,
                        path=f"{peer_path(task.task_id)}?k={task.key}")
        return info

    def piece_result(self, task_id: str, cid: str, piece: int, success: bool, kind: str = "") -> None:
        """A verified piece makes ``cid`` a holder; a failure blames its source."""
        task, peer = self.progress(task_id, cid)
        peer.seen = self.clock.seconds()
        if success:
            if not task.schedule.succeeded(cid, piece):
                raise ApiError(400, codes.PARAM_ERROR, f"piece {piece} was not assigned to {cid}")
        else:
            task.schedule.failed(cid, piece, kind)
        task.changed()

    def service_down(self, task_id: str, cid: str) -> None:
        task, _ = self.progress(task_id, cid)
        task.schedule.remove_peer(cid)
        task.changed()

    def sweep(self) -> None:
        """Drop downloading peers that went silent (killed without a word)."""
        now = self.clock.seconds()
        for task in self.tasks.values():
            gone = [
                peer.cid for peer in task.peers.values()
                if not peer.finished and not peer.pulls
                and now - peer.seen > (HUNG_UP_GRACE if peer.hung_up else SILENCE)
            ]
            for cid in gone:
                log.warn("cid:{cid} of taskID:{task_id} went silent: dropped", cid=cid, task_id=task.task_id)
                task.schedule.remove_peer(cid)
            if gone:
                task.changed()

    def stop(self) -> None:
        """Cancel running fetches (their metas stay 'running', so no cache hit)."""
        for task in list(self.tasks.values()):
            if task.fetch is not None:
                task.fetch.cancel()
            task.changed()
