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
from typing import Any, Callable, Mapping

import attrs
import hyperlink
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.error import ConnectError, ConnectingCancelledError, DNSLookupError, TimeoutError
from twisted.internet.error import ConnectionRefusedError as Refused
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

import dfly
from dfly import codes
from dfly.config import Home, format_node
from dfly.httpclient import BodyTooLarge, read_limited
from dfly.jsonapi import parse_json
from dfly.logs import CLIENT_NAMESPACE
from dfly.pieces import DEFAULT_PIECE_SIZE, file_digest, parse_range
from dfly.ratelimit import HostLimit, TokenBucket, describe_limit
from dfly.source import SourceClient, SourceError, abort_body
from dfly.stream import BodyWriter, RunBlocking, StreamError, WriteError, thread_runner
from dfly.peer import storage
from dfly.peer.nodehealth import NodeHealth
from dfly.placement import rendezvous_order, task_key
from dfly.peer.request import DownloadRequest, DownloadResult
from dfly.peer.uploader import HeldFile, UploadStore
from dfly.urls import move_userinfo

log = Logger(namespace=CLIENT_NAMESPACE)

#: Piece failures one download tolerates before it gives up on P2P.
MAX_PIECE_FAILURES = 8
#: 5xx codes that report the source's trouble, not the supernode's.
_SOURCE_CODES = frozenset({codes.SOURCE_FAILED, codes.SOURCE_ERROR, codes.URL_NOT_REACHABLE})
#: The largest supernode answer read (a 601 with a few pieces is ~2 KiB).
MAX_ANSWER = 1024 * 1024
#: Without --timeout and before the length is known, a download gets this long.
DEFAULT_TIMEOUT = 300.0

Emit = Callable[[dict[str, Any]], None]


class DownloadFailed(Exception):
    def __init__(self, code: int, reason: int, error: str) -> None:
        super().__init__(error)
        self.code = code
        self.reason = reason
        self.error = error


class _NodeHung(Exception):
    """A supernode took a connection and answers nothing, not even ``/_ping``."""


