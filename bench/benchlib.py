"""What the benchmark scripts share: their child processes, waiting for them, and /proc readers.

The scripts run as ``python3 bench/<name>.py``, so this module is found
next to them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Any, Callable, Self, TypeVar

T = TypeVar("T")


class Children:
    """The long-running processes of a run; leaving the block ends them (SIGTERM, then SIGKILL)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: str | None = None, **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv``; with ``log``, its stdout and stderr go to that file and stdin is closed."""
        if log is None:
            process = subprocess.Popen(argv, env=self.env, **kwargs)
        else:
            with open(log, "wb") as out:
                process = subprocess.Popen(argv, env=self.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                           **kwargs)
        self.processes.append(process)
        return process

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for(predicate: Callable[[], T | None], what: str, timeout: float = 30.0, name: str = "bench") -> T:
    """Poll ``predicate`` until it gives a value, or exit saying ``what`` did not come up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"{name}: {what} did not come up within {timeout:g}s")


def read_text(path: str) -> str:
    """A file's text, or "" when it cannot be read (a process that is gone)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a live process (all its threads)."""
    fields = read_text(f"/proc/{pid}/stat").rsplit(")", 1)[-1].split()
    if len(fields) < 13:
        return 0.0, 0.0
    hz = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / hz, int(fields[12]) / hz


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine since boot, by kind (softirq is most network work)."""
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) / os.sysconf("SC_CLK_TCK") for v in read_text("/proc/stat").split("\n", 1)[0].split()[1:9])
    return {"user": user + nice, "system": system + irq, "softirq": softirq, "idle": idle + iowait + steal}
