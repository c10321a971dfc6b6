"""Checks of what users give us: source URLs and ``--header`` lines.

Light on purpose (no reactor, no HTTP stack): the ``dfget`` CLI uses it too.
"""

from __future__ import annotations

from typing import Any, Iterable
from urllib.parse import urlsplit

import hyperlink


def parse_header_lines(lines: Iterable[str]) -> dict[str, str]:
    """``["K: V", ...]`` (dfget's ``--header``) into a dict; ValueError on junk."""
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not name or any(c.isspace() for c in name) or "\n" in value or "\r" in value:
            raise ValueError(f"invalid header {line!r}: expected 'Name: value'")
        headers[name] = value.strip()
    return headers


def check_url(url: Any) -> str:
    """``url`` if it is an absolute http(s) URL with a host; ValueError otherwise.

    Unlike Dragonfly 0.4, ``localhost`` and bare IPs are fine: no dotted-host rule.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("missing URL")
    try:
        parsed = hyperlink.URL.from_text(url)
    except (hyperlink.URLParseError, ValueError) as e:
        raise ValueError(f"invalid URL {url!r}: {e}") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL {url!r}: only http:// and https:// are supported")
    if not parsed.host or any(c.isspace() for c in url):
        raise ValueError(f"invalid URL {url!r}: no host")
    try:
        urlsplit(url).port
    except ValueError:
        raise ValueError(f"invalid URL {url!r}: bad port") from None
    return url
