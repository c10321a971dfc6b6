"""The peer daemon's local API, used by the ``dfget`` CLI on the same host.

``POST /local/download`` answers with a stream of JSON lines (events, then
the result) so the CLI can show progress; closing the connection cancels the
download.  Only loopback clients that present the token from ``host.meta``
(readable by the owner alone) may start downloads: the daemon writes files
as its user, so nobody else may steer it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.web.iweb import IRequest

import dfly
from dfly import codes
from dfly.config import parse_nodes, parse_size
from dfly.jsonapi import ApiError, bad_request, envelope, json_app, read_json
from dfly.pieces import is_md5, parse_digest, parse_filter
from dfly.peer.engine import DownloadRequest, PeerEngine
from dfly.source import check_url, parse_header_lines

log = Logger(namespace="dfly.peer")

TOKEN_HEADER = b"X-Dfly-Token"


def parse_download(body: dict[str, Any]) -> DownloadRequest:
    """Validate a download request as strictly as the CLI does."""
    try:
        url = check_url(body.get("url"))
        output = body.get("output")
        if not isinstance(output, str) or not os.path.isabs(output):
            raise ValueError("output must be an absolute path")
        sign = body.get("sign")
        if not isinstance(sign, str) or not sign or len(sign) > 64:
            raise ValueError("missing sign")
        md5 = body.get("md5") or None
        identifier = body.get("identifier") or None
        if md5 and identifier:
            raise ValueError("give md5 or identifier, not both")
        if md5 is not None and (not isinstance(md5, str) or not is_md5(md5)):
            raise ValueError(f"invalid md5 {md5!r}: expected 32 hex digits")
        digest = parse_digest(body["digest"]) if body.get("digest") else None
        headers = body.get("headers") or []
        if not isinstance(headers, list):
            raise ValueError("headers must be a list of 'Name: value' strings")
        timeout = body.get("timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"invalid timeout {timeout!r}")
        return DownloadRequest(
            url=url,
            output=output,
            sign=sign,
            nodes=parse_nodes(body.get("nodes") or []),
            headers=parse_header_lines(headers),
            md5=md5.lower() if md5 else None,
            identifier=identifier,
            digest=digest,
            filter=parse_filter(body.get("filter")),
            timeout=float(timeout),
            min_rate=parse_size(body.get("minRate", 64 << 10)),
            back_source=not body.get("notbs", False),
        )
    except (ValueError, TypeError) as e:
        raise bad_request(str(e)) from None


class LocalApi:
    app = json_app()

    def __init__(self, engine: PeerEngine, token: str) -> None:
        self.engine = engine
        self.token = token

    def resource(self) -> Any:
        return self.app.resource()

    @app.route("/_ping", methods=["GET"])
    def ping(self, request: IRequest) -> bytes:
        return envelope(request, codes.SUCCESS, "OK", {"version": dfly.__version__, "pid": os.getpid()})

    @app.route("/local/download", methods=["POST"])
    async def download(self, request: IRequest) -> bytes:
        self._authorize(request)
        req = parse_download(read_json(request))
        request.setHeader(b"content-type", b"application/x-ndjson")

        def emit(event: dict[str, Any]) -> None:
            request.write(json.dumps(event).encode() + b"\n")

        try:
            result = await self.engine.download(req, emit)
        except CancelledError:
            log.info("download of {url} cancelled: the client went away", url=req.url)
            raise
        return json.dumps({"event": "result", **result.to_json()}).encode() + b"\n"

    def _authorize(self, request: IRequest) -> None:
        client = request.getClientAddress()
        host = getattr(client, "host", "")
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        given = request.getHeader(TOKEN_HEADER) or b""
        if not loopback or not hmac.compare_digest(given, self.token.encode()):
            raise ApiError(403, codes.PARAM_ERROR, "local API: loopback clients with the host.meta token only")
