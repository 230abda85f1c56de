"""The device lifecycle: one state machine, one transition table.

    ALLOWLISTED --register--> ACTIVE --decommission--> DECOMMISSIONED --recommission--> ALLOWLISTED
                                |  ^
                        suspend v  | resume
                             SUSPENDED

A device comes into existence ALLOWLISTED (operator add or manifest import). Every transition is
applied by the store as a conditional write on the current state, together with its audit record.
"""

from __future__ import annotations

from enum import StrEnum

from fleetkey.errors import IllegalTransition


class DeviceState(StrEnum):
    ALLOWLISTED = "ALLOWLISTED"
    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    DECOMMISSIONED = "DECOMMISSIONED"


class Transition(StrEnum):
    REGISTER = "register"
    SUSPEND = "suspend"
    RESUME = "resume"
    DECOMMISSION = "decommission"
    RECOMMISSION = "recommission"


# transition -> (states it may start from, state it ends in)
TRANSITIONS: dict[Transition, tuple[frozenset[DeviceState], DeviceState]] = {
    Transition.REGISTER: (frozenset({DeviceState.ALLOWLISTED}), DeviceState.ACTIVE),
    Transition.SUSPEND: (frozenset({DeviceState.ACTIVE}), DeviceState.SUSPENDED),
    Transition.RESUME: (frozenset({DeviceState.SUSPENDED}), DeviceState.ACTIVE),
    Transition.DECOMMISSION: (
        frozenset({DeviceState.ALLOWLISTED, DeviceState.ACTIVE, DeviceState.SUSPENDED}),
        DeviceState.DECOMMISSIONED,
    ),
    Transition.RECOMMISSION: (frozenset({DeviceState.DECOMMISSIONED}), DeviceState.ALLOWLISTED),
}

# The state a device is created in; creation is not a transition of an existing device.
INITIAL_STATE = DeviceState.ALLOWLISTED


def target_state(current: DeviceState, transition: Transition) -> DeviceState:
    """Return the state `transition` leads to from `current`.

    Raises:
        IllegalTransition: the table has no such transition from `current`.
    """
    sources, target = TRANSITIONS[transition]
    if current not in sources:
        raise IllegalTransition(
            f"cannot {transition.value} a device that is {current.value}",
            details={"state": current.value, "transition": transition.value},
        )
    return target


def allowed_transitions(current: DeviceState) -> list[Transition]:
    return [t for t, (sources, _) in TRANSITIONS.items() if current in sources]
