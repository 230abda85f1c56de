"""The local API gateway over real HTTP: SigV4 as API Gateway checks it, the deployed API's routes
and events, its resource policy (operators, relying parties) and per-client limits, the real admin
function behind it, and the CLI pointed at it."""

from __future__ import annotations

import base64
import http.client
import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from unittest import mock
from urllib.parse import urlsplit

import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from fleetkey_cli.main import main
from fleetkey_infra.edge import Audience, RateLimit
from fleetkey_local.api_gateway import (
    LOCAL_OPERATOR_ARN,
    LOCAL_RELYING_PARTY_ARN,
    LOCAL_RELYING_PARTY_KEY,
    MAX_BODY_BYTES,
    LocalApiGateway,
    RateLimiter,
)
from fleetkey_local.pki import key_pem
from fleetkey_local.server import FAKE_CREDENTIALS, local_aws
from fleetkey_local.stack import REGION, EmbeddedStack, client_factory
from tests.conftest import load_event
from tests.support.pki_cache import ca as cached_ca

LOCAL = Credentials(
    FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
    FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    FAKE_CREDENTIALS["AWS_SESSION_TOKEN"],
)
# Requests for this machine never go through a proxy from the environment.
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@pytest.fixture(scope="module")
def gateway():
    """moto on 127.0.0.1 with fleetkey's resources, and the gateway on a free port."""
    with local_aws() as endpoint:
        EmbeddedStack(client_factory(endpoint)).provision()
        with LocalApiGateway(0) as api:
            # Warm the admin function (its AWS clients take the environment's credentials now,
            # as a Lambda instance does at cold start), so tests may change the CLI's environment.
            assert send(signed("GET", api.url + "/v1/admin/cas"))[0] == 200
            yield api


def signed(method, url, body=b"", headers=None, credentials=LOCAL, at=None, region=REGION):
    """A request signed as botocore signs for execute-api (at `at`, default now)."""
    request = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    signer = SigV4Auth(credentials, "execute-api", region)
    if at is None:
        signer.add_auth(request)
    else:
        with mock.patch("botocore.auth.get_current_datetime", return_value=at):
            signer.add_auth(request)
    return urllib.request.Request(
        url, data=body or None, method=method, headers=dict(request.headers)
    )


def send(request) -> tuple[int, dict, bytes]:
    try:
        with OPENER.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def message(body: bytes) -> str:
    return json.loads(body)["message"]


# ---- IAM authorization ---------------------------------------------------------------------------


def test_unsigned_request_is_refused_as_api_gateway_does(gateway):
    # When an admin route is called without a signature
    status, headers, body = send(urllib.request.Request(gateway.url + "/v1/admin/cas"))
    # Then API Gateway's answer for an IAM method comes back, and no function ran
    assert status == 403 and message(body) == "Missing Authentication Token"
    assert headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"


def test_wrong_secret_is_refused(gateway):
    # Given a request signed with the local access key but another secret
    wrong = Credentials(LOCAL.access_key, "not-the-secret", LOCAL.token)
    # When it is sent
    status, _, body = send(signed("GET", gateway.url + "/v1/admin/cas", credentials=wrong))
    # Then the signature does not match
    assert status == 403
    assert message(body).startswith("The request signature we calculated does not match")


def test_unknown_access_key_is_refused(gateway):
    stranger = Credentials("AKIAEXAMPLESTRANGER", "secret")
    status, _, body = send(signed("GET", gateway.url + "/v1/admin/cas", credentials=stranger))
    assert status == 403
    assert message(body) == "The security token included in the request is invalid."


def test_stale_signature_is_refused(gateway):
    # Given a correctly signed request from six minutes ago
    then = datetime.now(UTC) - timedelta(minutes=6)
    # When it is sent (a replay, or a clock far off)
    status, _, body = send(signed("GET", gateway.url + "/v1/admin/cas", at=then))
    # Then it is refused as expired
    assert status == 403 and message(body).startswith("Signature expired")


def test_signature_for_another_region_is_refused(gateway):
    status, _, body = send(signed("GET", gateway.url + "/v1/admin/cas", region="us-east-1"))
    assert status == 403 and "scoped to a valid region" in message(body)


