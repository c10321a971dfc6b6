"""Small service building blocks shared by the supernode and the peer daemon."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import ILogObserver, Logger, globalLogPublisher
from twisted.python.failure import Failure


log = Logger(namespace="dfly.services")


class ListenError(Exception):
    """A listener could not start (port in use, no permission)."""


class ListeningService(Service):
    """Listen on an endpoint while running; ``listening`` fires with the port.

    Unlike ``StreamServerEndpointService`` the bound port is public, so
    callers that asked for port 0 learn which one they got, and a failure to
    bind raises at start-up with a readable reason instead of being logged.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory, what: str) -> None:
        self.endpoint = endpoint
        self.factory = factory
        self.what = what
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()

    def startService(self) -> None:
        super().startService()
        failed: list[Failure] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._bound, failed.append)
        if failed:
            # TCP endpoints bind synchronously: refuse to start, with the reason.
            raise ListenError(f"cannot listen for {self.what}: {failed[0].getErrorMessage()}")

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        log.info("{what} listening on {host}:{port}", what=self.what, host=address.host, port=address.port)
        self.listening.callback(port)
        return port

    def stopService(self) -> Deferred[Any] | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


class LogObserverService(Service):
    """Adds a log observer while running (our log files next to twistd's own)."""

    def __init__(self, observer: ILogObserver, close: Any = None) -> None:
        self.observer = observer
        self._close = close

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.observer)

    def stopService(self) -> None:
        super().stopService()
        globalLogPublisher.removeObserver(self.observer)
        if self._close is not None:
            self._close()


def tcp_endpoint(reactor: Any, port: int, interface: str) -> Any:
    """A TCP server endpoint for an IPv4 or IPv6 listen address."""
    if ":" in interface:
        return TCP6ServerEndpoint(reactor, port, interface=interface)
    return TCP4ServerEndpoint(reactor, port, interface=interface)
