"""The supernode's register API (port 8002): thin klein handlers over `TaskManager`.

Handlers parse and validate, call the domain, and answer the JSON envelope;
`ApiError` becomes a 4xx/5xx with the Dragonfly code.  Names and codes are
Dragonfly's so operators recognise them.
"""

from __future__ import annotations

import ipaddress
import platform
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.iweb import IRequest

import dfly
from dfly import codes
from dfly.jsonapi import ApiError, FastRoutes, bad_request, envelope, json_app, query_arg, query_int, read_json
from dfly.pieces import (
    is_md5, is_task_id, parse_digest, parse_filter, parse_range, piece_num_of, registration_task_url, task_id,
)
from dfly.refusals import RefusalLog
from dfly.urls import check_url, parse_header_lines
from dfly.supernode.metrics import metrics_registry, render
from dfly.supernode.peerauth import PeerNetworks, RegistrationLimit
from dfly.supernode.pullqueue import Assignment
from dfly.supernode.tasks import MAX_POLL_WAIT, Registration, Task, TaskManager

log = Logger(namespace="dfly.supernode.api")


def parse_registration(body: dict[str, Any]) -> Registration:
    """Validate a registration body; accepts Dragonfly's ``rawUrl`` spelling too."""
    url = body.get("url", body.get("rawUrl"))
    try:
        url = check_url(url)
    except ValueError as e:
        raise bad_request(str(e)) from None
    headers_in = body.get("headers") or []
    try:
        if isinstance(headers_in, dict):
            headers = parse_header_lines(f"{k}: {v}" for k, v in headers_in.items())
        elif isinstance(headers_in, list) and all(isinstance(h, str) for h in headers_in):
            headers = parse_header_lines(headers_in)
        else:
            raise ValueError("headers must be a list of 'Name: value' strings")
    except ValueError as e:
        raise bad_request(str(e)) from None
    md5 = body.get("md5") or None
    identifier = body.get("identifier") or None
    if md5 is not None and identifier is not None:
        raise bad_request("give md5 or identifier, not both")
    if md5 is not None and (not isinstance(md5, str) or not is_md5(md5)):
        raise bad_request(f"invalid md5 {md5!r}: expected 32 hex digits")
    if identifier is not None and not isinstance(identifier, str):
        raise bad_request("identifier must be a string")
    digest_text = body.get("digest") or None
    digest = None
    if digest_text is not None:
        if md5 is not None or identifier is not None:
            raise bad_request("give digest, md5 or identifier, not several")
        try:
            digest = parse_digest(str(digest_text))
        except ValueError as e:
            raise bad_request(str(e)) from None
    filter_spec = body.get("filter")
    if filter_spec is not None and not (
        isinstance(filter_spec, str) or (isinstance(filter_spec, list) and all(isinstance(k, str) for k in filter_spec))
    ):
        raise bad_request("filter must be 'k1&k2' or a list of query keys")
    cid = body.get("cid")
    if not isinstance(cid, str) or not cid or len(cid) > 256 or cid.startswith("cdnnode:"):
        raise bad_request("missing or invalid cid")
    ip = body.get("ip")
    try:
        ip = str(ipaddress.ip_address(ip if isinstance(ip, str) else ""))
    except ValueError:
        raise bad_request(f"invalid ip {body.get('ip')!r}") from None
    port = body.get("port", 0)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise bad_request(f"invalid port {port!r}: expected 0-65535")
    host_name = body.get("hostName", "")
    if not isinstance(host_name, str):
        raise bad_request("hostName must be a string")
    turl = registration_task_url(url, parse_filter(filter_spec), digest)
    md5 = md5.lower() if md5 else None
    return Registration(
        url=url,
        task_url=turl,
        task_id=task_id(turl, md5, identifier),
        headers=headers,
        md5=md5,
        identifier=identifier,
        digest=digest,
        cid=cid,
        ip=ip,
        port=port,
        host_name=host_name,
    )


