"""The local IoT rules' SQL: `SELECT *` with AWS IoT's topic(N) fields, the tamper rule, and the
presence rule that commits rotations."""

import pytest

from fleetkey.events import PRESENCE_CONNECTED_RULE_SQL, REGISTRATION_RULE_SQL
from fleetkey_local import rules
from fleetkey_local.rules import (
    RULES,
    TAMPER_RULE_SQL,
    Rule,
    RulesEngine,
    Select,
    TopicField,
    parse_sql,
    topic_filter_of,
)

TAMPER_TOPIC = "fleetkey/sensor-0042/events/tamper"


class Recorder:
    def __init__(self) -> None:
        self.events: list[dict] = []

    def __call__(self, event, context):
        self.events.append(event)
        return None


def test_the_tamper_rule_is_the_stacks():
    # Given the SQL the CDK stack and the local stack share (fleetkey.events)
    # Then it selects the topic's second level as device_id, and nothing of the payload
    assert TAMPER_RULE_SQL == "SELECT topic(2) AS device_id FROM 'fleetkey/+/events/tamper'"
    assert parse_sql(TAMPER_RULE_SQL) == Select(
        "fleetkey/+/events/tamper", (TopicField("device_id", 2),), everything=False
    )
    # And the local rules send it to the device_events function
    [tamper] = [rule for rule in RULES if rule.sql == TAMPER_RULE_SQL]
    assert tamper.function == "device_events"
    assert tamper.topic_filter == "fleetkey/+/events/tamper"


def test_a_presence_event_goes_as_is_to_rotation_events():
    # Given the connected-presence rule the CDK stack and the local stack share
    [presence] = [rule for rule in RULES if rule.sql == PRESENCE_CONNECTED_RULE_SQL]
    event = {
        "clientId": "sensor-0042",
        "eventType": "connected",
        "principalIdentifier": "ab" * 32,
        "timestamp": 1,
    }
    # Then AWS IoT's event reaches the rotation_events function unchanged (it commits a pending
    # certificate the device connected with)
    assert presence.function == "rotation_events"
    assert presence.event("$aws/events/presence/connected/sensor-0042", event) == event
    assert not presence.matches("$aws/events/presence/disconnected/sensor-0042")


@pytest.mark.parametrize(
    "sql, expected",
    [
        ("SELECT * FROM 'a/+/b'", Select("a/+/b")),
        (REGISTRATION_RULE_SQL, Select("$aws/events/certificates/registered/+")),
        ("select *, TOPIC(3) as level3 from 'a/#'", Select("a/#", (TopicField("level3", 3),))),
        (
            "SELECT *, topic(1) AS a, topic() AS whole FROM 'x/y'",
            Select("x/y", (TopicField("a", 1), TopicField("whole", None))),
        ),
    ],
)
def test_emulated_sql_is_read(sql, expected):
    assert parse_sql(sql) == expected
    assert topic_filter_of(sql) == expected.topic_filter


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT a FROM 'x'",
        "SELECT topic(2) AS d, a FROM 'x'",  # a payload field without `*`
        "SELECT *, topic(0) AS d FROM 'x'",  # levels start at 1
        "SELECT *, topic(2) FROM 'x'",  # no alias
        "SELECT *, clientid() AS c FROM 'x'",
        "SELECT *, topic(2) AS d FROM 'x' WHERE d = 'y'",
        "SELECT *, topic(2) AS 1d FROM 'x'",
        "SELECT * FROM x",
    ],
)
def test_other_sql_is_refused_when_the_rule_is_defined(sql):
    with pytest.raises(ValueError):
        Rule.select_all("r", sql, "f")


def test_a_rule_must_name_its_sqls_filter():
    with pytest.raises(ValueError):
        Rule("r", "SELECT *, topic(2) AS d FROM 'a/+'", "b/+")


