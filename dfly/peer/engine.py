"""The download engine: register, pull pieces, verify, write in place, place the file.

One `PeerEngine` per peer daemon (and per dfdaemon later) runs any number of
downloads.  A download registers with the first supernode that answers,
then runs one pull loop: each pull is held open by the supernode until it
has work, and each piece fetch runs on its own, reporting its result as
soon as it is verified and on disk, which is what frees the next pull.
When the supernode cannot be used it goes back to the source, unless
``--notbs`` forbids it.  Nothing reaches ``-o`` before the whole file is
complete and, when a digest was given, verified.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Sequence

import attrs
import hyperlink
from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import RequestTransmissionFailed, ResponseFailed
from twisted.web.http_headers import Headers

import dfly
from dfly import codes
from dfly.codes import CLUSTER_TOKEN_HEADER, PEER_SECRET_HEADER, TASK_KEY_HEADER
from dfly.config import Home, NodeTimeouts, format_node
from dfly.httpclient import BodyTooLarge, read_limited
from dfly.jsonapi import parse_json
from dfly.logs import CLIENT_NAMESPACE
from dfly.pieces import DEFAULT_PIECE_SIZE, file_digest, parse_range, piece_count, piece_range, piece_size_for
from dfly.ratelimit import HostLimit, TokenBucket, describe_limit
from dfly.source import SourceClient, SourceError, SourceResponse, abort_body
from dfly.stream import BodyWriter, RunBlocking, StreamError, WriteError, thread_runner
from dfly.peer import resume, storage
from dfly.peer.fetchslots import HostFetchSlots
from dfly.peer.flow import DownloadFlow, Input, State
from dfly.peer.nodehealth import NodeHealth
from dfly.peer.nodenames import NodeNames
from dfly.peer.resume import PieceMap, RecordWriter
from dfly.placement import rendezvous_order, task_key
from dfly.peer.request import DownloadRequest, DownloadResult
from dfly.peer.uploader import HeldFile, UploadStore
from dfly.urls import move_userinfo, redact_userinfo

log = Logger(namespace=CLIENT_NAMESPACE)

#: Piece failures one download tolerates before it gives up on P2P.
MAX_PIECE_FAILURES = 8
#: 5xx codes that report the source's trouble, not the supernode's.
_SOURCE_CODES = frozenset({codes.SOURCE_FAILED, codes.SOURCE_ERROR, codes.URL_NOT_REACHABLE})
#: The largest supernode answer read (a 601 with a few pieces is ~2 KiB).
MAX_ANSWER = 1024 * 1024
#: Without --timeout and before the length is known, a download gets this long.
DEFAULT_TIMEOUT = 300.0
#: Seconds between rounds of registration while a migrating download waits for a node.
REJOIN_STEP = 1.0
#: How long stopping the pieces waits for their last writes.
STOP_WAIT = 10.0

Emit = Callable[[dict[str, Any]], None]


class DownloadFailed(Exception):
    def __init__(self, code: int, reason: int, error: str) -> None:
        super().__init__(error)
        self.code = code
        self.reason = reason
        self.error = error


class _NodeHung(Exception):
    """A supernode took a connection and answers nothing, not even ``/_ping``."""


class _NodeLost(Exception):
    """The task's supernode can no longer be used: died, hung, restarted, answered garbage.

    ``down``: it is certainly not serving (every download of the daemon
    skips it at once).
    """

    def __init__(self, error: str, down: bool) -> None:
        super().__init__(error)
        self.error = error
        self.down = down


class _P2PFailed(Exception):
    """The supernode path broke; the download may still go back to source."""

    def __init__(self, reason: int, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


class _BadAnswer(_P2PFailed):
    """A supernode answered something that is not a dfly answer (garbage, too large)."""


@attrs.frozen
class _Task:
    """The registration a piece belongs to (a migration makes a new one)."""

    node: tuple[str, int]
    task_id: str
    cid: str
    piece_size: int
    secret: str = ""  # the registration's peer secret: every call about this cid carries it
    key: str = ""  # the task's key: every piece request carries it (a header, never the URL)


class _PieceFailed(Exception):
    def __init__(self, kind: str, error: str) -> None:
        super().__init__(error)
        self.kind = kind
        self.error = error


@attrs.define(eq=False)
class _Run:
    """The mutable state of one download; `DownloadFlow` says which stage it is in."""

    req: DownloadRequest
    path: str
    emit: Emit
    flow: DownloadFlow = attrs.field(default=None)
    fd: int | None = None
    length: int = -1
    done: int = 0
    pmap: PieceMap = attrs.field(default=None)  # the verified pieces and their sha256
    record: RecordWriter | None = None  # keeps ``pmap`` in data/ (None: this download is not resumable)
    running: dict[int, Deferred[None]] = attrs.Factory(dict)
    reporting: set[Deferred[None]] = attrs.Factory(set)  # failed pieces whose report is still out
    nodes: tuple[tuple[str, int], ...] = ()  # the addresses behind req.nodes at the last registration
    writers: set[BodyWriter] = attrs.Factory(set)  # piece bodies still writing (even when cancelled)
    failures: int = 0
    fatal: str = ""  # the swarm failed: back to source
    lost: "_NodeLost | None" = None  # the supernode is gone: migrate
    broken: "DownloadFailed | None" = None  # nothing can mend it (the disk refused bytes)
    pull: Deferred[Any] | None = None
    task: "_Task | None" = None  # the current registration; pieces of an earlier one report nothing
    cancelled: bool = False
    timeout: float = DEFAULT_TIMEOUT
    from_peers: int = 0
    from_supernode: int = 0
    from_source: int = 0
    from_record: set[int] = attrs.Factory(set)  # pieces an earlier run verified, still kept

    @property
    def resumed(self) -> int:
        """Bytes kept from an earlier run's verified pieces (not fetched again)."""
        if self.pmap.length < 0:
            return 0
        return sum(end - start + 1 for start, end in map(self.pmap.range, self.from_record & self.pmap.pieces.keys()))
    started: float = 0.0
    registered: tuple[tuple[str, int], str, str, str] | None = None  # node, task id, cid, peer secret
    held: HeldFile | None = None  # what the uploader serves of this download
    bucket: TokenBucket | None = None  # --locallimit, inside the host's --totallimit

    @property
    def have(self) -> dict[int, str]:
        return self.pmap.pieces

    @property
    def timed_out(self) -> bool:
        return self.flow.ended_by is Input.TIMEOUT

    def open(self, fresh: bool) -> int:
        """The working file; ``fresh``: a new, empty one (nothing verified in it any more)."""
        if self.fd is not None and not fresh:
            return self.fd
        self.close()
        if fresh:
            self.fd = storage.open_working_file(self.path)
            self.pmap.pieces.clear()
            self.from_record.clear()
            self.done = 0
            self.changed()
        else:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        return self.fd

    def changed(self) -> None:
        if self.record is not None and self.pmap.length >= 0:  # pieces of an unknown length are not recorded
            self.record.changed()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@attrs.define(eq=False)