def _task_id_arg(request: IRequest) -> str:
    value = query_arg(request, "taskId")
    if not is_task_id(value):
        raise bad_request(f"invalid taskId {value!r}")
    return value


class SupernodeApi:
    app = json_app()

    def __init__(self, tasks: TaskManager, download_port: int, advertise_ip: str | None = None,
                 networks: PeerNetworks = PeerNetworks(), registration_rate: float = 20.0) -> None:
        self.tasks = tasks
        self.download_port = download_port
        self.advertise_ip = advertise_ip
        self.networks = networks
        self.limit = RegistrationLimit(tasks.clock, registration_rate)
        self.refusals = RefusalLog(tasks.clock, log)
        self.metrics = metrics_registry(tasks)

    def _authorize(self, request: IRequest, task_id: str, cid: str) -> None:
        """The call about ``cid`` carries the secret its registration got (`dfly.supernode.peerauth`)."""
        try:
            # By its bytes name: a str name makes twisted decode the value as UTF-8, which raises
            # for any other bytes (a 500 and a traceback for one bad header).
            self.tasks.authorize(task_id, cid, request.getHeader(codes.PEER_SECRET_HEADER.encode()))
        except ApiError as e:
            if e.status == 401:
                self.refusals.refused(_client(request), "a call without its peer secret", e.msg)
            raise

    def resource(self) -> Any:
        """Pulls and reports (nearly every request of a swarm) bypass klein: see `FastRoutes`."""
        return FastRoutes(
            {b"/peer/task": self.pull, b"/peer/piece/suc": self.piece_success, b"/peer/piece/error": self.piece_error},
            self.app.resource(),
        )

    @app.route("/peer/registry", methods=["POST"])
    async def registry(self, request: IRequest) -> bytes:
        client = _client(request)
        if not self.limit.take(client):
            self.refusals.refused(client, "registrations", "over registrationRate")
            request.setHeader(b"retry-after", b"1")
            raise ApiError(429, codes.SYSTEM_ERROR, f"too many registrations from {client}; try again later")
        reg = parse_registration(read_json(request))
        why = self.networks.refusal(reg.ip, client)
        if why is not None:
            self.refusals.refused(client, "a registration", why)
            raise ApiError(403, codes.PARAM_ERROR, why)
        task = await self.tasks.register(reg)
        peer = task.peers.get(reg.cid)
        return envelope(
            request,
            codes.SUCCESS,
            "success",
            {"taskId": task.task_id, "fileLength": task.length, "pieceSize": task.piece_size, "key": task.key,
             "peerSecret": peer.secret if peer is not None else ""},
        )

    def pull(self, request: IRequest) -> bytes | Deferred[bytes]:
        """``GET /peer/task``: the next pieces, at once or when the held pull is woken."""
        tid = _task_id_arg(request)
        cid = query_arg(request, "srcCid")
        self._authorize(request, tid, cid)
        wait = _wait_arg(request)
        # Dragonfly clients report their previous piece in the pull itself.
        reported = query_arg(request, "range", required=False)
        if reported:
            result = query_int(request, "result")
            task = self.tasks.task(tid)
            self.tasks.piece_result(tid, cid, _piece_num(reported, task.piece_size), result in (501, 503))
        answer = self.tasks.pull(tid, cid, self._cdn_ip(request), self.download_port, wait)
        if isinstance(answer, Deferred):
            return answer.addCallback(lambda answer: _pull_answer(request, *answer))
        return _pull_answer(request, *answer)

    def piece_success(self, request: IRequest) -> bytes:
        """``GET /peer/piece/suc``; with ``next=1`` the answer carries the reporter's next pieces."""
        tid = _task_id_arg(request)
        cid = query_arg(request, "cid")
        self._authorize(request, tid, cid)
        task = self.tasks.task(tid)
        text = query_arg(request, "pieceRange", required=False) or query_arg(request, "range")
        take_next = _next_arg(request)
        chosen = self.tasks.piece_result(tid, cid, _piece_num(text, task.piece_size), True, take_next=take_next)
        return self._reported(request, task, chosen, take_next, "success")

    def piece_error(self, request: IRequest) -> bytes:
        """``GET /peer/piece/error``: the source is blamed; ``next=1`` as for a success."""
        tid = _task_id_arg(request)
        cid = query_arg(request, "cid", required=False) or query_arg(request, "srcCid")
        self._authorize(request, tid, cid)
        task = self.tasks.task(tid)
        piece = _piece_num(query_arg(request, "range"), task.piece_size)
        kind = query_arg(request, "kind", required=False) or query_arg(request, "errorType", required=False)
        take_next = _next_arg(request)
        log.warn(
            "piece {piece} of taskID:{task_id} failed for {cid} from {dst}: {kind}",
            piece=piece, task_id=tid, cid=cid, dst=query_arg(request, "dstCid", required=False), kind=kind,
        )
        chosen = self.tasks.piece_result(tid, cid, piece, False, kind, take_next=take_next)
        return self._reported(request, task, chosen, take_next, "recorded")

    def _reported(self, request: IRequest, task: Task, chosen: Assignment, take_next: bool, msg: str) -> bytes:
        data = self.tasks.piece_infos(task, chosen, self._cdn_ip(request), self.download_port) if take_next else None
        return envelope(request, codes.PIECE_REPORTED, msg, data)

    @app.route("/peer/service/down", methods=["GET"])
    def service_down(self, request: IRequest) -> bytes:
        tid, cid = _task_id_arg(request), query_arg(request, "cid")
        self._authorize(request, tid, cid)
        self.tasks.service_down(tid, cid)
        return envelope(request, codes.PEER_DOWN, "success")

    @app.route("/_ping", methods=["GET"])
    def ping(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain")
        return b"OK"

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return render(self.metrics)

    @app.route("/version", methods=["GET"])
    def version(self, request: IRequest) -> bytes:
        return envelope(
            request,
            codes.SUCCESS,
            "success",
            {"version": dfly.__version__, "python": platform.python_version(), "os": platform.system().lower()},
        )

    def _cdn_ip(self, request: IRequest) -> str:
        """Where peers reach the CDN: --advertise-ip, else the address they reached us on."""
        return self.advertise_ip or request.getHost().host


def _client(request: IRequest) -> str:
    """The connection's source address (what a registration's ``ip`` must be)."""
    address = request.getClientAddress()
    return getattr(address, "host", "") or "unknown"


_PULL_MSG = {codes.PEER_CONTINUE: "continue", codes.PEER_FINISH: "finish", codes.PEER_WAIT: "wait"}


def _pull_answer(request: IRequest, code: int, data: Any) -> bytes:
    return envelope(request, code, _PULL_MSG[code], data)


def _wait_arg(request: IRequest) -> float | None:
    """The pull's own hold budget in seconds (``wait``), or None: the supernode's ``--poll-timeout``."""
    text = query_arg(request, "wait", required=False)
    if not text:
        return None
    try:
        wait = float(text)
    except ValueError:
        raise bad_request(f"query parameter 'wait' must be seconds, got {text!r}") from None
    if not 0 <= wait <= MAX_POLL_WAIT:  # NaN too
        raise bad_request(f"query parameter 'wait' must be 0-{MAX_POLL_WAIT:g} seconds, got {text!r}")
    return wait


def _next_arg(request: IRequest) -> bool:
    text = query_arg(request, "next", required=False, default="0")
    if text not in ("0", "1"):
        raise bad_request(f"query parameter 'next' must be 0 or 1, got {text!r}")
    return text == "1"


def _piece_num(text: str, piece_size: int) -> int:
    try:
        return piece_num_of(parse_range(text), piece_size)
    except ValueError as e:
        raise bad_request(str(e)) from None
