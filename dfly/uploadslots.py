"""Uploads per client address, capped on the ports that send piece bytes.

Each upload holds an fd, a transport buffer and, on the CDN port, a
read-ahead buffer.  Without a cap one client could open ranges until the
process runs out of descriptors.  `UploadSlots` counts uploads by client
address; past ``per_client`` a request is answered at once with ``503``, a
JSON reason (``{"code": 500, "msg": ...}``) and ``Retry-After: 1``.  A peer's
engine reads any answer but 206 as a refused piece and asks another holder,
and it never opens more than `dfly.peer.engine.PER_HOST_FETCHES` (half the
default cap) to one host itself, so honest swarms never meet the cap.
"""

from __future__ import annotations

import json

import attrs
from twisted.web.iweb import IRequest

from dfly import codes
from dfly.config import MAX_UPLOADS_PER_CLIENT
from dfly.refusals import RefusalLog


def client_of(request: IRequest) -> str:
    """The address a request came from, as the cap counts it."""
    return str(getattr(request.getClientAddress(), "host", "?"))


@attrs.define(eq=False)
class UploadSlots:
    """How many uploads each client address holds; at most ``per_client`` at once."""

    per_client: int = MAX_UPLOADS_PER_CLIENT
    _held: dict[str, int] = attrs.Factory(dict)  # only addresses with uploads running: bounded by them

    def take(self, client: str) -> bool:
        """One more upload for ``client``, if it is under the cap; give it back with `release`."""
        held = self._held.get(client, 0)
        if held >= self.per_client:
            return False
        self._held[client] = held + 1
        return True

    def release(self, client: str) -> None:
        held = self._held.get(client, 0) - 1
        if held > 0:
            self._held[client] = held
        else:
            self._held.pop(client, None)

    def held(self, client: str) -> int:
        return self._held.get(client, 0)

    def total(self) -> int:
        return sum(self._held.values())


def refuse_busy(request: IRequest, slots: UploadSlots, refusals: RefusalLog | None = None) -> bytes:
    """Answer a request over its client's cap: 503, the reason in JSON, ``Retry-After: 1``; logged once a minute."""
    client = client_of(request)
    why = f"{client} holds {slots.held(client)} uploads here already (maxUploadsPerClient {slots.per_client})"
    if refusals is not None:
        refusals.refused(client, "an upload past its cap", why)
    body = json.dumps({"code": codes.SYSTEM_ERROR, "msg": f"too many uploads at once: {why}"}).encode() + b"\n"
    request.setResponseCode(503)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"retry-after", b"1")
    return body
