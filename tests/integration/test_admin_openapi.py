"""The admin API's routers, their request validation and the OpenAPI document generated from them.

The lifecycle and data-key routes run against a fake composition root (fleetkey.composition's
`components`, replaced): what is checked here is the HTTP contract, not the services."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fleetkey.errors import IllegalTransition, NotFound
from fleetkey_cli import openapi
from fleetkey_local.apigw import proxy_event
from fleetkey_local.stack import TABLE
from tests.support.handlers import LambdaContext, load_handler

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/alice"


def call(admin, method, path, body=None, headers=None):
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    response = admin.handler(
        proxy_event(method, path, body=body, headers=headers or {}, caller_arn=OPERATOR),
        LambdaContext(),
    )
    return response["statusCode"], json.loads(response["body"]) if response.get("body") else None


# ---- the document ------------------------------------------------------------------------------


def test_the_committed_document_is_the_generated_one():
    # When the document is generated from the admin function's routes and models
    problem = openapi.check()
    # Then it is the one in the repository (else: how to regenerate it, and the difference)
    assert problem is None, problem


def test_generation_does_not_depend_on_the_interpreter_run():
    # Given another interpreter, with another hash seed (set and dict orders may differ)
    env = {**os.environ, "PYTHONHASHSEED": "4242"}
    # When it checks the committed document
    result = subprocess.run(
        [sys.executable, "-m", "fleetkey_cli.openapi", "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    # Then it generates the same bytes
    assert result.returncode == 0, result.stderr


def test_a_stale_document_is_reported_with_the_command_that_regenerates_it(tmp_path):
    # Given a committed document that lost a route
    document = openapi.admin_document()
    del document["paths"]["/devices/{device_id}/suspend"]
    stale = tmp_path / "admin.json"
    stale.write_text(openapi.render(document))
    # When it is checked / Then the check fails, naming the fix and showing the difference
    problem = openapi.check(stale)
    assert problem is not None
    assert "python -m fleetkey_cli.openapi" in problem
    assert '+    "/devices/{device_id}/suspend": {' in problem


def test_the_document_describes_every_route_with_its_status_and_fleetkeys_errors():
    document = openapi.admin_document()
    # Then every route is there with its success status
    routes = {
        (method.upper(), path): sorted(operation["responses"])
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    success = {route: [s for s in codes if s.startswith("2")] for route, codes in routes.items()}
    assert success == {
        ("POST", "/allowlist"): ["201"],
        ("POST", "/allowlist/import"): ["200"],
        ("GET", "/devices/{device_id}"): ["200"],
        ("GET", "/devices/{device_id}/audit"): ["200"],
        ("GET", "/certificates/{certificate_id}/audit"): ["200"],
        ("GET", "/audit-streams/{name}"): ["200"],
        ("POST", "/devices/{device_id}/suspend"): ["200"],
        ("POST", "/devices/{device_id}/resume"): ["200"],
        ("POST", "/devices/{device_id}/decommission"): ["202"],
        ("POST", "/devices/{device_id}/recommission"): ["200"],
        ("GET", "/devices/{device_id}/data-key"): ["200"],
        ("GET", "/cas"): ["200"],
        ("GET", "/cas/registration-code"): ["200"],
        ("POST", "/cas"): ["201"],
        ("GET", "/cas/{name}"): ["200"],
        ("POST", "/cas/{name}/disable"): ["200"],
        ("POST", "/cas/{name}/enable"): ["200"],
        ("GET", "/cas/{name}/audit"): ["200"],
        ("GET", "/signing-keys"): ["200"],
        ("POST", "/signing-keys/rotate"): ["201"],
        ("POST", "/signing-keys/retire"): ["200"],
        ("POST", "/tokens/revoke"): ["200"],
        ("GET", "/devices/{device_id}/rotation"): ["200"],
        ("GET", "/pki"): ["200"],
        ("POST", "/pki/init"): ["201"],
        ("POST", "/pki/csr"): ["201"],
        ("POST", "/pki/install"): ["200"],
        ("POST", "/firmware"): ["200", "201"],
        ("GET", "/firmware"): ["200"],
        ("GET", "/firmware/{profile}/{sha256}"): ["200"],
        ("POST", "/firmware/{profile}/{sha256}/revoke"): ["200"],
    }
    # And each documents fleetkey's 400/500/503 (never Powertools' 422), with fleetkey's body
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for route, codes in routes.items():
        assert {"400", "500", "503"} <= set(codes) and "422" not in codes, route
        operation = document["paths"][route[1]][route[0].lower()]
        for code in codes:
            if not code.startswith("2"):
                assert operation["responses"][code]["content"]["application/json"]["schema"] == (
                    error
                ), (route, code)
    # And the document is OpenAPI 3.1 for the /v1/admin server, SigV4-authorized
    assert document["openapi"].startswith("3.1")
    assert document["info"]["title"] == "fleetkey admin API"
    assert [s["url"] for s in document["servers"]] == ["/v1/admin"]
    assert document["security"] == [{"sigv4": []}]
    # And no reference dangles
    text = json.dumps(document)
    for name in document["components"]["schemas"]:
        text = text.replace(f'"#/components/schemas/{name}"', '""')
    assert "#/components/schemas/" not in text


def test_the_manifest_import_documents_its_raw_csv_or_json_body():
    operation = openapi.admin_document()["paths"]["/allowlist/import"]["post"]
    assert set(operation["requestBody"]["content"]) == {"text/csv", "application/json"}
    assert [p["name"] for p in operation["parameters"]] == ["format"]


# ---- the views document what the routes answer ----------------------------------------------


@pytest.fixture
def admin(stack, monkeypatch):
    monkeypatch.setenv("FLEETKEY_TABLE", TABLE)
    handler = load_handler("admin")
    yield handler
    handler.services.cache_clear()


def test_every_field_the_device_and_audit_routes_answer_is_documented(admin):
    from fleetkey.api.models import AuditRecordView, AuditTrailView, DeviceView

    # Given an allow-listed device
    entry = {
        "device_id": "doc-1",
        "serial_number": "SN-1",
        "manufacturer_ca": "acme",
        "profile": "telemetry-sensor",
    }
    assert call(admin, "POST", "/v1/admin/allowlist", entry)[0] == 201
    # When it and its audit trail are read
    _, device = call(admin, "GET", "/v1/admin/devices/doc-1")
    _, trail = call(admin, "GET", "/v1/admin/devices/doc-1/audit")
    # Then every field answered is one the views (and so the OpenAPI document) describe
    assert set(device) == set(DeviceView.model_fields), set(device) ^ set(DeviceView.model_fields)
    assert set(trail) == set(AuditTrailView.model_fields)
    assert set(trail["records"][0]) == set(AuditRecordView.model_fields)


def undocumented(view, where="") -> set[str]:
    """The fields of a view (and of the views in it) that it passed through undescribed."""
    from pydantic import BaseModel

    found = {f"{where}{name}" for name in view.model_extra or {}}
    for name in type(view).model_fields:
        value = getattr(view, name)
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, BaseModel):
                found |= undocumented(item, f"{where}{name}.")
    return found


def test_the_device_view_documents_every_field_of_a_device_in_every_part():
    from fleetkey.api.models import DeviceView
    from fleetkey.domain.audit import ChainHead
    from fleetkey.domain.lifecycle import DeviceState
    from fleetkey.domain.models import (
        CertificateOrigin,
        CertificateRole,
        Device,
        HeldCertificate,
        Teardown,
        TeardownStatus,
    )

    # Given a device with every optional part set (a certificate set, a teardown, an owner)
    device = Device(
        device_id="d-1",
        serial_number="SN-1",
        manufacturer_ca="acme",
        profile="telemetry-sensor",
        state=DeviceState.DECOMMISSIONED,
        audit_head=ChainHead(),
        public_key_fingerprint="ab" * 32,
        attributes={"site": "s"},
        certificates=(
            HeldCertificate(
                certificate_id="cd" * 32,
                role=CertificateRole.CURRENT,
                origin=CertificateOrigin.FACTORY,
                public_key_pem="-----BEGIN PUBLIC KEY-----",
                key="ec:secp256r1",
                not_after="2027-01-01T00:00:00+00:00",
            ),
        ),
        owner="acme-water",
        epoch=2,
        tokens_not_before=1,
        teardown=Teardown(status=TeardownStatus.PENDING, started_at="2026-01-01T00:00:00Z"),
        factory_certificate_id="cd" * 32,
        created_at="2026-01-01T00:00:00Z",
        updated_at="2026-01-01T00:00:00Z",
    )
    # When the route's view is built from it / Then no field passes through undescribed
    assert undocumented(DeviceView.model_validate(device.to_public())) == set()


# ---- validation and the new routes, against a fake composition root ---------------------------


def device_public(device_id: str, state: str) -> dict:
    """The public form of a device in `state`, as the domain writes it."""
    from fleetkey.domain.audit import ChainHead
    from fleetkey.domain.lifecycle import DeviceState
    from fleetkey.domain.models import Device

    return Device(
        device_id=device_id,
        serial_number="SN-1",
        manufacturer_ca="acme",
        profile="telemetry-sensor",
        state=DeviceState(state),
        audit_head=ChainHead(),
    ).to_public()


class FakeLifecycle:
    """Records each call; answers the device in the state the call leads to."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.refuse: Exception | None = None

    def _answer(self, name, device_id, state, **kwargs):
        self.calls.append((name, device_id, kwargs))
        if self.refuse is not None:
            raise self.refuse
        return SimpleNamespace(to_public=lambda: device_public(device_id, state))

    def suspend(self, device_id, *, reason, actor):
        return self._answer("suspend", device_id, "SUSPENDED", reason=reason, actor=actor)

    def resume(self, device_id, *, actor):
        return self._answer("resume", device_id, "ACTIVE", actor=actor)

    def decommission(self, device_id, *, reason, actor):
        return self._answer("decommission", device_id, "DECOMMISSIONED", reason=reason, actor=actor)

    def recommission(self, device_id, *, actor, owner=None, profile=None):
        return self._answer(
            "recommission", device_id, "ALLOWLISTED", actor=actor, owner=owner, profile=profile
        )


