"""IAM derived from the code: the evaluator of tests/support/aws_calls.py, on small policies (it
must catch a missing grant) and on the synthesized roles (what they refuse matters as much as
what they allow)."""

from __future__ import annotations

from typing import Any

import pytest

from fleetkey_infra import constants
from tests.support.aws_calls import (
    ACCOUNT,
    REGION,
    Decision,
    KeyFacts,
    RecordedCall,
    Request,
    decide,
    evaluate,
    function_roles,
    key_context,
    role_policy,
    to_requests,
)

THING = f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/pump-1"
CERT = f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/abc"
TABLE = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/<table>"
KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234"
OWN_TAGS = {"fleetkey:purpose": "token-signing:<stack>"}


def template_with(function: str, statements: list[dict[str, Any]]) -> dict[str, Any]:
    """The smallest template the evaluator reads: one function, its role, one policy."""
    return {
        "Resources": {
            "Fn": {
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "Environment": {
                        "Variables": {"POWERTOOLS_SERVICE_NAME": f"fleetkey-{function}"}
                    },
                    "Role": {"Fn::GetAtt": ["Role", "Arn"]},
                },
            },
            "Role": {"Type": "AWS::IAM::Role", "Properties": {}},
            "Policy": {
                "Type": "AWS::IAM::Policy",
                "Properties": {
                    "Roles": [{"Ref": "Role"}],
                    "PolicyDocument": {"Version": "2012-10-17", "Statement": statements},
                },
            },
        }
    }


def recorded(function: str, *requests: Request) -> list[RecordedCall]:
    return [RecordedCall(function, "test.Op", r, "test_x") for r in requests]


def take_over_requests() -> list[Request]:
    """What the registration function's thing take-over asks of IAM (through the recorder)."""
    requests = to_requests("iot", "ListThingPrincipals", {"thingName": "pump-1"})
    requests += to_requests(
        "iot", "DetachThingPrincipal", {"thingName": "pump-1", "principal": CERT}
    )
    requests += to_requests("iot", "CreateThing", {"thingName": "pump-1"})
    return requests


# The registration role as it was before issue 7: no ListThingPrincipals, no Detach.
TODAYS_REGISTRATION_GRANTS = [
    {
        "Effect": "Allow",
        "Action": ["iot:CreateThing", "iot:UpdateThing"],
        "Resource": THING[:-6] + "*",
    },
    {
        "Effect": "Allow",
        "Action": "iot:AttachThingPrincipal",
        "Resource": [THING[:-6] + "*", CERT[:-3] + "*"],
    },
]


def test_the_evaluator_catches_the_take_over_calls_the_old_registration_role_lacked() -> None:
    # Given the registration role before the fix, and the take-over's recorded calls
    template = template_with("registration", TODAYS_REGISTRATION_GRANTS)

    # When the evaluator checks them
    report = evaluate(template, recorded("registration", *take_over_requests()), stack_name="S")

    # Then both missing grants fail the check, each named
    assert not report.ok
    denied = [p for p in report.problems if "does not allow" in p]
    assert any("iot:ListThingPrincipals" in p for p in denied), report.problems
    assert any("iot:DetachThingPrincipal" in p for p in denied), report.problems


def test_the_evaluator_fails_a_function_without_recorded_calls() -> None:
    # Given a role and no recorded call of its function
    template = template_with("token", [{"Effect": "Allow", "Action": "kms:Sign", "Resource": KEY}])

    # When the evaluator runs
    report = evaluate(template, [], stack_name="S")

    # Then the check fails instead of proving nothing
    assert [p for p in report.problems if "no AWS call recorded" in p]


def test_the_evaluator_fails_a_grant_the_function_never_uses() -> None:
    # Given a role granting Sign and Decrypt, and a function that only signs
    grants = [
        {"Effect": "Allow", "Action": ["kms:Sign", "kms:ScheduleKeyDeletion"], "Resource": "*"}
    ]
    sign = Request("kms:Sign", KEY)

    # When the evaluator runs
    report = evaluate(template_with("token", grants), recorded("token", sign), stack_name="S")

    # Then the unused grant is a problem (Decrypt-like grants are reviewed, this one is not)
    assert report.problems == [
        "token: granted but never called: kms:ScheduleKeyDeletion (remove the grant, exercise "
        "the path in a test, or review it into UNCALLED_GRANTS)"
    ]


def test_an_unmodeled_operation_fails_the_check() -> None:
    # Given a call the recorder could not translate into IAM requests
    template = template_with("token", [{"Effect": "Allow", "Action": "kms:Sign", "Resource": "*"}])

    # When the evaluator runs
    report = evaluate(
        template,
        recorded("token", Request("kms:Sign", KEY)),
        stack_name="S",
        unmapped=[("token", "s3.PutObject", "test_y")],
    )

    # Then it is a problem, not silently ignored
    assert report.problems == [
        "token: s3.PutObject is not modeled by tests/support/aws_calls.py (in test_y)"
    ]


