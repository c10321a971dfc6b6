"""The scheduler's limits, as one object an operator can set in ``supernode.yml``.

Every value has Dragonfly's (or dfly's measured) default; ``docs/usage.rst``
says what each changes.  Pure data: the schedule, the pull queue and peer
liveness read it, nothing here does I/O.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs

from dfly.config import parse_count, parse_duration


def _duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"expected a duration > 0, got {value!r}")
    return seconds


@attrs.frozen
class SchedulerPolicy:
    """How many pieces run where, and when a peer is blamed, isolated or gone."""

    #: Pieces one peer downloads at once (Dragonfly's PeerDownLimit).
    max_running: int = 4
    #: Pieces one peer uploads at once (PeerUpLimit).
    max_uploads: int = 5
    #: Pieces of one task the CDN sends at once.
    cdn_task_limit: int = 4
    #: Source faults after which a peer is offered to nobody.
    elimination: int = 5
    #: A peer with more failed pieces than this is served by the CDN only.
    isolation: int = 5
    #: A downloading peer that neither pulls nor reports for this long is gone.
    silence: float = 6.0
    #: A peer that hung up on a held pull and did not pull again within this is gone.
    hung_up_grace: float = 1.0
    #: A finished peer (a source only) that neither pulls nor reports for this
    #: long is gone: peer daemons pull a finished task as a heartbeat.
    finished_silence: float = 90.0
    #: Candidate pieces one pull examines at most.
    scan_budget: int = 256


#: ``supernode.yml`` ``scheduler:`` keys -> (field, parser).
_KEYS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "maxRunning": ("max_running", parse_count),
    "maxUploads": ("max_uploads", parse_count),
    "cdnTaskLimit": ("cdn_task_limit", parse_count),
    "elimination": ("elimination", parse_count),
    "isolation": ("isolation", parse_count),
    "silence": ("silence", _duration),
    "hungUpGrace": ("hung_up_grace", _duration),
    "finishedSilence": ("finished_silence", _duration),
    "scanBudget": ("scan_budget", parse_count),
}


def policy_from_mapping(data: Mapping[str, Any] | None) -> SchedulerPolicy:
    """The ``scheduler:`` section of ``supernode.yml``; ValueError names a bad key or value."""
    if not data:
        return SchedulerPolicy()
    if not isinstance(data, Mapping):
        raise ValueError("scheduler: expected a mapping of keys to values")
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in _KEYS:
            raise ValueError(f"scheduler: unknown key {key!r} (known: {', '.join(sorted(_KEYS))})")
        field, parse = _KEYS[key]
        try:
            changes[field] = parse(value)
        except ValueError as e:
            raise ValueError(f"scheduler.{key}: {e}") from None
    return SchedulerPolicy(**changes)
