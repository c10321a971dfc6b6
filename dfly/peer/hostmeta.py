"""``meta/host.meta``: how a ``dfget`` run finds its host's peer daemon.

``{"servicePort": N, "token": "...", "pid": N, "version": "..."}``, owner-only
(0600): the token is what lets a local client ask the daemon for downloads.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dfly.config import Home

TOKEN_HEADER = b"X-Dfly-Token"


def write_host_meta(home: Home, port: int, token: str, version: str) -> None:
    meta = {"servicePort": port, "token": token, "pid": os.getpid(), "version": version}
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
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("servicePort"), int) or not meta.get("token"):
        return None
    return meta


def remove_host_meta(home: Home) -> None:
    """Remove host.meta if this process published it (a newer daemon may have)."""
    meta = read_host_meta(home)
    if meta is not None and meta.get("pid") == os.getpid():
        os.unlink(home.host_meta)
