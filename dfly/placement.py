"""Which supernode a task lives on: rendezvous (highest-random-weight) hashing, no shared state.

Every client orders the node list for a task by ``sha256(taskId NUL node)``,
highest first: the first healthy node is the task's supernode, the next
ones its fallbacks.  All peers of a task meet on one supernode, each
supernode fetches a URL once, and removing a node moves only its own tasks
(Kraken places blobs on its origin cluster the same way).

The key is the task id the supernode will compute (`task_key`), known
before registration even for md5, identifier and digest tasks.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

from dfly.config import format_node
from dfly.pieces import registration_task_url, task_id

Node = tuple[str, int]


def task_key(url: str, filter_keys: Iterable[str] = (), md5: str | None = None, identifier: str | None = None,
             digest: tuple[str, str] | None = None) -> str:
    """The base task id a registration of these fields gets (a digest counts only without md5/identifier)."""
    content = digest if digest is not None and not (md5 or identifier) else None
    return task_id(registration_task_url(url, filter_keys, content), md5, identifier)


def rendezvous_order(key: str, nodes: Sequence[Node]) -> list[Node]:
    """``nodes`` without duplicates, ordered by their weight for ``key`` (the task's supernode first)."""
    unique = list(dict.fromkeys(nodes))
    return sorted(unique, key=lambda node: hashlib.sha256(f"{key}\0{format_node(node)}".encode()).digest(),
                  reverse=True)
