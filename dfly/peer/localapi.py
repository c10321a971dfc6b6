"""The peer daemon's HTTP server: the uploader for other peers, the local API for ``dfget``.

``POST /local/download`` answers with a stream of JSON lines (events, then
the result) so the CLI can show progress; closing the connection cancels the
download.  Only loopback clients that present the token from ``host.meta``
(readable by the owner alone) may start downloads (or, for a daemon
listening on one address, clients connecting from that address): the daemon writes files
as its user, so nobody else may steer it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Any

import attrs
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest

import dfly
from dfly import codes
from dfly.jsonapi import ApiError, bad_request, envelope, json_app, read_json
from dfly.peer.engine import PeerEngine
from dfly.peer.hostmeta import TOKEN_HEADER
from dfly.peer.request import DownloadResult, request_from_json
from dfly.peer.uploader import UploadStore
from dfly.urls import add_missing_headers, split_userinfo

log = Logger(namespace="dfly.peer")

class LocalApi:
    app = json_app()

    def __init__(self, engine: PeerEngine, token: str, uploads: UploadStore) -> None:
        self.engine = engine
        self.token = token
        self.uploads = uploads

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/_ping", methods=["GET"])
    def ping(self, request: IRequest) -> bytes:
        return envelope(request, codes.SUCCESS, "OK", {"version": dfly.__version__, "pid": os.getpid()})

    @app.route("/peer/file/<task_id>", methods=["GET"])
    def piece(self, request: IRequest, task_id: str) -> Any:
        """Other peers fetch verified pieces here (no token: this is the uploader)."""
        return self.uploads.serve(request, task_id)

    @app.route("/local/download", methods=["POST"])
    async def download(self, request: IRequest) -> bytes:
        self._authorize(request)
        body = read_json(request)
        # Credentials in the URL become an Authorization header (dfly.urls'
        # rule), so no client can make us register or log them as a URL.
        url, credentials = split_userinfo(body["url"]) if isinstance(body.get("url"), str) else (body.get("url"), {})
        try:
            req = request_from_json({**body, "url": url})
        except ValueError as e:
            raise bad_request(str(e)) from None
        if credentials:
            req = attrs.evolve(req, headers=add_missing_headers(req.headers, credentials))
        request.setHeader(b"content-type", b"application/x-ndjson")

        def emit(event: dict[str, Any]) -> None:
            request.write(json.dumps(event).encode() + b"\n")

        try:
            result = await self.engine.download(req, emit)
        except CancelledError:
            log.info("download of {url} cancelled: the client went away", url=req.url)
            raise
        except Exception:
            # The stream has begun (status 200): an error body would be read as
            # a broken stream ("the peer daemon stopped").  End it with a FAIL
            # that says where to look; the exception stays in the log.
            log.failure("download of {url} failed unexpectedly", url=req.url)
            result = DownloadResult(False, 0.0, -1, codes.REASON_DOWNLOAD_ERROR, codes.ERR_DOWNLOAD,
                                    "internal error in the peer daemon (see its log)")
        return json.dumps({"event": "result", **result.to_json()}).encode() + b"\n"

    def _authorize(self, request: IRequest) -> None:
        host = getattr(request.getClientAddress(), "host", "")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        # A daemon listening on one specific address is reached from that same
        # address: still this host.
        local = loopback or host == getattr(request.getHost(), "host", None)
        given = request.getHeader(TOKEN_HEADER) or b""
        if not local or not hmac.compare_digest(given, self.token.encode()):
            raise ApiError(403, codes.PARAM_ERROR, "local API: loopback clients with the host.meta token only")