def test_the_tamper_rule_passes_only_the_topics_device_id():
    # Given the tamper rule, and a payload that names another device
    [tamper] = [rule for rule in RULES if rule.sql == TAMPER_RULE_SQL]
    payload = {"reason": "case opened", "device_id": "someone-else"}
    # When a device's message goes through it, Then only the topic's device id reaches the function
    assert tamper.event(TAMPER_TOPIC, payload) == {"device_id": "sensor-0042"}


def test_topic_fields_are_added_to_the_payload_and_replace_a_field_of_their_name():
    # Given a rule that selects the payload and a topic field
    rule = Rule.select_all("r", "SELECT *, topic(2) AS device_id FROM 'fleetkey/+/events/tamper'")
    payload = {"reason": "case opened", "device_id": "someone-else", "nested": {"a": [1]}}

    # When a device's message goes through it
    event = rule.event(TAMPER_TOPIC, payload)

    # Then the event is the payload plus the topic's device id, which wins over the payload's
    assert event == {"reason": "case opened", "device_id": "sensor-0042", "nested": {"a": [1]}}
    # and the payload itself is left alone (each rule's action gets its own copy)
    assert payload["device_id"] == "someone-else"
    event["nested"]["a"].append(2)
    assert payload["nested"] == {"a": [1]}


def test_a_topic_level_past_the_last_is_left_out_and_topic_is_the_whole_topic():
    select = parse_sql("SELECT *, topic(5) AS e, topic() AS t FROM 'a/#'")
    assert select.project("a/b", {"e": 1}) == {"e": 1, "t": "a/b"}


def _engine(*engine_rules):
    return RulesEngine(list(engine_rules), retry_delays=(0, 0))


def test_a_tamper_message_reaches_its_function_beside_a_catch_all_rule_without_one():
    # Given the tamper rule (with a test double) and a catch-all rule on device events that
    # drops what it matches
    handler = Recorder()
    engine = _engine(
        Rule.select_all("tamper", TAMPER_RULE_SQL, handler),
        Rule.select_all("all_events", rules.DEVICE_EVENTS_RULE_SQL, None),
    )
    try:
        # When a device reports tampering, and another event
        matched = engine.dispatch(TAMPER_TOPIC, b'{"reason": "case opened"}')
        other = engine.dispatch("fleetkey/sensor-0042/events/alarm", b'{"level": "high"}')
        assert engine.drain(5)

        # Then both rules match the tamper message, and the tamper function gets it with the
        # device id of its topic; the other event reaches no function
        assert [r.name for r in matched] == ["tamper", "all_events"]
        assert [r.name for r in other] == ["all_events"]
        assert handler.events == [{"device_id": "sensor-0042"}]
        [invocation] = engine.invocations
        assert (invocation.rule, invocation.status) == ("tamper", "succeeded")
        assert invocation.event == {"device_id": "sensor-0042"}
        assert engine.statistics()["dropped_no_function"] == 2
    finally:
        engine.close()


def test_an_empty_payload_gets_the_topic_fields_and_other_non_json_reaches_no_function():
    handler = Recorder()
    plain = Recorder()
    engine = _engine(
        Rule.select_all("tamper", TAMPER_RULE_SQL, handler),
        Rule.select_all("plain", "SELECT * FROM 'fleetkey/+/events/tamper'", plain),
    )
    try:
        engine.dispatch(TAMPER_TOPIC, b"")
        engine.dispatch(TAMPER_TOPIC, b"\x00binary")
        assert engine.drain(5)
        # AWS IoT adds the rule's fields to an empty payload; `SELECT *` alone has no object
        assert handler.events == [{"device_id": "sensor-0042"}]
        assert plain.events == []
        assert engine.statistics()["not_json"] == 2
    finally:
        engine.close()


def test_the_local_rules_keep_one_rule_per_sql():
    # The template test matches the stack's rules to the local ones by their SQL
    sqls = [rule.sql for rule in RULES]
    assert len(sqls) == len(set(sqls))
