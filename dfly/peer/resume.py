"""Resume from break-point: the verified-piece map of a working file, kept in ``data/`` as it grows.

A download whose identity (URL, output, task) is known writes into
``data/<name>-<identity>.server`` and records beside it, in
``<that>.pieces``, the file's length, its piece size and each verified
piece's sha256.  When the same download is asked for again after a crash,
a kill -9 or a reboot, the record is read, every recorded piece is hashed
again from the working file, and only those whose bytes still match are
kept: the rest is fetched.  A record that is corrupt, of another version,
or of another download is ignored with a log line (never trusted), and the
residue rule of ``data/`` (an hour untouched) removes what nobody resumes.

The record names the download by a hash, never by its URL: a signed URL's
secret does not land on disk.  Reading and hashing block: the engine runs
them in a thread; `RecordWriter` coalesces saves so a fast download writes
the record at most once per write in flight.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from dfly.logs import CLIENT_NAMESPACE
from dfly.pieces import piece_count, piece_range
from dfly.private import open_private
from dfly.stream import RunBlocking

log = Logger(namespace=CLIENT_NAMESPACE)

SUFFIX = ".pieces"
VERSION = 1
#: A record larger than this is not a record of ours (1 TiB in 4 MiB pieces is ~20 MiB of JSON).
MAX_RECORD = 32 << 20
_HEX64 = re.compile(r"\A[0-9a-f]{64}\Z")


def identity(url: str, output: str, key: str) -> str:
    """What makes two downloads the same one: the URL, the output and the task key."""
    return hashlib.sha256(f"{url}\0{output}\0{key}".encode()).hexdigest()


def record_path(working_path: str) -> str:
    return working_path + SUFFIX


@attrs.define(eq=False)
class PieceMap:
    """The verified pieces of one working file, with their sha256."""

    identity: str
    length: int = -1  # -1: not known yet (nothing can be recorded before it is)
    piece_size: int = 0
    pieces: dict[int, str] = attrs.Factory(dict)

    def layout(self, length: int, piece_size: int) -> bool:
        """Take the file's layout; False (and no pieces) when it differs from the recorded one."""
        same = self.length == length and self.piece_size == piece_size
        if not same:
            self.pieces.clear()
            self.length, self.piece_size = length, piece_size
        return same

    def range(self, num: int) -> tuple[int, int]:
        return piece_range(num, self.piece_size, self.length)

    def missing(self) -> list[tuple[int, int]]:
        """The byte ranges (inclusive) not covered by a verified piece, merged."""
        spans: list[tuple[int, int]] = []
        for num in range(piece_count(self.length, self.piece_size)):
            if num in self.pieces:
                continue
            start, end = self.range(num)
            if spans and spans[-1][1] + 1 == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
        return spans

    def verified_bytes(self) -> int:
        return sum(end - start + 1 for start, end in map(self.range, self.pieces))

    def to_bytes(self) -> bytes:
        return json.dumps({
            "version": VERSION, "identity": self.identity, "length": self.length, "pieceSize": self.piece_size,
            "pieces": {str(num): digest for num, digest in sorted(self.pieces.items())},
        }, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, data: bytes, expected_identity: str) -> "PieceMap":
        """Parse a record; ValueError says why it cannot be used."""
        try:
            raw = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"not JSON ({type(e).__name__})") from None
        if not isinstance(raw, dict) or raw.get("version") != VERSION:
            raise ValueError("not a piece record of this version")
        if raw.get("identity") != expected_identity:
            raise ValueError("it belongs to another download")
        length, size, pieces = raw.get("length"), raw.get("pieceSize"), raw.get("pieces")
        if (not isinstance(length, int) or isinstance(length, bool) or length < 0
                or not isinstance(size, int) or isinstance(size, bool) or size <= 0 or not isinstance(pieces, dict)):
            raise ValueError("its length, piece size or pieces are invalid")
        count = piece_count(length, size)
        kept: dict[int, str] = {}
        for text, digest in pieces.items():
            if not (isinstance(text, str) and text.isdigit() and int(text) < count
                    and isinstance(digest, str) and _HEX64.match(digest)):
                raise ValueError(f"invalid piece entry {text!r}")
            kept[int(text)] = digest
        return cls(expected_identity, length, size, kept)


def load(working_path: str, expected_identity: str) -> tuple[PieceMap | None, str]:
    """The record of ``working_path`` with only the pieces whose bytes still match (blocking).

    ``(None, why)`` when there is nothing to resume; a piece whose bytes
    changed is dropped and named in ``why``.
    """
    path = record_path(working_path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECORD + 1)
    except FileNotFoundError:
        return None, ""
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}"
    if len(data) > MAX_RECORD:
        return None, f"{path} is larger than any record"
    try:
        pmap = PieceMap.from_bytes(data, expected_identity)
    except ValueError as e:
        return None, f"ignoring {path}: {e}"
    try:
        fd = os.open(working_path, os.O_RDONLY)
    except OSError as e:
        return None, f"record {path} without its working file ({e.strerror or e})"
    bad: list[int] = []
    try:
        for num, digest in list(pmap.pieces.items()):
            start, end = pmap.range(num)
            data = os.pread(fd, end - start + 1, start)
            if len(data) != end - start + 1 or hashlib.sha256(data).hexdigest() != digest:
                bad.append(num)
                del pmap.pieces[num]
    finally:
        os.close(fd)
    why = f"pieces {sorted(bad)} of {working_path} changed on disk: fetched again" if bad else ""
    return pmap, why


def save(working_path: str, data: bytes) -> None:
    """Write a record atomically (blocking)."""
    path = record_path(working_path)
    tmp = f"{path}.tmp"
    with os.fdopen(open_private(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def remove(working_path: str) -> None:
    for path in (record_path(working_path), record_path(working_path) + ".tmp"):
        try:
            os.unlink(path)
        except OSError:
            pass


@attrs.define(eq=False)
class RecordWriter:
    """Keeps a working file's record current, one write at a time, the last state always written."""

    working_path: str
    pmap: PieceMap
    run_blocking: RunBlocking
    _writing: Deferred[Any] | None = None
    _dirty: bool = False
    _closed: bool = False
    _discarding: bool = False  # closed with discard: the record goes, nothing more is written

    def changed(self) -> None:
        if self._closed:
            return
        if self._writing is not None:
            self._dirty = True
            return
        self._write()

    def _write(self) -> None:
        self._dirty = False
        data = self.pmap.to_bytes()
        self._writing = self.run_blocking(lambda: save(self.working_path, data))
        self._writing.addErrback(lambda f: log.warn("cannot write piece record of {path}: {error}",
                                                    path=self.working_path, error=f.getErrorMessage()))
        self._writing.addBoth(self._written)

    def _written(self, _: object) -> None:
        self._writing = None
        if self._dirty and not self._discarding:
            self._write()  # a change made during the write (also after close: a kept record must have it)

    def flush(self) -> Deferred[None]:
        """Fires when the last change is on disk (or failed with a log line)."""
        if self._writing is None:
            return succeed(None)
        done: Deferred[None] = Deferred()

        def check(result: object) -> object:
            self.flush().addCallback(done.callback)
            return result

        self._writing.addBoth(check)
        return done

    def close(self, discard: bool) -> Deferred[None]:
        """No more changes; the last one is written (``discard``: the record goes instead)."""
        self._closed = True
        self._discarding = discard
        if self._dirty and self._writing is None and not discard:
            self._write()
        d = self.flush()
        if discard:
            d.addCallback(lambda _: remove(self.working_path))
        return d
