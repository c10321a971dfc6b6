"""One download as the CLI, the local API and the engine see it, and its wire format.

Kept free of the reactor and the HTTP stack so that ``dfget`` starts fast:
the CLI imports this, never the engine, on its usual path.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import attrs

from dfly import codes
from dfly.config import DEFAULT_LOCAL_LIMIT, format_node, parse_nodes, parse_size
from dfly.pieces import is_md5, parse_digest, parse_filter
from dfly.urls import check_url, parse_header_lines


@attrs.frozen
class DownloadRequest:
    """One ``dfget`` run, validated by the CLI or the local API."""

    url: str
    output: str  # absolute
    sign: str
    nodes: tuple[tuple[str, int], ...] = ()
    headers: Mapping[str, str] = attrs.field(factory=dict)
    md5: str | None = None
    identifier: str | None = None
    digest: tuple[str, str] | None = None  # ("sha256", hex)
    filter: tuple[str, ...] = ()
    timeout: float = 0.0  # 0: from the length and min_rate
    min_rate: int = 64 << 10
    back_source: bool = True
    local_limit: int = DEFAULT_LOCAL_LIMIT  # bytes/s for this download; 0 = unlimited
    total_limit: int | None = None  # set the host's --totallimit; None = leave it as it is
    resume: bool = True  # keep verified pieces for a later run of the same download (dfdaemon's blobs: no)


@attrs.frozen
class DownloadResult:
    success: bool
    cost: float
    length: int
    reason: int = codes.REASON_NONE
    code: int = 0
    error: str = ""
    from_peers: int = 0
    from_supernode: int = 0
    from_source: int = 0
    migrated: int = 0  # times the download moved to another supernode (or the same after its restart)
    resumed: int = 0  # bytes kept from an earlier run's verified pieces

    def line(self) -> str:
        """The result line users and scripts know from Dragonfly; a migration or a resume is appended."""
        extra = (f" migrated:{self.migrated}" if self.migrated else "") + (f" resumed:{self.resumed}" if self.resumed else "")
        if self.success:
            return f"download SUCCESS(0) cost:{self.cost:.3f}s length:{self.length} reason:{self.reason}{extra}"
        return (
            f"download FAIL({self.code}) cost:{self.cost:.3f}s length:{self.length} "
            f"reason:{self.reason}{extra} error:{self.error}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "success": self.success,
            "cost": round(self.cost, 3),
            "length": self.length,
            "reason": self.reason,
            "code": self.code,
            "error": self.error,
            "fromPeers": self.from_peers,
            "fromSupernode": self.from_supernode,
            "fromSource": self.from_source,
            "migrated": self.migrated,
            "resumed": self.resumed,
            "line": self.line(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "DownloadResult":
        return cls(
            success=bool(data["success"]), cost=float(data["cost"]), length=int(data["length"]),
            reason=int(data["reason"]), code=int(data["code"]), error=str(data["error"]),
            from_peers=int(data["fromPeers"]), from_supernode=int(data["fromSupernode"]),
            from_source=int(data["fromSource"]),
            migrated=int(data.get("migrated", 0)),
            resumed=int(data.get("resumed", 0)),
        )


def request_to_json(req: DownloadRequest) -> dict[str, Any]:
    return {
        "url": req.url,
        "output": req.output,
        "sign": req.sign,
        "nodes": [format_node(node) for node in req.nodes],
        "headers": [f"{k}: {v}" for k, v in req.headers.items()],
        "md5": req.md5,
        "identifier": req.identifier,
        "digest": f"{req.digest[0]}:{req.digest[1]}" if req.digest else None,
        "filter": list(req.filter),
        "timeout": req.timeout,
        "minRate": req.min_rate,
        "notbs": not req.back_source,
        "localLimit": req.local_limit,
        "totalLimit": req.total_limit,
    }


def request_from_json(body: Mapping[str, Any]) -> DownloadRequest:
    """Validate a download request as strictly as the CLI does; ValueError says why."""
    try:
        url = check_url(body.get("url"))
        output = body.get("output")
        if not isinstance(output, str) or not os.path.isabs(output):
            raise ValueError("output must be an absolute path")
        sign = body.get("sign")
        if not isinstance(sign, str) or not sign or len(sign) > 64:
            raise ValueError("missing sign")
        md5 = body.get("md5") or None
        identifier = body.get("identifier") or None
        if md5 and identifier:
            raise ValueError("give md5 or identifier, not both")
        if md5 is not None and (not isinstance(md5, str) or not is_md5(md5)):
            raise ValueError(f"invalid md5 {md5!r}: expected 32 hex digits")
        digest_text = body.get("digest") or None
        if digest_text is not None and not isinstance(digest_text, str):
            raise ValueError(f"invalid digest {digest_text!r}: expected sha256:<64 hex digits> or md5:<32 hex digits>")
        digest = parse_digest(digest_text) if digest_text else None
        headers = body.get("headers") or []
        if not isinstance(headers, list) or not all(isinstance(h, str) for h in headers):
            raise ValueError("headers must be a list of 'Name: value' strings")
        filter_spec = body.get("filter")
        if isinstance(filter_spec, list) and not all(isinstance(k, str) for k in filter_spec):
            raise ValueError("filter must be 'k1&k2' or a list of query keys")
        timeout = body.get("timeout", 0)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout < math.inf:
            raise ValueError(f"invalid timeout {timeout!r}")
        return DownloadRequest(
            url=url,
            output=output,
            sign=sign,
            nodes=parse_nodes(body.get("nodes") or []),
            headers=parse_header_lines(headers),
            md5=md5.lower() if md5 else None,
            identifier=identifier,
            digest=digest,
            filter=parse_filter(filter_spec),
            timeout=float(timeout),
            min_rate=parse_size(body.get("minRate", 64 << 10)),
            back_source=not body.get("notbs", False),
            local_limit=parse_size(body.get("localLimit", DEFAULT_LOCAL_LIMIT)),
            total_limit=None if body.get("totalLimit") is None else parse_size(body["totalLimit"]),
        )
    except TypeError as e:
        raise ValueError(str(e)) from None