def test_body_changed_after_signing_is_refused(gateway):
    # Given a signed import whose body is replaced in transit
    request = signed(
        "POST",
        gateway.url + "/v1/admin/allowlist",
        body=b'{"device_id": "a"}',
        headers={"content-type": "application/json"},
    )
    request.data = b'{"device_id": "b"}'
    # Then the signature (over the body's hash) no longer matches
    assert send(request)[0] == 403


def test_unknown_resource_is_missing_authentication_token(gateway):
    # When a path no route serves is called, signed or not
    for path in ("/v1/nothing", "/v1/admin", "/"):
        status, _, body = send(signed("GET", gateway.url + path))
        # Then it is API Gateway's 403 for an unknown resource
        assert (status, message(body)) == (403, "Missing Authentication Token"), path


def test_signed_request_reaches_the_admin_function(gateway):
    # When the registration code is read with the local credentials
    status, headers, body = send(signed("GET", gateway.url + "/v1/admin/cas/registration-code"))
    # Then the admin function answered
    assert status == 200 and json.loads(body)["registration_code"]
    assert headers["Content-Type"] == "application/json" and headers["x-amzn-RequestId"]


# ---- the CLI -------------------------------------------------------------------------------------


@pytest.fixture
def local_credentials_in_environment(monkeypatch):
    """The environment local_aws() sets, without the test suite's AWS_SECURITY_TOKEN (botocore
    prefers it to AWS_SESSION_TOKEN, and the gateway refuses a token that is not the local one)."""
    monkeypatch.delenv("AWS_SECURITY_TOKEN", raising=False)
    monkeypatch.delenv("FLEETKEY_ENDPOINT", raising=False)


