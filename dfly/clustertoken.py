"""The cluster token: one shared secret every port that peers reach asks for.

With ``clusterToken`` set (``supernode.yml``, ``dfget.yml``,
``dfdaemon.yml``), every request to the supernode API, the CDN port and the
peers' uploaders must carry it in ``X-Dfly-Cluster-Token``; the engine
sends it on all of them.  Anything else (no header, two headers, a value
that is not the token, is not printable ASCII or is longer than
`MAX_TOKEN`) is answered ``401`` with ``{"code": 615, "msg": ...}`` before
any resource runs, and logged once a minute per client
(`dfly.refusals.RefusalLog`), never with the value given.

`ClusterGate` is what `dfly.webbounds.BoundedSite` asks; ``guards`` says
which paths it covers, so the supernode API keeps ``/_ping`` open (load
balancers' liveness checks) and the peer daemon gates only its uploader
(``/peer/``), not the local API that ``dfget`` on the host uses with its
own token.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import Resource

from dfly import codes
from dfly.refusals import RefusalLog

#: Longest token accepted, in the config and on the wire.
MAX_TOKEN = 256
#: What a token may be made of: printable ASCII, no spaces (it travels in a header).
_TOKEN = re.compile(r"[\x21-\x7e]+")
_HEADER = codes.CLUSTER_TOKEN_HEADER.encode("ascii")

log = Logger(namespace="dfly.clustertoken")


def check_token(value: Any) -> str:
    """``clusterToken`` from a config file; ValueError (never repeating the value) when unusable."""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got a {type(value).__name__}")
    if not value:
        raise ValueError("must not be empty (leave the key out for a cluster without a token)")
    if len(value) > MAX_TOKEN:
        raise ValueError(f"longer than {MAX_TOKEN} characters")
    if not _TOKEN.fullmatch(value):
        raise ValueError("must be printable ASCII without spaces or control characters (it is sent as a header)")
    return value


def every_path(path: bytes) -> bool:
    return True


def all_but_ping(path: bytes) -> bool:
    """The supernode API: everything but ``/_ping``, which load balancers ask without secrets."""
    return path != b"/_ping"


def uploader_paths(path: bytes) -> bool:
    """The peer daemon's port: its uploader (``/peer/...``), not the local API."""
    return path.startswith(b"/peer/")


@attrs.define(eq=False)
class ClusterGate:
    """Decides whether a request carries the cluster token; refusals go to ``refusals``, once a minute."""

    token: str
    clock: IReactorTime
    port: str  # what the log calls this port ("the supernode API")
    guards: Callable[[bytes], bool] = every_path
    refusals: RefusalLog = attrs.field(default=None)

    def __attrs_post_init__(self) -> None:
        if self.refusals is None:
            self.refusals = RefusalLog(self.clock, log)

    def refusal(self, request: IRequest) -> str | None:
        """Why ``request`` may not pass (None: it may); logs the refusal."""
        if not self.guards(request.path):
            return None
        why = _why_not(request.requestHeaders.getRawHeaders(_HEADER), self.token)
        if why is not None:
            client = getattr(request.getClientAddress(), "host", "?")
            self.refusals.refused(client, f"{self.port} requests without the cluster token", why)
        return why


def _why_not(given: list[bytes] | None, token: str) -> str | None:
    if not given:
        return f"no {codes.CLUSTER_TOKEN_HEADER} header"
    if len(given) != 1:
        return f"{len(given)} {codes.CLUSTER_TOKEN_HEADER} headers"
    value = given[0]
    if len(value) > MAX_TOKEN or not _TOKEN.fullmatch(value.decode("latin-1")):
        return "a malformed cluster token"
    if not hmac.compare_digest(value, token.encode("ascii")):
        return "a wrong cluster token"
    return None


class Refusal(Resource):
    """The 401 a gate answers: the dfly JSON envelope with code 615 and the reason."""

    isLeaf = True

    def __init__(self, why: str) -> None:
        super().__init__()
        self.why = why

    def render(self, request: IRequest) -> bytes:
        request.setResponseCode(401)
        request.setHeader(b"content-type", b"application/json")
        body = json.dumps({"code": codes.CLUSTER_UNAUTHORIZED, "msg": f"cluster token required: {self.why}"})
        return b"" if request.method == b"HEAD" else body.encode() + b"\n"
