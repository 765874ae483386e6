"""The nydusd state machine (upstream's ``DaemonState``): INIT -> READY -> RUNNING -> STOPPED.

``INIT``: started, nothing served yet (also while waiting for a takeover with ``--upgrade``).
``READY``: file systems mounted, the FUSE session not yet serving. ``RUNNING``: serving.
``INTERRUPTED``: the FUSE connection ended underneath us (unmounted from outside).
``STOPPED``: exiting. Events not allowed in a state raise StateError (HTTP 409 at the API).

Threading contract: thread-safe; ``wait_for`` blocks until a state is reached.
"""

from __future__ import annotations

import threading
from enum import StrEnum

from ..errors import NydusError

__all__ = ["DaemonState", "DaemonEvent", "StateMachine", "StateError"]


class StateError(NydusError):
    """An event that the current state does not accept."""


class DaemonState(StrEnum):
    INIT = "INIT"
    READY = "READY"
    RUNNING = "RUNNING"
    UPGRADING = "UPGRADING"
    INTERRUPTED = "INTERRUPTED"
    STOPPED = "STOPPED"
    UNKNOWN = "UNKNOWN"


class DaemonEvent(StrEnum):
    MOUNT = "mount"
    TAKEOVER = "takeover"
    START = "start"
    STOP = "stop"
    INTERRUPT = "interrupt"
    EXIT = "exit"


_S, _E = DaemonState, DaemonEvent
_TRANSITIONS: dict[tuple[DaemonState, DaemonEvent], DaemonState] = {
    (_S.INIT, _E.MOUNT): _S.READY,
    (_S.INIT, _E.TAKEOVER): _S.READY,
    (_S.READY, _E.START): _S.RUNNING,
    (_S.READY, _E.MOUNT): _S.READY,
    (_S.RUNNING, _E.MOUNT): _S.RUNNING,
    (_S.RUNNING, _E.STOP): _S.READY,
    (_S.RUNNING, _E.START): _S.RUNNING,
    (_S.RUNNING, _E.INTERRUPT): _S.INTERRUPTED,
    (_S.READY, _E.INTERRUPT): _S.INTERRUPTED,
    (_S.INIT, _E.EXIT): _S.STOPPED,
    (_S.READY, _E.EXIT): _S.STOPPED,
    (_S.RUNNING, _E.EXIT): _S.STOPPED,
    (_S.INTERRUPTED, _E.EXIT): _S.STOPPED,
    (_S.UPGRADING, _E.EXIT): _S.STOPPED,
    (_S.STOPPED, _E.EXIT): _S.STOPPED,
}


class StateMachine:
    def __init__(self) -> None:
        self._state = DaemonState.INIT
        self._cond = threading.Condition()

    @property
    def state(self) -> DaemonState:
        with self._cond:
            return self._state

    def can(self, event: DaemonEvent) -> bool:
        with self._cond:
            return (self._state, event) in _TRANSITIONS

    def fire(self, event: DaemonEvent) -> DaemonState:
        with self._cond:
            nxt = _TRANSITIONS.get((self._state, event))
            if nxt is None:
                raise StateError(f"cannot {event.value} in state {self._state.value}")
            self._state = nxt
            self._cond.notify_all()
            return nxt

    def wait_for(self, *states: DaemonState, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._state in states, timeout)
