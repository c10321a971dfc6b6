"""Request bodies bounded while they arrive, for the ports that take small JSON.

twisted.web reads a whole request body before any resource sees it:
``Request.gotLength`` spools it into a BytesIO (a declared length under
100 000 bytes) or a temporary file (anything larger, and every chunked
body), however big it is.  ``read_json`` can only refuse it afterwards, when
the disk and the time are spent.  `BoundedSite` refuses it on the way in:

- a ``Content-Length`` over ``max_body`` is answered at once, before a byte
  of the body is read: ``413`` with ``{"code": 501, "msg": "request body
  larger than 65536 bytes"}`` and ``Connection: close``; the connection is
  then closed, so the rest of the body is never read;
- a chunked body is counted as it is decoded and refused the same way
  once it passes ``max_body``;
- no ``100 Continue`` is sent for a refused body;
- a body within the limit is kept in memory (never a temporary file), and
  requests without a body, and keep-alive, are untouched.

The resource never runs for a refused request.  Form bodies are not parsed
into ``request.args`` (``parsePOSTFormSubmission=False``): our APIs take
their parameters from the query and JSON bodies.

What Twisted already bounds (``twisted.web.http.HTTPChannel``, checked with
Twisted 26.10), so this module adds nothing for headers:

- ``MAX_LENGTH`` = 16384 (from ``LineReceiver``): one request or header
  line; a longer one drops the connection without an answer;
- ``totalHeadersSize`` = 16384: the request line and all headers together;
  more is a 400 and a close;
- ``maxHeaders`` = 500 headers; more is a 400 and a close;
- chunked bodies: malformed chunk lines are a 400; trailers at most 64 KiB;
- ``timeOut`` = 60 s (``HTTPFactory``'s default): a connection that sends
  nothing for that long while a request is being read is closed.

With a ``cluster_gate`` (`dfly.clustertoken.ClusterGate`) the site also
refuses requests without the cluster token, before any resource runs: the
one place every port that peers reach checks it.

Only for ports whose requests are small: dfdaemon's proxy port relays
registry uploads (blob ``PATCH``/``PUT`` of many MiB) and keeps a plain Site.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.web import http, server

from dfly import codes
from dfly.clustertoken import ClusterGate, Refusal
from dfly.urls import access_log_uri

#: The default limit; `dfly.jsonapi.read_json` checks the same one.
MAX_BODY = 64 * 1024

log = Logger(namespace="dfly.webbounds")


class BoundedRequest(server.Request):
    """A `server.Request` whose body may not pass its site's ``max_body``.

    Invariant: once ``refused`` is set, the 413 has been written and the
    connection is closing; later body bytes (those already read with the
    headers) are dropped, and a body that ends in them is not processed.
    """

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        self.max_body: int = getattr(channel.site, "max_body", MAX_BODY)
        self.body_received = 0
        self.refused = False

    def gotLength(self, length: int | None) -> None:
        # In memory, always: at most max_body bytes are ever kept.
        self.content = BytesIO()
        if length is not None and length > self.max_body:
            self._refuse(f"a declared body of {length} bytes")

    def handleContentChunk(self, data: bytes) -> None:
        if self.refused:
            return
        self.body_received += len(data)
        if self.body_received > self.max_body:
            self._refuse(f"a chunked body past {self.max_body} bytes")
            return
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.refused:
            return  # the end of a refused body arrived with the bytes already read: not a request
        super().requestReceived(command, path, version)

    def _refuse(self, what: str) -> None:
        self.refused = True
        self.content = BytesIO()
        # HTTPChannel answers "Expect: 100-continue" right after gotLength:
        # a refused body must not be invited.
        self.requestHeaders.removeHeader(b"expect")
        body = json.dumps({"code": codes.PARAM_ERROR, "msg": f"request body larger than {self.max_body} bytes"})
        payload = body.encode() + b"\n"
        # Written by hand, as HTTPChannel does for its own 400s: the request
        # line is not processed yet (no method or version on this object),
        # and finishing this request would make the channel parse the rest
        # of the body as the next request.
        head = (
            b"HTTP/1.1 413 Content Too Large\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n" % len(payload)
        )
        channel = self.channel
        log.info("refused {what} from {client} (limit {limit} bytes)", what=what,
                 client=getattr(self.client, "host", "?"), limit=self.max_body)
        channel.transport.write(head + payload)
        channel.loseConnection()


class _Channel(http.HTTPChannel):
    """An HTTP/1.1 channel that asks the kernel for its local address once.

    twisted.web's Request asks for it on every request (a ``getsockname``
    system call): about 2 % of the supernode's CPU per report.  A plain
    channel, not twisted's HTTP/2-negotiating wrapper: these ports speak
    HTTP/1.1 over TCP, where there is nothing to negotiate.
    """

    _host: Any = None

    def getHost(self) -> Any:
        if self._host is None:
            self._host = super().getHost()
        return self._host


class _WithoutQuery:
    """A request as the access log sees it: its target without the query (`access_log_uri`)."""

    def __init__(self, request: Any) -> None:
        self._request = request
        self.uri = access_log_uri(request.uri.decode("latin-1")).encode("latin-1")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._request, name)


def _log_line(timestamp: str, request: Any) -> str:
    return http.combinedLogFormatter(timestamp, _WithoutQuery(request))


class BoundedSite(server.Site):
    """A `server.Site` whose requests' bodies may not pass ``max_body`` bytes (see the module docstring)."""

    requestFactory = BoundedRequest
    protocol = _Channel

    def __init__(self, resource: Any, max_body: int = MAX_BODY, access_log: bool = True,
                 cluster_gate: ClusterGate | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("parsePOSTFormSubmission", False)
        kwargs.setdefault("logFormatter", _log_line)  # queries stay out of access logs
        super().__init__(resource, **kwargs)
        self.max_body = max_body
        self.access_log = access_log
        self.cluster_gate = cluster_gate

    def getResourceFor(self, request: Any) -> Any:
        """The resource, or the cluster gate's 401 when the request lacks the token."""
        if self.cluster_gate is not None:
            why = self.cluster_gate.refusal(request)
            if why is not None:
                return Refusal(why)
        return super().getResourceFor(request)

    def log(self, request: Any) -> None:
        """One access line per request, unless turned off (on a busy API it costs ~15 % of the CPU)."""
        if self.access_log:
            super().log(request)
