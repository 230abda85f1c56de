"""The CLI's firmware commands against the admin function (in-process, the same API Gateway
events), and `fleetkey validate` against a fake of the relying parties' API (the validations
routes, the JWKS and the metadata), its token verified offline as a relying party does."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from fleetkey_cli.client import AdminClient, ApiResponse, InProcessTransport, RelyingPartyClient
from fleetkey_cli.main import _parser, main, validate
from fleetkey_local.provision import DEMO_FIRMWARE
from fleetkey_local.stack import TABLE
from tests.support.handlers import LambdaContext, load_handler

OPERATOR = "arn:aws:iam::123456789012:user/release-pipeline"
SHA = hashlib.sha256(b"pump-2.5.0").hexdigest()
PUBLISH_PUMP = ["firmware", "publish", "--profile", "infusion-pump"]


def cli(capsys, *argv: str, client: AdminClient) -> tuple[int, object, str]:
    """Run the CLI: its exit status, its output read as JSON (None if empty), its stderr."""
    code = main(list(argv), client=client)
    captured = capsys.readouterr()
    return code, json.loads(captured.out) if captured.out.strip() else None, captured.err


# ---- firmware ---------------------------------------------------------------------------------


@pytest.fixture
def client(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    admin = load_handler("admin")
    admin.services.cache_clear()
    yield AdminClient(InProcessTransport(admin.handler, OPERATOR, LambdaContext()))
    admin.services.cache_clear()


def test_publish_show_list_and_revoke(stack, client, capsys):
    # When a release is published by its measurement
    code, release, _ = cli(
        capsys,
        "firmware",
        "publish",
        "--profile",
        "infusion-pump",
        "--version",
        "2.5.0",
        "--sha256",
        SHA,
        client=client,
    )
    # Then it is published, by the caller
    assert code == 0 and release["status"] == "published"
    assert release["published_by"] == OPERATOR and release["sha256"] == SHA
    # And it can be read and listed
    assert cli(capsys, "firmware", "show", "infusion-pump", SHA, client=client)[1] == release
    code, listed, _ = cli(capsys, "firmware", "list", "--profile", "infusion-pump", client=client)
    assert code == 0 and sorted(r["sha256"] for r in listed) == sorted([SHA, DEMO_FIRMWARE[2]])
    # When it is revoked, with a reason
    code, revoked, _ = cli(
        capsys, "firmware", "revoke", "infusion-pump", SHA, "--reason", "recalled", client=client
    )
    # Then it is revoked, and the other release is untouched
    assert code == 0 and (revoked["status"], revoked["revoke_reason"]) == ("revoked", "recalled")
    code, listed, _ = cli(capsys, "firmware", "list", client=client)
    assert {r["sha256"]: r["status"] for r in listed} == {
        SHA: "revoked",
        DEMO_FIRMWARE[2]: "published",
    }
    # And publishing it again is refused with the API's 409
    code, _, err = cli(
        capsys,
        "firmware",
        "publish",
        "--profile",
        "infusion-pump",
        "--version",
        "2.5.0",
        "--sha256",
        SHA,
        client=client,
    )
    assert code == 1 and "409 conflict" in err


def test_publish_hashes_an_image_and_publishing_it_again_converges(stack, client, capsys, tmp_path):
    # Given an image on disk
    image = tmp_path / "pump-2.6.0.bin"
    image.write_bytes(b"\x7fELF" + bytes(range(256)) * 8192)
    argv = ["firmware", "publish", "--profile", "infusion-pump", "--version", "2.6.0"]
    # When it is published by its file, twice
    code, first, _ = cli(capsys, *argv, "--image", str(image), client=client)
    code_again, again, _ = cli(capsys, *argv, "--image", str(image), client=client)
    # Then its SHA-256 was computed here, and the second publish answered the same release
    assert (code, code_again) == (0, 0)
    assert first["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
    assert again == first


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["firmware", "publish", "--profile", "nope", "--version", "1", "--sha256", SHA], "400"),
        (
            [*PUBLISH_PUMP, "--version", "1", "--sha256", SHA.upper()],
            "400 invalid_request",
        ),
        (["firmware", "revoke", "infusion-pump", SHA], "404 not_found"),
        (["firmware", "revoke", "infusion-pump", "../../admin"], "404 not_found"),
        (["firmware", "show", "no/such profile", SHA], "404 not_found"),
        (["firmware", "list", "--profile", "nope"], "400 invalid_request"),
    ],
    ids=["unknown-profile", "upper-sha", "unknown", "traversal", "odd-profile", "list-unknown"],
)
def test_refusals_exit_1_with_the_apis_error(client, capsys, argv, expected):
    code, out, err = cli(capsys, *argv, client=client)
    assert (code, out) == (1, None) and expected in err


def test_an_unreadable_image_is_a_local_problem(client, capsys, tmp_path):
    code, _, err = cli(
        capsys,
        "firmware",
        "publish",
        "--profile",
        "infusion-pump",
        "--version",
        "1",
        "--image",
        str(tmp_path / "missing.bin"),
        client=client,
    )
    assert code == 2 and "missing.bin" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["firmware", "publish", "--profile", "p", "--version", "1"],
        [
            "firmware",
            "publish",
            "--profile",
            "p",
            "--version",
            "1",
            "--sha256",
            SHA,
            "--image",
            "f",
        ],
        ["firmware", "publish", "--version", "1", "--sha256", SHA],
        ["firmware", "revoke", "infusion-pump"],
        ["validate", "pump-1", "--audience", "a"],
        ["validate", "pump-1", "--purpose", "p", "--audience", "a", "--expires-in", "4"],
        ["validate", "pump-1", "--purpose", "p", "--audience", "a", "--expires-in", "301"],
        ["validate", "pump-1", "--purpose", "p", "--audience", "a", "--wait", "-1"],
    ],
)
def test_bad_arguments_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


# ---- validate ---------------------------------------------------------------------------------

ISSUER = "https://fleetkey.example.com"
AUDIENCE = "urn:fleetkey:therapy"


class SigningKey:
    """An ES256 key, as the issuer's JWKS publishes it, that signs access tokens."""

    def __init__(self, kid: str = "key-1") -> None:
        self.kid = kid
        self.key = ec.generate_private_key(ec.SECP256R1())

    def jwk(self) -> dict:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        return {**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}

    def token(self, validation_id: str, *, typ: str = "at+jwt", **overrides) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "pump-1",
            "aud": AUDIENCE,
            "client_id": "pump-1",
            "jti": uuid.uuid4().hex,
            "iat": now,
            "exp": now + 60,
            "validation": {"id": validation_id, "purpose": "dose-change"},
            "firmware_version": DEMO_FIRMWARE[1],
            "firmware_sha256": DEMO_FIRMWARE[2],
            **overrides,
        }
        return jwt.encode(
            claims, self.key, algorithm="ES256", headers={"kid": self.kid, "typ": typ}
        )