class FakeDataKeys:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.answer: dict | None = None

    def for_backend(self, device_id, *, actor):
        self.calls.append((device_id, actor))
        return self.answer or {
            "device_id": device_id,
            "owner": "acme-water",
            "epoch": 2,
            "key_id": "arn:aws:kms:eu-west-1:123456789012:key/data",
            "key_ref": "0123456789abcdef",
            "ciphertext_blob": "AQID",
            "encryption_context": {"fleetkey:device_id": device_id},
        }


@pytest.fixture
def fake(monkeypatch):
    """The admin function with a fake composition root, and the metrics it adds."""
    import fleetkey.composition
    from fleetkey.observability import metrics

    components = SimpleNamespace(lifecycle=FakeLifecycle(), data_keys=FakeDataKeys())
    monkeypatch.setattr(fleetkey.composition, "components", lambda: components)
    added: list[str] = []
    monkeypatch.setattr(metrics, "add_metric", lambda name, unit, value: added.append(name))
    return load_handler("admin"), components, added


def test_suspend_decodes_the_device_id_and_names_the_operator(fake):
    admin, components, metrics = fake
    # When an operator suspends a device whose id the client percent-encoded
    status, body = call(
        admin, "POST", "/v1/admin/devices/well%3A0002/suspend", {"reason": "stolen van"}
    )
    # Then the service is asked for the decoded id, with the reason and the SigV4 principal
    assert (status, body["state"], body["device_id"]) == (200, "SUSPENDED", "well:0002")
    assert components.lifecycle.calls == [
        ("suspend", "well:0002", {"reason": "stolen van", "actor": OPERATOR})
    ]
    # And the route counts nothing itself (the composition counts each committed change once)
    assert metrics == []


