"""Piece arithmetic, task identity and digests.

Pure functions shared by the supernode and the peer: both sides must agree on
them bit for bit, so they live here and nowhere else.
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import hyperlink

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

DEFAULT_PIECE_SIZE = 4 * MiB
MAX_PIECE_SIZE = 15 * MiB
#: Files up to this length (or of unknown length) use the default piece size.
SMALL_FILE_LIMIT = 200 * MiB

_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")
_HEX32 = re.compile(r"\A[0-9a-fA-F]{32}\Z")


def piece_size_for(length: int) -> int:
    """The piece size for a file of ``length`` bytes (``-1`` when unknown).

    Bigger files get bigger pieces so the number of pieces, and with it the
    scheduler's work per file, stays bounded: +1 MiB per 100 MiB above
    200 MiB, at most 15 MiB.
    """
    if length <= SMALL_FILE_LIMIT:
        return DEFAULT_PIECE_SIZE
    return min(DEFAULT_PIECE_SIZE + (length // (100 * MiB) - 2) * MiB, MAX_PIECE_SIZE)


def piece_count(length: int, piece_size: int) -> int:
    """How many pieces cover ``length`` bytes; an empty file has none."""
    if length < 0:
        raise ValueError("piece count of a file of unknown length")
    return -(-length // piece_size)


def piece_range(piece_num: int, piece_size: int, length: int) -> tuple[int, int]:
    """The inclusive byte range ``(start, end)`` of one piece, as in a Range header."""
    start = piece_num * piece_size
    if piece_num < 0 or start >= length:
        raise ValueError(f"piece {piece_num} is outside a file of {length} bytes")
    return start, min(start + piece_size, length) - 1


def format_range(start: int, end: int) -> str:
    return f"{start}-{end}"


def parse_range(text: str) -> tuple[int, int]:
    """Parse ``"start-end"`` (inclusive, both given) as used in the piece API."""
    match = re.fullmatch(r"(\d{1,19})-(\d{1,19})", text.strip())
    if match is None:
        raise ValueError(f"invalid range {text!r}: expected 'start-end'")
    start, end = int(match.group(1)), int(match.group(2))
    if end < start:
        raise ValueError(f"invalid range {text!r}: end before start")
    return start, end


def piece_num_of(byte_range: tuple[int, int], piece_size: int) -> int:
    """The piece a range belongs to; it must start on a piece boundary."""
    start, end = byte_range
    if start % piece_size or end - start >= piece_size:
        raise ValueError(f"range {start}-{end} is not one piece of {piece_size} bytes")
    return start // piece_size


def parse_filter(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """Query keys to drop from the task URL: ``"k1&k2"`` or a list of keys."""
    if not spec:
        return ()
    keys = spec.split("&") if isinstance(spec, str) else list(spec)
    return tuple(sorted({k.strip() for k in keys if k.strip()}))


def task_url(url: str, filter_keys: Iterable[str] = ()) -> str:
    """The URL with the ``--filter`` query keys removed.

    Signed URLs (``?sig=..&expires=..``) differ on every request while naming
    the same bytes; dropping those keys makes them one task.
    """
    drop = set(filter_keys)
    if not drop:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in drop]
    return urlunsplit(parts._replace(query=urlencode(query)))


def registration_task_url(url: str, filter_keys: Iterable[str] = (), digest: tuple[str, str] | None = None) -> str:
    """What a registration's task is named by: the URL without filter keys, or origin + digest.

    A digest makes the task content-addressed within one origin (the same
    bytes are one task whatever repository or signed query they were asked
    by on that server), but only when the URL's last path segment names that
    same digest, as a registry's ``/v2/<name>/blobs/sha256:<hex>`` does.
    Then the access probe, which asks the caller's own URL, asks the registry
    exactly "may this caller read this digest in this repository": a "yes"
    means the caller may read these bytes.  A digest the path does not name
    is only a check of the bytes: otherwise a caller who can read any blob
    would register its URL with a private layer's digest and be handed the
    private bytes.  The origin stays in the identity, so another server
    never unlocks them.  The supernode names tasks with this, and peers
    place tasks on supernodes with it (`dfly.placement`), so both must
    compute the same.
    """
    if digest is None or not names_digest(url, digest):
        return task_url(url, filter_keys)
    parsed = hyperlink.URL.from_text(url)
    return f"{parsed.scheme}://{parsed.host.lower()}:{parsed.port}#{digest[0]}:{digest[1]}"


def names_digest(url: str, digest: tuple[str, str]) -> bool:
    """Is the last path segment of ``url`` exactly ``<algorithm>:<hex>`` of ``digest``?"""
    segments = hyperlink.URL.from_text(url).path
    return bool(segments) and segments[-1].lower() == f"{digest[0]}:{digest[1]}"


def task_id(url: str, md5: str | None = None, identifier: str | None = None) -> str:
    """``sha256(taskUrl + NUL + (md5 or identifier or ""))``: same id, same bytes."""
    tag = md5 or identifier or ""
    return hashlib.sha256(f"{url}\0{tag}".encode()).hexdigest()


def is_task_id(text: str) -> bool:
    return bool(_HEX64.match(text))


def is_md5(text: str) -> bool:
    return bool(_HEX32.match(text))


def piece_digest(data: bytes) -> str:
    """Hex sha256 of a piece; the supernode computes it, every receiver checks it."""
    return hashlib.sha256(data).hexdigest()


def parse_digest(text: str) -> tuple[str, str]:
    """Parse ``sha256:<hex>`` or ``md5:<hex>`` into ``(algorithm, lower-case hex)``."""
    algorithm, sep, value = text.partition(":")
    algorithm = algorithm.lower()
    value = value.lower()
    if sep and algorithm == "sha256" and _HEX64.match(value):
        return algorithm, value
    if sep and algorithm == "md5" and _HEX32.match(value):
        return algorithm, value
    raise ValueError(f"invalid digest {text!r}: expected sha256:<64 hex digits> or md5:<32 hex digits>")


def file_digest(path: str, algorithm: str) -> str:
    """The hex digest of a whole file (blocking: run it off the reactor thread)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
