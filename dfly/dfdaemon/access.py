"""Who may use dfdaemon as a proxy, and where a CONNECT may lead.

Proxy requests (absolute-form ``GET http://...``) and CONNECT make dfdaemon
open connections wherever the client says, so they are gated here, in one
place; registry-mirror requests (``/v2/...`` to ``--registry``) and
``/_ping`` are not, because their target is fixed by the operator.

- ``proxyAuth`` set: every proxy request and CONNECT needs
  ``Proxy-Authorization: Basic`` with one of its ``user:password`` pairs;
  missing or wrong is 407 with ``Proxy-Authenticate``, on any address.
- no ``proxyAuth`` and a loopback ``listen``: open, as before (only local
  users reach it).
- no ``proxyAuth`` and any other ``listen``: proxying is off (403), so a
  mirror for a cluster is not also an open proxy into the network it sits in.
- CONNECT only to ``connectPorts`` (default 443): 403 and a log line otherwise.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress

import attrs
from twisted.logger import Logger

from dfly.config import DfdaemonFileConfig

log = Logger(namespace="dfly.dfdaemon")

#: What a 407 asks for (RFC 9110 11.7.1, Basic as in RFC 7617).
CHALLENGE = b'Basic realm="dfdaemon", charset="UTF-8"'


@attrs.frozen
class Refusal:
    """Why a request is not served: its status, a one-line reason and any headers to add."""

    status: int
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.frozen
class ProxyGate:
    """The proxy-side access rules of one dfdaemon (see the module docstring)."""

    credentials: tuple[bytes, ...] = attrs.field(repr=False)
    open_without_credentials: bool
    connect_ports: frozenset[int]
    listen: str

    @classmethod
    def from_config(cls, config: DfdaemonFileConfig) -> ProxyGate:
        return cls(config.proxy_auth, ipaddress.ip_address(config.listen).is_loopback,
                   frozenset(config.connect_ports), config.listen)

    def check_proxy(self, authorization: bytes | None) -> Refusal | None:
        """None when a proxy request or CONNECT with this ``Proxy-Authorization`` may go on."""
        if self.credentials:
            if authorization is not None and self._valid(authorization):
                return None
            reason = "wrong" if authorization is not None else "no"
            return Refusal(407, f"dfdaemon: {reason} proxy credentials (Proxy-Authorization: Basic)",
                           ((b"proxy-authenticate", CHALLENGE),))
        if self.open_without_credentials:
            return None
        return Refusal(403, f"dfdaemon: proxy requests and CONNECT are off: dfdaemon listens on {self.listen} "
                            "and no proxyAuth is configured (registry-mirror requests still work)")

    def check_connect_port(self, host: str, port: int) -> Refusal | None:
        """None when a CONNECT may lead to *port*; a 403 (and a log line) otherwise."""
        if port in self.connect_ports:
            return None
        allowed = ", ".join(str(p) for p in sorted(self.connect_ports)) or "none"
        log.warn("CONNECT {host}:{port} refused: port {port} is not in connectPorts ({allowed})",
                 host=host, port=port, allowed=allowed)
        return Refusal(403, f"dfdaemon: CONNECT to port {port} is not allowed (connectPorts: {allowed})")

    def _valid(self, authorization: bytes) -> bool:
        scheme, _, encoded = authorization.strip().partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        # Every configured pair is compared, in constant time each, whatever matched before.
        matched = False
        for expected in self.credentials:
            matched |= hmac.compare_digest(given, expected)
        return matched