@pytest.mark.parametrize("body", [None, "", "{}", "null"], ids=["none", "empty", "object", "null"])
def test_resume_takes_an_empty_body_or_an_empty_object(fake, body):
    admin, components, _ = fake
    status, response = call(admin, "POST", "/v1/admin/devices/d-1/resume", body)
    assert (status, response["state"]) == (200, "ACTIVE")
    assert components.lifecycle.calls == [("resume", "d-1", {"actor": OPERATOR})]


def test_decommission_is_accepted_with_202(fake):
    admin, components, _ = fake
    status, body = call(admin, "POST", "/v1/admin/devices/d-1/decommission", {"reason": "EOL"})
    assert (status, body["state"]) == (202, "DECOMMISSIONED")
    assert components.lifecycle.calls[0][2] == {"reason": "EOL", "actor": OPERATOR}


@pytest.mark.parametrize(
    "body,owner,profile",
    [
        (None, None, None),
        ({}, None, None),
        ({"profile": "infusion-pump"}, None, "infusion-pump"),
        ({"owner": "acme-water:site@7.b_c-d"}, "acme-water:site@7.b_c-d", None),
    ],
    ids=["no-body", "empty", "profile", "owner"],
)
def test_recommission_passes_what_changes(fake, body, owner, profile):
    admin, components, _ = fake
    status, response = call(admin, "POST", "/v1/admin/devices/d-1/recommission", body)
    assert (status, response["state"]) == (200, "ALLOWLISTED")
    assert components.lifecycle.calls == [
        ("recommission", "d-1", {"actor": OPERATOR, "owner": owner, "profile": profile})
    ]


def test_the_data_key_route_answers_the_wrapped_key(fake):
    admin, components, metrics = fake
    status, body = call(admin, "GET", "/v1/admin/devices/d%3A1/data-key")
    assert status == 200 and body["ciphertext_blob"] == "AQID" and body["epoch"] == 2
    assert components.data_keys.calls == [("d:1", OPERATOR)]
    assert metrics == ["DataKeysIssued"]


