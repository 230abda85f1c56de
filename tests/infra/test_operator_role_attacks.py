"""Hostile review of the operator roles' scopes (issue 10): the synthesized resource policy read
with API Gateway's and IAM's semantics, and the local gateway held to it.

Each test here is a finding; see the review report for what held.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from infra_template import as_list, only, render

# The local stack's account and region: the template's tokens are rendered with them, so that
# the template's principals are the local gateway's operator roles (same names, same account).
LOCAL_ACCOUNT = "123456789012"
LOCAL_REGION = "eu-west-1"
API_ID = "a1b2c3d4e5"
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# ---- the template's resource policy, evaluated as IAM evaluates it -------------------------------


def _policy(resources: dict[str, dict]) -> list[dict]:
    _, api = only(resources, "AWS::ApiGateway::RestApi")
    rendered = json.dumps(render(api["Properties"]["Policy"]))
    rendered = (
        rendered.replace("<AWS::Partition>", "aws")
        .replace("<AWS::AccountId>", LOCAL_ACCOUNT)
        .replace("<AWS::Region>", LOCAL_REGION)
    )
    statements: list[dict] = json.loads(rendered)["Statement"]
    return statements


def _wildcard(pattern: str, value: str) -> bool:
    """IAM's `*` (any run of characters, `/` included) and `?`."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _expanded(resource: str) -> str:
    """API Gateway's expansion of `execute-api:/...` (documented for the Resource element)."""
    prefix = "execute-api:/"
    if resource.startswith(prefix):
        return (
            f"arn:aws:execute-api:{LOCAL_REGION}:{LOCAL_ACCOUNT}:{API_ID}/"
            + resource[len(prefix) :]
        )
    return resource


def _arn_like(pattern: str, arn: str) -> bool:
    patterns, parts = pattern.split(":", 5), arn.split(":", 5)
    return len(patterns) == len(parts) == 6 and all(
        _wildcard(p, v) for p, v in zip(patterns, parts, strict=True)
    )


def _denied_by(statements: list[dict], principal_arn: str, method: str, path: str) -> list[str]:
    """The Sids of the resource policy's Deny statements that match the request."""
    arn = f"arn:aws:execute-api:{LOCAL_REGION}:{LOCAL_ACCOUNT}:{API_ID}/prod/{method}{path}"
    hits = []
    for statement in statements:
        if statement["Effect"] != "Deny":
            continue
        if "Resource" in statement:
            hit = any(_wildcard(_expanded(r), arn) for r in as_list(statement["Resource"]))
        else:
            hit = not any(_wildcard(_expanded(r), arn) for r in as_list(statement["NotResource"]))
        for operator, keys in statement.get("Condition", {}).items():
            for values in keys.values():
                matched = any(_arn_like(v, principal_arn) for v in as_list(values))
                hit = hit and (matched if operator == "ArnLike" else not matched)
        if hit:
            hits.append(statement["Sid"])
    return hits


# ---- F1: the release role's Deny relies on an undocumented expansion ---------------------------


def test_the_release_scope_names_its_routes_by_full_arn(resources: dict[str, dict]) -> None:
    # Given the statement that holds the release role to the firmware routes: a Deny of
    # everything BUT its routes (NotResource)
    [statement] = [s for s in _policy(resources) if s.get("Sid") == "ScopeOfRelease"]
    carved_out = as_list(statement["NotResource"])

    # When reading how it names the routes it carves out
    abbreviated = [r for r in carved_out if not r.startswith("arn:")]

    # Then each is a full execute-api ARN. API Gateway documents expanding `execute-api:/...` for
    # the Resource element only; an abbreviation left unexpanded in NotResource matches no
    # request ARN, and the Deny then refuses the release role its own firmware routes too (or
    # the policy is refused at deployment). The project's own IAM check refuses NotResource
    # for the same reason ("everything but" is misread): at least name the routes in a form
    # whose meaning does not depend on API Gateway rewriting it, e.g. arn:${AWS::Partition}:
    # execute-api:${AWS::Region}:${AWS::AccountId}:*/prod/GET/v1/admin/firmware
    assert abbreviated == [], abbreviated


# ---- F2: the local gateway does not evaluate the audiences' Denies as AWS does ------------------


def _stub(name: str):
    def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
        return {"statusCode": 200, "body": json.dumps({"reached": name, "path": event["path"]})}

    return handler


@pytest.fixture(scope="module")
def gateway() -> Iterator[Any]:
    """The local gateway with every route's function a stub that answers 200 (the request got
    past the resource policy)."""
    from fleetkey_local.api_gateway import ROUTES, LocalApiGateway

    functions = {route.function: _stub(route.function) for route in ROUTES}
    with LocalApiGateway(0, functions=functions) as api:
        yield api


def _call(gateway: Any, role: str, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    from fleetkey_local.api_gateway import local_operator_role

    session = local_operator_role(role)
    url = gateway.url + path
    request = AWSRequest(method=method, url=url, data=b"")
    SigV4Auth(
        Credentials(session.access_key, session.secret_key), "execute-api", LOCAL_REGION
    ).add_auth(request)
    signed = urllib.request.Request(url, method=method, headers=dict(request.headers))
    try:
        with OPENER.open(signed, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.parametrize(
    ("role", "method", "path"),
    [
        # operator roles on admin paths that END like the introspection route, or hold the
        # validations route: the relying parties' Deny (`execute-api:/*/*/v1/introspect`,
        # `.../*/*/v1/validations/*`) matches them in AWS, its leading `*/*` crossing `/`
        ("release", "GET", "/v1/admin/firmware/v1/introspect"),
        ("auditor", "GET", "/v1/admin/devices/v1/introspect"),
        ("fleet-admin", "POST", "/v1/admin/cas/v1/validations/x"),
    ],
)
def test_the_local_gateway_denies_what_the_template_denies(
    resources: dict[str, dict], gateway: Any, role: str, method: str, path: str
) -> None:
    from fleetkey_local.api_gateway import local_operator_role

    # Given the synthesized resource policy, read as IAM reads it (`*` matches across `/`)
    statements = _policy(resources)
    principal = local_operator_role(role).principal_arn
    aws_denies = _denied_by(statements, principal, method, path)
    assert aws_denies, "precondition: the template's policy denies this request"

    # When the same operator role's session sends the request to the local gateway
    status, headers, body = _call(gateway, role, method, path)

    # Then the local gateway refuses it too, as API Gateway's explicit deny. It does not: it
    # matches an audience's paths against the bare request path (`Audience.guards`: fullmatch of
    # `/v1/introspect`), not as the template's `execute-api:/*/*<path>` reads in AWS, where the
    # stage and method wildcards also swallow any prefix of the path. (The operator roles'
    # identity policies spell stage and method out for exactly this reason; the audiences'
    # Denies do not.) Fix one side: spell the audiences' resources out per method on the `prod`
    # stage, or have `Audience.guards` match `<stage>/<METHOD><path>` against `*/*<path>`.
    assert (status, headers.get("x-amzn-ErrorType")) == (403, "AccessDeniedException"), (
        aws_denies,
        status,
        body,
    )
