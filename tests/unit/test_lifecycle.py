"""The device state machine: every (state, transition) pair against the documented table."""

import itertools

import pytest

from fleetkey.domain.lifecycle import (
    INITIAL_STATE,
    DeviceState,
    Transition,
    allowed_transitions,
    target_state,
)
from fleetkey.errors import Conflict, IllegalTransition

S, T = DeviceState, Transition

# Written out independently of the module's TRANSITIONS table, from the diagram in its docstring,
# so that an accidental edit of the table fails here.
EXPECTED = {
    (S.ALLOWLISTED, T.REGISTER): S.ACTIVE,
    (S.ACTIVE, T.SUSPEND): S.SUSPENDED,
    (S.SUSPENDED, T.RESUME): S.ACTIVE,
    (S.ALLOWLISTED, T.DECOMMISSION): S.DECOMMISSIONED,
    (S.ACTIVE, T.DECOMMISSION): S.DECOMMISSIONED,
    (S.SUSPENDED, T.DECOMMISSION): S.DECOMMISSIONED,
    (S.DECOMMISSIONED, T.RECOMMISSION): S.ALLOWLISTED,
}
ALL_PAIRS = list(itertools.product(DeviceState, Transition))
ILLEGAL = [pair for pair in ALL_PAIRS if pair not in EXPECTED]


def _id(pair):
    return f"{pair[0].value}-{pair[1].value}"


def test_table_covers_every_pair():
    # Given / When: the allowed and the illegal pairs
    # Then: together they are the whole state x transition product, with no overlap
    assert len(EXPECTED) + len(ILLEGAL) == len(DeviceState) * len(Transition) == 20


@pytest.mark.parametrize("pair", list(EXPECTED), ids=_id)
def test_allowed_transition_leads_to_its_target(pair):
    # Given a state and a transition the table allows from it
    state, transition = pair

    # When the transition is applied
    result = target_state(state, transition)

    # Then the device ends in the documented state
    assert result is EXPECTED[pair]


@pytest.mark.parametrize("pair", ILLEGAL, ids=_id)
def test_any_other_transition_is_illegal(pair):
    # Given a state and a transition the table does not allow from it
    state, transition = pair

    # When the transition is applied
    with pytest.raises(IllegalTransition) as caught:
        target_state(state, transition)

    # Then it is refused as a conflict that names the state and the transition
    assert isinstance(caught.value, Conflict)
    assert caught.value.code == "illegal_transition"
    assert caught.value.status == 409
    assert caught.value.details == {"state": state.value, "transition": transition.value}


@pytest.mark.parametrize("state", list(DeviceState), ids=lambda s: s.value)
def test_allowed_transitions_lists_exactly_the_legal_ones(state):
    # Given a state
    # When its allowed transitions are listed
    allowed = allowed_transitions(state)

    # Then they are exactly the table's transitions from that state, each listed once
    assert sorted(allowed) == sorted(t for (s, t) in EXPECTED if s is state)
    assert len(allowed) == len(set(allowed))


def test_allowed_transitions_per_state():
    # Given / When / Then: the concrete lists, as the admin API shows them
    assert set(allowed_transitions(S.ALLOWLISTED)) == {T.REGISTER, T.DECOMMISSION}
    assert set(allowed_transitions(S.ACTIVE)) == {T.SUSPEND, T.DECOMMISSION}
    assert set(allowed_transitions(S.SUSPENDED)) == {T.RESUME, T.DECOMMISSION}
    assert set(allowed_transitions(S.DECOMMISSIONED)) == {T.RECOMMISSION}


def test_initial_state_is_allowlisted():
    # Given / When: a device is created
    # Then it starts ALLOWLISTED, from where only registration or decommissioning is possible
    assert INITIAL_STATE is S.ALLOWLISTED


def test_every_state_is_reachable_from_the_initial_state():
    # Given the initial state
    reached, frontier = {INITIAL_STATE}, [INITIAL_STATE]

    # When every allowed transition is followed
    while frontier:
        state = frontier.pop()
        for transition in allowed_transitions(state):
            nxt = target_state(state, transition)
            if nxt not in reached:
                reached.add(nxt)
                frontier.append(nxt)

    # Then no state is unreachable (and none is a dead end, see the per-state lists)
    assert reached == set(DeviceState)


def test_states_and_transitions_accept_their_string_values():
    # Given values as stored in DynamoDB / sent by the API
    # When they are turned back into enums
    # Then they round-trip (the store relies on the str values being stable)
    assert DeviceState("SUSPENDED") is S.SUSPENDED
    assert Transition("recommission") is T.RECOMMISSION
    assert [s.value for s in DeviceState] == [
        "ALLOWLISTED",
        "ACTIVE",
        "SUSPENDED",
        "DECOMMISSIONED",
    ]
