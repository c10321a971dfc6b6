"""HTTP connections that ask a guard about every address before they dial it.

`twisted.web.client.Agent` normally dials with a `HostnameEndpoint`, which
resolves the host and connects to whatever comes back.  A check of the URL's
text before the request cannot see that answer: a name that resolves to
``169.254.169.254``, a redirect to ``http://127.0.0.1:2379/``, or a DNS
answer that changes between the check and the connect (rebinding) all get
through.  Here the endpoint resolves the host itself, asks the guard about
each address, and connects only to an address the guard allowed, so the
address checked is the address connected to, on every hop a redirect makes.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.interfaces import IProtocolFactory, IStreamClientEndpoint
from twisted.web.client import URI
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from dfly.resolve import is_address, lookup

#: ``guard(host, address)``: why dialling ``address`` for the URL host ``host`` is refused, or None.
Guard = Callable[[str, str], "str | None"]


class ConnectRefused(ConnectError):
    """The guard refused every address the host stands for; the message says why."""


@implementer(IStreamClientEndpoint)
@attrs.frozen
class GuardedEndpoint:
    """Resolve ``host``, drop the addresses ``guard`` refuses, connect to the first allowed that answers."""

    reactor: Any
    host: str
    port: int
    guard: Guard
    timeout: float | None = None  # per connection attempt; None: the reactor's 30 s
    lookup_timeout: float = 10.0

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> Any:
        if is_address(self.host):
            addresses = [self.host]
        else:
            found = await lookup(self.reactor, self.host, self.port).addTimeout(self.lookup_timeout, self.reactor)
            addresses = found.all
            if not addresses:
                raise DNSLookupError(f"{self.host} has no address")
        refusals = [self.guard(self.host, a) for a in addresses]
        allowed = [a for a, why in zip(addresses, refusals) if why is None]
        if not allowed:
            raise ConnectRefused(string=next(why for why in refusals if why))
        kwargs = {} if self.timeout is None else {"timeout": self.timeout}
        for n, address in enumerate(allowed):
            dial = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint  # an address: no second lookup
            try:
                return await dial(self.reactor, address, self.port, **kwargs).connect(factory)
            except ConnectError:
                if n == len(allowed) - 1:
                    raise


@implementer(IAgentEndpointFactory)
@attrs.frozen
class GuardedEndpointFactory:
    """What `Agent.usingEndpointFactory` dials with: Twisted's standard choices, through `GuardedEndpoint`."""

    reactor: Any
    guard: Guard
    tls: IPolicyForHTTPS
    connect_timeout: float | None = None

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        try:
            host = uri.host.decode("ascii")
        except UnicodeDecodeError:
            raise ValueError(f"the host of {uri.toBytes()!r} is not ASCII") from None
        endpoint = GuardedEndpoint(self.reactor, host.strip("[]"), uri.port, self.guard, self.connect_timeout)
        if uri.scheme == b"http":
            return endpoint
        if uri.scheme == b"https":
            return wrapClientTLS(self.tls.creatorForNetloc(uri.host, uri.port), endpoint)
        raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