class _P2PFailed(Exception):
    """The supernode path broke; the download may still go back to source."""

    def __init__(self, reason: int, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


class _PieceFailed(Exception):
    def __init__(self, kind: str, error: str) -> None:
        super().__init__(error)
        self.kind = kind
        self.error = error


@attrs.define(eq=False)
class _Run:
    """The mutable state of one download."""

    req: DownloadRequest
    path: str
    emit: Emit
    fd: int | None = None
    length: int = -1
    done: int = 0
    have: set[int] = attrs.Factory(set)
    running: dict[int, Deferred[None]] = attrs.Factory(dict)
    failures: int = 0
    fatal: str = ""
    pull: Deferred[Any] | None = None
    timed_out: bool = False
    cancelled: bool = False
    timeout: float = DEFAULT_TIMEOUT
    from_peers: int = 0
    from_supernode: int = 0
    from_source: int = 0
    started: float = 0.0
    watchdog: Any = None  # IDelayedCall that cancels the fetch at the deadline
    registered: tuple[tuple[str, int], str, str] | None = None  # node, task id, cid
    held: HeldFile | None = None  # what the uploader serves of this download
    bucket: TokenBucket | None = None  # --locallimit, inside the host's --totallimit

    def open(self) -> int:
        if self.fd is not None:
            os.close(self.fd)
        self.fd = storage.open_working_file(self.path)
        self.done = 0
        self.have.clear()
        return self.fd

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
    api_timeout: float = 10.0
    register_timeout: float = 60.0  # a registration waits for the source's headers: long ...
    hang_check: float = 3.0  # ... but after this long without an answer the supernode is pinged,
    ping_timeout: float = 2.0  # and one that does not answer that either is taken for hung
    health: NodeHealth = attrs.field(default=None)  # nodes that failed lately, shared by all downloads
    poll_timeout: float = 30.0  # how long the supernode may hold our pull (sent as its ``wait``)
    idle_timeout: float = 30.0
    source: SourceClient = attrs.field(default=None)
    run_blocking: RunBlocking = attrs.field(default=None)  # where hashing and disk writes run
    uploads: UploadStore | None = None  # None: this engine serves no pieces (no uploader)
    limit: HostLimit = attrs.field(default=None)  # --totallimit, shared with the uploader
    active: int = 0
    last_active: float = 0.0  # when the last download ended (for the daemon's idle exit)

    def __attrs_post_init__(self) -> None:
        if self.source is None:
            self.source = SourceClient(self.http, self.reactor)
        if self.run_blocking is None:
            self.run_blocking = thread_runner(self.reactor)
        if self.limit is None:
            self.limit = HostLimit(0, self.reactor)
        if self.health is None:
            self.health = NodeHealth(self.reactor)

    def download(self, req: DownloadRequest, emit: Emit = lambda event: None) -> Deferred[DownloadResult]:
        """Run one download to its end; fires with the result (failures too).

        Cancelling it stops the transfer and removes the working file.
        """
        return Deferred.fromCoroutine(self._run(req, emit))

    async def _run(self, req: DownloadRequest, emit: Emit) -> DownloadResult:
        started = self.reactor.seconds()
        url, headers = move_userinfo(req.url, req.headers)
        if url != req.url:
            # ``http://u:p@host/f`` from a caller that did not convert it (dfdaemon's
            # proxy rules): the supernode refuses such a URL and treq cannot send it.
            req = attrs.evolve(req, url=url, headers=headers)
        run = _Run(req, os.path.join(self.home.data, storage.working_name(req.output, req.sign)), emit)
        run.timeout = req.timeout or DEFAULT_TIMEOUT
        run.started = started
        if req.total_limit is not None and req.total_limit != self.limit.rate:
            self.limit.set_rate(req.total_limit)
            log.info("host limit (--totallimit) now {limit} each way", limit=describe_limit(req.total_limit),
                     sign=req.sign)
        run.bucket = TokenBucket(req.local_limit, self.reactor, parent=self.limit.rx)
        self.active += 1
        fetch = Deferred.fromCoroutine(self._fetch(run))

        # Cancelling (client gone, or the watchdog) marks the run first, so
        # that no stage mistakes the errors it sees for a reason to go on
        # (next node, back to source); we then wait for the fetch to unwind
        # before cleaning up under it.
        def cancel(_: object = None) -> None:
            run.cancelled = True
            fetch.cancel()

        def expire() -> None:
            run.timed_out = True
            cancel()

        waiting: Deferred[int] = Deferred(cancel)
        fetch.addBoth(lambda result: None if waiting.called else waiting.callback(result))
        run.watchdog = self.reactor.callLater(run.timeout, expire)
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
            await self._finish(run)
            kept = self._keep_serving(run)
            result = DownloadResult(
                True, self.reactor.seconds() - started, run.length, reason,
                from_peers=run.from_peers, from_supernode=run.from_supernode, from_source=run.from_source,
            )
        except DownloadFailed as e:
            kept = False
            result = DownloadResult(
                False, self.reactor.seconds() - started, run.length, e.reason, e.code, e.error,
                run.from_peers, run.from_supernode, run.from_source,
            )
        except BaseException:
            kept = False
            raise
        finally:
            if run.watchdog.active():
                run.watchdog.cancel()
            run.close()
            self.active -= 1
            self.last_active = self.reactor.seconds()
            if not kept:
                self._drop_held(run)
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
        run.held.node, run.held.cid = run.registered[0], run.registered[2]
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
        return Deferred.fromCoroutine(self.leave(held.node, held.task_id, held.cid))

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
            status, answer = await self._api(held.node, "GET", "/peer/task", {"taskId": held.task_id, "srcCid": held.cid})
        except Exception as e:
            log.warn("heartbeat to {node} failed: {error}", node=format_node(held.node), error=e)
            return
        if status != 200:
            log.info("supernode {node} no longer knows cid:{cid} of taskID:{task_id} ({msg})",
                     node=format_node(held.node), cid=held.cid, task_id=held.task_id, msg=answer.get("msg", status))

    async def leave(self, node: tuple[str, int], task_id: str, cid: str) -> None:
        """Tell the supernode this cid is gone (best effort: it only frees state)."""
        try:
            await self._api(node, "GET", "/peer/service/down", {"taskId": task_id, "cid": cid})
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
            elapsed = self.reactor.seconds() - run.started
            if run.watchdog.active():
                run.watchdog.reset(max(run.timeout - elapsed, 0))

    async def _fetch(self, run: _Run) -> int:
        """Fill the working file; returns the back-to-source reason (0 if none)."""
        req = run.req
        if not req.nodes:
            reason, error = codes.REASON_NO_NODE, "no supernode given (--node or nodes in dfget.yml)"
        else:
            try:
                node, cid, reg = await self._register(run)
            except DownloadFailed:
                raise
            except _P2PFailed as e:
                reason, error = e.reason, e.error
            else:
                try:
                    await self._p2p(run, node, cid, reg)
                    return codes.REASON_NONE
                except _P2PFailed as e:
                    reason, error = e.reason, e.error
        _stop_if_cancelled(run)
        if not req.back_source:
            raise DownloadFailed(
                codes.ERR_REGISTER if reason in (codes.REASON_REGISTER_FAILED, codes.REASON_NO_NODE) else codes.ERR_DOWNLOAD,
                reason + codes.REASON_NO_BACK_SOURCE,
                error,
            )
        log.info("download from source, reason:{reason} ({error})", reason=reason, error=error, sign=req.sign)
        run.emit({"event": "source", "reason": reason, "error": error})
        # The working file is about to be recreated: stop offering its pieces.
        self._drop_held(run)
        if run.registered is not None:
            registered, run.registered = run.registered, None
            await self.leave(*registered)
        await self._back_source(run, reason)
        return reason

    # --- supernode API ----------------------------------------------------------

    async def _api(self, node: tuple[str, int], method: str, path: str, params: Mapping[str, Any] = {},
                   body: Any = None, timeout: float | None = None) -> tuple[int, dict[str, Any]]:
        host, port = node
        url = hyperlink.URL(scheme="http", host=host, port=port, path=tuple(path.strip("/").split("/")))
        for key, value in params.items():
            url = url.add(key, str(value))
        kwargs: dict[str, Any] = {"timeout": timeout or self.api_timeout, "reactor": self.reactor}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"] = {"Content-Type": "application/json"}
        response = await self.http.request(method, url.to_text(), **kwargs)
        try:
            raw = await read_limited(response, MAX_ANSWER)
        except BodyTooLarge as e:
            raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"supernode {format_node(node)} answered {response.code} "
                                                          f"with a body too large for an API answer ({e})") from None
        try:
            answer = parse_json(raw)
            if not isinstance(answer, dict) or not isinstance(answer.get("code"), int):
                raise ValueError("no code")
        except ValueError:
            raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"supernode {format_node(node)} answered {response.code} without a dfly JSON body") from None
        return response.code, answer

    async def _unless_hung(self, node: tuple[str, int], call: Deferred[Any]) -> Any:
        """``call``'s result; cancelled as `_NodeHung` if ``node`` stops answering even ``/_ping``.

        A registration may rightly take long (the supernode waits for the
        source's headers), so its own timeout stays long; but a supernode
        that accepts connections and answers nothing (stopped, overloaded, a
        dead VM behind a live load balancer) must cost seconds, not that
        timeout: after ``hang_check`` s without an answer the node is pinged,
        and a ping unanswered within ``ping_timeout`` s ends the call.
        """
        hung: list[bool] = []

        async def ping() -> None:
            host, port = node
            url = hyperlink.URL(scheme="http", host=host, port=port, path=("_ping",)).to_text()
            try:
                response = await self.http.get(url, timeout=self.ping_timeout, reactor=self.reactor)
                abort_body(response)
                if response.code == 200:
                    return
            except CancelledError:
                return  # the call ended first
            except Exception:
                pass
            if not call.called:
                hung.append(True)
                call.cancel()

        pinging: list[Deferred[None]] = []
        timer = self.reactor.callLater(self.hang_check, lambda: pinging.append(Deferred.fromCoroutine(ping())))
        try:
            return await call
        except Exception:  # our cancel surfaces as CancelledError or as treq's ResponseNeverReceived
            if hung:
                raise _NodeHung(f"{format_node(node)} accepts connections but does not answer, not even /_ping "
                                f"within {self.ping_timeout:g}s") from None
            raise
        finally:
            if timer.active():
                timer.cancel()
            for d in pinging:
                d.cancel()

    async def _local_ip(self, node: tuple[str, int]) -> str:
        """The address this host uses to reach ``node`` (what peers will dial)."""
        if self.ip:
            return self.ip
        endpoint = HostnameEndpoint(self.reactor, node[0].encode("idna"), node[1], timeout=3)
        factory = Factory.forProtocol(Protocol)
        factory.noisy = False
        protocol = await endpoint.connect(factory)
        ip = protocol.transport.getHost().host
        protocol.transport.loseConnection()
        return ip

    async def _register(self, run: _Run) -> tuple[tuple[str, int], str, dict[str, Any]]:
        req = run.req
        errors: list[str] = []
        # The task's own order of the nodes (rendezvous hashing), nodes this
        # daemon saw fail lately last.
        key = task_key(req.url, req.filter, req.md5, req.identifier, req.digest)
        for node in self.health.order(rendezvous_order(key, req.nodes)):
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
            except (ConnectError, DNSLookupError, TimeoutError, ResponseFailed, _P2PFailed, _NodeHung) as e:
                _stop_if_cancelled(run)
                error = e.error if isinstance(e, _P2PFailed) else (str(e) or type(e).__name__)
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
            if code == codes.SUCCESS:
                data = answer.get("data") or {}
                run.emit({"event": "registered", "node": where, **data})
                return node, cid, data
            if code == codes.NEED_AUTH:
                raise DownloadFailed(codes.ERR_REGISTER, codes.REASON_REGISTER_FAILED, msg)
            errors.append(f"{where}: {msg}")
            if code == codes.URL_NOT_REACHABLE or status == 400:
                break  # another supernode would hear the same from the source
        raise _P2PFailed(codes.REASON_REGISTER_FAILED, "register failed: " + "; ".join(errors))

    # --- pieces ------------------------------------------------------------------

    async def _p2p(self, run: _Run, node: tuple[str, int], cid: str, reg: dict[str, Any]) -> None:
        task_id = reg["taskId"]
        run.registered = (node, task_id, cid)
        run.open()
        if self.uploads is not None:
            run.held = HeldFile(task_id, run.path, int(reg["pieceSize"]), key=reg.get("key") or None)
            self.uploads.add(run.held)
        self._known_length(run, int(reg.get("fileLength", -1)))
        run.emit({"event": "file", "path": run.path, "length": run.length})
        # A held pull is woken when an event elsewhere gives us work; our own
        # reports get our next pieces in their answers (``next=1``).
        params = {"taskId": task_id, "srcCid": cid, "wait": f"{self.poll_timeout:g}"}
        try:
            while True:
                if run.fatal:
                    raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, run.fatal)
                run.pull = Deferred.fromCoroutine(
                    self._api(node, "GET", "/peer/task", params, timeout=self.poll_timeout + self.api_timeout)
                )
                try:
                    status, answer = await run.pull
                except Exception as e:
                    _stop_if_cancelled(run)
                    if run.fatal:
                        continue  # a piece gave up on P2P and cancelled this pull
                    if isinstance(e, (ConnectError, DNSLookupError, TimeoutError, ResponseFailed)):
                        raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"lost supernode {format_node(node)}: {e}") from None
                    raise
                finally:
                    run.pull = None
                code = answer["code"]
                if code == codes.PEER_CONTINUE:
                    for piece in answer.get("data") or []:
                        self._start_piece(run, node, task_id, cid, piece)
                elif code == codes.PEER_WAIT:
                    continue
                elif code == codes.PEER_FINISH:
                    data = answer.get("data") or {}
                    self._finish_pieces(run, int(data.get("fileLength", -1)), int(data.get("pieceCount", -1)))
                    return
                elif code == codes.SOURCE_ERROR:
                    raise _P2PFailed(codes.REASON_SOURCE_ERROR, answer.get("msg", "source error"))
                else:
                    raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"pull failed ({code}): {answer.get('msg', '')}")
        finally:
            for d in list(run.running.values()):
                d.cancel()

    def _finish_pieces(self, run: _Run, length: int, count: int) -> None:
        if length < 0 or count < 0 or run.have != set(range(count)):
            raise _P2PFailed(codes.REASON_DOWNLOAD_ERROR, f"supernode says finished, but {count - len(run.have)} pieces are missing")
        self._known_length(run, length)

    def _start_piece(self, run: _Run, node: tuple[str, int], task_id: str, cid: str, piece: Any) -> None:
        num = piece.get("pieceNum") if isinstance(piece, dict) else None
        if not isinstance(num, int) or num in run.running or num in run.have:
            return
        d = Deferred.fromCoroutine(self._piece(run, node, task_id, cid, piece))
        run.running[num] = d

        def ended(result: object) -> None:
            if run.running.get(num) is d:  # a retry of the piece may be running already
                del run.running[num]

        d.addBoth(ended)

    async def _piece(self, run: _Run, node: tuple[str, int], task_id: str, cid: str, piece: dict[str, Any]) -> None:
        num = piece["pieceNum"]
        dst = str(piece.get("cid", ""))
        byte_range = str(piece.get("range", ""))
        log.info(
            "downloading piece:{piece}",
            piece=json.dumps({
                "taskID": task_id, "superNode": format_node(node), "dstCid": dst, "range": byte_range,
                "result": codes.PIECE_SEMISUC, "status": codes.TASK_RUNNING,
                "pieceSize": piece.get("pieceSize"), "pieceNum": num,
            }),
            sign=run.req.sign,
        )
        try:
            length = await self._fetch_piece(run, piece)
        except CancelledError:
            raise
        except _PieceFailed as e:
            _stop_if_cancelled(run)  # our own cancel is nobody's fault
            # Free the number before reporting: the report wakes the held pull,
            # whose answer may offer this piece again before the report returns.
            run.running.pop(num, None)
            run.failures += 1
            log.warn("piece {num} from {dst} failed: {error}", num=num, dst=dst, error=e.error, sign=run.req.sign)
            params = {"taskId": task_id, "cid": cid, "dstCid": dst, "range": byte_range, "kind": e.kind, "next": 1}
            if run.failures > MAX_PIECE_FAILURES:
                self._fatal(run, f"{run.failures} piece failures, last: {e.error}")
                return
            await self._report(run, node, task_id, cid, "/peer/piece/error", params)
            return
        run.have.add(num)
        start, end = parse_range(byte_range)
        if run.held is not None:
            # Servable from now on: verified and on disk.
            run.held.pieces[num] = (start, end)
        run.done += length
        if dst.startswith("cdnnode:"):
            run.from_supernode += length
        else:
            run.from_peers += length
        run.emit({"event": "piece", "start": start, "end": end})
        run.emit({"event": "progress", "done": run.done, "total": run.length})
        await self._report(run, node, task_id, cid, "/peer/piece/suc",
                           {"taskId": task_id, "cid": cid, "dstCid": dst, "pieceRange": byte_range, "next": 1})

    async def _report(self, run: _Run, node: tuple[str, int], task_id: str, cid: str, path: str,
                      params: Mapping[str, Any]) -> None:
        """Report a piece; the answer carries our next pieces (``next=1``), started at once."""
        try:
            status, answer = await self._api(node, "GET", path, params)
        except (ConnectError, DNSLookupError, TimeoutError, ResponseFailed, _P2PFailed) as e:
            self._fatal(run, f"cannot report to supernode {format_node(node)}: {e}")
            return
        if status != 200:
            self._fatal(run, f"supernode refused report {path}: {answer.get('msg', '')}")
            return
        pieces = answer.get("data")
        if isinstance(pieces, list) and not run.fatal:
            for piece in pieces:
                self._start_piece(run, node, task_id, cid, piece)

    def _fatal(self, run: _Run, error: str) -> None:
        """Stop the pull loop: it re-raises ``run.fatal`` as soon as it wakes."""
        if not run.fatal:
            run.fatal = error
        if run.pull is not None:
            run.pull.cancel()

    async def _fetch_piece(self, run: _Run, piece: dict[str, Any]) -> int:
        try:
            start, end = parse_range(str(piece["range"]))
            host, port, path = str(piece["peerIp"]), int(piece["peerPort"]), str(piece["path"])
            expected = str(piece["pieceDigest"])
        except (KeyError, ValueError, TypeError) as e:
            raise _PieceFailed("invalid", f"malformed piece task {piece!r}: {e}") from None
        length = end - start + 1
        target = hyperlink.URL.from_text(path)  # a path, with the task's key as its query
        url = hyperlink.URL(scheme="http", host=host, port=port, path=target.path, query=target.query)
        headers = Headers({"Range": [f"bytes={start}-{end}"]})
        try:
            response = await self.http.get(url.to_text(), headers=headers, unbuffered=True,
                                           timeout=self.api_timeout, reactor=self.reactor)
        except (ConnectError, DNSLookupError) as e:
            raise _PieceFailed("unreachable", f"cannot reach {host}:{port}: {e}") from None
        except (TimeoutError, ResponseFailed) as e:
            # treq's timeout surfaces as ResponseNeverReceived; a bare
            # CancelledError is our own download ending, and propagates.
            raise _PieceFailed("timeout", f"no answer from {host}:{port}: {e}") from None
        if response.code != 206:
            abort_body(response)
            kind = "not found" if response.code == 404 else "refused"
            raise _PieceFailed(kind, f"{host}:{port} answered {response.code} to range {start}-{end}")
        digests: list[str] = []
        writer = BodyWriter(run.fd, start, length, length, lambda i, n, d: digests.append(d), self.reactor,
                            self.idle_timeout, self.run_blocking, run.bucket)
        response.deliverBody(writer)
        try:
            await writer.done
        except WriteError as e:
            self._fatal(run, str(e))
            raise _PieceFailed("write", str(e)) from None
        except StreamError as e:
            raise _PieceFailed("short body", f"from {host}:{port}: {e}") from None
        if digests != [expected]:
            raise _PieceFailed("digest mismatch", f"piece from {host}:{port} has sha256 {digests[0] if digests else '-'}, expected {expected}")
        return length

    # --- back to source and the end ----------------------------------------------

    async def _back_source(self, run: _Run, reason: int) -> None:
        """Fetch straight from the source; a failure keeps the reason we came here for."""
        req = run.req
        try:
            opened = await self.source.open(req.url, req.headers)
        except SourceError as e:
            _stop_if_cancelled(run)
            raise DownloadFailed(codes.ERR_DOWNLOAD, reason, e.reason) from None
        if opened.status != 200:
            abort_body(opened.response)
            raise DownloadFailed(codes.ERR_DOWNLOAD, reason, f"source answered {opened.status}")
        run.open()
        self._known_length(run, opened.length)
        run.emit({"event": "file", "path": run.path, "length": run.length})

        def progress(index: int, length: int, digest: str) -> None:
            start = index * DEFAULT_PIECE_SIZE
            run.done += length
            run.emit({"event": "piece", "start": start, "end": start + length - 1})
            run.emit({"event": "progress", "done": run.done, "total": run.length})

        writer = BodyWriter(run.fd, 0, DEFAULT_PIECE_SIZE, opened.length, progress, self.reactor, self.idle_timeout,
                            self.run_blocking, run.bucket)
        opened.response.deliverBody(writer)
        try:
            total = await writer.done
        except WriteError as e:
            raise DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_WRITE_ERROR, str(e)) from None
        except StreamError as e:
            _stop_if_cancelled(run)
            raise DownloadFailed(codes.ERR_DOWNLOAD, reason, f"from source: {e}") from None
        run.from_source = total
        self._known_length(run, total)

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
                raise DownloadFailed(
                    codes.ERR_DOWNLOAD, codes.REASON_DIGEST_MISMATCH,
                    f"{algorithm} mismatch: expected {expected}, got {actual}",
                )
        try:
            await self._in_thread(storage.place, run.path, req.output, req.sign)
        except OSError as e:
            raise DownloadFailed(codes.ERR_DOWNLOAD, codes.REASON_WRITE_ERROR, f"cannot write {req.output}: {e.strerror or e}") from None

    def _in_thread(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return self.run_blocking(lambda: f(*args))


def _stop_if_cancelled(run: _Run) -> None:
    """Errors seen while the run is being cancelled are the cancel itself."""
    if run.cancelled:
        raise CancelledError()
