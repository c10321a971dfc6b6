"""Blob GETs peer-to-peer, streamed to the client in file order as pieces land.

The embedded `PeerEngine` downloads the blob (with the client's headers, so
the supernode's probe and fetch carry its ``Authorization``) and reports
each verified piece; `OrderedStream` sends the contiguous verified prefix as
it grows, so the client starts receiving long before the blob is complete.
The last byte is held back until the engine has checked the whole file
against the digest in the URL: a blob that does not match is never
delivered as complete (the connection is dropped one byte short) and the
engine leaves nothing of it behind.
"""

from __future__ import annotations

import os
import re
import uuid
from typing import Any, Awaitable, Callable

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from dfly import codes
from dfly.dfdaemon.forward import end_to_end, fail
from dfly.logs import make_sign
from dfly.peer.engine import PeerEngine
from dfly.peer.request import DownloadRequest
from dfly.peer.storage import remove_quietly
from dfly.ratelimit import send_range

log = Logger(namespace="dfly.dfdaemon")

_BLOB = re.compile(r"\A/v2/(?P<name>.+)/blobs/sha256:(?P<hex>[0-9a-f]{64})\Z")
#: Request headers that are about this client's view of the body, not the
#: blob: the P2P download always fetches the whole blob.
_NOT_PASSED = frozenset({b"range", b"if-range", b"if-none-match", b"if-modified-since", b"accept-encoding",
                         b"content-length", b"expect"})


def blob_digest(path: str) -> str | None:
    """The sha256 hex of a ``/v2/<name>/blobs/sha256:<hex>`` path, else None."""
    match = _BLOB.match(path)
    return match.group("hex") if match else None


class OrderedStream:
    """Feeds the verified prefix of a download's working file to one response."""

    def __init__(self, request: IRequest, clock: IReactorTime, digest: str | None) -> None:
        self.request = request
        self.clock = clock
        self.digest = digest
        self.fd = -1
        self.length = -1
        self.prefix = 0  # bytes from 0 that are verified in the current working file
        self._pieces: dict[int, int] = {}  # start -> end + 1, verified but beyond the prefix
        self.sent = 0
        self.verified = False  # the whole file passed its checks: the held-back tail may go
        self.broken = False
        self._sending: Deferred[None] | None = None
        self._drained: Deferred[None] | None = None

    @property
    def started(self) -> bool:
        return self.sent > 0 or self._sending is not None

    def event(self, event: dict[str, Any]) -> None:
        """An engine event: a (new) working file, or a verified piece of it."""
        kind = event.get("event")
        if self.broken:
            return
        if kind == "file":
            if self.started:
                # A new working file (back to source) after bytes went out: its
                # bytes need not continue the ones sent (the first fetch may have
                # been wrong), and the final digest check covers only the new
                # file.  Splicing them could deliver a wrong blob as complete.
                log.warn("the download restarted after the response began: dropping the client")
                self.abandon()
                return
            self.close()
            try:
                self.fd = os.open(event["path"], os.O_RDONLY)
            except OSError as e:
                log.warn("cannot read the working file {path}: {error}", path=event.get("path"), error=e)
                return
            self.length = int(event.get("length", -1))
            self.prefix, self._pieces = 0, {}  # a new file (back to source) starts empty
        elif kind == "piece":
            self._pieces[int(event["start"])] = int(event["end"]) + 1
            while self.prefix in self._pieces:
                self.prefix = self._pieces.pop(self.prefix)
            self._pump()

    def finish(self) -> Deferred[None]:
        """The download succeeded: send the rest and finish the response."""
        self.verified = True
        self._drained = Deferred()
        self._pump()
        return self._drained

    def abandon(self) -> None:
        """The download failed after bytes went out: the client must see a broken body."""
        self.broken = True
        self.close()
        if self.request.channel is not None:
            self.request.channel.transport.abortConnection()

    def _limit(self) -> int:
        if self.verified:
            return self.prefix
        # Hold back the last byte until the whole file is verified.
        end = self.length if self.length >= 0 else self.prefix
        return max(min(self.prefix, end - 1), 0)

    def _pump(self) -> None:
        if self.broken:
            if self._drained is not None and not self._drained.called:
                self._drained.callback(None)
            return
        if self._sending is not None:
            return
        if self.fd < 0 and not (self.verified and self.length == 0):
            if self.verified:  # complete, yet its working file could not be read
                self.abandon()
                self._send_failed(None)
            return
        limit = self._limit()
        if limit > self.sent:
            if not self.request.startedWriting:
                self._headers()
            n = limit - self.sent
            self._sending = send_range(self.request, os.dup(self.fd), self.sent, n, self.clock)
            self._sending.addCallbacks(lambda _: self._sent(n), self._send_failed)
            return
        if self.verified and self._drained is not None and not self._drained.called:
            if not self.request.startedWriting:
                self._headers()
            self.close()
            self.request.finish()
            self._drained.callback(None)

    def _sent(self, n: int) -> None:
        self._sending = None
        self.sent += n
        self._pump()

    def _send_failed(self, failure: Any) -> None:
        self._sending = None
        self.broken = True
        self.close()
        if self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def _headers(self) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/octet-stream")
        if self.digest:
            request.setHeader(b"docker-content-digest", f"sha256:{self.digest}".encode())
        if self.length >= 0:
            request.setHeader(b"content-length", str(self.length).encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


async def serve_p2p(
    request: IRequest,
    url: str,
    digest: str | None,
    engine: PeerEngine,
    nodes: tuple[tuple[str, int], ...],
    localrepo: str,
    rate: int,
    direct: Callable[[], Awaitable[None]],
) -> None:
    """GET ``url`` through the P2P network into ``request``.

    Before the first byte is sent, a failure other than a wrong digest falls
    back to ``direct`` (the registry's own answer: its 401 with
    ``WWW-Authenticate``, its 404, ...).  After it, the connection is
    dropped, so a partial blob never looks complete.
    """
    headers = end_to_end(request.requestHeaders, _NOT_PASSED)
    sign = make_sign(os.getpid(), engine.reactor.seconds()) + f"-{uuid.uuid4().hex[:6]}"
    req = DownloadRequest(
        url=url,
        output=os.path.join(localrepo, uuid.uuid4().hex),
        sign=sign,
        nodes=nodes,
        headers={name.decode("latin-1"): b", ".join(values).decode("latin-1") for name, values in headers.getAllRawHeaders()},
        digest=("sha256", digest) if digest else None,
        local_limit=rate,
        resume=False,  # each request has an output of its own: nothing a later one could resume
    )
    stream = OrderedStream(request, engine.reactor, digest)
    download = engine.download(req, stream.event)
    request.notifyFinish().addErrback(lambda _: download.cancel())
    try:
        result = await download
    except CancelledError:
        stream.abandon()
        return
    try:
        if result.success:
            how = "via P2P" if result.reason == codes.REASON_NONE else f"from the source (P2P failed, reason {result.reason})"
            log.info("{url} {how}: {line}", url=url, how=how, line=result.line())
            await stream.finish()
        elif stream.started:
            log.warn("{url} failed after the response started: {error}", url=url, error=result.error)
            stream.abandon()
        elif result.reason == codes.REASON_DIGEST_MISMATCH:
            stream.close()
            fail(request, 502, f"dfdaemon: {url} does not match its digest: {result.error}")
        else:
            log.info("{url}: P2P failed ({error}), passing the request to the registry", url=url, error=result.error)
            stream.close()
            await direct()
    finally:
        remove_quietly(req.output)
