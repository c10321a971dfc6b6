"""Passing a request through to its real server, untouched.

Everything that does not go peer-to-peer (manifests, tokens, ``/v2/``, HEAD,
uploads, any URL a rule sends ``direct``) goes through `forward`: every value
of every end-to-end header is passed on (a registry answers 404 to an OCI
manifest GET that lost one of its six ``Accept`` lines, which is what
``twisted.web.proxy`` does), the answer's status, headers and body come back
as they are, redirects included (the client follows them), and the body
streams with flow control both ways.  A 401 with its ``WWW-Authenticate``
therefore reaches the client unchanged and its token flow works.
"""

from __future__ import annotations

from typing import Any, Iterable

from OpenSSL import SSL
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError, TCPTimedOutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone, ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IRequest, IResponse

from dfly.httpclient import QuietConnectionPool

log = Logger(namespace="dfly.dfdaemon")

#: Headers that describe one connection, not the message (RFC 9110 7.6.1),
#: plus Host, which the agent sets for the real server.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
    b"te", b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"host",
})


def end_to_end(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy of ``headers`` without hop-by-hop ones (and those named in Connection, and ``drop``)."""
    named = {token.strip().lower() for value in headers.getRawHeaders(b"connection", []) for token in value.split(b",")}
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named and lower not in drop:
            out.setRawHeaders(name, list(values))
    return out


def has_body(request: IRequest) -> bool:
    length = request.getHeader(b"content-length")
    return bool(request.getHeader(b"transfer-encoding")) or (length is not None and length.strip() not in (b"", b"0"))


#: How long the real server may take to send its response head, and then
#: stay silent in the middle of a body, before the client gets a 504 / a
#: dropped connection.
RESPONSE_TIMEOUT = 60.0


async def forward(request: IRequest, url: str, agent: IAgent, clock: IReactorTime,
                  timeout: float = RESPONSE_TIMEOUT) -> None:
    """Send ``request`` to ``url`` and relay the answer; the caller finishes nothing."""
    body = None
    if has_body(request):
        request.content.seek(0)
        body = FileBodyProducer(request.content)
    # The agent frames the body itself (Content-Length or chunked): a second
    # Content-Length from the client would make the request invalid.
    headers = end_to_end(request.requestHeaders, frozenset({b"content-length"}))
    pending = agent.request(request.method, url.encode("utf-8"), headers, body)
    client_left = False

    def left(_: object) -> None:
        nonlocal client_left
        client_left = True
        pending.cancel()

    gone = request.notifyFinish()
    gone.addErrback(left)
    pending.addTimeout(timeout, clock)
    try:
        response: IResponse = await pending
    except CancelledError:
        if not client_left:
            fail(request, 504, f"dfdaemon: {url} sent no answer within {timeout:g}s")
        return
    except Exception as e:
        log.warn("{method} {url} failed: {error}", method=request.method.decode(), url=url, error=e)
        fail(request, 502, f"dfdaemon: cannot reach {url}: {upstream_failure(e)}")
        return
    request.setResponseCode(response.code, response.phrase)
    request.responseHeaders = end_to_end(response.headers)
    if response.length is not UNKNOWN_LENGTH and request.method != b"HEAD" and response.code not in (204, 304):
        # Twisted's client keeps Content-Length out of the headers: put it back,
        # or the client gets a chunked body instead of the registry's length.
        request.setHeader(b"content-length", b"%d" % response.length)
    if request.method == b"HEAD" or response.code in (204, 304):
        _discard(response)
        request.finish()
        return
    relay = Relay(request, clock, timeout)
    response.deliverBody(relay)
    gone.addErrback(lambda _: relay.stop())
    await relay.done


def upstream_failure(e: BaseException) -> str:
    """What went wrong with an upstream request, in words fit for a client.

    Exception texts name Twisted's internals (``ResponseNeverReceived([<Failure
    ...>])``, OpenSSL's error stack); the client gets the kind of failure, the
    log (above) the details.
    """
    reasons = [f.value for f in e.reasons] if isinstance(e, ResponseFailed) else [e]
    for reason in reasons:
        if isinstance(reason, SSL.Error):
            # OpenSSL's (library, function, reason) triples: the reason says
            # which ("certificate verify failed"), the rest is its internals.
            said = [str(t[-1]) for t in (reason.args[0] if reason.args else ()) if isinstance(t, tuple) and t]
            return f"the TLS handshake failed: {', '.join(said) or 'no reason given'}"
        if isinstance(reason, DNSLookupError):
            return "its host name does not resolve"
        if isinstance(reason, ConnectionRefusedError):
            return "connection refused"
        if isinstance(reason, (TCPTimedOutError, TimeoutError)):
            return "the connection timed out"
        if isinstance(reason, ConnectError):
            return "the connection failed"
    if isinstance(e, ResponseFailed):
        return "the connection closed before a whole answer"
    return "the request failed (see dfdaemon.log)"


def fail(request: IRequest, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    """A one-line text error (with *headers*), unless the response already started (then only drop the connection)."""
    if request.startedWriting:
        if request.channel is not None:
            request.channel.transport.abortConnection()
        return
    request.setResponseCode(status)
    request.responseHeaders = Headers({b"content-type": [b"text/plain; charset=utf-8"]})
    for name, value in headers:
        request.responseHeaders.addRawHeader(name, value)
    body = (message + "\n").encode("utf-8")
    request.setHeader(b"content-length", str(len(body)).encode())
    request.write(body)
    request.finish()


def _discard(response: IResponse) -> None:
    transport = getattr(response, "_transport", None)
    if transport is not None:
        transport.stopProducing()
    else:
        response.deliverBody(Protocol())


class Relay(Protocol):
    """Copies a response body into a request, pausing the server while the client is slow.

    ``done`` fires once the client has the whole body (the request is then
    finished); a body cut short (or silent for ``idle`` seconds) drops the
    client's connection too, so the client sees the same truncation instead
    of a complete-looking answer.
    """

    def __init__(self, request: IRequest, clock: IReactorTime, idle: float = RESPONSE_TIMEOUT) -> None:
        self.request = request
        self.done: Deferred[None] = Deferred()
        self._idle_after = idle
        self._idle = clock.callLater(idle, self.stop)

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            self._idle.reset(self._idle_after)
            self.request.write(data)

    def stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if self._idle.active():
            self._idle.cancel()
        if self.done.called:
            return
        if self.request.channel is None:  # the client went away first
            self.done.callback(None)
            return
        self.request.unregisterProducer()
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.request.finish()
        else:
            log.warn("upstream body broke off: {error}", error=reason.getErrorMessage())
            self.request.channel.transport.abortConnection()
        self.done.callback(None)


def agent_for(reactor: Any, policy: IPolicyForHTTPS, connect_timeout: float = 10.0) -> tuple[IAgent, HTTPConnectionPool]:
    """An agent that follows no redirects (the client does), and the pool that is its alone.

    One pool per TLS policy, never shared: Twisted pools connections by
    (scheme, host, port) only, so an agent that skips verification (an
    ``insecure`` hijack rule) would leave a connection in a shared pool that
    a verifying agent then reuses for the same host, unverified.  Close the
    pool on stop.  No automatic retries: a forwarded POST or PUT must not
    be sent twice.
    """
    pool = QuietConnectionPool(reactor, persistent=True)
    pool.retryAutomatically = False
    return Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=connect_timeout), pool