def test_transact_write_items_is_one_request_per_item() -> None:
    # Given a transaction of a Put, a Delete, an Update and a ConditionCheck
    items = [
        {"Put": {"TableName": "t", "Item": {"pk": {"S": "JTI#d#1"}}}},
        {"Delete": {"TableName": "t", "Key": {"pk": {"S": "NONCE#n"}}}},
        {"Update": {"TableName": "t", "Key": {"pk": {"S": "DEVICE#d"}}}},
        {"ConditionCheck": {"TableName": "t", "Key": {"pk": {"S": "CA"}}}},
    ]

    # When it is translated
    requests = to_requests(
        "dynamodb", "TransactWriteItems", {"TransactItems": items}, table_name="t"
    )

    # Then each item is authorized by its own action, on the table, with its partition key
    assert [(r.action, r.resource, r.context["dynamodb:leadingkeys"]) for r in requests] == [
        ("dynamodb:PutItem", TABLE, ("JTI#d#1",)),
        ("dynamodb:DeleteItem", TABLE, ("NONCE#n",)),
        ("dynamodb:UpdateItem", TABLE, ("DEVICE#d",)),
        ("dynamodb:ConditionCheckItem", TABLE, ("CA",)),
    ]


def test_iot_requests_follow_the_service_authorization_reference() -> None:
    # Given the IoT calls of registration
    attach = to_requests("iot", "AttachPolicy", {"policyName": "p", "target": CERT})
    principal = to_requests(
        "iot", "AttachThingPrincipal", {"thingName": "pump-1", "principal": CERT}
    )

    # Then AttachPolicy is authorized on its target, AttachThingPrincipal on the certificate
    # with the thing as iot:thingArn
    assert [(r.action, r.resource) for r in attach] == [("iot:AttachPolicy", CERT)]
    assert [(r.action, r.resource, dict(r.context)) for r in principal] == [
        ("iot:AttachThingPrincipal", CERT, {"iot:thingarn": (THING,)})
    ]


def test_create_key_with_tags_also_asks_for_tag_resource() -> None:
    # Given a CreateKey with this stack's tag
    params = {
        "KeySpec": "ECC_NIST_P256",
        "KeyUsage": "SIGN_VERIFY",
        "Tags": [{"TagKey": "fleetkey:purpose", "TagValue": "token-signing:local"}],
    }

    # When it is translated
    create, tag = to_requests("kms", "CreateKey", params, stack_name="local")

    # Then KMS's TagResource requirement is a request too, with the request's tag and shape
    assert (create.action, tag.action) == ("kms:CreateKey", "kms:TagResource")
    assert tag.context["aws:requesttag/fleetkey:purpose"] == ("token-signing:<stack>",)
    assert tag.context["kms:keyspec"] == ("ECC_NIST_P256",)


def test_conditions_the_recorder_cannot_know_are_not_guessed() -> None:
    # Given a grant conditioned on the caller's address
    grants = [
        {
            "Effect": "Allow",
            "Action": "kms:Sign",
            "Resource": "*",
            "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
        }
    ]

    # When deciding a Sign
    # Then the answer is "not evaluable", neither allowed nor denied
    assert decide(grants, Request("kms:Sign", KEY)) is Decision.UNEVALUATED


# ---- the synthesized roles ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def roles(synthesized: Any) -> dict[str, list[dict[str, Any]]]:
    template = synthesized.template_json
    return {
        name: role_policy(template, role_id, constants.STACK_ID)
        for name, role_id in function_roles(template).items()
    }


def item(action: str, partition: str) -> Request:
    return Request(
        f"dynamodb:{action}",
        TABLE,
        {"dynamodb:leadingkeys": (partition,)},
        frozenset({"dynamodb:leadingkeys"}),
    )