def test_cli_imports_a_manifest_and_the_audit_names_the_local_operator(
    gateway, local_credentials_in_environment, tmp_path, capsys
):
    cli = ["--endpoint", gateway.url]
    acme = cached_ca("acme")
    (tmp_path / "ca.pem").write_text(acme.pem)
    (tmp_path / "ca.key").write_text(key_pem(acme.key))
    manifest = tmp_path / "factory.csv"
    manifest.write_text(
        "device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile\n"
        "pump-0001,SN-0001,acme,,infusion-pump\n"
        "well:0002,SN-0002,acme,,telemetry-sensor\n"
    )
    # Given a manufacturer CA registered over HTTP (registration code read, proof made locally)
    assert (
        main(
            [
                *cli,
                "ca",
                "register",
                "--name",
                "acme",
                "--certificate",
                str(tmp_path / "ca.pem"),
                "--ca-key",
                str(tmp_path / "ca.key"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["status"] == "ACTIVE"
    # When a manifest is imported and a device shown, through the local gateway
    assert main([*cli, "allowlist", "import", str(manifest)]) == 0
    assert json.loads(capsys.readouterr().out)["imported"] == 2
    assert main([*cli, "device", "show", "well:0002"]) == 0
    shown = json.loads(capsys.readouterr().out)
    # Then the device is there, and its audit record names the operator who signed the request
    assert (shown["device_id"], shown["state"]) == ("well:0002", "ALLOWLISTED")
    status, _, body = send(signed("GET", gateway.url + "/v1/admin/devices/pump-0001/audit"))
    assert status == 200
    assert [r["actor"] for r in json.loads(body)["records"]] == [LOCAL_OPERATOR_ARN]
    assert main([*cli, "audit", "ca:acme"]) == 0
    assert LOCAL_OPERATOR_ARN in capsys.readouterr().out


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """An operator's machine with no AWS credentials anywhere (environment, files, metadata)."""
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_PROFILE",
        "FLEETKEY_ENDPOINT",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_cli_defaults_to_the_local_stack_with_local_credentials(
    gateway, no_aws_credentials, monkeypatch, capsys
):
    # Given no endpoint, no credentials, and a region that is not the local stack's
    monkeypatch.setattr("fleetkey_cli.main.LOCAL_ENDPOINT", gateway.url)  # `make serve`'s :8080
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    # When the CLI runs
    code = main(["ca", "registration-code"])
    # Then it reached the local stack, signed as the local operator for the local region
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.fullmatch(r"[0-9a-f-]{36}\n", out)


def test_cli_never_uses_local_credentials_for_a_remote_endpoint(no_aws_credentials):
    # Given a deployed stack's endpoint and no AWS credentials
    remote = "https://abcdef1234.execute-api.eu-west-1.amazonaws.com/prod"
    # When the CLI is run, it refuses to sign (nothing is sent)
    with pytest.raises(SystemExit, match="no AWS credentials"):
        main(["--endpoint", remote, "ca", "list"])


# ---- bodies --------------------------------------------------------------------------------------


def test_binary_body_reaches_the_function_base64_encoded(gateway):
    # Given a manifest that is not UTF-8 text
    body = "device_id\nпомпа\n".encode("utf-16")  # noqa: RUF001 - Cyrillic on purpose
    # When it is imported
    status, _, response = send(
        signed(
            "POST",
            gateway.url + "/v1/admin/allowlist/import?format=csv",
            body=body,
            headers={"content-type": "text/csv"},
        )
    )
    # Then the function got it base64-encoded, decoded it, and refused it as not UTF-8
    assert status == 400 and "UTF-8" in json.loads(response)["message"]


def test_body_over_10_mb_is_refused_with_413(gateway):
    # When a body one byte over API Gateway's limit is sent
    request = urllib.request.Request(
        gateway.url + "/v1/admin/allowlist/import", data=b"x" * (MAX_BODY_BYTES + 1), method="POST"
    )
    status, _, body = send(request)
    # Then API Gateway's 413 comes back before authorization or the function
    assert status == 413 and message(body) == "Request Too Long"


# ---- the event and the response, with a recording function ------------------------------------


@pytest.fixture
def recording():
    """A gateway whose admin function records its events and answers as told."""
    events, answers = [], []

    def function(event, context):
        events.append(event)
        answer = answers.pop(0) if answers else {"statusCode": 200, "body": "{}"}
        if isinstance(answer, Exception):
            raise answer
        return answer

    with LocalApiGateway(0, functions={"admin": function}) as api:
        yield api, events, answers


def test_event_has_the_deployed_apis_shape(recording):
    api, events, _ = recording
    sample = load_event("admin-import-manifest-csv")
    # When a CSV import is sent, with a header that repeats
    path = "/v1/admin/allowlist/import?format=csv"
    request = signed(
        "POST", api.url + path, body=sample["body"].encode(), headers={"content-type": "text/csv"}
    )
    connection = http.client.HTTPConnection(urlsplit(api.url).netloc, timeout=30)
    connection.putrequest("POST", path, skip_accept_encoding=True)
    for name, value in [*request.header_items(), ("X-Trace", "a"), ("X-Trace", "b")]:
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(len(request.data)))
    connection.endheaders(request.data)
    response = connection.getresponse()
    response.read()
    connection.close()
    # Then the function gets the event the deployed API would send (the sample's shape)
    assert response.status == 200
    event = events[-1]
    assert set(event) == set(sample)
    assert set(sample["requestContext"]) <= set(event["requestContext"])
    assert set(sample["requestContext"]["identity"]) <= set(event["requestContext"]["identity"])
    for key in (
        "resource",
        "path",
        "httpMethod",
        "queryStringParameters",
        "multiValueQueryStringParameters",
        "pathParameters",
        "body",
        "isBase64Encoded",
    ):
        assert event[key] == sample[key], key
    assert event["requestContext"]["path"] == "/prod/v1/admin/allowlist/import"
    assert event["requestContext"]["resourcePath"] == "/v1/admin/{proxy+}"
    assert event["headers"]["Content-type"] == "text/csv"  # the client's spelling (urllib's)
    assert event["headers"]["X-Trace"] == "b"
    assert event["multiValueHeaders"]["X-Trace"] == ["a", "b"]
    identity = event["requestContext"]["identity"]
    assert identity["userArn"] == LOCAL_OPERATOR_ARN and identity["accessKey"] == LOCAL.access_key


def test_path_parameters_are_decoded_and_the_path_is_not(recording):
    api, events, _ = recording
    send(signed("GET", api.url + "/v1/admin/devices/well%3A0002/audit"))
    assert events[-1]["path"] == "/v1/admin/devices/well%3A0002/audit"
    assert events[-1]["pathParameters"] == {"proxy": "devices/well:0002/audit"}


def test_non_utf8_body_is_base64_and_proxy_response_is_rendered(recording):
    api, events, answers = recording
    payload = bytes(range(256))
    answers.append(
        {
            "statusCode": 201,
            "headers": {"X-One": "1"},
            "multiValueHeaders": {"Set-Cookie": ["a=1", "b=2"]},
            "body": base64.b64encode(b"\x00\xff").decode(),
            "isBase64Encoded": True,
        }
    )
    # When a binary body is sent and the function answers in binary
    status, headers, body = send(
        signed(
            "PUT",
            api.url + "/v1/admin/blob",
            body=payload,
            headers={"content-type": "application/octet-stream"},
        )
    )
    # Then the event carried it base64, and the answer is decoded with every header
    assert events[-1]["isBase64Encoded"] is True
    assert base64.b64decode(events[-1]["body"]) == payload
    assert (status, body, headers["X-One"]) == (201, b"\x00\xff", "1")


def test_function_error_is_502_and_logged(recording, capsys):
    api, _, answers = recording
    answers.append(RuntimeError("boom"))
    # When the function raises
    status, _, body = send(signed("GET", api.url + "/v1/admin/cas"))
    # Then the caller sees API Gateway's 502 without detail, and the traceback is on stderr
    assert (status, message(body)) == (502, "Internal server error")
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "Traceback" in err


def test_malformed_proxy_response_is_502(recording):
    api, _, answers = recording
    answers.append({"body": "no status code"})
    assert send(signed("GET", api.url + "/v1/admin/cas"))[0] == 502


# ---- curl ----------------------------------------------------------------------------------------


def _curl_with_sigv4() -> bool:
    """curl has --aws-sigv4 since 7.75.0."""
    if not shutil.which("curl"):
        return False
    first = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    found = re.match(r"curl (\d+)\.(\d+)", first)
    return bool(found) and (int(found[1]), int(found[2])) >= (7, 75)


@pytest.mark.skipif(not _curl_with_sigv4(), reason="needs curl >= 7.75 (--aws-sigv4)")
def test_curl_with_aws_sigv4_reaches_the_admin_api(gateway):
    # When docs/local-stack.md's curl example is run against the local gateway
    result = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--noproxy",
            "*",
            "--aws-sigv4",
            f"aws:amz:{REGION}:execute-api",
            "--user",
            f"{LOCAL.access_key}:{LOCAL.secret_key}",
            "--write-out",
            "\n%{http_code}",
            gateway.url + "/v1/admin/cas/registration-code",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # Then the signature is accepted and the function answered
    body, _, status = result.stdout.rpartition("\n")
    assert status == "200", result.stdout + result.stderr
    assert json.loads(body)["registration_code"]


# ---- the resource policy: operators on the admin routes, relying parties on introspection -------

RELYING_PARTY = Credentials(LOCAL_RELYING_PARTY_KEY, LOCAL_RELYING_PARTY_KEY)


def test_a_principal_that_is_not_an_operator_is_denied_the_admin_routes(gateway):
    # Given the local relying party: a valid local identity, signing correctly, not an operator
    for method, path in (
        ("GET", "/v1/admin/cas"),
        ("POST", "/v1/admin/signing-keys/rotate"),
        ("GET", "/v1/%61dmin/cas"),
    ):
        # When it calls an admin route
        status, headers, body = send(signed(method, gateway.url + path, credentials=RELYING_PARTY))
        # Then API Gateway's answer for a resource policy's explicit deny comes back, naming it
        assert status == 403, path
        assert headers["x-amzn-ErrorType"] == "AccessDeniedException"
        assert message(body).startswith(
            f"User: {LOCAL_RELYING_PARTY_ARN} is not authorized to perform: execute-api:Invoke"
        )
        assert message(body).endswith("with an explicit deny")


def test_relying_party_and_operator_may_introspect(gateway):
    # Given the local relying party and the local operator
    for credentials in (RELYING_PARTY, LOCAL):
        # When each introspects a token
        status, _, body = send(
            signed(
                "POST",
                gateway.url + "/v1/introspect",
                body=b"token=not-a-token",
                headers={"content-type": "application/x-www-form-urlencoded"},
                credentials=credentials,
            )
        )
        # Then the introspection function answered (an unknown token is inactive)
        assert (status, json.loads(body)) == (200, {"active": False}), credentials.access_key


def test_an_operator_outside_the_introspection_audience_is_denied(gateway):
    # Given a gateway whose relying parties do not include the local operator
    audiences = [
        Audience("operators", ("/v1/admin/*",), (LOCAL_OPERATOR_ARN,)),
        Audience(
            "relying parties", ("/v1/introspect", "/v1/introspect/*"), (LOCAL_RELYING_PARTY_ARN,)
        ),
    ]
    with LocalApiGateway(0, audiences=audiences, functions=_answering()) as api:
        # When the operator introspects, and calls an admin route
        introspect = send(signed("POST", api.url + "/v1/introspect", body=b"token=x"))
        admin = send(signed("GET", api.url + "/v1/admin/cas"))
    # Then introspection is denied to it, the admin route is not
    assert introspect[0] == 403 and message(introspect[2]).endswith("with an explicit deny")
    assert admin[0] == 200


# ---- per-client limits ---------------------------------------------------------------------------


def _answering() -> dict:
    ok = lambda event, context: {"statusCode": 200, "body": "{}"}  # noqa: E731
    return {name: ok for name in ("admin", "token", "discovery", "introspect")}


def from_address(url: str, source: str, method: str, path: str, headers=None):
    """A request sent from `source` (any 127.0.0.x: Linux routes all of 127/8 to loopback)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(
        parts.hostname, parts.port, timeout=30, source_address=(source, 0)
    )
    try:
        connection.request(
            method, path, body=b"" if method == "POST" else None, headers=headers or {}
        )
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture
def limited():
    """A gateway with small per-client limits (3 token requests, 5 discovery requests a minute)."""
    limits = [
        RateLimit("token", ("/v1/token", "/v1/challenge"), 3, 60),
        RateLimit("discovery", ("/.well-known/",), 5, 60),
    ]
    with LocalApiGateway(0, rate_limits=limits, functions=_answering()) as api:
        yield api


def test_a_client_over_its_limit_gets_429_and_others_do_not(limited):
    # Given a client that spends its token-endpoint allowance
    first = [from_address(limited.url, "127.0.0.2", "POST", "/v1/challenge")[0] for _ in range(3)]
    # When it calls again, whatever it claims in X-Forwarded-For
    status, headers, body = from_address(
        limited.url, "127.0.0.2", "POST", "/v1/token", {"X-Forwarded-For": "203.0.113.7"}
    )
    # Then it gets 429 with a Retry-After in seconds and a JSON body
    assert first == [200, 200, 200]
    assert status == 429
    assert int(headers["Retry-After"]) >= 1
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"message": "Too Many Requests"}
    # and another client, and the same client's discovery requests, are served
    assert from_address(limited.url, "127.0.0.3", "POST", "/v1/token")[0] == 200
    assert from_address(limited.url, "127.0.0.2", "GET", "/.well-known/jwks.json")[0] == 200


def test_an_encoded_path_counts_with_the_route_it_reaches(limited):
    # Given a client over its token-endpoint allowance
    for _ in range(3):
        from_address(limited.url, "127.0.0.4", "POST", "/v1/challenge")
    # When it spells the path another way, Then it is still limited
    for path in ("/v1/%74oken", "/V1/TOKEN", "/v1//challenge"):
        assert from_address(limited.url, "127.0.0.4", "POST", path)[0] == 429, path


def test_the_admin_routes_have_no_per_client_limit(limited):
    # Given the local operator's address, over its token-endpoint allowance
    for _ in range(4):
        from_address(limited.url, "127.0.0.1", "POST", "/v1/challenge")
    # When it calls the admin API
    status, _, _ = send(signed("GET", limited.url + "/v1/admin/cas"))
    # Then it is served (only the public routes are limited per client)
    assert status == 200


def test_an_allowance_refills_at_its_rate():
    # Given a limit of 2 per 10 s, spent by a client, on a controlled clock
    now = [0.0]
    limiter = RateLimiter([RateLimit("token", ("/v1/token",), 2, 10)], clock=lambda: now[0])
    assert limiter.retry_after("/v1/token", "a") is None
    assert limiter.retry_after("/v1/token", "a") is None
    # When it asks again at once, Then it must wait one token's time (10 s / 2)
    assert limiter.retry_after("/v1/token", "a") == 5
    # When that time has passed, Then one request passes, and the next waits again
    now[0] = 5.0
    assert limiter.retry_after("/v1/token", "a") is None
    assert limiter.retry_after("/v1/token", "a") == 5
    # and paths no limit covers are never counted
    assert limiter.retry_after("/v1/admin/cas", "a") is None
