"""AWS IoT Core policy evaluation, for the local IoT Core emulator (and for tests of the policies
fleetkey attaches).

What is evaluated, as AWS IoT does it:

- documents: a dict or its JSON text; `Statement` one object or a list; `Effect` Allow or Deny;
  `Action`/`NotAction` and `Resource`/`NotResource` a string or a list. Actions match without
  regard to case (`iot:*`, `iot:Pub*`); resources match case-sensitively. `*` matches any run of
  characters (including `/`), `?` one character; MQTT's `+` and `#` are ordinary characters in a
  resource (so the subscription filter `fleetkey/+/commands/#` is the resource
  `topicfilter/fleetkey/+/commands/#`, which `topicfilter/fleetkey/pump-1/commands/*` does not
  match).
- policy variables (documents of Version 2012-10-17 only, as in IAM): `${iot:ClientId}`,
  `${iot:Connection.Thing.ThingName}`, `${iot:Connection.Thing.ThingTypeName}`,
  `${iot:Connection.Thing.Attributes[name]}`, `${iot:Connection.Thing.IsAttached}`, and the
  escapes `${*}`, `${?}`, `${$}`. A substituted value is a literal (a client id `*` is not a
  wildcard). A variable without a value (no thing attached, unknown variable) makes the pattern
  match nothing.
- conditions: String(Not)Equals(IgnoreCase), String(Not)Like, Bool, Null, and the `...IfExists`
  forms, on the keys above (`iot:Connection.Thing.IsAttached` etc.). Several values of one key are
  alternatives; several keys or operators must all hold. Anything else raises `PolicyError`
  (the emulator then denies): a policy the evaluator does not understand is never read as allow.
- decision: an explicit Deny in any statement of any policy wins; otherwise any Allow allows;
  otherwise denied by default.

Resources: `arn:aws:iot:<region>:<account>:client/<clientId>` (iot:Connect),
`topic/<topic>` (iot:Publish, iot:Receive), `topicfilter/<filter>` (iot:Subscribe).

Not evaluated: policies attached to thing groups, `iot:Certificate.*` and `aws:*` keys (they have
no value, so patterns using them match nothing and conditions on them are false), ForAnyValue /
ForAllValues, numeric, date and IP condition operators (PolicyError).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

VARIABLES_VERSION = "2012-10-17"
_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_ATTRIBUTE = re.compile(r"^iot:Connection\.Thing\.Attributes\[(.+)\]$")
_ESCAPES = {"*": "*", "?": "?", "$": "$"}


class PolicyError(ValueError):
    """A policy document (or a part of it) this evaluator does not understand."""


def arn_prefix(region: str, account: str, partition: str = "aws") -> str:
    return f"arn:{partition}:iot:{region}:{account}"


def client_resource(prefix: str, client_id: str) -> str:
    return f"{prefix}:client/{client_id}"


def topic_resource(prefix: str, topic: str) -> str:
    return f"{prefix}:topic/{topic}"


def topic_filter_resource(prefix: str, topic_filter: str) -> str:
    return f"{prefix}:topicfilter/{topic_filter}"


@dataclass(frozen=True)
class ConnectionContext:
    """What AWS IoT knows about an MQTT connection when it evaluates a policy.

    `thing_name` is set only when the connection's certificate is attached to the thing whose
    name is the client id (that is when AWS IoT resolves the thing variables); `is_attached`
    follows from it.
    """

    client_id: str
    thing_name: str | None = None
    thing_type_name: str | None = None
    thing_attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_attached(self) -> bool:
        return self.thing_name is not None

    def value(self, key: str) -> str | None:
        """The value of a policy variable or condition key, or None when it has none."""
        if key == "iot:ClientId":
            return self.client_id
        if key == "iot:Connection.Thing.IsAttached":
            return "true" if self.is_attached else "false"
        if not self.is_attached:
            return None
        if key == "iot:Connection.Thing.ThingName":
            return self.thing_name
        if key == "iot:Connection.Thing.ThingTypeName":
            return self.thing_type_name
        match = _ATTRIBUTE.match(key)
        if match:
            return self.thing_attributes.get(match.group(1))
        return None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    # "allowed", "explicit_deny" or "implicit_deny"
    reason: str
    statement: Mapping[str, Any] | None = None

    def __bool__(self) -> bool:
        return self.allowed


# ---- patterns --------------------------------------------------------------------------------


def _pattern_regex(pattern: str, context: ConnectionContext | None, variables: bool) -> str | None:
    """The regular expression for a policy pattern with its variables substituted (as literals),
    or None when a variable has no value."""
    parts: list[str] = []
    position = 0
    for match in _VARIABLE.finditer(pattern) if variables else ():
        parts.append(_glob_regex(pattern[position : match.start()]))
        name = match.group(1)
        if name in _ESCAPES:
            value = _ESCAPES[name]
        else:
            value = context.value(name) if context is not None else None
        if value is None:
            return None
        parts.append(re.escape(value))
        position = match.end()
    parts.append(_glob_regex(pattern[position:]))
    return "".join(parts)


@lru_cache(maxsize=4096)
def _glob_regex(text: str) -> str:
    return "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in text)


@lru_cache(maxsize=8192)
def _compiled(regex: str, ignore_case: bool) -> re.Pattern:
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _matches(
    pattern: str,
    value: str,
    context: ConnectionContext | None,
    variables: bool,
    ignore_case: bool = False,
) -> bool:
    regex = _pattern_regex(pattern, context, variables)
    return regex is not None and _compiled(regex, ignore_case).fullmatch(value) is not None


def _as_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise PolicyError(f"{what} must be a string or a list of strings")


# ---- conditions ------------------------------------------------------------------------------


def _string_values(values: Any, key: str) -> list[str]:
    if isinstance(values, (str, bool, int, float)):
        values = [values]
    if not isinstance(values, list):
        raise PolicyError(f"condition values of {key} must be a string or a list")
    return [str(v).lower() if isinstance(v, bool) else str(v) for v in values]


def _substitute(value: str, context: ConnectionContext, variables: bool) -> str | None:
    if not variables:
        return value
    out: list[str] = []
    position = 0
    for match in _VARIABLE.finditer(value):
        out.append(value[position : match.start()])
        name = match.group(1)
        resolved = _ESCAPES.get(name) if name in _ESCAPES else context.value(name)
        if resolved is None:
            return None
        out.append(resolved)
        position = match.end()
    out.append(value[position:])
    return "".join(out)


_OPERATORS = frozenset(
    {
        "StringEquals",
        "StringNotEquals",
        "StringEqualsIgnoreCase",
        "StringNotEqualsIgnoreCase",
        "StringLike",
        "StringNotLike",
        "Bool",
        "Null",
    }
)


def _condition_holds(
    operator: str, key: str, values: Any, context: ConnectionContext, variables: bool
) -> bool:
    if operator.startswith(("ForAnyValue:", "ForAllValues:")):
        raise PolicyError(f"condition set operator not supported: {operator}")
    if_exists = operator.endswith("IfExists")
    base = operator[: -len("IfExists")] if if_exists else operator
    if base not in _OPERATORS:
        raise PolicyError(f"condition operator not supported: {operator}")
    actual = context.value(key)
    expected = _string_values(values, key)
    if base == "Null":
        # Null: "true" holds when the key is absent, "false" when present.
        return any((actual is None) == (v.lower() == "true") for v in expected)
    if actual is None:
        return if_exists
    negated = base in {"StringNotEquals", "StringNotEqualsIgnoreCase", "StringNotLike"}
    if base in {"StringEquals", "StringNotEquals"}:
        hit = any(_substitute(v, context, variables) == actual for v in expected)
    elif base in {"StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"}:
        hit = any(
            (s := _substitute(v, context, variables)) is not None and s.lower() == actual.lower()
            for v in expected
        )
    elif base in {"StringLike", "StringNotLike"}:
        hit = any(_matches(v, actual, context, variables) for v in expected)
    else:  # Bool
        hit = any(v.lower() == actual.lower() for v in expected)
    return not hit if negated else hit


def _conditions_hold(conditions: Any, context: ConnectionContext, variables: bool) -> bool:
    if conditions is None:
        return True
    if not isinstance(conditions, Mapping):
        raise PolicyError("Condition must be an object")
    for operator, clauses in conditions.items():
        if not isinstance(clauses, Mapping):
            raise PolicyError(f"Condition {operator} must be an object")
        for key, values in clauses.items():
            if not _condition_holds(operator, key, values, context, variables):
                return False
    return True


# ---- statements and documents ----------------------------------------------------------------


def parse_document(document: Mapping[str, Any] | str) -> Mapping[str, Any]:
    if isinstance(document, str):
        try:
            document = json.loads(document)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"policy document is not JSON: {exc}") from None
    if not isinstance(document, Mapping):
        raise PolicyError("policy document must be a JSON object")
    return document


def _statements(document: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    statements = document.get("Statement")
    if isinstance(statements, Mapping):
        return [statements]
    if isinstance(statements, list) and all(isinstance(s, Mapping) for s in statements):
        return statements
    raise PolicyError("Statement must be an object or a list of objects")


def _statement_applies(
    statement: Mapping[str, Any],
    action: str,
    resource: str,
    context: ConnectionContext,
    variables: bool,
) -> bool:
    if "Action" in statement:
        actions = _as_list(statement["Action"], "Action")
        if not any(_matches(a, action, None, False, ignore_case=True) for a in actions):
            return False
    elif "NotAction" in statement:
        actions = _as_list(statement["NotAction"], "NotAction")
        if any(_matches(a, action, None, False, ignore_case=True) for a in actions):
            return False
    else:
        raise PolicyError("a statement needs Action or NotAction")
    if "Resource" in statement:
        resources = _as_list(statement["Resource"], "Resource")
        if not any(_matches(r, resource, context, variables) for r in resources):
            return False
    elif "NotResource" in statement:
        resources = _as_list(statement["NotResource"], "NotResource")
        if any(_matches(r, resource, context, variables) for r in resources):
            return False
    else:
        raise PolicyError("a statement needs Resource or NotResource")
    return _conditions_hold(statement.get("Condition"), context, variables)


def evaluate(
    policies: Iterable[Mapping[str, Any] | str],
    action: str,
    resource: str,
    context: ConnectionContext,
) -> Decision:
    """AWS IoT's decision on `action` on `resource` for a connection with these policies."""
    allow: Mapping[str, Any] | None = None
    for document in policies:
        parsed = parse_document(document)
        variables = parsed.get("Version") == VARIABLES_VERSION
        for statement in _statements(parsed):
            effect = statement.get("Effect")
            if effect not in ("Allow", "Deny"):
                raise PolicyError(f"Effect must be Allow or Deny, not {effect!r}")
            if not _statement_applies(statement, action, resource, context, variables):
                continue
            if effect == "Deny":
                return Decision(False, "explicit_deny", statement)
            allow = allow or statement
    if allow is not None:
        return Decision(True, "allowed", allow)
    return Decision(False, "implicit_deny", None)


def is_allowed(
    policies: Iterable[Mapping[str, Any] | str],
    action: str,
    resource: str,
    context: ConnectionContext,
) -> bool:
    return evaluate(policies, action, resource, context).allowed
