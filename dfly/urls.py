"""Checks of what users give us: source URLs and ``--header`` lines.

Light on purpose (no reactor, no HTTP stack): the ``dfget`` CLI uses it too.

The rule for credentials in a URL (``http://user:password@host/f``), shared
by the supernode, the peer and dfdaemon: they never travel or get logged as
part of the URL.  Where a user typed them (``dfget -u``, the local API, the
engine) `move_userinfo` takes them out into an ``Authorization: Basic``
header, as curl does; the URL without them is what is registered, fetched
and logged.  `check_url`, which guards every API, refuses a URL that still
has them, with a reason that names the header (and never repeats the
password).  Neither treq nor Twisted's Agent can send such a URL anyway:
hyperlink drops the password and the Agent takes ``user:@host`` for the
host name.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from typing import Any, Iterable, Mapping
from urllib.parse import unquote, urlsplit

import hyperlink
import idna

#: ``scheme://`` and the userinfo of an authority (up to its last ``@``).
_USERINFO = re.compile(r"\A(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#]*)@")
#: The same anywhere in a text (a message, a command line).
_ANY_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


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


def redact_userinfo(text: str) -> str:
    """``text`` with a URL's ``user:password@`` shown as ``***@``: for messages and logs."""
    return _ANY_USERINFO.sub(r"\g<scheme>***@", text)


def access_log_uri(uri: str) -> str:
    """A request target for an access log: no query (signed URLs, tokens, keys live there), no userinfo."""
    path, mark, _ = uri.partition("?")
    return redact_userinfo(path) + ("?..." if mark else "")


def split_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its userinfo, and the ``Authorization: Basic`` header that carries it.

    Percent-escapes in the user and password are decoded (``%40`` is ``@``),
    as curl does; the header is UTF-8 (RFC 7617).  A URL without userinfo
    (or with an empty one) comes back unchanged, with no header.
    """
    match = _USERINFO.match(url)
    if match is None:
        return url, {}
    stripped = match.group("scheme") + url[match.end():]
    user, _, password = match.group("userinfo").partition(":")
    if not user and not password:
        return stripped, {}
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode("utf-8")).decode("ascii")
    return stripped, {"Authorization": f"Basic {token}"}


def add_missing_headers(headers: Mapping[str, str], extra: Mapping[str, str]) -> dict[str, str]:
    """``headers`` plus those of ``extra`` it does not have already (names compared without case)."""
    have = {name.lower() for name in headers}
    return {**headers, **{name: value for name, value in extra.items() if name.lower() not in have}}


def move_userinfo(url: str, headers: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The URL without userinfo and ``headers`` with its Basic credentials.

    An ``Authorization`` header given explicitly wins over the URL's
    credentials (curl sends the ``-H`` one too).
    """
    stripped, extra = split_userinfo(url)
    return stripped, add_missing_headers(headers, extra)


def check_url(url: Any) -> str:
    """``url`` if it is an absolute http(s) URL our HTTP client can send; ValueError otherwise.

    Unlike Dragonfly 0.4, ``localhost`` and bare IPv4 addresses are fine: no
    dotted-host rule.  Refused with a one-line reason: credentials in the
    URL (see the module docstring), and host names treq and Twisted cannot
    dial (``a_b``, empty labels, IPv6 literals, which hyperlink's
    ``to_uri`` cannot encode): those used to surface as a ValueError deep
    in the client, i.e. a 500.  Messages never repeat the URL's password.
    """
    if not isinstance(url, str) or not url:
        raise ValueError("missing URL")
    shown = redact_userinfo(url)
    if _USERINFO.match(url):
        raise ValueError(
            f"URL {shown!r} carries credentials (user:password@): send them in an "
            "'Authorization: Basic ...' header instead (dfget -u moves them there itself)"
        )
    try:
        parsed = hyperlink.URL.from_text(url)
    except (hyperlink.URLParseError, ValueError) as e:
        raise ValueError(f"invalid URL {shown!r}: {redact_userinfo(str(e))}") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"unsupported URL {shown!r}: only http:// and https:// are supported")
    if parsed.userinfo:
        raise ValueError(f"URL {shown!r} carries credentials: send them in an 'Authorization' header instead")
    if not parsed.host or any(c.isspace() for c in url):
        raise ValueError(f"invalid URL {shown!r}: no host")
    try:
        urlsplit(url).port
    except ValueError:
        raise ValueError(f"invalid URL {shown!r}: bad port") from None
    _check_host(parsed, shown)
    return url


def _check_host(parsed: hyperlink.URL, shown: str) -> None:
    """The host must survive what treq does (``to_uri``) and what Twisted's endpoint accepts."""
    try:
        ipaddress.IPv4Address(parsed.host)
        return
    except ValueError:
        pass
    try:
        ipaddress.IPv6Address(parsed.host)
    except ValueError:
        pass
    else:
        raise ValueError(f"unsupported URL {shown!r}: IPv6 address hosts are not supported; use a host name")
    try:
        encoded = parsed.to_uri().host  # treq sends this (IDNA, lower case)
        idna.decode(encoded.encode("ascii"))  # and HostnameEndpoint refuses what this refuses
    except (UnicodeError, ValueError) as e:
        raise ValueError(f"invalid URL {shown!r}: bad host name ({e})") from None
