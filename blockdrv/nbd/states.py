"""The driver's connection states and the events that move between them, as data.

===================  ============================  =========================================
state                event                         next state
===================  ============================  =========================================
CONNECTED            transport-failure             CONNECTING_WAIT if reconnect_delay > 0,
                                                   else CONNECTING_NOWAIT
CONNECTING_WAIT      delay-expired                 CONNECTING_NOWAIT
CONNECTING_WAIT      cancel-in-flight              CONNECTING_NOWAIT
CONNECTING_WAIT      connected                     CONNECTED
CONNECTING_NOWAIT    connected                     CONNECTED
any                  protocol-violation            QUIT
any                  close                         QUIT
===================  ============================  =========================================

Every other (state, event) pair leaves the state as it is (a second transport failure
while already reconnecting, a late timer after the connection came back, ...).  QUIT is
final: nothing leaves it.  The names are qemu's (block/nbd.c, NBDClientState).
"""

from __future__ import annotations

import enum


class State(enum.Enum):
    CONNECTED = "connected"
    CONNECTING_WAIT = "connecting-wait"
    CONNECTING_NOWAIT = "connecting-nowait"
    QUIT = "quit"

    @property
    def connecting(self) -> bool:
        """True in the states where the connection worker is reconnecting."""
        return self in (State.CONNECTING_WAIT, State.CONNECTING_NOWAIT)


class Event(enum.Enum):
    TRANSPORT_FAILURE = "transport-failure"
    DELAY_EXPIRED = "delay-expired"
    CANCEL_IN_FLIGHT = "cancel-in-flight"
    CONNECTED = "connected"
    PROTOCOL_VIOLATION = "protocol-violation"
    CLOSE = "close"


# (state, event) -> next state; ``None`` for "depends on reconnect_delay".
TRANSITIONS: dict[tuple[State, Event], State | None] = {
    (State.CONNECTED, Event.TRANSPORT_FAILURE): None,
    (State.CONNECTING_WAIT, Event.DELAY_EXPIRED): State.CONNECTING_NOWAIT,
    (State.CONNECTING_WAIT, Event.CANCEL_IN_FLIGHT): State.CONNECTING_NOWAIT,
    (State.CONNECTING_WAIT, Event.CONNECTED): State.CONNECTED,
    (State.CONNECTING_NOWAIT, Event.CONNECTED): State.CONNECTED,
}
for _state in (State.CONNECTED, State.CONNECTING_WAIT, State.CONNECTING_NOWAIT):
    TRANSITIONS[(_state, Event.PROTOCOL_VIOLATION)] = State.QUIT
    TRANSITIONS[(_state, Event.CLOSE)] = State.QUIT


def next_state(state: State, event: Event, *, reconnect_delay: float) -> State:
    """The state after ``event`` happens in ``state`` (unchanged if it does not apply)."""
    if (state, event) not in TRANSITIONS:
        return state
    target = TRANSITIONS[(state, event)]
    if target is None:
        return State.CONNECTING_WAIT if reconnect_delay > 0 else State.CONNECTING_NOWAIT
    return target
