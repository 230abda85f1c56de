"""IAM derived from the code: the evaluator of tests/support/aws_calls.py, on small policies (it
must catch a missing grant) and on the synthesized roles (what they refuse matters as much as
what they allow)."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from fleetkey.services.signing_keys import token_key_policy_for
from fleetkey_infra import constants
from tests.support import aws_calls
from tests.support.aws_calls import (
    ACCOUNT,
    DEFAULT_KEY_POLICY,
    REGION,
    Decision,
    KeyFacts,
    RecordedCall,
    Request,
    decide,
    evaluate,
    function_roles,
    key_context,
    role_arn,
    role_policy,
    to_requests,
    verdict,
)

THING = f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/pump-1"
CERT = f"arn:aws:iot:{REGION}:{ACCOUNT}:cert/abc"
TABLE = f"arn:aws:dynamodb:{REGION}:{ACCOUNT}:table/<table>"
KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234"
OWN_TAGS = {"fleetkey:purpose": "token-signing:<stack>"}
# The policy fleetkey writes on its signing keys, naming the functions' roles as the evaluator
# resolves them from the template (aws_calls.role_arn).
FLEETKEY_KEY_POLICY = json.dumps(
    token_key_policy_for(role_arn("token"), [role_arn("admin"), role_arn("maintenance")])
)
# A key of the account governed by IAM alone (KMS's default policy).
SIGN = Request("kms:Sign", KEY, key_policy=DEFAULT_KEY_POLICY)


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
    sign = SIGN

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
        recorded("token", SIGN),
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
    found = verdict(grants, SIGN, role_arn("token"))
    assert (found.decision, found.unknown) == (Decision.UNEVALUATED, {"aws:sourceip"})


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
        ("DeleteItem", "JTI#pump-1#j1", Decision.DENIED),  # a recorded jti stays
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


@pytest.mark.parametrize(
    ("action", "partition", "decision"),
    [
        ("PutItem", "DATAKEY#pump-1", Decision.ALLOWED),
        ("PutItem", "JTI#pump-1#j1", Decision.ALLOWED),
        ("DeleteItem", "NONCE#n1", Decision.ALLOWED),
        ("ConditionCheckItem", "DEVICE#pump-1", Decision.ALLOWED),
        # the data_key_created record in the device's chain (IAM cannot tell the device item
        # from its audit records: the writes are conditional on the device as read)
        ("PutItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("UpdateItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("GetItem", "CERT#abc", Decision.ALLOWED),
        ("PutItem", "CERT#abc", Decision.DENIED),
        ("PutItem", "NONCE#n1", Decision.DENIED),
        ("PutItem", "STREAM#signing-keys", Decision.DENIED),
        ("UpdateItem", "DATAKEY#pump-1", Decision.DENIED),
        ("DeleteItem", "DATAKEY#pump-1", Decision.DENIED),
        ("DeleteItem", "JTI#pump-1#j1", Decision.DENIED),
    ],
)
def test_the_data_keys_role_writes_only_its_own_items(
    roles: dict[str, list[dict[str, Any]]], action: str, partition: str, decision: Decision
) -> None:
    # Given the internet-facing data_keys function's role
    # When it would touch an item of the table
    # Then it writes only assertions' jtis (consuming challenges), data keys and the device's
    # chain, and deletes no data key
    assert decide(roles["data_keys"], item(action, partition)) is decision


@pytest.mark.parametrize(
    ("function", "action", "partition", "decision"),
    [
        ("converge", "DeleteItem", "DATAKEY#pump-1", Decision.ALLOWED),
        ("converge", "Query", "DATAKEY#pump-1", Decision.ALLOWED),
        ("converge", "DeleteItem", "DEVICE#pump-1", Decision.DENIED),
        ("converge", "DeleteItem", "JTI#pump-1#j1", Decision.DENIED),
        ("converge", "Query", "DEVICE#pump-1", Decision.DENIED),
        ("converge", "UpdateItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("converge", "PutItem", "CERT#abc", Decision.DENIED),
        ("device_events", "UpdateItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("device_events", "PutItem", "DEVICE#pump-1", Decision.ALLOWED),
        ("device_events", "PutItem", "CERT#abc", Decision.DENIED),
        ("device_events", "DeleteItem", "DATAKEY#pump-1", Decision.DENIED),
    ],
)
def test_the_lifecycle_roles_write_only_devices_and_converge_deletes_only_data_keys(
    roles: dict[str, list[dict[str, Any]]],
    function: str,
    action: str,
    partition: str,
    decision: Decision,
) -> None:
    # Given a lifecycle role
    # When it would touch an item, Then it writes only devices' partitions (the device item and
    # its audit chain), and converge alone lists and deletes data keys (the device keeps its
    # record and audit trail)
    assert decide(roles[function], item(action, partition)) is decision


@pytest.mark.parametrize(
    ("function", "action", "resource", "decision"),
    [
        ("converge", "iot:Publish", "topic/fleetkey/pump-1/commands/reset", Decision.ALLOWED),
        ("converge", "iot:Publish", "topic/fleetkey/pump-1/commands/rotate", Decision.DENIED),
        ("converge", "iot:Publish", "topic/other/pump-1/commands/reset", Decision.DENIED),
        ("converge", "iot:DeleteCertificate", "cert/abc", Decision.ALLOWED),
        ("converge", "iot:DeleteThing", "thing/pump-1", Decision.ALLOWED),
        ("converge", "iot:DeleteConnection", "client/pump-1", Decision.ALLOWED),
        ("device_events", "iot:UpdateCertificate", "cert/abc", Decision.ALLOWED),
        ("device_events", "iot:DeleteCertificate", "cert/abc", Decision.DENIED),
        ("device_events", "iot:DeleteConnection", "client/pump-1", Decision.ALLOWED),
        ("admin", "iot:UpdateCertificate", "cert/abc", Decision.ALLOWED),
        ("admin", "iot:DeleteThing", "thing/pump-1", Decision.DENIED),
        ("admin", "iot:Publish", "topic/fleetkey/pump-1/commands/reset", Decision.DENIED),
    ],
)
def test_lifecycle_iot_requests(
    roles: dict[str, list[dict[str, Any]]],
    function: str,
    action: str,
    resource: str,
    decision: Decision,
) -> None:
    # Given a lifecycle role and an AWS IoT request of this account and region
    request = Request(action, f"arn:aws:iot:{REGION}:{ACCOUNT}:{resource}")

    # When deciding it, Then suspension can only toggle certificates and close connections, and
    # only converge tears down and sends the reset command (and no other command)
    assert decide(roles[function], request) is decision


def key_request(action: str, facts: KeyFacts, **request_tags: str) -> Request:
    context = key_context(facts, constants.STACK_ID)
    modeled = set(aws_calls.KEY_CONDITION_PREFIXES)
    if request_tags:
        context.update({f"aws:requesttag/{k}": (v,) for k, v in request_tags.items()})
        context["aws:tagkeys"] = tuple(request_tags)
        modeled |= {"aws:requesttag/", "aws:tagkeys"}
    return Request(action, KEY, context, frozenset(modeled), key_policy=facts.policy)


def decide_as(roles: dict[str, list[dict[str, Any]]], function: str, request: Request) -> Decision:
    """The decision for `function`'s role: its identity policy, and the key's policy naming it."""
    return decide(roles[function], request, role_arn(function))


# The table's key: IAM governs it, and its policy denies every function role its management.
TABLE_KEY_POLICY = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            *json.loads(DEFAULT_KEY_POLICY)["Statement"],
            {
                "Effect": "Deny",
                "Principal": {"AWS": "*"},
                "Action": ["kms:ScheduleKeyDeletion", "kms:TagResource"],
                "Resource": "*",
                "Condition": {
                    "ArnEquals": {"aws:PrincipalArn": [role_arn(f) for f in ("admin", "token")]}
                },
            },
        ],
    }
)
TABLE_KEY = KeyFacts({}, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", policy=TABLE_KEY_POLICY)
OWN_SIGNING_KEY = KeyFacts(
    {"fleetkey:purpose": f"token-signing:{constants.STACK_ID}"},
    "ECC_NIST_P256",
    "SIGN_VERIFY",
    policy=FLEETKEY_KEY_POLICY,
)
OTHER_STACKS_KEY = KeyFacts(
    {"fleetkey:purpose": "token-signing:OtherStack"},
    "ECC_NIST_P256",
    "SIGN_VERIFY",
    policy=json.dumps(
        token_key_policy_for(
            f"arn:aws:iam::{ACCOUNT}:role/other-token", [f"arn:aws:iam::{ACCOUNT}:role/other-admin"]
        )
    ),
)
# Tagged like this stack's keys, but not a P-256 signing key (someone tagged a symmetric key).
TAGGED_SYMMETRIC_KEY = KeyFacts(
    OWN_SIGNING_KEY.tags, "SYMMETRIC_DEFAULT", "ENCRYPT_DECRYPT", policy=DEFAULT_KEY_POLICY
)
OWN_TAG = {"fleetkey:purpose": "token-signing:<stack>"}
# Untagged, P-256 signing: what CreateKey makes before its tags apply (and, see infra/README.md,
# any such key of the account: the one shape the admin role may still tag).
NEW_SIGNING_KEY = KeyFacts({}, "ECC_NIST_P256", "SIGN_VERIFY", policy=FLEETKEY_KEY_POLICY)
# Another team's P-256 signing key, governed by IAM (KMS's default policy), that the admin role
# tagged as this stack's (the defect: admin or maintenance could then delete it, token sign).
ANOTHER_TEAMS_KEY_TAGGED = KeyFacts(
    OWN_SIGNING_KEY.tags, "ECC_NIST_P256", "SIGN_VERIFY", policy=DEFAULT_KEY_POLICY
)
# This stack's tag and policy, but imported key material / a multi-Region key.
IMPORTED_KEY = KeyFacts(
    OWN_SIGNING_KEY.tags, "ECC_NIST_P256", "SIGN_VERIFY", "EXTERNAL", policy=DEFAULT_KEY_POLICY
)
MULTI_REGION_KEY = KeyFacts(
    OWN_SIGNING_KEY.tags,
    "ECC_NIST_P256",
    "SIGN_VERIFY",
    multi_region=True,
    policy=DEFAULT_KEY_POLICY,
)


@pytest.mark.parametrize("function", ["admin", "maintenance"])
@pytest.mark.parametrize(
    ("facts", "decision"),
    [
        (OWN_SIGNING_KEY, Decision.ALLOWED),
        (TABLE_KEY, Decision.DENIED),
        (OTHER_STACKS_KEY, Decision.DENIED),
        (TAGGED_SYMMETRIC_KEY, Decision.DENIED),
        (ANOTHER_TEAMS_KEY_TAGGED, Decision.DENIED),
        (IMPORTED_KEY, Decision.DENIED),
    ],
)
def test_key_deletion_reaches_this_stacks_signing_keys_only(
    roles: dict[str, list[dict[str, Any]]], function: str, facts: KeyFacts, decision: Decision
) -> None:
    # Given a role that retires signing keys, and a key of some kind
    # When it would schedule the key's deletion
    # Then only a key whose policy is fleetkey's is within reach: IAM grants no deletion, so a
    # key someone else owns (even tagged as this stack's by the admin role) is not
    assert decide_as(roles, function, key_request("kms:ScheduleKeyDeletion", facts)) is decision


@pytest.mark.parametrize(
    ("facts", "decision"),
    [
        (OWN_SIGNING_KEY, Decision.ALLOWED),
        (ANOTHER_TEAMS_KEY_TAGGED, Decision.DENIED),
        (OTHER_STACKS_KEY, Decision.DENIED),
    ],
)
def test_the_token_role_signs_only_with_keys_whose_policy_is_fleetkeys(
    roles: dict[str, list[dict[str, Any]]], facts: KeyFacts, decision: Decision
) -> None:
    # Given the token role and a key (another team's, tagged by the admin role as this stack's)
    # When it would sign with it
    # Then only fleetkey's own key policy lets it
    assert decide_as(roles, "token", key_request("kms:Sign", facts)) is decision


@pytest.mark.parametrize("facts", [IMPORTED_KEY, MULTI_REGION_KEY], ids=["imported", "multi"])
@pytest.mark.parametrize("function", ["admin", "token", "discovery", "introspect", "maintenance"])
def test_no_role_reads_a_key_of_imported_material_or_multi_region(
    roles: dict[str, list[dict[str, Any]]], function: str, facts: KeyFacts
) -> None:
    # Given a key tagged as this stack's, of imported material or multi-Region
    # When a role would read it to confirm it, Then IAM refuses (kms:KeyOrigin, kms:MultiRegion)
    assert decide_as(roles, function, key_request("kms:GetPublicKey", facts)) is Decision.DENIED


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
    assert decide_as(roles, "admin", request) is decision


@pytest.mark.parametrize(
    "function",
    [
        "registration",
        "admin",
        "token",
        "discovery",
        "introspect",
        "maintenance",
        "converge",
        "device_events",
        "data_keys",
        "rotation",
        "rotation_events",
    ],
)
@pytest.mark.parametrize("action", ["kms:DisableKey", "kms:PutKeyPolicy", "kms:UntagResource"])
def test_no_role_may_disable_repermission_or_untag_a_key(
    roles: dict[str, list[dict[str, Any]]], function: str, action: str
) -> None:
    # Given any function's role and this stack's own signing key
    # When it would disable the key, change its policy or remove its tag
    # Then it may not
    assert decide_as(roles, function, key_request(action, OWN_SIGNING_KEY)) is Decision.DENIED


def test_the_registration_role_allows_the_take_over(roles: dict[str, list[dict[str, Any]]]) -> None:
    # Given the registration role and the take-over's requests
    # When deciding each
    # Then all are allowed (the defect of issue 7, fixed)
    for request in take_over_requests():
        assert decide(roles["registration"], request) is Decision.ALLOWED, request


# ---- the evaluator's own soundness (hostile review of issue 7) ----------------------------------


def _key_policy(*statements: dict[str, Any]) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


ROOT = {"AWS": f"arn:aws:iam::{ACCOUNT}:root"}
DELEGATE_TO_IAM = {"Effect": "Allow", "Principal": ROOT, "Action": "kms:*", "Resource": "*"}
IDENTITY_SIGNS = [{"Effect": "Allow", "Action": "kms:Sign", "Resource": "*"}]


@pytest.mark.parametrize(
    ("identity", "key_policy", "decision"),
    [
        # the key policy alone allows the role (no IAM grant): allowed
        (
            [],
            _key_policy(
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": role_arn("token")},
                    "Action": "kms:Sign",
                    "Resource": "*",
                }
            ),
            Decision.ALLOWED,
        ),
        # IAM allows, the key policy delegates to the account: allowed
        (IDENTITY_SIGNS, _key_policy(DELEGATE_TO_IAM), Decision.ALLOWED),
        # IAM allows, but the key policy does not delegate (names someone else): denied
        (
            IDENTITY_SIGNS,
            _key_policy(
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:role/someone"},
                    "Action": "kms:*",
                    "Resource": "*",
                }
            ),
            Decision.DENIED,
        ),
        # IAM allows, the key policy delegates but denies the role: the Deny wins
        (
            IDENTITY_SIGNS,
            _key_policy(
                DELEGATE_TO_IAM,
                {
                    "Effect": "Deny",
                    "Principal": {"AWS": "*"},
                    "Action": "kms:Sign",
                    "Resource": "*",
                    "Condition": {"ArnEquals": {"aws:PrincipalArn": role_arn("token")}},
                },
            ),
            Decision.DENIED,
        ),
        # the key policy allows the role, IAM denies: the Deny wins
        (
            [{"Effect": "Deny", "Action": "kms:Sign", "Resource": "*"}],
            _key_policy(
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": "*"},
                    "Action": "kms:Sign",
                    "Resource": "*",
                }
            ),
            Decision.DENIED,
        ),
    ],
    ids=["key-policy-alone", "delegated", "not-delegated", "key-deny", "iam-deny"],
)
def test_a_key_request_is_decided_by_the_identity_and_the_key_policy(
    identity: list[dict[str, Any]], key_policy: str, decision: Decision
) -> None:
    # (a) Given a role's identity policy and the key's policy
    request = Request("kms:Sign", KEY, key_policy=key_policy)

    # When deciding a Sign by the role
    # Then either policy may allow (the key's only if it delegates to IAM), and a Deny in either
    # wins
    assert decide(identity, request, role_arn("token")) is decision


def test_a_sign_granted_by_the_key_policy_alone_passes_the_check() -> None:
    # (a) Given a token role with no kms:Sign, and a key whose policy lets that role sign
    template = template_with(
        "token", [{"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TABLE}]
    )
    sign = Request("kms:Sign", KEY, key_policy=FLEETKEY_KEY_POLICY)
    get = Request("dynamodb:GetItem", TABLE)

    # When the evaluator runs
    report = evaluate(template, recorded("token", sign, get), stack_name="S")

    # Then the role is resolved to the principal the key policy names, and nothing fails
    assert report.problems == []


def test_an_unreadable_key_policy_is_not_evaluable() -> None:
    # (a) Given a key request without the key's policy (the recorder could not read it)
    # Then the IAM grant alone does not decide it
    found = verdict(IDENTITY_SIGNS, Request("kms:Sign", KEY), role_arn("token"))
    assert found.decision is Decision.UNEVALUATED


@pytest.mark.parametrize("element", ["NotAction", "NotResource"])
def test_not_action_and_not_resource_are_refused(element: str) -> None:
    # (b) Given a role statement written with NotAction / NotResource
    statement = {"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TABLE}
    statement[element] = statement.pop(element[3:])
    template = template_with("token", [statement])
    get = Request("dynamodb:GetItem", TABLE)

    # When the evaluator runs
    report = evaluate(template, recorded("token", get), stack_name="S")

    # Then the check fails (it does not report "not evaluable" and pass)
    assert any(f"with {element}" in p for p in report.problems), report.problems
    assert decide([statement], get) is Decision.REFUSED


def test_not_principal_in_a_key_policy_is_refused() -> None:
    # (b) Given a key policy with NotPrincipal
    key_policy = _key_policy(
        DELEGATE_TO_IAM,
        {"Effect": "Deny", "NotPrincipal": ROOT, "Action": "kms:Sign", "Resource": "*"},
    )

    # Then a request on the key is refused, not evaluated
    request = Request("kms:Sign", KEY, key_policy=key_policy)
    assert decide(IDENTITY_SIGNS, request, role_arn("token")) is Decision.REFUSED


def _with_managed_policy(template: dict[str, Any], statements: list[dict[str, Any]]) -> None:
    template["Resources"]["Managed"] = {
        "Type": "AWS::IAM::ManagedPolicy",
        "Properties": {
            "Roles": [{"Ref": "Role"}],
            "PolicyDocument": {"Version": "2012-10-17", "Statement": statements},
        },
    }


def test_a_customer_managed_policy_is_read() -> None:
    # (c) Given a role whose only grant of DeleteItem is in an AWS::IAM::ManagedPolicy
    template = template_with(
        "token", [{"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TABLE}]
    )
    _with_managed_policy(
        template, [{"Effect": "Allow", "Action": "dynamodb:DeleteItem", "Resource": "*"}]
    )

    # When the evaluator runs on a function that only reads
    report = evaluate(
        template, recorded("token", Request("dynamodb:GetItem", TABLE)), stack_name="S"
    )

    # Then the managed policy's grant is seen (and, never called, fails the check)
    assert report.problems == [
        "token: granted but never called: dynamodb:DeleteItem (remove the grant, exercise the "
        "path in a test, or review it into UNCALLED_GRANTS)"
    ]


def test_an_aws_managed_policy_fails_the_check() -> None:
    # (c) Given a role carrying an AWS managed policy (the evaluator cannot read it)
    template = template_with(
        "token", [{"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TABLE}]
    )
    template["Resources"]["Role"]["Properties"]["ManagedPolicyArns"] = [
        {"Fn::Join": ["", ["arn:", {"Ref": "AWS::Partition"}, ":iam::aws:policy/PowerUserAccess"]]}
    ]

    # When the evaluator runs
    report = evaluate(
        template, recorded("token", Request("dynamodb:GetItem", TABLE)), stack_name="S"
    )

    # Then it fails, naming the policy
    assert len(report.problems) == 1
    assert "arn:aws:iam::aws:policy/PowerUserAccess" in report.problems[0]


def test_an_undecidable_deny_is_never_allowed() -> None:
    # (d) Given an Allow, and a Deny of the same request on a condition it cannot know
    statements = [
        {"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TABLE},
        {
            "Effect": "Deny",
            "Action": "dynamodb:GetItem",
            "Resource": "*",
            "Condition": {"NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
        },
    ]

    # When deciding the request
    found = verdict(statements, Request("dynamodb:GetItem", TABLE))

    # Then it is not evaluable (the Deny may apply), never allowed
    assert found.decision is Decision.UNEVALUATED
    assert found.unknown == {"aws:sourceip"}


def test_a_deny_that_cannot_match_does_not_block() -> None:
    # (d) Given a Deny whose known condition rules it out, beside an unknown one
    statements = [
        {"Effect": "Allow", "Action": "dynamodb:GetItem", "Resource": TABLE},
        {
            "Effect": "Deny",
            "Action": "dynamodb:GetItem",
            "Resource": "*",
            "Condition": {
                "StringEquals": {"dynamodb:LeadingKeys": "DEVICE#x"},
                "NotIpAddress": {"aws:SourceIp": "10.0.0.0/8"},
            },
        },
    ]
    request = item("GetItem", "NONCE#n")

    # Then the request is decided: the Deny cannot apply whatever the address
    assert decide(statements, request) is Decision.ALLOWED


GRANT_BY_ADDRESS = [
    {
        "Effect": "Allow",
        "Action": "dynamodb:GetItem",
        "Resource": TABLE,
        "Condition": {"IpAddress": {"aws:SourceIp": "10.0.0.0/8"}},
    }
]


def test_not_evaluable_fails_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    # (e) Given a grant conditioned on a key the recorder does not know
    template = template_with("token", GRANT_BY_ADDRESS)
    calls = recorded("token", Request("dynamodb:GetItem", TABLE))

    # When the evaluator runs
    report = evaluate(template, calls, stack_name="S")

    # Then it fails the check, naming the key
    assert len(report.problems) == 1 and "aws:sourceip" in report.problems[0]

    # ... unless the (action, key) pair is on the reviewed list: then it is a note
    monkeypatch.setattr(
        aws_calls,
        "REVIEWED_UNEVALUABLE",
        {("dynamodb:getitem", "aws:sourceip"): "reviewed in this test"},
    )
    report = evaluate(template, calls, stack_name="S")
    assert report.problems == [] and len(report.notes) == 1


def test_the_reviewed_unevaluable_list_is_short_and_reasoned() -> None:
    # (e) Every entry is an (action, condition key) pair with a reason
    assert len(aws_calls.REVIEWED_UNEVALUABLE) <= 5
    for (action, key), reason in aws_calls.REVIEWED_UNEVALUABLE.items():
        assert action == action.lower() and key == key.lower() and len(reason) > 20


# ---- (f) widening: every role's statements pinned -----------------------------------------------

SNAPSHOT = Path(__file__).with_name("iam_snapshot.json")
UPDATE_SNAPSHOT = "FLEETKEY_UPDATE_IAM_SNAPSHOT"


def test_each_roles_statements_match_the_reviewed_snapshot(synthesized: Any) -> None:
    # (f) Given the synthesized roles' resolved statements (actions, resources, conditions)
    current = aws_calls.role_snapshot(synthesized.template_json, constants.STACK_ID)
    text = json.dumps(current, indent=2, sort_keys=True) + "\n"
    if os.environ.get(UPDATE_SNAPSHOT) == "1":
        SNAPSHOT.write_text(text)

    # When comparing them with the reviewed snapshot
    reviewed = SNAPSHOT.read_text()

    # Then they are the same: a Resource "*", a dropped condition or a new action is a diff to
    # review (and commit with FLEETKEY_UPDATE_IAM_SNAPSHOT=1), not a silent widening
    diff = "".join(
        difflib.unified_diff(
            reviewed.splitlines(keepends=True),
            text.splitlines(keepends=True),
            "tests/infra/iam_snapshot.json (reviewed)",
            "synthesized",
        )
    )
    assert not diff, f"IAM statements changed; review, then {UPDATE_SNAPSHOT}=1:\n{diff}"


def test_the_snapshot_sees_a_dropped_condition(synthesized: Any) -> None:
    # (f) Given the token role with one condition dropped (same action names: the call-derived
    # "granted but never called" check would not see it)
    template = json.loads(json.dumps(synthesized.template_json))
    for resource in template["Resources"].values():
        if resource["Type"] == "AWS::IAM::Policy":
            for statement in resource["Properties"]["PolicyDocument"]["Statement"]:
                statement.pop("Condition", None)

    # Then the snapshot differs
    assert aws_calls.role_snapshot(template, constants.STACK_ID) != json.loads(SNAPSHOT.read_text())


def test_a_resource_wildcard_does_not_span_arn_parts() -> None:
    # Given a grant on things of one account, written with a wildcard in the resource part
    statement = {
        "Effect": "Allow",
        "Action": "iot:DescribeThing",
        "Resource": f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/*",
    }

    # When a request names a thing of another account whose name would satisfy a wildcard
    # spanning the ':' between parts, or an IAM pattern holds what fnmatch would read as a class
    other_account = Request("iot:DescribeThing", f"arn:aws:iot:{REGION}:999999999999:thing/x")
    bracket = {**statement, "Resource": f"arn:aws:iot:{REGION}:{ACCOUNT}:thing/[ab]"}

    # Then neither is allowed: AWS matches each ARN part on its own and has no classes
    assert decide([statement], other_account) is not Decision.ALLOWED
    assert decide([bracket], Request("iot:DescribeThing", THING)) is not Decision.ALLOWED
    assert decide([statement], Request("iot:DescribeThing", THING)) is Decision.ALLOWED


def test_a_statement_whose_effect_is_neither_allow_nor_deny_is_refused() -> None:
    # Given a statement with an Effect AWS would reject ("allow" in lower case)
    statement = {"Effect": "allow", "Action": "iot:DescribeThing", "Resource": "*"}

    # When / Then: the evaluator refuses it rather than read it as an Allow
    assert decide([statement], Request("iot:DescribeThing", THING)) is Decision.REFUSED
