"""The supernode's Prometheus metrics, read from its state at scrape time.

A collector, not counters incremented on the hot path: the pull queue and
reports keep plain integers (`PullCounters`, `TaskManager.reports`), and a
scrape turns them into metric families.  So a report costs no lock and no
label lookup, and a per-supernode registry keeps tests independent.
"""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dfly.supernode.tasks import TaskManager


class SupernodeCollector:
    def __init__(self, tasks: TaskManager) -> None:
        self._tasks = tasks

    def collect(self) -> Iterator[Metric]:
        t = self._tasks
        yield CounterMetricFamily("dfly_supernode_reports", "Piece reports (success and failure) received.",
                                  value=t.reports)
        yield CounterMetricFamily("dfly_supernode_pull_wakeups",
                                  "Held pulls resumed by an event (not by their timeout).",
                                  value=t.counters.wakeups)
        yield CounterMetricFamily("dfly_supernode_assign_calls", "Scheduler assign calls (pulls and wake-ups).",
                                  value=t.counters.assign_calls)
        states = GaugeMetricFamily("dfly_supernode_tasks", "Task versions in memory, by fetch state.",
                                   labels=["state"])
        counts: dict[str, int] = {}
        for task in t.tasks.values():
            counts[task.state.value] = counts.get(task.state.value, 0) + 1
        for state, n in sorted(counts.items()):
            states.add_metric([state], n)
        yield states
        yield GaugeMetricFamily("dfly_supernode_peers", "Peers registered in tasks in memory.",
                                value=sum(len(task.peers) for task in t.tasks.values()))
        yield GaugeMetricFamily("dfly_supernode_held_pulls", "Pulls held open right now.", value=t.held_pulls())
        decisions, missing = t.access.sizes
        yield GaugeMetricFamily("dfly_supernode_access_decisions", "Remembered source access decisions.",
                                value=decisions)
        yield GaugeMetricFamily("dfly_supernode_missing_sources", "Remembered 404 sources.", value=missing)


def metrics_registry(tasks: TaskManager) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SupernodeCollector(tasks))  # type: ignore[arg-type]
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
