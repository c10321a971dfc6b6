"""The origin client: one streaming GET per fetch, conditional when we can.

Both the supernode CDN and a peer going back to source use it.  It only
opens responses and classifies them; reading the body is the caller's
business (``deliverBody`` into a sink), so nothing here buffers a file.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import attrs
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from dfly import codes
from dfly.connectguard import ConnectRefused
from dfly.urls import redact_userinfo

#: Headers a client may not make us send upstream: they describe our hop.
_HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Host",
        "Connection",
        "Content-Length",
        "Transfer-Encoding",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Upgrade",
        "Range",
        "If-None-Match",
        "If-Modified-Since",
        "If-Range",
        "Accept-Encoding",
    )
)


class SourceError(Exception):
    """The origin refused or failed; ``code`` is the Dragonfly result code."""

    def __init__(self, code: int, reason: str, status: int = 0) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status


@attrs.frozen
class SourceResponse:
    """An open origin response whose body has not been read yet."""

    status: int
    length: int
    etag: str | None
    last_modified: str | None
    response: IResponse
    #: For a 206: the first byte and the whole length from Content-Range.
    range_start: int | None = None
    total_length: int | None = None

    @property
    def not_modified(self) -> bool:
        return self.status == 304


_CONTENT_RANGE = re.compile(r"\Abytes (\d+)-(\d+)/(\d+|\*)\Z")


def _content_range(headers: Headers) -> tuple[int | None, int | None]:
    match = _CONTENT_RANGE.match((_first(headers, "Content-Range") or "").strip())
    if match is None:
        return None, None
    total = match.group(3)
    return int(match.group(1)), (None if total == "*" else int(total))


def _first(headers: Headers, name: str) -> str | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def abort_body(response: IResponse) -> None:
    """Drop a response without reading its body (a probe wanted headers only)."""
    response.deliverBody(_Discard())


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        pass


@attrs.define(eq=False)
class SourceClient:
    """Opens origin URLs with the caller's headers, following redirects."""

    http: Any  # treq.client.HTTPClient
    clock: Any  # IReactorTime, for treq's timeout
    timeout: float = 30.0

    def open(
        self,
        url: str,
        headers: Mapping[str, str] = {},
        etag: str | None = None,
        last_modified: str | None = None,
        byte_range: tuple[int, int | None] | None = None,
        if_range: str | None = None,
    ) -> "Deferred[SourceResponse]":
        """GET ``url``; fires with the open response or fails with `SourceError`.

        ``byte_range`` (end None: to the end) asks for part of the body;
        with ``if_range`` (an ETag or a Last-Modified date) the source sends
        the whole body instead when it changed.

        2xx and 304 are answers; 401/403/407 are "needs auth" (608), 404 and 410
        "not reachable" (607), anything else or a network failure 604.
        """
        return self._open(url, headers, etag, last_modified, byte_range, if_range)

    @inlineCallbacks
    def _open(self, url, headers, etag, last_modified, byte_range, if_range):  # type: ignore[no-untyped-def]
        send = Headers({k: [v] for k, v in headers.items() if k.lower() not in _HOP_HEADERS})
        send.setRawHeaders("Accept-Encoding", ["identity"])
        if etag:
            send.setRawHeaders("If-None-Match", [etag])
        if last_modified:
            send.setRawHeaders("If-Modified-Since", [last_modified])
        if byte_range is not None:
            end = "" if byte_range[1] is None else byte_range[1]
            send.setRawHeaders("Range", [f"bytes={byte_range[0]}-{end}"])
            if if_range:
                send.setRawHeaders("If-Range", [if_range])
        try:
            response = yield self.http.get(
                url, headers=send, unbuffered=True, timeout=self.timeout, reactor=self.clock
            )
        except CancelledError:
            raise SourceError(codes.SOURCE_FAILED, f"source {url} did not answer within {self.timeout:g}s") from None
        except ConnectRefused as e:  # the source policy: no request was sent
            raise SourceError(codes.SOURCE_REFUSED, e.args[0], 403) from None
        except (ConnectError, DNSLookupError, TimeoutError, ResponseFailed) as e:
            if isinstance(e, ResponseFailed) and any(r.check(CancelledError) for r in e.reasons):
                # treq's timeout cancels the request, which surfaces wrapped.
                raise SourceError(codes.SOURCE_FAILED, f"source {url} did not answer within {self.timeout:g}s") from None
            raise SourceError(codes.SOURCE_FAILED, f"cannot reach source {url}: {_describe(e)}") from None
        except ValueError as e:
            # Twisted cannot dial the URL (or a redirect's target): a host
            # name it refuses, credentials in the authority, an IPv6 literal.
            raise SourceError(codes.SOURCE_FAILED,
                              f"cannot fetch source {redact_userinfo(url)}: {redact_userinfo(str(e))}") from None
        status = response.code
        if status in (200, 206, 304):
            length = response.length
            start, total = _content_range(response.headers) if status == 206 else (None, None)
            return SourceResponse(
                status=status,
                length=-1 if length is UNKNOWN_LENGTH or status == 304 else int(length),
                etag=_first(response.headers, "ETag"),
                last_modified=_first(response.headers, "Last-Modified"),
                response=response,
                range_start=start,
                total_length=total,
            )
        abort_body(response)
        phrase = response.phrase.decode("latin-1", "replace") if isinstance(response.phrase, bytes) else ""
        said = f"source {url} answered {status} {phrase}".rstrip()
        if status in (401, 403, 407):
            raise SourceError(codes.NEED_AUTH, said, status)
        if status in (404, 410):
            raise SourceError(codes.URL_NOT_REACHABLE, said, status)
        raise SourceError(codes.SOURCE_FAILED, said, status)


def _describe(error: BaseException) -> str:
    if isinstance(error, ResponseFailed):
        reasons = [r.getErrorMessage() for r in error.reasons] if error.reasons else []
        return "; ".join(reasons) or "connection closed"
    return str(error) or type(error).__name__
