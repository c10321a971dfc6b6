"""Who may read a task, and which sources are missing: bounded, expiring memories.

The source is the authority on access.  The supernode asks it (the
registration's own GET, or a ``Range: bytes=0-0`` probe with the caller's
URL and headers) and remembers the answer briefly, so a burst of peers with
the same credentials costs one question, and a revoked token stops
unlocking cached bytes within ``access_ttl``.  What is remembered is a
sha256 of the URL and headers, never the credentials themselves.

A source that answered 404/410 is remembered for ``fail_access_interval``
(per URL and headers, like the access decisions: one caller's 404 says
nothing about another's URL or credentials) so a flood of registrations for
a missing file does not become a flood of requests to the origin.

Both memories are LRU-bounded in number, so a stream of distinct URLs or
credentials cannot grow them without limit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, Hashable, Mapping, TypeVar

import attrs
from twisted.internet.interfaces import IReactorTime

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def access_fingerprint(url: str, headers: Mapping[str, str]) -> str:
    """What the source judged (raw URL, signed query included, and the headers), hashed."""
    h = hashlib.sha256(url.encode("utf-8", "surrogateescape"))
    for name, value in sorted((k.lower(), v) for k, v in headers.items()):
        h.update(b"\0" + name.encode("utf-8", "surrogateescape") + b"\0" + value.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@attrs.define(eq=False)
class ExpiringMemory(Generic[K, V]):
    """A mapping whose entries vanish after ``ttl`` seconds or when ``limit`` newer ones came."""

    clock: IReactorTime
    ttl: float
    limit: int
    _entries: "OrderedDict[K, tuple[float, V]]" = attrs.Factory(OrderedDict)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self.clock.seconds() - entry[0] > self.ttl:
            del self._entries[key]
            return None
        return entry[1]

    def put(self, key: K, value: V) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (self.clock.seconds(), value)
        while len(self._entries) > self.limit:
            self._entries.popitem(last=False)
        self.expire()

    def discard(self, key: K) -> None:
        self._entries.pop(key, None)

    def expire(self) -> None:
        """Drop what is past its ttl (entries are in insertion order, so from the front)."""
        now = self.clock.seconds()
        while self._entries:
            key, (since, _) = next(iter(self._entries.items()))
            if now - since <= self.ttl:
                break
            del self._entries[key]


@attrs.define(eq=False)
class SourceAccess:
    """Access decisions per (task, caller fingerprint) and the 404 memory per caller fingerprint."""

    clock: IReactorTime
    access_ttl: float = 60.0
    fail_access_interval: float = 180.0
    max_decisions: int = 100_000
    max_missing: int = 10_000
    _allowed: ExpiringMemory[tuple[str, str], bool] = attrs.field(init=False)
    _missing: ExpiringMemory[str, str] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._allowed = ExpiringMemory(self.clock, self.access_ttl, self.max_decisions)
        self._missing = ExpiringMemory(self.clock, self.fail_access_interval, self.max_missing)

    def allowed(self, task_id: str, fingerprint: str) -> bool:
        return self._allowed.get((task_id, fingerprint)) is not None

    def allow(self, task_id: str, fingerprint: str) -> None:
        self._allowed.put((task_id, fingerprint), True)

    def missing(self, fingerprint: str) -> str | None:
        """Why the source answered 404/410 to this URL and headers (`access_fingerprint`) within ``fail_access_interval``."""
        return self._missing.get(fingerprint)

    def remember_missing(self, fingerprint: str, reason: str) -> None:
        self._missing.put(fingerprint, reason)

    def expire(self) -> None:
        self._allowed.expire()
        self._missing.expire()

    @property
    def sizes(self) -> tuple[int, int]:
        """(access decisions, missing sources) held now."""
        return len(self._allowed), len(self._missing)
