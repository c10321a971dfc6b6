"""Log files in Dragonfly's line format, and the ``sign`` that ties lines to a run.

A line reads ``2019-02-13 15:20:45.757 INFO sign:31923-1550042443.708 : message``,
so the operators' habit of ``grep <sign> dfclient.log`` keeps working.  Code
logs structured events through ``twisted.logger.Logger``; the text format is
only this observer's business.  An event may carry its own ``sign`` field (a
peer daemon logs on behalf of the ``dfget`` run that asked it).
"""

from __future__ import annotations

import io
import os
import re
import time
from typing import Callable

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    PredicateResult,
    formatEvent,
)

from dfly.private import make_private_dirs, open_private
from dfly.urls import redact_userinfo

#: The namespace of per-download events that go to ``dfclient.log``.
CLIENT_NAMESPACE = "dfly.client"


def make_sign(pid: int, seconds: float) -> str:
    """``<pid>-<unix time with 3 decimals>``: unique per process run."""
    return f"{pid}-{seconds:.3f}"


#: Query parameters of signed URLs and tokens (S3, GCS, Azure SAS, CloudFront, OAuth).
_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    r"|sig|signature|token|access_token|policy|key-pair-id|password|secret)=)[^&\s\"'<>]+")
#: Headers that carry credentials, as "Name: value" (a --header, a logged request).
_HEADER_NAMES = (r"(?:authorization|proxy-authorization|cookie|set-cookie|x-api-key|private-token|x-auth-token"
                 r"|x-dfly-peer-secret|x-dfly-task-key|x-dfly-cluster-token)")
_SECRET_HEADER = re.compile(rf"(?i)\b({_HEADER_NAMES})(\s*:\s*)[^,\"'\]\n]+")
#: The same headers in a Python repr: ``{'Cookie': 'v'}``, ``(b'cookie', [b'v'])``.
_QUOTED_HEADER = re.compile(rf"""(?i)(b?(['"]){_HEADER_NAMES}\2\s*[:,]\s*\[?\s*b?)(['"])(?:(?!\3).)*\3""")
#: The same secrets as JSON fields (a logged supernode answer holds the task key and the peer secret).
_SECRET_FIELD = re.compile(r'(?i)("(?:key|peersecret|token|password|secret|authorization)"\s*:\s*)"[^"]*"')
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}")


def redact(message: str) -> str:
    """``message`` with credentials, signatures, task keys and peer secrets shown as ``***``.

    Applied to every line dfly writes (supernode.log, dfclient.log,
    dfserver.log, dfdaemon.log), so no call site can forget it; URLs'
    ``user:password@`` go too.
    """
    message = redact_userinfo(message)
    message = _SECRET_QUERY.sub(r"\1***", message)
    message = _QUOTED_HEADER.sub(r"\1\3***\3", message)
    message = _SECRET_HEADER.sub(r"\1\2***", message)
    message = _SECRET_FIELD.sub(r'\1"***"', message)
    return _BEARER.sub(r"\1 ***", message)


def format_line(event: LogEvent, default_sign: str | None) -> str | None:
    """One log line (with any traceback after it), redacted (`redact`), or None for an empty event."""
    message = formatEvent(event)
    failure = event.get("log_failure")
    if failure is not None:
        message = f"{message}\n{failure.getTraceback()}".rstrip("\n")
    if not message:
        return None
    message = redact(message)
    level = getattr(event.get("log_level"), "name", "info")
    return plain_line(event.get("log_time") or time.time(), level, event.get("sign") or default_sign, message)


def plain_line(stamp: float, level: str, sign: str | None, message: str) -> str:
    """The line format itself, for writers that do without twisted.logger."""
    millis = int((stamp - int(stamp)) * 1000)
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) + f".{millis:03d}"
    prefix = f"{when} {level.upper()[:4]} sign:{sign} : " if sign else f"{when} {level.upper()[:4]} : "
    return prefix + message + "\n"


def open_log(path: str) -> io.TextIOWrapper:
    """Append-mode text file, line-buffered; created 0600 (with its directory, 0700) if missing.

    Logs name URLs, peers and hosts: no other local user's to read.
    """
    make_private_dirs(os.path.dirname(path) or ".")
    fd = open_private(path, os.O_WRONLY | os.O_APPEND)
    return open(fd, "a", encoding="utf-8", buffering=1)


def line_observer(
    out: io.TextIOBase,
    default_sign: str | None,
    accept: Callable[[LogEvent], bool] | None = None,
) -> ILogObserver:
    """An observer writing Dragonfly-format lines to ``out``, optionally filtered."""
    observer = FileLogObserver(out, lambda event: format_line(event, default_sign))
    if accept is None:
        return observer

    def predicate(event: LogEvent) -> PredicateResult:
        return PredicateResult.yes if accept(event) else PredicateResult.no

    return FilteringLogObserver(observer, [predicate])


def is_client_event(event: LogEvent) -> bool:
    return str(event.get("log_namespace", "")).startswith(CLIENT_NAMESPACE)


def is_dfly_event(event: LogEvent) -> bool:
    """Our own events, not the libraries' chatter (for the CLI's log)."""
    return str(event.get("log_namespace", "")).startswith("dfly")