class PeerEngine:
    """Runs downloads for a peer; ``reactor`` provides time, TCP and threads."""

    reactor: Any
    http: Any  # treq.client.HTTPClient
    home: Home
    port: int = 0  # where this peer serves pieces; 0 = not serving
    ip: str | None = None  # advertised IP; None = the address that reaches the supernode
    timeouts: NodeTimeouts = NodeTimeouts()  # connect, API, hang check, rejoin (dfget.yml, daemon flags)
    register_timeout: float = 60.0  # a registration waits for the source's headers: long, but the
    ping_timeout: float = 2.0  # node is pinged after timeouts.hang_check, and one that does not answer is hung
    health: NodeHealth = attrs.field(default=None)  # nodes that failed lately, shared by all downloads
    names: NodeNames = attrs.field(default=None)  # node names to addresses, looked up again every 30 s
    poll_timeout: float = 30.0  # how long the supernode may hold our pull (sent as its ``wait``)
    idle_timeout: float = 30.0
    source: SourceClient = attrs.field(default=None)
    run_blocking: RunBlocking = attrs.field(default=None)  # where hashing and disk writes run
    uploads: UploadStore | None = None  # None: this engine serves no pieces (no uploader)
    limit: HostLimit = attrs.field(default=None)  # --totallimit, shared with the uploader
    fetch_slots: HostFetchSlots = attrs.Factory(HostFetchSlots)  # PER_HOST_FETCHES piece fetches per host
    # The cluster (``clusterToken``, ``clusterCa``): the token goes on every request to a supernode,
    # its CDN port and peers' uploaders; with ``cluster_tls`` the API is dialled with https, and
    # so is the CDN when its piece tasks say ``scheme: https``.  ``cluster_http`` (None: ``http``)
    # makes those requests: with TLS it trusts the cluster's CA only, while ``http`` (back to
    # source) keeps the system's roots.
    cluster_token: str | None = attrs.field(default=None, repr=False)
    cluster_tls: bool = False
    cluster_http: Any = None
    active: int = 0
    last_active: float = 0.0  # when the last download ended (for the daemon's idle exit)
    _resumable: set[str] = attrs.Factory(set)  # working files of running resumable downloads
    _heard: dict[tuple[str, int], float] = attrs.Factory(dict)  # when each node last answered

    def __attrs_post_init__(self) -> None:
        if self.source is None:
            self.source = SourceClient(self.http, self.reactor)
        if self.run_blocking is None:
            self.run_blocking = thread_runner(self.reactor)
        if self.limit is None:
            self.limit = HostLimit(0, self.reactor)
        if self.health is None:
            self.health = NodeHealth(self.reactor)
        if self.names is None:
            self.names = NodeNames(self.reactor, timeout=self.timeouts.connect)

    def download(self, req: DownloadRequest, emit: Emit = lambda event: None) -> Deferred[DownloadResult]:
        """Run one download to its end; fires with the result (failures too).

        Cancelling it stops the transfer; the verified pieces stay in data/
        for a later run of the same download to resume from.
        """
        return Deferred.fromCoroutine(self._run(req, emit))

    def _working_path(self, req: DownloadRequest) -> tuple[str, str | None]:
        """Where this download writes, and its resume identity (None: not resumable).

        The same URL, output and task share one working file across runs,
        so a later run finds what an earlier one verified; a second download
        of it while the first runs (or while its file is still served) gets
        a file of its own and resumes nothing.
        """
        key = task_key(req.url, req.filter, req.md5, req.identifier, req.digest)
        ident = resume.identity(req.url, req.output, key)
        path = os.path.join(self.home.data, storage.working_name(req.output, ident[:16]))
        busy = self.uploads.paths() if self.uploads is not None else set()
        if not req.resume or path in self._resumable or path in busy:
            return os.path.join(self.home.data, storage.working_name(req.output, req.sign)), None
        return path, ident

    async def _run(self, req: DownloadRequest, emit: Emit) -> DownloadResult:
        started = self.reactor.seconds()
        url, headers = move_userinfo(req.url, req.headers)
        if url != req.url:
            # ``http://u:p@host/f`` from a caller that did not convert it (dfdaemon's
            # proxy rules): the supernode refuses such a URL and treq cannot send it.
            req = attrs.evolve(req, url=url, headers=headers)
        path, ident = self._working_path(req)
        run = _Run(req, path, emit)
        run.pmap = PieceMap(ident or "")
        if ident is not None:
            self._resumable.add(path)
            run.record = RecordWriter(path, run.pmap, self.run_blocking)
        run.timeout = req.timeout or DEFAULT_TIMEOUT
        run.started = started
        if req.total_limit is not None and req.total_limit != self.limit.rate:
            self.limit.set_rate(req.total_limit)
            log.info("host limit (--totallimit) now {limit} each way", limit=describe_limit(req.total_limit),
                     sign=req.sign)
        run.bucket = TokenBucket(req.local_limit, self.reactor, parent=self.limit.rx)
        self.active += 1
        fetch: Deferred[int] | None = None

        # Cancelling (client gone, or the deadline) moves the flow to failed
        # first, so that no stage mistakes the errors it sees for a reason to
        # go on (next node, back to source); we then wait for the fetch to
        # unwind before cleaning up under it.
        def stop() -> None:
            run.cancelled = True
            if fetch is not None:
                fetch.cancel()

        def cancel(_: object = None) -> None:
            run.flow.handle(Input.CANCEL, "cancelled")
            stop()

        def changed(old: State, event: Input, new: State, why: str) -> None:
            if new is State.MIGRATING:
                log.warn("migrating taskID:{task_id} away from its supernode: {why}",
                         task_id=run.registered[1] if run.registered else "-", why=why, sign=req.sign)
            run.emit({"event": "state", "state": new.value, "input": event.value, "why": why})

        run.flow = DownloadFlow(self.reactor, run.timeout, stop, changed)
        waiting: Deferred[int] = Deferred(cancel)
        fetch = Deferred.fromCoroutine(self._fetch(run))
        fetch.addBoth(lambda result: None if waiting.called else waiting.callback(result))
        kept = False
        try:
            try:
                reason = await waiting
            except (CancelledError, ConnectingCancelledError):
                if not fetch.called:
                    try:
                        await fetch
                    except Exception:
                        pass  # it unwound; the cancel is what we report
                if run.timed_out:
                    raise DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_DOWNLOAD_ERROR, f"download timeout ({run.timeout:g}s)") from None
                raise
            except DownloadFailed:
                raise
            except Exception:
                # A bug, not the network: the traceback goes to the log, and the
                # download ends with a reason that names no internals.
                log.failure("download of {url} failed unexpectedly", url=redact_userinfo(req.url), sign=req.sign)
                raise DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_DOWNLOAD_ERROR,
                                     "internal error (see the daemon's log)") from None
            await self._finish(run)
            if not run.flow.running:  # cancelled while the file was being placed
                raise CancelledError()
            run.flow.handle(Input.FINISHED)
            kept = self._keep_serving(run)
            result = DownloadResult(
                True, self.reactor.seconds() - started, run.length, reason,
                from_peers=run.from_peers, from_supernode=run.from_supernode, from_source=run.from_source,
                migrated=run.flow.migrations, resumed=run.resumed,
            )
        except DownloadFailed as e:
            if run.flow.running:
                run.flow.handle(Input.ERROR, e.error)
            result = DownloadResult(
                False, self.reactor.seconds() - started, run.length, e.reason, e.code, e.error,
                run.from_peers, run.from_supernode, run.from_source, run.flow.migrations, run.resumed,
            )
        except BaseException:
            if run.flow.running:
                run.flow.handle(Input.ERROR, "interrupted")
            raise
        finally:
            run.flow.handle(Input.CANCEL)  # a no-op once ended; stops the deadline in any case
            await self._stop_pieces(run)
            run.close()
            self.active -= 1
            self.last_active = self.reactor.seconds()
            self._resumable.discard(path)
            # What was verified stays for a later run of the same download to
            # resume from (the residue rule removes it after an hour); a
            # finished, served file or an unresumable one needs no record.
            resumable = (run.flow.state is not State.DONE and run.record is not None and bool(run.have)
                         and run.pmap.length >= 0)
            if run.record is not None:
                await run.record.close(discard=not resumable)
            if not kept:
                self._drop_held(run)
                if not resumable:
                    storage.remove_quietly(run.path)
        log.info("{line}", line=result.line(), sign=req.sign)
        if not kept and run.registered is not None:
            await self.leave(*run.registered)
        return result

    def _keep_serving(self, run: _Run) -> bool:
        """After a P2P download, the file stays in data/ for other peers.

        The daemon removes it once nobody asked for it for --expiretime
        (`expire`).  Back-to-source downloads hold nothing the supernode
        knows about, so they keep nothing.
        """
        if run.held is None or run.registered is None:
            return False
        run.held.length = run.length
        run.held.finished = True
        run.held.last_access = self.reactor.seconds()
        run.held.node, _, run.held.cid, run.held.secret = run.registered
        run.held.heartbeat = self.reactor.seconds()
        return True

    def _drop_held(self, run: _Run) -> None:
        if run.held is not None and self.uploads is not None:
            self.uploads.remove(run.held)
        run.held = None

    def expire(self, held: HeldFile) -> Deferred[None]:
        """Stop serving a kept file: delete it and tell its supernode."""
        if self.uploads is not None:
            self.uploads.remove(held)
        storage.remove_quietly(held.path)
        log.info("stopped serving taskID:{task_id}: {path} removed", task_id=held.task_id, path=held.path)
        return Deferred.fromCoroutine(self.leave(held.node, held.task_id, held.cid, held.secret))

    def heartbeat(self, held: HeldFile) -> Deferred[None]:
        """Tell the supernode this finished peer still serves ``held`` (a pull, answered 600 at once).

        The supernode drops a finished peer it has not heard from for its
        ``finishedSilence`` (90 s by default), so a killed peer stops being
        offered as a source.
        """
        held.heartbeat = self.reactor.seconds()
        return Deferred.fromCoroutine(self._heartbeat(held))

    async def _heartbeat(self, held: HeldFile) -> None:
        try:
            status, answer = await self._api(held.node, "GET", "/peer/task", {"taskId": held.task_id, "srcCid": held.cid},
                                             secret=held.secret)
        except Exception as e:
            log.warn("heartbeat to {node} failed: {error}", node=format_node(held.node), error=e)
            return
        if status != 200:
            log.info("supernode {node} no longer knows cid:{cid} of taskID:{task_id} ({msg})",
                     node=format_node(held.node), cid=held.cid, task_id=held.task_id, msg=answer.get("msg", status))

    async def leave(self, node: tuple[str, int], task_id: str, cid: str, secret: str) -> None:
        """Tell the supernode this cid is gone (best effort: it only frees state)."""
        try:
            await self._api(node, "GET", "/peer/service/down", {"taskId": task_id, "cid": cid}, secret=secret)
        except (CancelledError, ConnectingCancelledError):
            raise  # the download's cancel or deadline: not a failed notice
        except Exception as e:
            log.warn("service down to {node} failed: {error}", node=format_node(node), error=e)

    def _known_length(self, run: _Run, length: int) -> None:
        """Once the length is known, the default timeout follows from --minrate."""
        run.length = length
        if length >= 0 and run.fd is not None:
            os.ftruncate(run.fd, length)
        if length >= 0 and not run.req.timeout:
            # A download limited below --minrate must not time out by its own limit.
            rates = [rate for rate in (run.req.min_rate, run.req.local_limit) if rate > 0]
            run.timeout = length / max(min(rates, default=1), 1) + 10
            run.flow.extend(run.timeout)

    async def _resume(self, run: _Run) -> None:
        """Keep what an earlier run of this download verified (re-hashed), or start a new working file."""
        if run.record is not None and os.path.exists(resume.record_path(run.path)):
            pmap, why = await self._in_thread(resume.load, run.path, run.pmap.identity)
            _stop_if_cancelled(run)
            if why:
                log.warn("resume: {why}", why=why, sign=run.req.sign)
            if pmap is not None and pmap.pieces:
                run.pmap = run.record.pmap = pmap
                run.open(fresh=False)
                run.from_record = set(pmap.pieces)
                run.done = pmap.verified_bytes()
                run.length = pmap.length
                log.info("resuming from break-point: {n} verified pieces ({bytes} bytes) of {path} kept",
                         n=len(pmap.pieces), bytes=run.done, path=run.path, sign=run.req.sign)
                run.emit({"event": "resume", "pieces": len(pmap.pieces), "bytes": run.done})
                return
        run.open(fresh=True)

    async def _fetch(self, run: _Run) -> int:
        """Fill the working file; returns the back-to-source reason (0 if none).

        Registers with the task's supernode, runs the pieces; when that node
        is lost, registers with the next one (or the same after its restart)
        and goes on with the verified pieces; only when no node can be used
        does it go back to the source, for the missing ranges.
        """
        req = run.req
        await self._resume(run)
        flow = run.flow
        if not req.nodes:
            reason, error = codes.REASON_NO_NODE, "no supernode given (--node or nodes in dfget.yml)"
            flow.handle(Input.NODES_FAILED, error)
        else:
            while True:
                try:
                    node, cid, reg = await self._register(run, patience=self.timeouts.rejoin if flow.migrations else 0.0)
                except _P2PFailed as e:
                    reason, error = e.reason, e.error
                    flow.handle(Input.NODES_FAILED, error)
                    break
                flow.handle(Input.REGISTERED, format_node(node))
                try:
                    await self._p2p(run, node, cid, reg)
                    flow.handle(Input.COMPLETE)
                    return codes.REASON_NONE
                except _NodeLost as e:
                    await self._stop_pieces(run)
                    _stop_if_cancelled(run)
                    run.registered = None  # that supernode is gone or forgot us: nobody to leave
                    self.health.failed(node, e.error, down=e.down)
                    if flow.migrations >= self.max_migrations(run.nodes):
                        reason, error = codes.REASON_DOWNLOAD_ERROR, f"{e.error} (after {flow.migrations} migrations)"
                        flow.handle(Input.P2P_FAILED, error)
                        break
                    flow.handle(Input.NODE_LOST, e.error)
                    run.emit({"event": "migrate", "node": format_node(node), "why": e.error})
                except _P2PFailed as e:
                    await self._stop_pieces(run)
                    _stop_if_cancelled(run)
                    reason, error = e.reason, e.error
                    flow.handle(Input.P2P_FAILED, error)
                    break
        _stop_if_cancelled(run)
        if not req.back_source:
            raise DownloadFailed(
                codes.ERR_REGISTER if reason in (codes.REASON_REGISTER_FAILED, codes.REASON_NO_NODE) else codes.ERR_DOWNLOAD,
                reason + codes.REASON_NO_BACK_SOURCE,
                error,
            )
        log.info("download from source, reason:{reason} ({error})", reason=reason, error=error, sign=req.sign)
        run.emit({"event": "source", "reason": reason, "error": error})
        # No supernode offers this peer any more: stop serving its pieces.
        self._drop_held(run)
        if run.registered is not None:
            registered, run.registered = run.registered, None
            await self.leave(*registered)
            _stop_if_cancelled(run)
        await self._back_source(run, reason)
        _stop_if_cancelled(run)
        flow.handle(Input.COMPLETE)
        return reason

    def max_migrations(self, nodes: Sequence[tuple[str, int]]) -> int:
        """Moves one download may make: each node twice (a restart, then its death), and one more."""
        return 2 * len(set(nodes)) + 1

    async def _stop_pieces(self, run: _Run) -> None:
        """Cancel the running pieces and wait until none of their bytes can still land in the file.

        Failed pieces still reporting are cancelled too, and the registration
        is forgotten first: a report answered now must start no new piece
        (before, one could, after the download had returned).
        """
        run.task = None
        for d in [*run.running.values(), *run.reporting]:
            d.cancel()
        closing = [writer.closed for writer in run.writers]
        if closing:
            try:
                await gatherResults(closing, consumeErrors=True).addTimeout(STOP_WAIT, self.reactor)
            except Exception as e:
                # Their queued writes may still land on pieces verified after
                # this: nothing in the working file can be trusted any more.
                log.warn("piece writers did not stop within {t}s: {e}", t=STOP_WAIT, e=e, sign=run.req.sign)
                run.broken = DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_WRITE_ERROR,
                                            f"piece writes did not stop within {STOP_WAIT:g}s (the disk stalls)")

    # --- supernode API ----------------------------------------------------------

    async def _api(self, node: tuple[str, int], method: str, path: str, params: Mapping[str, Any] = {},
                   body: Any = None, timeout: float | None = None, secret: str | None = None,
                   ) -> tuple[int, dict[str, Any]]:
        host, port = node
        url = hyperlink.URL(scheme=self._api_scheme, host=host, port=port, path=tuple(path.strip("/").split("/")))
        for key, value in params.items():
            url = url.add(key, str(value))
        kwargs: dict[str, Any] = {"timeout": timeout or self.timeouts.api, "reactor": self.reactor}
        headers = self._cluster_headers()
        if secret:
            headers[PEER_SECRET_HEADER] = secret
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if headers:
            kwargs["headers"] = headers
        response = await self._cluster.request(method, url.to_text(), **kwargs)
        try:
            raw = await read_limited(response, MAX_ANSWER)
        except BodyTooLarge as e:
            raise _BadAnswer(codes.REASON_DOWNLOAD_ERROR, f"supernode {format_node(node)} answered {response.code} "
                                                          f"with a body too large for an API answer ({e})") from None
        try:
            answer = parse_json(raw)
            if not isinstance(answer, dict) or not isinstance(answer.get("code"), int):
                raise ValueError("no code")
        except ValueError:
            raise _BadAnswer(codes.REASON_DOWNLOAD_ERROR, f"supernode {format_node(node)} answered {response.code} without a dfly JSON body") from None
        return response.code, answer

    @property
    def _cluster(self) -> Any:
        """The client for requests into the cluster: ``cluster_http``, else the one client."""
        return self.cluster_http if self.cluster_http is not None else self.http

    @property
    def _api_scheme(self) -> str:
        return "https" if self.cluster_tls else "http"

    def _cluster_headers(self) -> dict[str, str]:
        """The headers every request into the cluster carries: the token, when there is one."""
        return {CLUSTER_TOKEN_HEADER: self.cluster_token} if self.cluster_token else {}

    async def _unless_hung(self, node: tuple[str, int], call: Deferred[Any], every: bool = False) -> Any:
        """``call``'s result; cancelled as `_NodeHung` if ``node`` stops answering even ``/_ping``.

        A registration may rightly take long (the supernode waits for the
        source's headers), and a pull is held by design, so their own
        timeouts stay long; but a supernode that accepts connections and
        answers nothing (stopped, overloaded, a dead VM behind a live load
        balancer) must cost seconds, not that timeout: after ``hang_check`` s
        without an answer the node is pinged, and a ping unanswered within
        ``ping_timeout`` s ends the call.  With ``every`` (a held pull) the
        check repeats while the call waits, skipped while any call of this
        engine hears from the node.
        """
        hung: list[bool] = []
        pinging: list[Deferred[None]] = []
        timer: list[Any] = []

        async def ping() -> None:
            host, port = node
            url = hyperlink.URL(scheme=self._api_scheme, host=host, port=port, path=("_ping",)).to_text()
            try:
                # /_ping needs no token; it goes with it anyway, like every request into the cluster.
                headers = self._cluster_headers()
                response = await self._cluster.get(url, timeout=self.ping_timeout, reactor=self.reactor,
                                                       **({"headers": headers} if headers else {}))
                abort_body(response)
                if response.code == 200:
                    self._heard[node] = self.reactor.seconds()
                    return
            except CancelledError:
                return  # the call ended first
            except Exception:
                pass
            if not call.called:
                hung.append(True)
                call.cancel()

        def check() -> None:
            # Quiet for hang_check s: ping.  Heard from lately (another call's
            # answer): look again hang_check s after that answer, not a whole
            # hang_check from now, so a node that hangs is found within
            # hang_check + ping_timeout of its last answer, whatever the phase.
            timer.clear()
            quiet = self.reactor.seconds() - self._heard.get(node, float("-inf"))
            if quiet < self.timeouts.hang_check:
                timer.append(self.reactor.callLater(self.timeouts.hang_check - quiet, check))
                return
            pinging.append(Deferred.fromCoroutine(ping()))
            if every:
                timer.append(self.reactor.callLater(self.timeouts.hang_check, check))

        timer.append(self.reactor.callLater(self.timeouts.hang_check, check))
        try:
            result = await call
            self._heard[node] = self.reactor.seconds()
            return result
        except Exception:  # our cancel surfaces as CancelledError or as treq's ResponseNeverReceived
            if hung:
                raise _NodeHung(f"{format_node(node)} accepts connections but does not answer, not even /_ping "
                                f"within {self.ping_timeout:g}s") from None
            raise
        finally:
            for t in timer:
                if t.active():
                    t.cancel()
            for d in pinging:
                d.cancel()

    async def _local_ip(self, node: tuple[str, int]) -> str:
        """The address this host uses to reach ``node`` (what peers will dial)."""
        if self.ip:
            return self.ip
        endpoint = HostnameEndpoint(self.reactor, node[0].encode("idna"), node[1], timeout=self.timeouts.connect)
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        protocol = await endpoint.connect(factory)
        ip = protocol.transport.getHost().host
        protocol.transport.loseConnection()
        return ip

    async def _register(self, run: _Run, patience: float = 0.0) -> tuple[tuple[str, int], str, dict[str, Any]]:
        """Register with the task's first node that takes it; `_P2PFailed` when none does.

        With ``patience`` (a migration) rounds over all nodes go on for that
        long, a second apart: a supernode restarting takes a moment to listen.
        """
        deadline = self.reactor.seconds() + patience
        while True:
            errors: list[str] = []
            found = await self._register_round(run, errors)
            if isinstance(found, tuple):
                return found
            if found or self.reactor.seconds() + REJOIN_STEP > deadline:
                raise _P2PFailed(codes.REASON_REGISTER_FAILED, "register failed: " + "; ".join(errors))
            log.info("no supernode took the task yet; trying again in {t:g}s", t=REJOIN_STEP, sign=run.req.sign)
            await deferLater(self.reactor, REJOIN_STEP)

    async def _register_round(self, run: _Run, errors: list[str]) -> tuple[tuple[str, int], str, dict[str, Any]] | bool:
        """One try of every node in the task's order: the registration, or whether trying again is pointless."""
        req = run.req
        # The task's own order of the nodes (rendezvous hashing), nodes this
        # daemon saw fail lately last.
        key = task_key(req.url, req.filter, req.md5, req.identifier, req.digest)
        # A name may stand for several supernodes (a headless Service): each address is a node.
        run.nodes = await self.names.expand(req.nodes)
        for node in self.health.order(rendezvous_order(key, run.nodes)):
            where = format_node(node)
            try:
                ip = await self._local_ip(node)
                cid = f"{ip}-{req.sign}"
                body = {
                    "url": req.url,
                    "headers": [f"{k}: {v}" for k, v in req.headers.items()],
                    "md5": req.md5,
                    "identifier": req.identifier,
                    # With a digest (and nothing else naming the task) the task is
                    # the content at this URL's server: any path there is one task.
                    "digest": f"{req.digest[0]}:{req.digest[1]}" if req.digest and not (req.md5 or req.identifier) else None,
                    "filter": list(req.filter),
                    "cid": cid,
                    "ip": ip,
                    "port": self.port,
                    "hostName": os.uname().nodename,
                    "version": dfly.__version__,
                }
                status, answer = await self._unless_hung(node, Deferred.fromCoroutine(
                    self._api(node, "POST", "/peer/registry", body=body, timeout=self.register_timeout)))
            except (ConnectError, DNSLookupError, TimeoutError, *_NO_RESPONSE, _P2PFailed, _NodeHung) as e:
                _stop_if_cancelled(run)
                error = _describe_error(e)
                log.warn("do register to {node} failed: {error}", node=where, error=error, sign=req.sign)
                errors.append(f"{where}: {error}")
                self.health.failed(node, error, down=isinstance(e, (_NodeHung, Refused)))
                continue
            if status >= 500 and answer.get("code") not in _SOURCE_CODES:
                self.health.failed(node, f"answered {status}")
            else:
                self.health.succeeded(node)
            log.info("do register to {node}, res:{res}", node=where, res=json.dumps(answer), sign=req.sign)
            code, msg = answer["code"], answer.get("msg", "")
            if code == codes.SUCCESS and isinstance(answer.get("data"), dict):
                data = answer["data"]
                run.emit({"event": "registered", "node": where, **data})
                return node, cid, data
            if code == codes.NEED_AUTH:
                raise DownloadFailed(codes.ERR_REGISTER, codes.REASON_REGISTER_FAILED, msg)
            if code == codes.SUCCESS:
                msg = "a success without registration data"
                self.health.failed(node, msg)
            errors.append(f"{where}: {msg}")
            if code in (codes.URL_NOT_REACHABLE, codes.SOURCE_REFUSED) or status == 400:
                return True  # another supernode would hear the same from the source
        return False

    # --- pieces ------------------------------------------------------------------

    async def _p2p(self, run: _Run, node: tuple[str, int], cid: str, reg: dict[str, Any]) -> None:
        try:
            task_id = str(reg["taskId"])
            piece_size = int(reg["pieceSize"])
            length = int(reg.get("fileLength", -1))
            if piece_size <= 0 or length < -1:
                raise ValueError("piece size or length out of range")
        except (KeyError, ValueError, TypeError) as e:
            raise _NodeLost(f"supernode {format_node(node)} registered us with an invalid answer ({e})", down=False) from None
        secret = reg.get("peerSecret")
        secret = secret if isinstance(secret, str) else ""  # an older supernode gives none
        run.registered = (node, task_id, cid, secret)
        self._take_layout(run, length, piece_size)
        self._drop_held(run)
        if self.uploads is not None:
            run.held = HeldFile(task_id, run.path, piece_size, key=reg.get("key") or None)
            if run.length >= 0:
                run.held.pieces.update((num, run.pmap.range(num)) for num in run.have)
            self.uploads.add(run.held)
        run.emit({"event": "file", "path": run.path, "length": run.length})
        # A held pull is woken when an event elsewhere gives us work; our own
        # reports get our next pieces in their answers (``next=1``).
        params = {"taskId": task_id, "srcCid": cid, "wait": f"{self.poll_timeout:g}"}
        ctx = run.task = _Task(node, task_id, cid, piece_size, secret, str(reg.get("key") or ""))
        run.lost = None  # whatever lost the last node is not this one's
        while True:
            self._raise_if_ended(run)
            run.pull = Deferred.fromCoroutine(self._unless_hung(node, Deferred.fromCoroutine(
                self._api(node, "GET", "/peer/task", params, timeout=self.poll_timeout + self.timeouts.api,
                          secret=secret)), every=True))
            try:
                status, answer = await run.pull
            except Exception as e:
                _stop_if_cancelled(run)
                if run.fatal or run.lost or run.broken:
                    continue  # a piece ended P2P and cancelled this pull
                if isinstance(e, _NodeHung) or _is_network_error(e):
                    raise _NodeLost(f"lost supernode {format_node(node)}: {_describe_error(e)}",
                                    down=not isinstance(e, _BadAnswer)) from None
                raise
            finally:
                run.pull = None
            code = answer["code"]
            if status in (401, 404):  # 401: our secret is not the cid's (it registered again): register again
                raise _NodeLost(f"supernode {format_node(node)} no longer knows the task ({answer.get('msg', '')}): "
                                "restarted or dropped it", down=False)
            if code == codes.PEER_CONTINUE:
                self._start_pieces(run, ctx, answer.get("data"))
            elif code == codes.PEER_WAIT:
                continue
            elif code == codes.PEER_FINISH:
                data = answer.get("data") or {}
                self._finish_pieces(run, data.get("fileLength", -1), data.get("pieceCount", -1))
                return
            elif code == codes.SOURCE_ERROR:
                raise _P2PFailed(codes.REASON_SOURCE_ERROR, answer.get("msg", "source error"))
            else:
                raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"pull failed ({code}): {answer.get('msg', '')}")

    def _take_layout(self, run: _Run, length: int, piece_size: int) -> None:
        """The supernode's length and piece size; verified pieces of another layout are not these bytes."""
        if run.have and (length < 0 or not run.pmap.layout(length, piece_size)):
            log.warn("the verified pieces of {path} were cut for a file of {old} bytes in pieces of {osize}; "
                     "the supernode says {new} bytes in pieces of {nsize}: starting over",
                     path=run.path, old=run.pmap.length, osize=run.pmap.piece_size, new=length, nsize=piece_size,
                     sign=run.req.sign)
            run.open(fresh=True)
        run.pmap.layout(length, piece_size)
        self._known_length(run, length)

    def _raise_if_ended(self, run: _Run) -> None:
        if run.broken is not None:
            raise run.broken
        if run.lost is not None:
            raise run.lost
        if run.fatal:
            raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, run.fatal)

    def _finish_pieces(self, run: _Run, length: Any, count: Any) -> None:
        if (not isinstance(length, int) or not isinstance(count, int) or length < 0 or count < 0
                or set(run.have) != set(range(count))):
            missing = count - len(run.have) if isinstance(count, int) else "some"
            raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"supernode says finished, but {missing} pieces are missing")
        self._known_length(run, length)

    def _start_pieces(self, run: _Run, ctx: "_Task", pieces: Any) -> None:
        if not isinstance(pieces, list) or ctx is not run.task or run.lost or run.fatal or run.broken:
            return
        for piece in pieces:
            self._start_piece(run, ctx, piece)

    def _start_piece(self, run: _Run, ctx: "_Task", piece: Any) -> None:
        num = piece.get("pieceNum") if isinstance(piece, dict) else None
        if not isinstance(num, int) or isinstance(num, bool) or num in run.running:
            return
        # The number is taken before the coroutine runs (it runs at once, up
        # to its first wait): a piece failing that fast frees it for its retry.
        d: Deferred[None] = Deferred()
        run.running[num] = d
        d.addCallback(lambda _: Deferred.fromCoroutine(self._piece(run, ctx, piece)))

        def ended(result: object) -> None:
            if run.running.get(num) is d:  # a retry of the piece may be running already
                del run.running[num]
            if isinstance(result, Failure) and not result.check(CancelledError):
                log.failure("piece {num} ended unexpectedly", result, num=num, sign=run.req.sign)

        d.addBoth(ended)
        d.callback(None)

    def _checked_range(self, run: _Run, piece_size: int, num: int, given: str) -> tuple[int, int] | None:
        """Piece ``num``'s bytes as we compute them, if ``given`` (the supernode's range) says the same.

        While the length is unknown the last piece may be short: its end
        may be anywhere inside the piece.
        """
        try:
            start, end = parse_range(given)
        except ValueError:
            return None
        if run.length >= 0:
            if not 0 <= num < piece_count(run.length, piece_size):
                return None
            expected = piece_range(num, piece_size, run.length)
            return expected if (start, end) == expected else None
        if num < 0 or start != num * piece_size or end >= start + piece_size:
            return None
        return start, end

    async def _piece(self, run: _Run, ctx: "_Task", piece: dict[str, Any]) -> None:
        num = piece["pieceNum"]
        dst = str(piece.get("cid", ""))
        byte_range = str(piece.get("range", ""))
        params = {"taskId": ctx.task_id, "cid": ctx.cid, "dstCid": dst, "range": byte_range, "next": 1}
        expected = self._checked_range(run, ctx.piece_size, num, byte_range)
        held_digest = run.have.get(num)
        if held_digest is not None and held_digest == piece.get("pieceDigest") and expected is not None:
            # Verified by us before (an earlier supernode, an earlier run): the
            # new supernode learns we hold it, and nothing is fetched again.
            await self._report(run, ctx, "/peer/piece/suc",
                               {"taskId": ctx.task_id, "cid": ctx.cid, "dstCid": dst, "pieceRange": byte_range, "next": 1})
            return
        if held_digest is not None and expected is not None:
            log.warn("piece {num} held here has sha256 {ours}, the supernode says {theirs}: fetched again",
                     num=num, ours=held_digest, theirs=piece.get("pieceDigest"), sign=run.req.sign)
            self._forget_piece(run, num)
        log.info(
            "downloading piece:{piece}",
            piece=json.dumps({
                "taskID": ctx.task_id, "superNode": format_node(ctx.node), "dstCid": dst, "range": byte_range,
                "result": codes.PIECE_SEMISUC, "status": codes.TASK_RUNNING,
                "pieceSize": piece.get("pieceSize"), "pieceNum": num,
            }),
            sign=run.req.sign,
        )
        try:
            if expected is None:
                raise _PieceFailed("invalid", f"supernode {format_node(ctx.node)} gave piece {num} the range "
                                              f"{byte_range!r}, which is not its place in the file: refused")
            length, digest = await self._fetch_piece(run, piece, expected, ctx.key)
        except (CancelledError, ConnectingCancelledError):
            raise CancelledError() from None
        except Exception as e:
            _stop_if_cancelled(run)  # our own cancel is nobody's fault
            if ctx is not run.task:
                # Stopped for a migration or the download's end (a cancel while
                # waiting for headers surfaces as ResponseNeverReceived): no
                # failure to count, nobody to blame, no report to send.
                raise CancelledError() from None
            if not isinstance(e, _PieceFailed):
                log.failure("piece {num} failed unexpectedly", num=num, sign=run.req.sign)
                e = _PieceFailed("error", f"internal error: {e!r}")
            # Free the number before reporting: the report wakes the held pull,
            # whose answer may offer this piece again before the report returns.
            mine = run.running.pop(num, None)
            run.failures += 1
            log.warn("piece {num} from {dst} failed: {error}", num=num, dst=dst, error=e.error, sign=run.req.sign)
            if run.failures > MAX_PIECE_FAILURES:
                self._fatal(run, f"{run.failures} piece failures, last: {e.error}")
                return
            if mine is None:
                return  # stopped while it failed
            run.reporting.add(mine)
            try:
                await self._report(run, ctx, "/peer/piece/error", {**params, "kind": e.kind})
            finally:
                run.reporting.discard(mine)
            return
        start, end = expected
        self._verified(run, num, digest, start, end)
        if dst.startswith("cdnnode:"):
            run.from_supernode += length
        else:
            run.from_peers += length
        await self._report(run, ctx, "/peer/piece/suc",
                           {"taskId": ctx.task_id, "cid": ctx.cid, "dstCid": dst, "pieceRange": byte_range, "next": 1})

    def _verified(self, run: _Run, num: int, digest: str, start: int, end: int) -> None:
        """Piece ``num`` is on disk and matched its sha256: servable, recorded, counted."""
        run.have[num] = digest
        run.changed()
        if run.held is not None:
            run.held.pieces[num] = (start, end)
        run.done += end - start + 1
        run.emit({"event": "piece", "start": start, "end": end})
        run.emit({"event": "progress", "done": run.done, "total": run.length})

    def _forget_piece(self, run: _Run, num: int) -> None:
        run.from_record.discard(num)
        if run.have.pop(num, None) is not None:
            run.changed()
            if run.length >= 0:
                start, end = run.pmap.range(num)
                run.done -= end - start + 1
        if run.held is not None:
            run.held.pieces.pop(num, None)

    async def _report(self, run: _Run, ctx: "_Task", path: str, params: Mapping[str, Any]) -> None:
        """Report a piece; the answer carries our next pieces (``next=1``), started at once."""
        try:
            status, answer = await self._unless_hung(ctx.node, Deferred.fromCoroutine(
                self._api(ctx.node, "GET", path, params, secret=ctx.secret)))
        except (CancelledError, ConnectingCancelledError):
            raise CancelledError() from None  # the piece was stopped (a migration, the download's end)
        except Exception as e:
            if run.cancelled:
                raise CancelledError() from None
            if ctx is not run.task:
                return  # a report to a supernode the download has left: nothing to mend
            if isinstance(e, _NodeHung) or _is_network_error(e):
                self._lose(run, _NodeLost(f"cannot report to supernode {format_node(ctx.node)}: {_describe_error(e)}",
                                          down=not isinstance(e, _BadAnswer)))
                return
            raise
        if ctx is not run.task:
            return
        if status in (401, 404):
            self._lose(run, _NodeLost(f"supernode {format_node(ctx.node)} no longer knows us "
                                      f"({answer.get('msg', '')}): restarted or dropped us", down=False))
            return
        if status != 200:
            self._fatal(run, f"supernode refused report {path}: {answer.get('msg', '')}")
            return
        self._start_pieces(run, ctx, answer.get("data"))

    def _lose(self, run: _Run, lost: "_NodeLost") -> None:
        """The supernode is gone: the pull loop migrates as soon as it wakes."""
        if run.lost is None:
            run.lost = lost
        self._wake(run)

    def _fatal(self, run: _Run, error: str) -> None:
        """The swarm failed: the pull loop goes back to source as soon as it wakes."""
        if not run.fatal:
            run.fatal = error
        self._wake(run)

    def _wake(self, run: _Run) -> None:
        if run.pull is not None:
            run.pull.cancel()

    async def _fetch_piece(self, run: _Run, piece: dict[str, Any], expected: tuple[int, int],
                           key: str) -> tuple[int, str]:
        """Fetch one piece into its place; its length and sha256 once they matched the supernode's."""
        try:
            host, port, path = str(piece["peerIp"]), int(piece["peerPort"]), str(piece["path"])
            digest = str(piece["pieceDigest"])
            # A supernode with TLS marks its CDN's pieces; peers' uploaders speak http.
            scheme = piece.get("scheme", "http")
            if scheme not in ("http", "https"):
                raise ValueError(f"unknown scheme {scheme!r}")
        except (KeyError, ValueError, TypeError) as e:
            raise _PieceFailed("invalid", f"malformed piece task {piece!r}: {e}") from None
        slot = await self.fetch_slots.acquire((host, port))
        try:
            return await self._fetch_range(run, scheme, host, port, path, digest, expected, key)
        finally:
            slot.release()

    async def _fetch_range(self, run: _Run, scheme: str, host: str, port: int, path: str, digest: str,
                           expected: tuple[int, int], key: str) -> tuple[int, str]:
        start, end = expected
        length = end - start + 1
        target = hyperlink.URL.from_text(path)
        url = hyperlink.URL(scheme=scheme, host=host, port=port, path=target.path)
        headers = Headers({"Range": [f"bytes={start}-{end}"]})
        if key:
            headers.setRawHeaders(TASK_KEY_HEADER, [key])  # out of URLs, so out of every access log
        if self.cluster_token:
            headers.setRawHeaders(CLUSTER_TOKEN_HEADER, [self.cluster_token])
        try:
            response = await self._cluster.get(url.to_text(), headers=headers, unbuffered=True,
                                           timeout=self.timeouts.api, reactor=self.reactor)
        except (ConnectError, DNSLookupError) as e:
            raise _PieceFailed("unreachable", f"cannot reach {host}:{port}: {e}") from None
        except (TimeoutError, *_NO_RESPONSE) as e:
            # treq's timeout surfaces as ResponseNeverReceived; a bare
            # CancelledError is our own download ending, and propagates.
            raise _PieceFailed("timeout", f"no answer from {host}:{port}: {_describe_error(e)}") from None
        if response.code != 206:
            abort_body(response)
            kind = "not found" if response.code == 404 else "refused"
            raise _PieceFailed(kind, f"{host}:{port} answered {response.code} to range {start}-{end}")
        digests: list[str] = []
        assert run.fd is not None
        writer = self._writer(run, start, length, length, lambda i, n, d: digests.append(d))
        response.deliverBody(writer)
        try:
            await writer.done
        except WriteError as e:
            run.broken = DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_WRITE_ERROR, str(e))
            self._wake(run)
            raise _PieceFailed("write", str(e)) from None
        except StreamError as e:
            raise _PieceFailed("short body", f"from {host}:{port}: {e}") from None
        if digests != [digest]:
            raise _PieceFailed("digest mismatch", f"piece from {host}:{port} has sha256 {digests[0] if digests else '-'}, expected {digest}")
        return length, digest

    def _writer(self, run: _Run, offset: int, piece_size: int, length: int,
                on_piece: Callable[[int, int, str], None]) -> BodyWriter:
        """A body writer into the working file, tracked until its last write landed."""
        assert run.fd is not None
        writer = BodyWriter(run.fd, offset, piece_size, length, on_piece, self.reactor, self.idle_timeout,
                            self.run_blocking, run.bucket)
        run.writers.add(writer)
        writer.closed.addCallback(lambda _: run.writers.discard(writer))
        return writer

    # --- back to source and the end ----------------------------------------------

    async def _back_source(self, run: _Run, reason: int) -> None:
        """Fetch from the source what is not verified yet; a failure keeps the reason we came here for.

        With verified pieces and a known layout, only the missing ranges are
        asked for (``Range``, each later one ``If-Range`` the first answer's
        validator, so all of them are of one version); a source that answers
        a range with the whole body gets the whole file written anew.
        """
        req = run.req
        if run.have and run.length >= 0 and run.pmap.piece_size > 0:
            spans = run.pmap.missing()
            log.info("back to source for {n} missing ranges ({bytes} bytes); {kept} verified bytes kept",
                     n=len(spans), bytes=sum(e - s + 1 for s, e in spans), kept=run.done, sign=req.sign)
            validator: str | None = None
            for first, last in spans:
                try:
                    opened = await self.source.open(req.url, req.headers, byte_range=(first, last), if_range=validator)
                except SourceError as e:
                    _stop_if_cancelled(run)
                    if e.status != 416 or validator is not None:
                        raise DownloadFailed(codes.ERR_DOWNLOAD, reason, e.reason) from None
                    opened = None  # the file is shorter now: another version
                if opened is not None and opened.status == 200:
                    log.info("the source answered a range with its whole body: writing it all", sign=req.sign)
                    await self._whole_from_source(run, reason, opened)
                    return
                if validator is None and (opened is None or opened.total_length not in (None, run.length)):
                    # The first answer says the file changed since its pieces were
                    # verified: they are another version's, so all of it anew.
                    if opened is not None:
                        abort_body(opened.response)
                    log.warn("the source's file is no longer {length} bytes long: fetching all of it",
                             length=run.length, sign=req.sign)
                    await self._whole_from_source(run, reason, await self._open_whole(run, reason))
                    return
                if (opened.status != 206 or opened.range_start != first or opened.length != last - first + 1
                        or opened.total_length not in (None, run.length)):
                    abort_body(opened.response)
                    raise DownloadFailed(codes.ERR_DOWNLOAD, reason, f"source answered {opened.status} with bytes "
                                         f"{opened.range_start}+{opened.length} of {opened.total_length} to range {first}-{last}")
                if validator is None:
                    validator = opened.etag if opened.etag and not opened.etag.startswith("W/") else opened.last_modified
                base = first // run.pmap.piece_size

                def piece_done(index: int, length: int, digest: str, base: int = base) -> None:
                    start, end = run.pmap.range(base + index)
                    self._verified(run, base + index, digest, start, end)

                run.from_source += await self._source_body(run, reason, opened, first, piece_done)
            return
        await self._whole_from_source(run, reason, await self._open_whole(run, reason))

    async def _open_whole(self, run: _Run, reason: int) -> SourceResponse:
        opened = await self._open_source(run, reason, None, None)
        if opened.status != 200:
            abort_body(opened.response)
            raise DownloadFailed(codes.ERR_DOWNLOAD, reason, f"source answered {opened.status}")
        return opened

    async def _open_source(self, run: _Run, reason: int, byte_range: tuple[int, int] | None,
                           if_range: str | None) -> SourceResponse:
        try:
            return await self.source.open(run.req.url, run.req.headers, byte_range=byte_range, if_range=if_range)
        except SourceError as e:
            _stop_if_cancelled(run)
            raise DownloadFailed(codes.ERR_DOWNLOAD, reason, e.reason) from None

    async def _whole_from_source(self, run: _Run, reason: int, opened: SourceResponse) -> None:
        run.open(fresh=True)
        run.pmap.layout(opened.length, piece_size_for(opened.length) if opened.length >= 0 else 0)
        self._known_length(run, opened.length)
        run.emit({"event": "file", "path": run.path, "length": run.length})

        def piece_done(index: int, length: int, digest: str) -> None:
            # Recorded (for a resume) only when the layout is known; counted in any case.
            size = run.pmap.piece_size or DEFAULT_PIECE_SIZE
            start = index * size
            if run.pmap.piece_size:
                self._verified(run, index, digest, start, start + length - 1)
                return
            run.done += length
            run.emit({"event": "piece", "start": start, "end": start + length - 1})
            run.emit({"event": "progress", "done": run.done, "total": run.length})

        total = await self._source_body(run, reason, opened, 0, piece_done)
        run.from_source = total
        self._known_length(run, total)

    async def _source_body(self, run: _Run, reason: int, opened: SourceResponse, offset: int,
                           piece_done: Callable[[int, int, str], None]) -> int:
        writer = self._writer(run, offset, run.pmap.piece_size or DEFAULT_PIECE_SIZE, opened.length, piece_done)
        opened.response.deliverBody(writer)
        try:
            return await writer.done
        except WriteError as e:
            raise DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_WRITE_ERROR, str(e)) from None
        except StreamError as e:
            _stop_if_cancelled(run)
            raise DownloadFailed(codes.ERR_DOWNLOAD, reason, f"from source: {e}") from None

    async def _finish(self, run: _Run) -> None:
        """fsync, check the whole-file digest, then place the file at ``-o``."""
        req = run.req
        assert run.fd is not None
        await self._in_thread(os.fsync, run.fd)  # seconds for a big file: not on the reactor
        run.close()
        checks = []
        if req.md5:
            checks.append(("md5", req.md5.lower()))
        if req.digest:
            checks.append(req.digest)
        for algorithm, expected in checks:
            actual = await self._in_thread(file_digest, run.path, algorithm)
            if actual != expected:
                run.have.clear()  # these bytes are not the file: nothing of them is resumed
                raise DownloadFailed(
                    codes.ERR_DOWNLOAD, codes.REASON_DIGEST_MISMATCH,
                    f"{algorithm} mismatch: expected {expected}, got {actual}",
                )
        _stop_if_cancelled(run)  # nothing is placed for a download that was cancelled meanwhile
        try:
            await self._in_thread(storage.place, run.path, req.output, req.sign)
        except OSError as e:
            raise DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_WRITE_ERROR, f"cannot write {req.output}: {e.strerror or e}") from None

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self.run_blocking(lambda: f(*args))


