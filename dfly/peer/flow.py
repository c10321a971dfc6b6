"""A download's lifecycle as an explicit state machine: which stage runs, and what may follow it.

The engine runs the stages (register, pull pieces, fetch from the source,
finish); this table decides what each outcome leads to, so that no stage
has to guess from shared flags whether the download was cancelled, timed
out, or may still go on elsewhere::

    registering --registered--> p2p --complete--> finishing --finished--> done
         |                       |  ^
         |                  node_lost|registered
         |                       v  |
         |                     migrating
         +--nodes_failed--> source <--nodes_failed / p2p_failed-- (p2p, migrating)
                              |
                              +--complete--> finishing

``error`` (what no other stage can mend: refused credentials, a full disk,
a digest mismatch, no back-to-source allowed), ``cancel`` and ``timeout``
end every running state in ``failed``; in ``done`` and ``failed`` they
change nothing.  The deadline stops in ``finishing``: the bytes are all in
and verified, and what is left (fsync, digest, placing) is local.  Any other pair is a bug and raises `InvalidTransition`.
The flow owns the download's deadline: a `Clock` drives it in tests.
"""

from __future__ import annotations

import enum
from typing import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from dfly.logs import CLIENT_NAMESPACE

log = Logger(namespace=CLIENT_NAMESPACE)


class State(enum.Enum):
    REGISTERING = "registering"
    P2P = "p2p"
    MIGRATING = "migrating"
    SOURCE = "source"
    FINISHING = "finishing"
    DONE = "done"
    FAILED = "failed"


class Input(enum.Enum):
    REGISTERED = "registered"  # a supernode took the task
    NODE_LOST = "node_lost"  # the task's supernode died, hung, restarted or was dropped
    NODES_FAILED = "nodes_failed"  # no supernode can be used: go back to the source
    P2P_FAILED = "p2p_failed"  # the swarm failed (pieces, source error behind the supernode)
    COMPLETE = "complete"  # every byte is in the working file
    FINISHED = "finished"  # checked and placed at -o
    ERROR = "error"  # nothing can mend this
    CANCEL = "cancel"  # the caller went away
    TIMEOUT = "timeout"  # the download's deadline passed


#: Running states: the ones cancel, timeout and error may end.
RUNNING = frozenset({State.REGISTERING, State.P2P, State.MIGRATING, State.SOURCE, State.FINISHING})
TERMINAL = frozenset({State.DONE, State.FAILED})

TRANSITIONS: dict[tuple[State, Input], State] = {
    (State.REGISTERING, Input.REGISTERED): State.P2P,
    (State.REGISTERING, Input.NODES_FAILED): State.SOURCE,
    (State.P2P, Input.COMPLETE): State.FINISHING,
    (State.P2P, Input.NODE_LOST): State.MIGRATING,
    (State.P2P, Input.P2P_FAILED): State.SOURCE,
    (State.MIGRATING, Input.REGISTERED): State.P2P,
    (State.MIGRATING, Input.NODES_FAILED): State.SOURCE,
    (State.SOURCE, Input.COMPLETE): State.FINISHING,
    (State.FINISHING, Input.FINISHED): State.DONE,
    **{(state, end): State.FAILED for state in RUNNING for end in (Input.ERROR, Input.CANCEL, Input.TIMEOUT)},
    **{(state, end): state for state in TERMINAL for end in (Input.CANCEL, Input.TIMEOUT)},
}


class InvalidTransition(Exception):
    """An input the current state does not take: a bug in the engine."""


class DownloadFlow:
    """The state of one download and its deadline.

    ``on_timeout`` is called once when the deadline passes in a running
    state (the engine cancels the running stage from it); ``on_change`` sees
    every transition, for logs and events.
    """

    def __init__(self, clock: IReactorTime, timeout: float, on_timeout: Callable[[], None],
                 on_change: Callable[[State, Input, State, str], None] = lambda *_: None) -> None:
        self.clock = clock
        self.state = State.REGISTERING
        self.why = ""  # the reason given with the last transition
        self.migrations = 0
        self.ended_by: Input | None = None  # the input that ended it
        self._on_timeout = on_timeout
        self._on_change = on_change
        self._started = clock.seconds()
        self._deadline: IDelayedCall | None = clock.callLater(timeout, self._expired)

    def handle(self, event: Input, why: str = "") -> State:
        """Take ``event``; the new state.  `InvalidTransition` if this state does not take it."""
        try:
            new = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise InvalidTransition(f"a download in state {self.state.value} cannot take {event.value}") from None
        old = self.state
        if old in TERMINAL:
            return old  # a cancel or timeout after the end changes nothing
        self.state = new
        self.why = why or self.why
        if old is State.P2P and new is State.MIGRATING:
            self.migrations += 1
        if new in TERMINAL or new is State.FINISHING:
            # Every byte is in and verified: fsync, the digest and placing the
            # file run to their end (a deadline there would throw the file away).
            self.ended_by = event if new in TERMINAL else None
            self._stop_deadline()
        self._on_change(old, event, new, why)
        return new

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def extend(self, timeout: float) -> None:
        """The whole download may take ``timeout`` s from its start (known once the length is)."""
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(max(timeout - (self.clock.seconds() - self._started), 0))

    def _expired(self) -> None:
        self._deadline = None
        if self.running:
            self.handle(Input.TIMEOUT, "download timeout")
            self._on_timeout()

    def _stop_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