class FakeRelyingPartyApi:
    """The relying parties' side of the API, as the contract describes it: validations, the
    JWKS and the metadata. `answers` are the successive GET results (the last one repeats)."""

    def __init__(self, key: SigningKey, *answers: dict) -> None:
        self.key = key
        self.validation_id = "v-" + uuid.uuid4().hex
        self.answers = list(answers)
        self.requests: list[tuple[str, str, dict | None]] = []
        self.waits: list[int] = []
        self.create_error: ApiResponse | None = None
        self.poll_errors: list[ApiResponse] = []

    def result(self, status: str, **fields) -> dict:
        return {
            "validation_id": self.validation_id,
            "device_id": "pump-1",
            "purpose": "dose-change",
            "audience": AUDIENCE,
            "status": status,
            "expires_at": "2026-03-01T12:00:30Z",
            **fields,
        }

    def __call__(self, method: str, path: str, body: str | None, headers: dict) -> ApiResponse:
        parts = urlsplit(path)
        self.requests.append((method, parts.path, json.loads(body) if body else None))
        if (method, parts.path) == ("POST", "/v1/validations"):
            assert headers == {"content-type": "application/json"}
            if self.create_error is not None:
                return self.create_error
            return ApiResponse(
                201,
                {
                    "validation_id": self.validation_id,
                    "status": "pending",
                    "expires_at": "2026-03-01T12:00:30Z",
                },
            )
        if (method, parts.path) == ("GET", f"/v1/validations/{self.validation_id}"):
            self.waits.append(int(parse_qs(parts.query).get("wait", ["0"])[0]))
            if self.poll_errors:
                return self.poll_errors.pop(0)
            answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
            return ApiResponse(200, answer)
        if (method, parts.path) == ("GET", "/.well-known/jwks.json"):
            return ApiResponse(200, {"keys": [self.key.jwk()]})
        if (method, parts.path) == ("GET", "/.well-known/oauth-authorization-server"):
            return ApiResponse(
                200, {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/.well-known/jwks.json"}
            )
        return ApiResponse(404, {"error": "not_found", "message": "no such route"})


def validated_api(key: SigningKey | None = None, **token_overrides) -> FakeRelyingPartyApi:
    """A validation answered on the second read: pending, then validated with a token."""
    key = key or SigningKey()
    api = FakeRelyingPartyApi(key)
    api.answers = [
        api.result("pending"),
        api.result("validated", token=key.token(api.validation_id, **token_overrides)),
    ]
    return api


VALIDATE = ["validate", "pump-1", "--purpose", "dose-change", "--audience", AUDIENCE]


def test_validate_waits_for_the_result_and_verifies_the_token(capsys):
    # Given a device that answers its validation
    api = validated_api()
    # When a relying party validates it, verifying the token
    code, out, err = cli(capsys, *VALIDATE, "--verify", client=AdminClient(api))
    # Then the request named the device, purpose and audience (attestation not required)
    method, path, body = api.requests[0]
    assert (method, path) == ("POST", "/v1/validations")
    assert body == {
        "device_id": "pump-1",
        "purpose": "dose-change",
        "audience": AUDIENCE,
        "require_attestation": False,
    }
    # And the result was long-polled (at most 20 s a read), then printed with its verified claims
    assert code == 0 and out["status"] == "validated"
    assert api.waits and all(0 < w <= 20 for w in api.waits)
    claims = out["verified_claims"]
    assert claims["validation"] == {"id": api.validation_id, "purpose": "dose-change"}
    assert (claims["sub"], claims["aud"], claims["iss"]) == ("pump-1", AUDIENCE, ISSUER)
    assert api.validation_id in err


def test_validate_sends_attestation_and_expiry_when_asked(capsys):
    api = validated_api()
    code, out, _ = cli(
        capsys,
        *VALIDATE,
        "--require-attestation",
        "--expires-in",
        "5",
        client=AdminClient(api),
    )
    assert code == 0 and "verified_claims" not in out
    assert api.requests[0][2]["require_attestation"] is True
    assert api.requests[0][2]["expires_in"] == 5


@pytest.mark.parametrize(
    "status,reason",
    [("refused", "firmware_not_released"), ("refused", "device_not_active"), ("expired", None)],
)
def test_a_validation_that_fails_exits_1_and_says_why(capsys, status, reason):
    api = FakeRelyingPartyApi(SigningKey())
    fields = {"reason": reason} if reason else {}
    api.answers = [api.result(status, **fields)]
    code, out, err = cli(capsys, *VALIDATE, "--verify", client=AdminClient(api))
    assert code == 1 and out["status"] == status
    assert f"was not validated: {status}" in err and (reason or "") in err
    # Nothing to verify: the JWKS was never read
    assert ("GET", "/.well-known/jwks.json", None) not in api.requests


def test_a_validation_still_pending_when_the_wait_is_spent_exits_1(capsys):
    api = FakeRelyingPartyApi(SigningKey())
    api.answers = [api.result("pending")]
    code, out, err = cli(capsys, *VALIDATE, "--wait", "0", client=AdminClient(api))
    assert (code, out["status"]) == (1, "pending") and "pending" in err
    assert api.waits == [0]


def test_long_polls_are_capped_and_stop_when_the_wait_is_spent(capsys):
    # Given a device that never answers, and a clock each long poll moves by its wait
    api = FakeRelyingPartyApi(SigningKey())
    api.answers = [api.result("pending")]
    now = [0.0]
    slept: list[float] = []
    rp = RelyingPartyClient(api)
    polled = rp.validation

    def holding(validation_id, wait=0):
        now[0] += wait  # the API holds a pending answer for the whole wait
        return polled(validation_id, wait)

    rp.validation = holding
    args = _parser().parse_args([*VALIDATE, "--wait", "45"])
    # When the CLI waits 45 s
    code = validate(args, rp, clock=lambda: now[0], sleep=slept.append)
    # Then it asked for at most 20 s a poll, for 45 s in all, and gave up: pending
    assert code == 1 and api.waits == [20, 20, 5] and slept == []
    capsys.readouterr()


def test_a_transient_failure_while_polling_is_tried_again(capsys):
    api = validated_api()
    api.poll_errors = [
        ApiResponse(503, {"error": "service_unavailable", "message": "retry"}),
        ApiResponse(0, {"error": "unreachable", "message": "timed out"}),
    ]
    code, out, err = cli(capsys, *VALIDATE, "--verify", client=AdminClient(api))
    assert code == 0 and out["status"] == "validated"
    assert "trying again" in err


def test_a_refused_request_is_the_apis_error(capsys):
    api = FakeRelyingPartyApi(SigningKey())
    api.create_error = ApiResponse(404, {"error": "not_found", "message": "no such device"})
    code, out, err = cli(capsys, *VALIDATE, client=AdminClient(api))
    assert (code, out) == (1, None) and "404 not_found" in err


@pytest.mark.parametrize(
    "case",
    [
        "other-key",
        "other-audience",
        "other-issuer",
        "other-validation",
        "other-device",
        "jwt",
        "expired",
    ],
)
def test_a_token_that_does_not_verify_exits_1(capsys, case):
    # Given a validated result whose token is wrong in one way
    key = SigningKey()
    overrides: dict = {
        "other-audience": {"aud": "urn:fleetkey:telemetry"},
        "other-issuer": {"iss": "https://evil.example.com"},
        "other-validation": {"validation": {"id": "v-other", "purpose": "dose-change"}},
        "other-device": {"sub": "pump-2"},
        "jwt": {"typ": "JWT"},
        "expired": {"exp": int(time.time()) - 120, "iat": int(time.time()) - 180},
    }.get(case, {})
    signer = SigningKey(kid=key.kid) if case == "other-key" else key
    api = FakeRelyingPartyApi(key)
    api.answers = [api.result("validated", token=signer.token(api.validation_id, **overrides))]
    # When it is verified / Then the CLI refuses it, saying so
    code, out, err = cli(capsys, *VALIDATE, "--verify", client=AdminClient(api))
    assert code == 1 and "the token did not verify" in err
    assert "verified_claims" not in out


def test_a_pinned_issuer_is_used_instead_of_the_metadata(capsys):
    api = validated_api()
    code, _, err = cli(
        capsys,
        *VALIDATE,
        "--verify",
        "--issuer",
        "https://other.example.com",
        client=AdminClient(api),
    )
    assert code == 1 and "issuer" in err.lower()
    assert ("GET", "/.well-known/oauth-authorization-server", None) not in api.requests