#: No answer came: the connection broke, timed out, or (TLS) its handshake failed
#: before the request was sent (RequestTransmissionFailed) or after.
_NO_RESPONSE = (ResponseFailed, RequestTransmissionFailed)


def _is_network_error(e: BaseException) -> bool:
    """The supernode cannot be reached or used (as opposed to a bug of ours)."""
    return isinstance(e, (ConnectError, DNSLookupError, TimeoutError, *_NO_RESPONSE, _BadAnswer, _NodeHung))


def _describe_error(e: BaseException) -> str:
    if isinstance(e, _P2PFailed):
        return e.error
    if isinstance(e, _NO_RESPONSE) and e.reasons:
        # A timeout cancels the request: its reason, a CancelledError, has no message.
        return "; ".join(_tls_error(r.value) or r.getErrorMessage() or _no_answer(r.value) for r in e.reasons)
    return str(e) or _no_answer(e)


def _tls_error(e: BaseException) -> str | None:
    """Words for a failed TLS handshake with a supernode (or its CDN): what to check."""
    if isinstance(e, SSL.Error):
        return (f"TLS handshake failed ({e.args[0] if e.args else e}): is the certificate signed by clusterCa, "
                "and still valid?")
    if isinstance(e, VerificationError):
        ids = [error.mismatched_id for error in e.errors if hasattr(error, "mismatched_id")]
        dialled = ", ".join(str(getattr(i, "ip", None) or getattr(i, "hostname", i)) for i in ids) or "what was dialled"
        return f"TLS: the certificate does not name {dialled} (its SANs must hold the name or address peers dial)"
    return None


def _no_answer(e: BaseException) -> str:
    """Words for an error without a message (a cancelled request: the API timeout ran out)."""
    if isinstance(e, CancelledError):
        return "no answer within the API timeout"
    return type(e).__name__


def _stop_if_cancelled(run: _Run) -> None:
    """Errors seen while the run is being cancelled are the cancel itself."""
    if run.cancelled:
        raise CancelledError()