@pytest.mark.parametrize(
    ("action", "partition", "decision"),
    [
        ("PutItem", "JTI#pump-1#j1", Decision.ALLOWED),
        ("PutItem", "NONCE#n1", Decision.ALLOWED),
        ("DeleteItem", "NONCE#n1", Decision.ALLOWED),
        ("GetItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("PutItem", "DEVICE#pump-1", Decision.DENIED),
        ("PutItem", "STREAM#signing-keys", Decision.DENIED),
        ("DeleteItem", "REVOKED#j1", Decision.DENIED),
        ("UpdateItem", "DEVICE#pump-1", Decision.DENIED),
    ],
)
def test_the_token_role_writes_only_its_own_items(
    roles: dict[str, list[dict[str, Any]]], action: str, partition: str, decision: Decision
) -> None:
    # Given the internet-facing token function's role
    # When it would touch an item of the table
    # Then only its own partitions (assertions, challenges) are writable
    assert decide(roles["token"], item(action, partition)) is decision


def key_request(action: str, facts: KeyFacts, **request_tags: str) -> Request:
    context = key_context(facts, constants.STACK_ID)
    modeled = {"aws:resourcetag/", "kms:keyspec", "kms:keyusage"}
    if request_tags:
        context.update({f"aws:requesttag/{k}": (v,) for k, v in request_tags.items()})
        context["aws:tagkeys"] = tuple(request_tags)
        modeled |= {"aws:requesttag/", "aws:tagkeys"}
    return Request(action, KEY, context, frozenset(modeled))


TABLE_KEY = KeyFacts({}, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
OWN_SIGNING_KEY = KeyFacts(
    {"fleetkey:purpose": f"token-signing:{constants.STACK_ID}"}, "ECC_NIST_P256", "SIGN_VERIFY"
)
OTHER_STACKS_KEY = KeyFacts(
    {"fleetkey:purpose": "token-signing:OtherStack"}, "ECC_NIST_P256", "SIGN_VERIFY"
)
# Tagged like this stack's keys, but not a P-256 signing key (someone tagged a symmetric key).
TAGGED_SYMMETRIC_KEY = KeyFacts(OWN_SIGNING_KEY.tags, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT")
OWN_TAG = {"fleetkey:purpose": "token-signing:<stack>"}
# Untagged, P-256 signing: what CreateKey makes before its tags apply (and, see infra/README.md,
# any such key of the account: the one shape the admin role may still tag).
NEW_SIGNING_KEY = KeyFacts({}, "ECC_NIST_P256", "SIGN_VERIFY")


@pytest.mark.parametrize("function", ["admin", "maintenance"])
@pytest.mark.parametrize(
    ("facts", "decision"),
    [
        (OWN_SIGNING_KEY, Decision.ALLOWED),
        (TABLE_KEY, Decision.DENIED),
        (OTHER_STACKS_KEY, Decision.DENIED),
        (TAGGED_SYMMETRIC_KEY, Decision.DENIED),
    ],
)
def test_key_deletion_reaches_this_stacks_signing_keys_only(
    roles: dict[str, list[dict[str, Any]]], function: str, facts: KeyFacts, decision: Decision
) -> None:
    # Given a role that retires signing keys, and a key of some kind
    # When it would schedule the key's deletion
    # Then only a P-256 signing key tagged for this stack is within reach
    assert decide(roles[function], key_request("kms:ScheduleKeyDeletion", facts)) is decision


@pytest.mark.parametrize(
    ("facts", "decision"),
    [
        (OWN_SIGNING_KEY, Decision.ALLOWED),
        (NEW_SIGNING_KEY, Decision.ALLOWED),  # the key rotation is creating
        (TABLE_KEY, Decision.DENIED),
        (TAGGED_SYMMETRIC_KEY, Decision.DENIED),
        (OTHER_STACKS_KEY, Decision.DENIED),
    ],
)
def test_admin_tags_only_p256_signing_keys_with_this_stacks_tag(
    roles: dict[str, list[dict[str, Any]]], facts: KeyFacts, decision: Decision
) -> None:
    # Given the admin role
    # When it would tag a key as this stack's signing key
    request = key_request("kms:TagResource", facts, **OWN_TAG)
    # Then never the table's key (nor any symmetric key), nor another stack's signing key
    assert decide(roles["admin"], request) is decision


@pytest.mark.parametrize(
    "function", ["registration", "admin", "token", "discovery", "introspect", "maintenance"]
)
@pytest.mark.parametrize("action", ["kms:DisableKey", "kms:PutKeyPolicy", "kms:UntagResource"])
def test_no_role_may_disable_repermission_or_untag_a_key(
    roles: dict[str, list[dict[str, Any]]], function: str, action: str
) -> None:
    # Given any function's role and this stack's own signing key
    # When it would disable the key, change its policy or remove its tag
    # Then it may not
    assert decide(roles[function], key_request(action, OWN_SIGNING_KEY)) is Decision.DENIED


def test_the_registration_role_allows_the_take_over(roles: dict[str, list[dict[str, Any]]]) -> None:
    # Given the registration role and the take-over's requests
    # When deciding each
    # Then all are allowed (the defect of issue 7, fixed)
    for request in take_over_requests():
        assert decide(roles["registration"], request) is Decision.ALLOWED, request
