"""CONNECT for dfdaemon: blind tunnels, and handing a connection over for TLS interception.

twisted.web parses ``CONNECT host:port HTTP/1.1`` like any request
(``request.method == b"CONNECT"``, ``request.uri == b"host:port"``) but has no
way to turn the connection into a tunnel afterwards (``twisted.web.proxy``
has no CONNECT at all).  `take_over` does that for one request; call it from
``process()`` of a `Request` subclass, so resource traversal never sees an
authority-form URI.

How `take_over` takes the connection from `HTTPChannel` (checked against
``twisted/web/http.py`` of Twisted 26.10; Twisted's own websocket upgrade,
the private ``HTTPChannel._protocolUpgradeForWebsockets``, works the same
way):

- the channel's ``dataReceived`` and ``connectionLost`` are replaced on the
  instance.  The transport's protocol is the channel, or Site's
  ``_GenericHTTPChannelProtocol`` wrapper, which looks both methods up on the
  channel at each call, so every later byte and the final close arrive at
  the new protocol either way;
- ``connectionMade`` registered the channel as the transport's producer: it
  is unregistered so the new protocol can register its own;
- after the CONNECT head the channel is in raw mode and keeps what the
  client sent next, in ``_dataBuffer`` (reads that arrived while the request
  was being handled) and in ``LineReceiver._buffer`` (the rest of the read
  being parsed, when ``process()`` runs synchronously).  Both are private:
  they are drained and replayed, in that order, to the new protocol.  A
  Twisted without them makes `take_over` raise AttributeError; the tests
  send bytes along with the CONNECT on both paths, to catch quieter changes;
- the channel pauses reading once more than 16 KiB are buffered, so reading
  is resumed; its idle timeout is cancelled.

The CONNECT request itself is never finished (there is no response to finish
any more).  When the connection closes, the channel's own ``connectionLost``
still runs after the new protocol's, so ``request.notifyFinish()`` errbacks
with the reason and the request is cleaned up as usual.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator, IProtocol, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, Request
from twisted.web.iweb import IRequest

from dfly.config import TUNNEL_IDLE_TIMEOUT

log = Logger(namespace="dfly.dfdaemon")

ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

_REG_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?")
_PORT = re.compile(r"[0-9]{1,5}")


def parse_connect_target(uri: bytes) -> tuple[str, int]:
    """Split a CONNECT request-target (``host:port`` or ``[v6]:port``) into host and port.

    The host comes back lower-cased and without brackets.  ValueError for
    anything else (no port, a path, user info, a bad address), which the
    caller answers with 400.
    """
    try:
        target = uri.decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("the CONNECT target is not ASCII") from None
    host, sep, port_text = target.rpartition(":")
    if not sep or not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise ValueError(f"the CONNECT target {target!r} is not host:port")
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), int(port_text)
        except ValueError:
            raise ValueError(f"the CONNECT target {target!r} has a bad IPv6 address") from None
    if not _REG_NAME.fullmatch(host):
        raise ValueError(f"the CONNECT target {target!r} is not host:port")
    return host.lower(), int(port_text)


def take_over(request: IRequest, protocol: IProtocol, tls: IOpenSSLServerConnectionCreator | None = None) -> None:
    """Answer a CONNECT with 200 and give its connection to *protocol*.

    With *tls*, dfdaemon is the TLS server on that connection (interception)
    and *protocol* gets the decrypted stream; without it, the raw bytes.
    Bytes the client sent right behind the CONNECT head reach *protocol*
    (through TLS if any) before anything else.  See the module docstring for
    the parts of `HTTPChannel` this relies on.
    """
    http_request = _http_request(request)
    channel = http_request.channel
    if not isinstance(channel, HTTPChannel) or http_request.startedWriting:
        raise RuntimeError("take_over needs an HTTP/1.1 request that is connected and not yet answered")
    transport: Any = channel.transport
    buffered = b"".join(channel._dataBuffer) + channel._buffer
    channel._dataBuffer = []
    channel._buffer = b""
    transport.unregisterProducer()
    channel.setTimeout(None)
    # Raw: request.write would add a status line of its own and chunked framing.
    transport.write(ESTABLISHED)

    receiver: IProtocol = protocol
    if tls is not None:
        # Our own TLS layer rather than transport.startTLS: it works on any
        # transport (even one that is TLS already) and the buffered bytes
        # simply go through it.  No wrapped factory, as in startTLS: the
        # protocol exists already.
        tls_factory = TLSMemoryBIOFactory(tls, False, None)  # type: ignore[arg-type]
        receiver = tls_factory.protocol(tls_factory, protocol)
    channel_lost = channel.connectionLost

    def connection_lost(reason: Failure) -> None:
        receiver.connectionLost(reason)
        channel_lost(reason)

    channel.dataReceived = receiver.dataReceived  # type: ignore[method-assign]
    channel.connectionLost = connection_lost  # type: ignore[method-assign]
    producer = IPushProducer(transport, None)
    if producer is not None:
        producer.resumeProducing()  # only registers for reading: no bytes arrive before makeConnection
    receiver.makeConnection(transport)
    if buffered:
        receiver.dataReceived(buffered)


def open_tunnel(request: IRequest, reactor: Any, host: str, port: int, timeout: float = 10.0,
                idle_timeout: float = TUNNEL_IDLE_TIMEOUT) -> Deferred[None]:
    """Serve a CONNECT as a blind tunnel to *host*:*port*, closed after *idle_timeout* seconds of silence.

    Connects first and answers 200 only once the target accepted, so a
    client never sees a tunnel that leads nowhere: when the connection fails
    (refused, no such host, *timeout* seconds without an answer) the client
    gets ``502`` with a one-line reason instead, and its connection stays a
    normal HTTP one.  The Deferred fires (with None) when the tunnel is up,
    the 502 is sent, or the client left while we were connecting; cancelling
    it cancels the connection attempt (the client then gets the 502).
    """
    target = _authority(host, port)
    client_end, server_end = tunnel_pair(reactor, idle_timeout, target)
    connecting = connectProtocol(HostnameEndpoint(reactor, host, port), server_end)
    connecting.addTimeout(timeout, reactor)  # bounds name resolution and every connection attempt
    client_left = False

    def on_client_lost(reason: Failure) -> None:
        # Also fires when a tunnel that is up closes; cancel() is a no-op then.
        nonlocal client_left
        client_left = True
        connecting.cancel()

    _http_request(request).notifyFinish().addErrback(on_client_lost)

    def connected(_: object) -> None:
        if client_left:
            server_end.transport.loseConnection()
            return
        try:
            take_over(request, client_end)
        except Exception:
            server_end.transport.loseConnection()
            raise
        log.debug("tunnel to {target} open", target=target)

    def failed(reason: Failure) -> None:
        if client_left:
            return
        why = _describe(reason, timeout)
        log.info("CONNECT {target} failed: {why}", target=target, why=why)
        body = f"dfdaemon: cannot connect to {target}: {why}\n".encode()
        request.setResponseCode(502)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    connecting.addCallbacks(connected, failed)
    return connecting


def tunnel_pair(clock: IReactorTime, idle_timeout: float, target: str = "?") -> tuple[_TunnelEnd, _TunnelEnd]:
    """The client end and the target end of one blind tunnel, sharing one idle timer."""
    idle = _TunnelIdle(clock, idle_timeout, target)
    client_end, server_end = _TunnelEnd(idle), _TunnelEnd(idle)
    client_end.peer, server_end.peer = server_end, client_end
    idle.ends = (client_end, server_end)
    return client_end, server_end


class _TunnelIdle(TimeoutMixin):
    """The idle timer of one tunnel: started when both ends are up, reset by a byte either way.

    A tunnel silent for its whole timeout is aborted at both ends (not
    closed gracefully: an end whose peer stopped reading would wait
    forever for its buffer to drain).
    """

    def __init__(self, clock: IReactorTime, seconds: float, target: str) -> None:
        self.callLater = clock.callLater  # type: ignore[method-assign]
        self.seconds = seconds
        self.target = target
        self.ends: tuple[_TunnelEnd, ...] = ()

    def start(self) -> None:
        if self.seconds > 0:
            self.setTimeout(self.seconds)

    def stop(self) -> None:
        self.setTimeout(None)

    def timeoutConnection(self) -> None:
        log.info("tunnel to {target} closed: nothing either way for {seconds:g}s", target=self.target,
                 seconds=self.seconds)
        for end in self.ends:
            if end.transport is not None:
                end.transport.abortConnection()


class _TunnelEnd(Protocol):
    """One end of a blind tunnel: what arrives here is written to the other end.

    Flow control: once both ends are connected, each transport is the
    streaming producer of the other, so when one side's send buffer fills,
    Twisted stops reading from the other side until it drains.  When either
    connection is lost, the other is closed after its pending bytes are
    written (a half-close closes the whole tunnel).  Both ends share one
    `_TunnelIdle`.
    """

    transport: Any
    peer: _TunnelEnd

    def __init__(self, idle: _TunnelIdle) -> None:
        self.idle = idle

    def connectionMade(self) -> None:
        # The target side connects first; wiring happens when the client side joins.
        if self.peer.transport is not None:
            self.transport.registerProducer(self.peer.transport, True)
            self.peer.transport.registerProducer(self.transport, True)
            self.idle.start()

    def dataReceived(self, data: bytes) -> None:
        self.idle.resetTimeout()
        self.peer.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.idle.stop()
        other = self.peer.transport
        if other is not None:
            # A paused producer that is gone would keep the other side from closing.
            other.unregisterProducer()
            other.loseConnection()


def _http_request(request: IRequest) -> Request:
    """The twisted.web request behind *request*: only it has a channel to take over."""
    if not isinstance(request, Request):
        raise TypeError(f"CONNECT handling needs a twisted.web.http.Request, not {type(request).__name__}")
    return request


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _describe(reason: Failure, timeout: float) -> str:
    if reason.check(defer.TimeoutError):
        return f"no answer within {timeout:g}s"
    if reason.check(error.DNSLookupError):
        return "cannot resolve the host name"
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(defer.CancelledError):
        return "cancelled"
    return reason.getErrorMessage()
