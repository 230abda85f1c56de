"""The admin API's OpenAPI document, generated from the admin routers (those the admin function
serves, and the issuing CA's, which the rotation function serves under /v1/admin/pki) with their
request and response models, and kept in the repository as docs/openapi/admin.json.

    python -m fleetkey_cli.openapi            # (re)write docs/openapi/admin.json
    python -m fleetkey_cli.openapi --check    # exit 1 if the committed document is stale

The document is what Powertools generates, with its own error answers replaced by fleetkey's: a
request that fails validation is answered 400 `invalid_request` (each route documents it), not
Powertools' 422, and a 500 has fleetkey's error body, not Powertools' ResponseValidationError.
It also declares the API's IAM authorization (SigV4). It is written deterministically: sorted
keys, 2-space indent, a trailing newline.
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DOCUMENT = ROOT / "docs" / "openapi" / "admin.json"
TITLE = "fleetkey admin API"
DESCRIPTION = (
    "The operator API of fleetkey: allow-list, devices and their lifecycle, data keys, "
    "manufacturer CAs, audit trails, token signing keys and revocation, firmware releases, the "
    "issuing CA and certificate rotation. Every request is signed "
    "with SigV4 (execute-api) by an operator principal; API Gateway refuses anything else with "
    "403 before fleetkey sees it. Errors are JSON: "
    '{"error": <stable code>, "message": <text>, "details"?: {...}}.'
)
SERVER = "/v1/admin"
REGENERATE = "python -m fleetkey_cli.openapi"
# The schemas of Powertools' own 422 and 500 answers, which the admin API never gives.
POWERTOOLS_ERROR_SCHEMAS = ("HTTPValidationError", "ValidationError", "ResponseValidationError")
INTERNAL_ERROR = {
    "description": "fleetkey failed (`internal_error`, `audit_chain_broken`); logged",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
}


def admin_document() -> dict[str, Any]:
    """The document, from the resolver the admin function builds (`admin_resolver`) given every
    admin router: ROUTERS (the admin function's) and PKI_ROUTERS (the rotation function's)."""
    from aws_lambda_powertools.event_handler.openapi.models import APIKey, APIKeyIn, Server

    import fleetkey
    from fleetkey.api.admin import PKI_ROUTERS, ROUTERS
    from fleetkey.api.admin.resolver import admin_resolver

    generated = admin_resolver((*ROUTERS, *PKI_ROUTERS)).get_openapi_json_schema(
        title=TITLE,
        version=getattr(fleetkey, "__version__", "0"),
        description=DESCRIPTION,
        servers=[Server(url=SERVER, description="The stage URL followed by /v1/admin")],
        security_schemes={
            "sigv4": APIKey(
                name="Authorization",
                in_=APIKeyIn.header,
                description="AWS Signature Version 4 for the service execute-api",
                openapi_extensions={"x-amazon-apigateway-authtype": "awsSigv4"},
            )
        },
        security=[{"sigv4": []}],
    )
    return _with_fleetkey_errors(json.loads(generated))


def _with_fleetkey_errors(document: dict[str, Any]) -> dict[str, Any]:
    for path in document["paths"].values():
        for operation in path.values():
            responses = operation["responses"]
            responses.pop("422", None)
            responses["500"] = INTERNAL_ERROR
    schemas = document["components"]["schemas"]
    for name in POWERTOOLS_ERROR_SCHEMAS:
        schemas.pop(name, None)
    return document


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def check(path: Path = DOCUMENT) -> str | None:
    """None when `path` holds the document the code generates, else what differs and how to
    regenerate it."""
    generated = render(admin_document())
    committed = path.read_text(encoding="utf-8") if path.exists() else ""
    if committed == generated:
        return None
    diff = difflib.unified_diff(
        committed.splitlines(),
        generated.splitlines(),
        f"{path.name} (committed)",
        f"{path.name} (generated)",
        lineterm="",
    )
    shown = list(diff)[:60]
    return (
        f"{path} does not match the admin API's routes and models; regenerate it with "
        f"`{REGENERATE}` (from the repository root, in the project's virtualenv) and commit it.\n"
        + "\n".join(shown)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed document; write nothing"
    )
    parser.add_argument("--output", type=Path, default=DOCUMENT, help=f"default {DOCUMENT}")
    args = parser.parse_args(argv)
    if args.check:
        problem = check(args.output)
        if problem:
            print(problem, file=sys.stderr)
            return 1
        print(f"{args.output} is up to date")
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render(admin_document()), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
