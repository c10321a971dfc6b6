"""``meta/host.meta``: how a ``dfget`` run finds its host's peer daemon.

``{"servicePort": N, "serviceHost": "127.0.0.1", "token": "...", "pid": N, "version": "..."}``, owner-only
(0600): the token is what lets a local client ask the daemon for downloads.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dfly.config import Home

TOKEN_HEADER = b"X-Dfly-Token"


def write_host_meta(home: Home, port: int, token: str, version: str, listen: str = "0.0.0.0") -> None:
    meta = {"servicePort": port, "serviceHost": local_address(listen), "token": token, "pid": os.getpid(),
            "version": version}
    tmp = home.host_meta + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f)
    os.replace(tmp, home.host_meta)


def read_host_meta(home: Home) -> dict[str, Any] | None:
    """The published meta, or None when absent or not ours to use."""
    try:
        with open(home.host_meta) as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):  # RecursionError: ``[[[[...``
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("servicePort"), int) or not meta.get("token"):
        return None
    return meta


def remove_host_meta(home: Home) -> None:
    """Remove host.meta if this process published it (a newer daemon may have)."""
    meta = read_host_meta(home)
    if meta is not None and meta.get("pid") == os.getpid():
        os.unlink(home.host_meta)


def local_address(listen: str) -> str:
    """Where a client on this host reaches a daemon listening on ``listen``."""
    if listen in ("0.0.0.0", ""):
        return "127.0.0.1"
    if listen == "::":
        return "::1"
    return listen


def service_host(meta: dict[str, Any]) -> str:
    """The address to dial from host.meta (files written before it was recorded mean loopback)."""
    host = meta.get("serviceHost")
    return host if isinstance(host, str) and host else "127.0.0.1"