@pytest.mark.parametrize(
    "path,body,message",
    [
        ("suspend", None, "request body must be a JSON object; it is empty"),
        ("suspend", "{not json", "request body must be JSON"),
        ("suspend", "[" * 100_000, "request body must be JSON"),
        ("suspend", '{"reason": ' + "9" * 5000 + "}", "request body must be JSON"),
        ("suspend", "[]", "request body must be a JSON object"),
        ("suspend", {}, "reason: Field required"),
        ("suspend", {"reason": ""}, "reason: String should have at least 1 character"),
        ("suspend", {"reason": "x" * 257}, "reason: String should have at most 256 characters"),
        ("suspend", {"reason": "a\nb"}, "reason: Value error, must be printable characters"),
        ("suspend", {"reason": 7}, "reason: Input should be a valid string"),
        ("suspend", {"reason": "x", "until": 1}, "until: Extra inputs are not permitted"),
        ("decommission", {}, "reason: Field required"),
        ("resume", {"force": True}, "force: Extra inputs are not permitted"),
        ("resume", "[]", "request body must be a JSON object"),
        ("recommission", {"owner": "a b"}, "owner: String should match pattern"),
        ("recommission", {"owner": "x" * 129}, "owner: String should match pattern"),
        ("recommission", {"profile": ""}, "profile: String should have at least 1 character"),
        ("recommission", {"epoch": 3}, "epoch: Extra inputs are not permitted"),
    ],
    ids=[
        "no-body",
        "not-json",
        "deep-nesting",
        "huge-number",
        "not-an-object",
        "no-reason",
        "empty-reason",
        "long-reason",
        "line-break",
        "not-a-string",
        "extra-field",
        "decommission-no-reason",
        "resume-extra-field",
        "resume-not-an-object",
        "bad-owner",
        "long-owner",
        "empty-profile",
        "recommission-extra-field",
    ],
)
def test_a_request_its_model_refuses_is_a_400_and_reaches_no_service(fake, path, body, message):
    admin, components, metrics = fake
    # When an operator sends a body the route's model refuses
    status, response = call(admin, "POST", f"/v1/admin/devices/d-1/{path}", body)
    # Then it is fleetkey's 400 (not Powertools' 422), saying what is wrong, and nothing ran
    assert (status, response["error"]) == (400, "invalid_request")
    assert response["message"].startswith(message), response["message"]
    assert components.lifecycle.calls == [] and metrics == []


def test_a_body_that_is_not_utf8_or_not_json_by_its_type_is_a_400(fake):
    admin, components, _ = fake
    for body, headers in (
        ("reason".encode("utf-16"), {"content-type": "application/json"}),
        ('{"reason": "x"}', {"content-type": "text/plain"}),
    ):
        status, response = call(admin, "POST", "/v1/admin/devices/d-1/suspend", body, headers)
        assert (status, response["error"]) == (400, "invalid_request"), response
    assert components.lifecycle.calls == []


def test_refusals_of_the_service_keep_their_status_and_code(fake):
    admin, components, metrics = fake
    components.lifecycle.refuse = IllegalTransition("DECOMMISSIONED devices cannot be suspended")
    status, body = call(admin, "POST", "/v1/admin/devices/d-1/suspend", {"reason": "x"})
    assert (status, body["error"]) == (409, "illegal_transition")
    components.lifecycle.refuse = NotFound("no device 'd-1'")
    status, body = call(admin, "POST", "/v1/admin/devices/d-1/resume")
    assert (status, body) == (404, {"error": "not_found", "message": "no device 'd-1'"})
    assert metrics == []


def test_a_response_that_does_not_match_its_view_is_a_500(fake):
    admin, components, _ = fake
    # Given a service answering something the view does not describe (an epoch that is no int)
    components.data_keys.answer = {
        **components.data_keys.for_backend("d-1", actor=""),
        "epoch": "x",
    }
    # When the route answers / Then it is fleetkey's fault, not the caller's
    status, body = call(admin, "GET", "/v1/admin/devices/d-1/data-key")
    assert (status, body["error"]) == (500, "internal_error")


def test_a_query_parameter_outside_its_values_is_a_400_naming_it(fake):
    admin, _, _ = fake
    status, body = call(admin, "POST", "/v1/admin/allowlist/import?format=xml", "<x/>")
    assert (status, body["error"]) == (400, "invalid_request")
    assert body["message"].startswith("query format: Input should be 'csv' or 'json'")
