"""The CDN cache's disk quota: least recently used entries go, never one in use.

The quota is ``--cache-limit`` bytes of dfly's own cache files, or, by
default, whatever keeps 20 % of the cache's filesystem free.  Only dfly's
files count and only they are removed.  Watermarks keep eviction from
running on every new piece: above the high mark (the limit, or 20 % free)
entries are removed until the low mark (90 % of the limit, or 25 % free).

Which entries are least recently used is kept in memory (`CacheIndex`):
filled once at start from the ``.meta`` files' times (a file's atime is not
reliable under ``relatime``), then touched whenever a task version enters
or leaves memory.  A version in memory is in use and never removed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Iterable

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from dfly.pieces import is_task_id
from dfly.stream import RunBlocking, run_inline
from dfly.supernode.cdn import CdnCache

log = Logger(namespace="dfly.supernode")

#: With the default quota: keep this share of the filesystem free ...
FREE_SHARE = 0.20
#: ... and, once below it, evict until this share is free.
FREE_SHARE_LOW = 0.25
#: With --cache-limit: evict down to this share of the limit.
LIMIT_LOW = 0.90


def scan(cache: CdnCache) -> list[tuple[float, str, int]]:
    """(meta mtime, task id, data size) of every cache entry on disk, oldest first (blocking)."""
    found = []
    root = os.path.join(cache.repo, "download")
    try:
        prefixes = os.listdir(root)
    except FileNotFoundError:
        return []
    for prefix in prefixes:
        try:
            names = os.listdir(os.path.join(root, prefix))
        except (NotADirectoryError, FileNotFoundError):
            continue
        for name in names:
            if not is_task_id(name) or name[:3] != prefix:
                continue
            try:
                size = os.path.getsize(cache.data_path(name))
                when = os.path.getmtime(cache.meta_path(name))
            except OSError:
                when = 0.0  # no meta: the oldest of all
                try:
                    size = os.path.getsize(cache.data_path(name))
                except OSError:
                    continue
            found.append((when, name, size))
    found.sort()
    return found


@attrs.define(eq=False)
class CacheIndex:
    """Cache entries in least-recently-used order, with their sizes."""

    entries: "OrderedDict[str, int]" = attrs.Factory(OrderedDict)
    used: int = 0

    def load(self, scanned: Iterable[tuple[float, str, int]]) -> None:
        """Put what a scan found (oldest first) before everything touched since: older than all of it."""
        for _, task_id, size in reversed(list(scanned)):
            if task_id not in self.entries:  # touched since the scan started: newer
                self.entries[task_id] = size
                self.entries.move_to_end(task_id, last=False)
                self.used += size

    def touch(self, task_id: str, size: int) -> None:
        self.used += size - self.entries.pop(task_id, 0)
        self.entries[task_id] = size

    def drop(self, task_id: str) -> None:
        self.used -= self.entries.pop(task_id, 0)


@attrs.define(eq=False)
class DiskQuota:
    cache: CdnCache
    limit: int = 0  # bytes; 0: keep FREE_SHARE of the filesystem free
    disk: RunBlocking = run_inline
    index: CacheIndex = attrs.Factory(CacheIndex)
    evictions: int = 0
    evicted_bytes: int = 0
    _running: bool = False
    #: Entries chosen for removal whose files the disk pool has not removed
    #: yet, and who waits for that (`settled`).
    _removing: set[str] = attrs.Factory(set)
    _waiting: list[Deferred[None]] = attrs.Factory(list)

    def settled(self, task_id: str) -> Deferred[None]:
        """Fires once no removal of ``task_id``'s files is pending (at once when none is).

        Whoever opens an entry's files waits for this first: an entry is
        chosen on the reactor and removed on the disk pool, and a
        registration in between must not find the files and lose them.
        """
        if task_id not in self._removing:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def start(self) -> Deferred[None]:
        """Fill the index from disk (off the reactor thread)."""
        return self.disk(lambda: scan(self.cache)).addCallback(self.index.load)

    def to_free(self) -> int:
        """Bytes to remove now (0: under the high mark) (blocking: statvfs)."""
        if self.limit > 0:
            return self.index.used - int(self.limit * LIMIT_LOW) if self.index.used > self.limit else 0
        try:
            st = os.statvfs(self.cache.repo)
        except OSError:
            return 0
        total, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        if free >= total * FREE_SHARE:
            return 0
        return int(total * FREE_SHARE_LOW) - free

    def collect(self, in_use: Callable[[str], bool]) -> Deferred[int]:
        """Evict least recently used entries not ``in_use`` until under the low mark; fires with bytes freed."""
        if self._running:
            return succeed(0)
        self._running = True

        def evict(need: int) -> Deferred[int] | int:
            if need <= 0:
                return 0
            chosen, freed = [], 0
            for task_id, size in self.index.entries.items():
                if freed >= need:
                    break
                if not in_use(task_id):
                    chosen.append((task_id, size))
                    freed += size
            for task_id, _ in chosen:
                self.index.drop(task_id)
                self._removing.add(task_id)

            def removed(result: object) -> object:
                self._removing.difference_update(task_id for task_id, _ in chosen)
                waiting, self._waiting = self._waiting, []
                for d in waiting:
                    d.callback(None)
                return result

            def remove() -> int:
                for task_id, _ in chosen:
                    self.cache.remove(task_id)
                return freed

            def done(freed: int) -> int:
                self.evictions += len(chosen)
                self.evicted_bytes += freed
                for task_id, size in chosen:
                    log.info("cache: evicted taskID:{task_id} ({size} bytes, least recently used)",
                             task_id=task_id, size=size)
                if freed < need:
                    log.warn("cache: {need} bytes over the quota, only {freed} could be freed (the rest is in use)",
                             need=need, freed=freed)
                return freed

            return self.disk(remove).addBoth(removed).addCallback(done)

        def finished(result: object) -> object:
            self._running = False
            return result

        return self.disk(self.to_free).addCallback(evict).addBoth(finished)
