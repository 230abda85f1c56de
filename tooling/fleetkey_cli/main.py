"""fleetkey — operator command line.

    fleetkey allowlist import factory-manifest.csv       # the local stack (`make serve`)
    fleetkey device show pump-0001
    fleetkey device suspend pump-0001 --reason "reported stolen"
    fleetkey device resume pump-0001
    fleetkey device decommission pump-0001 --reason "end of life" --wait 600
    fleetkey device recommission pump-0001 --owner clinic-7    # an ownership transfer
    fleetkey device data-key pump-0001 > pump-0001.data-key.json
    fleetkey audit device:pump-0001
    fleetkey ca register --name acme-2026 --certificate acme-ca.pem --ca-key acme-ca.key
    fleetkey pki init --key-spec ECC_NIST_P384                   # fleetkey's issuing CA, in KMS
    fleetkey pki csr --subject "CN=fleetkey issuing CA,O=Example" --out issuing-ca.csr
    fleetkey pki install --certificate issuing-ca.pem --chain root-ca.pem
    fleetkey pki show
    fleetkey rotation status pump-0001
    fleetkey firmware publish --profile infusion-pump --version 2.5.0 --image pump-2.5.0.bin
    fleetkey firmware revoke infusion-pump <sha256> --reason "CVE-2026-0042"
    fleetkey firmware list --profile infusion-pump
    fleetkey validate pump-0001 --purpose dose-change --audience urn:fleetkey:therapy --verify
    fleetkey redrive registration-failures --dry-run     # failure queues: fleetkey_cli/redrive.py
    fleetkey --endpoint https://<api-id>.execute-api.eu-west-1.amazonaws.com/prod ca list

The endpoint is the admin API's stage URL (--endpoint, or $FLEETKEY_ENDPOINT); without either it
is the local stack's API gateway, http://127.0.0.1:8080. Requests are signed with SigV4 using the
standard AWS credential chain. For an endpoint on this machine (loopback) with no AWS credentials
configured, the local stack's own credentials are used; they are never used for any other
endpoint. The region is the local stack's for a loopback endpoint, else $AWS_REGION /
$AWS_DEFAULT_REGION (--region overrides both).

`validate` is a relying party's call (`POST /v1/validations`), signed by the same credentials:
the result is readable only by the principal that asked for it.

Exit status: 0 done; 1 the API refused the request (its error code and message on stderr), or a
`validate` whose device was not validated (refused, expired, still pending when the wait was
spent, or a token that did not verify); 2 a local problem (usage, unreadable file, unreachable
endpoint) or a `device decommission --wait` that timed out (the teardown goes on); 3 a manifest
import with refused rows. `redrive`: 1 when messages were left in the queue (why, per message).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fleetkey_cli import redrive
from fleetkey_cli.client import (
    LOCAL_ENDPOINT,
    AdminApiError,
    AdminClient,
    RelyingPartyClient,
    SigV4Transport,
    configured_credentials,
    is_loopback,
    local_credentials,
)

# `device decommission --wait` without SECONDS: long enough for a teardown that waits out AWS
# IoT's eventual consistency, which takes seconds, now and then minutes.
DEFAULT_WAIT_SECONDS = 300.0
# While waiting, a `device show` answered with one of these is tried again (0: unreachable).
RETRIED_WHILE_WAITING = frozenset({0, 429, 502, 503, 504})
MAX_POLL_INTERVAL_SECONDS = 5.0
# The KMS key specs fleetkey's issuing CA may have.
KEY_SPECS = ("ECC_NIST_P256", "ECC_NIST_P384")
# A validation: the API's bounds on the device's time to answer, and on one long poll.
VALIDATION_EXPIRES_IN = (5, 300)
DEFAULT_VALIDATION_EXPIRES_IN = 30
MAX_VALIDATION_POLL_SECONDS = 20
# Access tokens are ES256 (KMS ECC_NIST_P256) and typed RFC 9068 access tokens.
TOKEN_ALGORITHMS = ["ES256"]
ACCESS_TOKEN_TYPE = "at+jwt"

DATA_KEY_HELP = """\
The device's data key as a backend gets it: the KMS-wrapped blob (ciphertext_blob, base64) and
the encryption context it was wrapped with, as JSON. Nothing here is the key in the clear.
Decrypting it needs kms:Decrypt on the data-key KMS key (key_id) with exactly that encryption
context, e.g.:

  fleetkey device data-key pump-0001 > key.json
  jq -r .ciphertext_blob key.json | base64 -d > key.bin
  aws kms decrypt --key-id "$(jq -r .key_id key.json)" --ciphertext-blob fileb://key.bin \\
      --encryption-context "$(jq -c .encryption_context key.json)"

KMS answers with the key in the clear (Plaintext, base64): keep it out of terminals and logs.
The device must have asked for its data key in its current life first (until then: 404); a
device that is not ACTIVE or SUSPENDED has none (409). Each recommission (epoch) has another key.
"""


def _print(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more seconds, not {text!r}")
    return value


def _days(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of days: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more days, not {text!r}")
    return value


def _expires_in(text: str) -> int:
    low, high = VALIDATION_EXPIRES_IN
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {low}-{high} seconds, not {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleetkey",
        description="fleetkey operator CLI",
        epilog="Without --endpoint or $FLEETKEY_ENDPOINT the CLI talks to the local stack "
        f"(`make serve`, {LOCAL_ENDPOINT}), signing with the local credentials unless "
        "AWS credentials are configured. A deployed stack: --endpoint <stage URL> and the "
        "standard AWS credential chain.",
    )
    parser.add_argument(
        "--endpoint",
        default=os.environ.get("FLEETKEY_ENDPOINT") or LOCAL_ENDPOINT,
        help="admin API stage URL (default: $FLEETKEY_ENDPOINT, else the local "
        f"stack at {LOCAL_ENDPOINT})",
    )
    parser.add_argument(
        "--region",
        help="region the API is signed for (default: the local stack's for a "
        "loopback endpoint, else $AWS_REGION, $AWS_DEFAULT_REGION, eu-west-1)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    allowlist = commands.add_parser("allowlist", help="allow-list entries").add_subparsers(
        dest="action", required=True
    )
    add = allowlist.add_parser("add", help="allow-list one device")
    add.add_argument("--device-id", required=True)
    add.add_argument("--serial-number", required=True)
    add.add_argument("--manufacturer-ca", required=True)
    add.add_argument("--profile", required=True)
    add.add_argument("--public-key-fingerprint")
    add.add_argument("--attribute", action="append", default=[], metavar="NAME=VALUE")
    imp = allowlist.add_parser("import", help="import a factory manifest (CSV or JSON)")
    imp.add_argument("file", type=Path)
    imp.add_argument("--format", choices=["csv", "json"])

    device = commands.add_parser("device", help="devices").add_subparsers(
        dest="action", required=True
    )
    device.add_parser("show", help="read a device").add_argument("device_id", metavar="DEVICE")
    reason_help = "why, for the audit trail (1-256 printable characters)"
    suspend = device.add_parser(
        "suspend",
        help="suspend a device: its certificates INACTIVE in AWS IoT, its MQTT connection "
        "closed, the tokens issued so far inactive",
    )
    suspend.add_argument("device_id", metavar="DEVICE")
    suspend.add_argument("--reason", required=True, help=reason_help)
    device.add_parser(
        "resume", help="resume a suspended device: its certificates ACTIVE again"
    ).add_argument("device_id", metavar="DEVICE")
    decommission = device.add_parser(
        "decommission",
        help="decommission a device: DECOMMISSIONED at once, its removal from AWS IoT "
        "(teardown) follows asynchronously",
        description="The device is DECOMMISSIONED at once: nothing is granted to it from then "
        "on. Its removal from AWS IoT (reset command, disconnection, certificates and thing "
        "deleted, data key destroyed) follows asynchronously; `teardown.status` goes from "
        "pending to completed. Without --wait, prints the API's answer (202, teardown pending). "
        "Decommissioning it again queues an unfinished teardown once more. The device record "
        "and its audit trail stay.",
    )
    decommission.add_argument("device_id", metavar="DEVICE")
    decommission.add_argument("--reason", required=True, help=reason_help)
    decommission.add_argument(
        "--wait",
        nargs="?",
        const=DEFAULT_WAIT_SECONDS,
        type=_seconds,
        metavar="SECONDS",
        help="wait until teardown.status is completed, at most SECONDS (default "
        f"{DEFAULT_WAIT_SECONDS:g}), then print the device; exit status 2 if it is not "
        "complete by then (the teardown goes on). Put it after DEVICE or write --wait=SECONDS",
    )
    recommission = device.add_parser(
        "recommission",
        help="recommission a decommissioned device (once its teardown is complete); a "
        "different --owner is an ownership transfer",
        description="Once its teardown is complete, the device is ALLOWLISTED again in its "
        "next life (epoch + 1) and re-onboards through JITR with its factory certificate. "
        "Naming an owner other than its current one is an ownership transfer: the audit trail "
        "records the previous and the new owner, and the new life has a new data key. A device "
        "still being torn down is refused (409): wait with `device decommission --wait`.",
    )
    recommission.add_argument("device_id", metavar="DEVICE")
    recommission.add_argument(
        "--owner",
        help="the owner in its next life: a different owner is an ownership transfer "
        "(default: unchanged)",
    )
    recommission.add_argument(
        "--profile", help="the device profile in its next life (default: unchanged)"
    )
    device.add_parser(
        "data-key",
        help="print the device's data key wrapped by KMS (for a backend: decrypt it with "
        "kms:Decrypt and its encryption context)",
        description=DATA_KEY_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).add_argument("device_id", metavar="DEVICE")

    audit = commands.add_parser("audit", help="read and verify an audit trail")
    audit.add_argument(
        "subject", help="device id, or device:<id>, certificate:<id>, ca:<name>, stream:<name>"
    )

    ca = commands.add_parser("ca", help="manufacturer CAs").add_subparsers(
        dest="action", required=True
    )
    ca.add_parser("list")
    ca.add_parser("registration-code")
    register = ca.add_parser("register", help="register a manufacturer CA with AWS IoT")
    register.add_argument("--name", required=True)
    register.add_argument("--certificate", type=Path, required=True, help="CA certificate PEM")
    proof = register.add_mutually_exclusive_group(required=True)
    proof.add_argument(
        "--verification-certificate",
        type=Path,
        help="PEM whose CN is the registration code, signed by the CA key",
    )
    proof.add_argument(
        "--ca-key",
        type=Path,
        help="CA private key PEM: the proof is made here; the key is not sent",
    )
    for name in ("disable", "enable"):
        ca.add_parser(name).add_argument("name")

    keys = commands.add_parser("signing-keys", help="access-token signing keys (KMS)")
    keys_actions = keys.add_subparsers(dest="action", required=True)
    keys_actions.add_parser("list", help="the keys published in the JWKS")
    keys_actions.add_parser(
        "rotate",
        help="create a new key: published now, signing after the "
        "publish lead; the old one retires after its tokens",
    )
    keys_actions.add_parser("retire", help="schedule deletion of keys whose tokens have expired")

    pki = commands.add_parser(
        "pki",
        help="fleetkey's issuing CA (its key in KMS), which issues rotated device certificates",
    ).add_subparsers(dest="action", required=True)
    key_spec = {
        "choices": KEY_SPECS,
        "help": "the KMS key spec of the CA key (default ECC_NIST_P256)",
    }
    subject = {
        "metavar": "DN",
        "help": 'the CA\'s subject, RFC 4514 (default "CN=fleetkey issuing CA")',
    }
    init = pki.add_parser(
        "init",
        help="create the issuing CA: a KMS key and a self-signed CA certificate, registered "
        "with AWS IoT (auto-registration off)",
    )
    init.add_argument("--key-spec", **key_spec)
    init.add_argument("--subject", **subject)
    init.add_argument(
        "--validity-days", type=_days, metavar="N", help="CA certificate validity (default 3650)"
    )
    csr = pki.add_parser(
        "csr",
        help="create the CA key in KMS and print a CSR for it, for your own root (offline or "
        "enterprise CA) to sign; then `pki install`",
    )
    csr.add_argument("--key-spec", **key_spec)
    csr.add_argument("--subject", **subject)
    csr.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="write the CSR (PEM) to FILE and print the rest of the answer",
    )
    install = pki.add_parser(
        "install", help="install the CA certificate your root signed for `pki csr`'s CSR"
    )
    install.add_argument(
        "--certificate", type=Path, required=True, metavar="FILE", help="CA certificate PEM"
    )
    install.add_argument(
        "--chain",
        type=Path,
        required=True,
        metavar="FILE",
        help="its issuers up to the root, PEM",
    )
    pki.add_parser("show", help="the issuing CA: key, certificate, status, CRL")

    rotation = commands.add_parser("rotation", help="device certificate rotation").add_subparsers(
        dest="action", required=True
    )
    rotation.add_parser(
        "status",
        help="a device's certificates (current, pending with its commit deadline, retired) "
        "and its next renewal",
    ).add_argument("device_id", metavar="DEVICE")

    token = commands.add_parser("token", help="access tokens").add_subparsers(
        dest="action", required=True
    )
    revoke = token.add_parser(
        "revoke", help="revoke an access token (introspection reports it inactive)"
    )
    revoke.add_argument("--jti", required=True)

    firmware = commands.add_parser(
        "firmware",
        help="firmware releases: the measurements attested tokens accept, per device profile",
    ).add_subparsers(dest="action", required=True)
    publish = firmware.add_parser(
        "publish",
        help="publish a release: devices of the profile attesting it get tokens from now on",
        description="Publishing the same release again answers it unchanged; the same "
        "measurement with another version, or a revoked one, is refused (409).",
    )
    publish.add_argument("--profile", required=True, help="the device profile it is for")
    publish.add_argument("--version", required=True, help="the version devices running it report")
    image = publish.add_mutually_exclusive_group(required=True)
    image.add_argument(
        "--sha256", metavar="HEX", help="the image's SHA-256 (64 lowercase hex digits)"
    )
    image.add_argument(
        "--image", type=Path, metavar="FILE", help="the image: its SHA-256 is computed here"
    )
    withdraw = firmware.add_parser(
        "revoke",
        help="withdraw a release: attestation of it fails from now on (for good)",
    )
    withdraw.add_argument("profile", metavar="PROFILE")
    withdraw.add_argument("sha256", metavar="SHA256")
    withdraw.add_argument("--reason", help=reason_help)
    show = firmware.add_parser("show", help="read a release")
    show.add_argument("profile", metavar="PROFILE")
    show.add_argument("sha256", metavar="SHA256")
    firmware.add_parser("list", help="the releases, published and revoked").add_argument(
        "--profile", help="only this profile's (default: every profile's)"
    )

    validation = commands.add_parser(
        "validate",
        help="have a device prove itself now (a relying party's call) and print the result",
        description="Asks fleetkey to validate DEVICE (POST /v1/validations): fleetkey sends it "
        "a validate command, the device answers with an assertion signed by its key, and "
        "fleetkey issues a short-lived token for --audience carrying the validation's id and "
        "purpose. Waits for the result (GET /v1/validations/{id}?wait=...) and prints it. "
        "Exit status 0 when validated, 1 when refused, expired or still pending.",
    )
    validation.add_argument("device_id", metavar="DEVICE")
    validation.add_argument(
        "--purpose",
        required=True,
        help="the critical action about to happen (1-64 of A-Z a-z 0-9 . _ : -)",
    )
    validation.add_argument(
        "--audience", required=True, help="the token's audience (one the profile allows)"
    )
    validation.add_argument(
        "--require-attestation",
        action="store_true",
        help="require released firmware whatever the device's profile says",
    )
    validation.add_argument(
        "--expires-in",
        type=_expires_in,
        metavar="SECONDS",
        help="seconds the device has to answer, "
        f"{VALIDATION_EXPIRES_IN[0]}-{VALIDATION_EXPIRES_IN[1]} "
        f"(default {DEFAULT_VALIDATION_EXPIRES_IN})",
    )
    validation.add_argument(
        "--wait",
        type=_seconds,
        metavar="SECONDS",
        help="wait at most SECONDS for the result (default: until the device's deadline)",
    )
    validation.add_argument(
        "--verify",
        action="store_true",
        help="verify the token offline against the JWKS (ES256, audience, issuer) and add its "
        "verified claims to the output (verified_claims)",
    )
    validation.add_argument(
        "--issuer",
        metavar="URL",
        help="the issuer the token must name (default: the API's metadata `issuer`)",
    )
    redrive.add_parser(commands)  # fleetkey_cli/redrive.py
    return parser


def _verification_from_key(client: AdminClient, certificate_pem: str, key_path: Path) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from fleetkey_local.pki import CertificateAuthority, pem

    data = key_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: ask for the passphrase; the key never leaves this machine
        import getpass

        passphrase = getpass.getpass(f"passphrase for {key_path}: ").encode()
        key = serialization.load_pem_private_key(data, password=passphrase)
    authority = CertificateAuthority(
        name="ca", key=key, certificate=x509.load_pem_x509_certificate(certificate_pem.encode())
    )
    return pem(authority.verification_certificate(client.registration_code()))


def run(args: argparse.Namespace, client: AdminClient) -> int:
    if args.command == "allowlist" and args.action == "add":
        malformed = [a for a in args.attribute if "=" not in a]
        if malformed:
            print(f"fleetkey: --attribute takes NAME=VALUE, not {malformed[0]!r}", file=sys.stderr)
            return 2
        attributes = dict(a.split("=", 1) for a in args.attribute)
        entry = {
            "device_id": args.device_id,
            "serial_number": args.serial_number,
            "manufacturer_ca": args.manufacturer_ca,
            "profile": args.profile,
            "attributes": attributes,
        }
        if args.public_key_fingerprint:
            entry["public_key_fingerprint"] = args.public_key_fingerprint
        _print(client.add_entry(entry))
    elif args.command == "allowlist" and args.action == "import":
        fmt = args.format or ("json" if args.file.suffix.lower() == ".json" else "csv")
        report = client.import_manifest(args.file.read_text(encoding="utf-8"), fmt)
        _print(report)
        return 0 if not report["rejected"] else 3
    elif args.command == "device":
        return _device(args, client)
    elif args.command == "audit":
        trail = client.audit(args.subject)
        for record in trail["records"]:
            print(
                f"{record['seq']:>4}  {record['at']}  {record['action']:<22} {record['actor']}  "
                f"{json.dumps(record['details'], sort_keys=True)}"
            )
        print(f"chain verified: {len(trail['records'])} records, head {trail['head']['hash']}")
    elif args.command == "ca":
        if args.action == "list":
            _print(client.list_cas())
        elif args.action == "registration-code":
            print(client.registration_code())
        elif args.action == "register":
            certificate = args.certificate.read_text()
            if args.ca_key:
                verification = _verification_from_key(client, certificate, args.ca_key)
            else:
                verification = args.verification_certificate.read_text()
            _print(client.register_ca(args.name, certificate, verification))
        else:
            _print(client.set_ca_enabled(args.name, args.action == "enable"))
    elif args.command == "signing-keys":
        actions = {
            "list": client.signing_keys,
            "rotate": client.rotate_signing_key,
            "retire": client.retire_signing_keys,
        }
        _print(actions[args.action]())
    elif args.command == "token":
        _print(client.revoke_token(args.jti))
    elif args.command == "pki":
        return _pki(args, client)
    elif args.command == "rotation":
        _print(client.rotation_status(args.device_id))
    elif args.command == "firmware":
        return _firmware(args, client)
    elif args.command == "validate":
        return validate(args, RelyingPartyClient(client.transport))
    return 0


def _firmware(args: argparse.Namespace, client: AdminClient) -> int:
    if args.action == "publish":
        sha256 = args.sha256 if args.image is None else image_sha256(args.image)
        _print(client.publish_firmware(args.profile, args.version, sha256))
    elif args.action == "revoke":
        _print(client.revoke_firmware(args.profile, args.sha256, args.reason))
    elif args.action == "show":
        _print(client.firmware_release(args.profile, args.sha256))
    else:
        _print(client.list_firmware(args.profile))
    return 0


def image_sha256(path: Path) -> str:
    """The SHA-256 of a firmware image, read in chunks (images can be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as image:
        for chunk in iter(lambda: image.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def validate(
    args: argparse.Namespace,
    client: RelyingPartyClient,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Request a validation, then read its result until it is not pending or the wait is
    spent (each read a long poll of at most MAX_VALIDATION_POLL_SECONDS; a transient failure
    of a read is tried again). Prints the result (with `verified_claims` under --verify);
    0 when validated (and verified), 1 otherwise."""
    expires_in = args.expires_in or DEFAULT_VALIDATION_EXPIRES_IN
    seconds = args.wait if args.wait is not None else expires_in + 1
    created = client.request_validation(
        args.device_id,
        args.purpose,
        args.audience,
        require_attestation=args.require_attestation,
        expires_in=args.expires_in,
    )
    validation_id = created["validation_id"]
    print(
        f"fleetkey: validation {validation_id} of {args.device_id} requested; the device must "
        f"answer by {created.get('expires_at')} (waiting up to {seconds:g} s)",
        file=sys.stderr,
    )
    deadline = clock() + seconds
    result: dict = {**created, "device_id": args.device_id, "status": "pending"}
    while True:
        remaining = deadline - clock()
        wait = int(min(MAX_VALIDATION_POLL_SECONDS, max(0.0, remaining)))
        try:
            result = client.validation(validation_id, wait)
        except AdminApiError as exc:
            if exc.response.status not in RETRIED_WHILE_WAITING:
                raise
            print(f"fleetkey: reading the result failed, trying again: {exc}", file=sys.stderr)
            wait = 0
        if result.get("status") != "pending":
            break
        remaining = deadline - clock()
        if remaining <= 0:
            break
        if wait == 0:  # answered at once: do not spin
            sleep(min(0.5, remaining))
    status = result.get("status")
    if status != "validated":
        _print(result)
        why = f" ({result['reason']})" if result.get("reason") else ""
        print(f"fleetkey: {args.device_id} was not validated: {status}{why}", file=sys.stderr)
        return 1
    if args.verify:
        try:
            claims = verify_token(
                result.get("token") or "",
                client,
                audience=args.audience,
                issuer=args.issuer,
                validation_id=validation_id,
                device_id=args.device_id,
                purpose=args.purpose,
            )
        except TokenNotVerified as exc:
            _print(result)
            print(f"fleetkey: the token did not verify: {exc}", file=sys.stderr)
            return 1
        result = {**result, "verified_claims": claims}
    _print(result)
    return 0


class TokenNotVerified(Exception):
    pass


def verify_token(
    token: str,
    client: RelyingPartyClient,
    *,
    audience: str,
    issuer: str | None,
    validation_id: str,
    device_id: str,
    purpose: str,
) -> dict:
    """Verify a validation's token as a relying party does, offline against the JWKS: an
    RFC 9068 access token (`typ` at+jwt), ES256 by a key of the JWKS (by `kid`), for
    `audience`, from `issuer` (default: the metadata's), unexpired; its subject the device and
    its `validation` claim this validation. Its claims.

    Raises:
        TokenNotVerified: any check failed (why, in the message).
    """
    import jwt

    issuer = issuer or client.metadata().get("issuer")
    if not isinstance(issuer, str) or not issuer:
        raise TokenNotVerified("the API's metadata names no issuer")
    try:
        header = jwt.get_unverified_header(token)
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise TokenNotVerified(f"typ is {header.get('typ')!r}, not {ACCESS_TOKEN_TYPE}")
        keys = {key.key_id: key for key in jwt.PyJWKSet.from_dict(client.jwks()).keys}
        key = keys.get(header.get("kid"))
        if key is None:
            raise TokenNotVerified("it is signed by no key of the JWKS")
        claims: dict = jwt.decode(
            token,
            key.key,
            algorithms=TOKEN_ALGORITHMS,
            audience=audience,
            issuer=issuer,
            options={"require": ["exp", "iat", "iss", "aud", "sub", "jti"]},
        )
    except jwt.PyJWTError as exc:
        raise TokenNotVerified(str(exc) or type(exc).__name__) from None
    if claims.get("sub") != device_id:
        raise TokenNotVerified(f"its subject is {claims.get('sub')!r}, not {device_id}")
    if claims.get("validation") != {"id": validation_id, "purpose": purpose}:
        raise TokenNotVerified("its validation claim is not this validation's")
    return claims


def _pki(args: argparse.Namespace, client: AdminClient) -> int:
    if args.action == "init":
        _print(client.pki_init(args.key_spec, args.subject, args.validity_days))
    elif args.action == "csr":
        answer = client.pki_csr(args.key_spec, args.subject)
        if args.out is None:
            _print(answer)
        else:
            args.out.write_text(answer["csr_pem"])
            rest = {k: v for k, v in answer.items() if k != "csr_pem"}
            _print({**rest, "csr_file": str(args.out)})
    elif args.action == "install":
        _print(client.pki_install(args.certificate.read_text(), args.chain.read_text()))
    else:
        _print(client.pki())
    return 0


def _device(args: argparse.Namespace, client: AdminClient) -> int:
    device_id = args.device_id
    if args.action == "show":
        _print(client.device(device_id))
    elif args.action == "suspend":
        _print(client.suspend(device_id, args.reason))
    elif args.action == "resume":
        _print(client.resume(device_id))
    elif args.action == "decommission":
        answer = client.decommission(device_id, args.reason)
        if args.wait is None:
            _print(answer)
        else:
            return wait_for_teardown(client, device_id, args.wait)
    elif args.action == "recommission":
        _print(client.recommission(device_id, owner=args.owner, profile=args.profile))
    elif args.action == "data-key":
        _print(client.data_key(device_id))
    return 0


def wait_for_teardown(
    client: AdminClient,
    device_id: str,
    seconds: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Poll the device until its teardown is complete (0, the device printed) or `seconds` have
    passed (2, the last device read printed, and why on stderr). Polls back off from half a
    second to MAX_POLL_INTERVAL_SECONDS; a transient error of a poll is tried again."""
    print(
        f"fleetkey: waiting up to {seconds:g} s for {device_id}'s teardown to complete",
        file=sys.stderr,
    )
    deadline = clock() + seconds
    interval = 0.5
    device: dict | None = None
    failure: AdminApiError | None = None
    while True:
        try:
            device = client.device(device_id)
            failure = None
        except AdminApiError as exc:
            if exc.response.status not in RETRIED_WHILE_WAITING:
                raise
            failure = exc
        else:
            if device.get("state") != "DECOMMISSIONED":
                # Only a recommission leaves DECOMMISSIONED, and only once the teardown completed.
                _print(device)
                print(
                    f"fleetkey: {device_id} is {device.get('state')} again (recommissioned "
                    "meanwhile, after its teardown completed)",
                    file=sys.stderr,
                )
                return 0
            if (device.get("teardown") or {}).get("status") == "completed":
                _print(device)
                return 0
        remaining = deadline - clock()
        if remaining <= 0:
            break
        sleep(min(interval, remaining))
        interval = min(interval * 2, MAX_POLL_INTERVAL_SECONDS)
    if device is not None:
        _print(device)
    message = (
        f"fleetkey: timed out after {seconds:g} s: {device_id}'s teardown is still pending; "
        f"it goes on in the background (`fleetkey device show {device_id}`: teardown.status)"
    )
    if failure is not None:
        message += f"; the last read failed: {failure}"
    print(message, file=sys.stderr)
    return 2


def _transport(endpoint: str, region: str | None) -> SigV4Transport:
    """SigV4 with the standard credential chain. For the local stack (a loopback endpoint): its
    region, and its own credentials when none are configured. Local credentials are never sent
    anywhere else: a non-loopback endpoint without credentials is an error."""
    if not is_loopback(endpoint):
        region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return SigV4Transport(endpoint, region or "eu-west-1")
    from fleetkey_local.stack import REGION as LOCAL_REGION

    credentials = configured_credentials(instance_metadata=False) or local_credentials()
    return SigV4Transport(endpoint, region or LOCAL_REGION, credentials=credentials)


def _local_hint(endpoint: str, error: AdminApiError) -> str | None:
    if not is_loopback(endpoint):
        return None
    if error.response.status == 0:
        return "is the local stack running? (`make serve`)"
    if error.response.status == 403:
        return (
            "the local stack accepts only its own credentials: unset AWS_ACCESS_KEY_ID/"
            "AWS_PROFILE, or set AWS_ACCESS_KEY_ID=fleetkey-local "
            "AWS_SECRET_ACCESS_KEY=fleetkey-local"
        )
    return None


def main(argv: list[str] | None = None, client: AdminClient | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "redrive":  # SQS and Lambda, not the admin API
        return redrive.command(args)
    if client is None:
        client = AdminClient(_transport(args.endpoint, args.region))
    try:
        return run(args, client)
    except AdminApiError as exc:
        print(f"fleetkey: {exc}", file=sys.stderr)
        hint = _local_hint(args.endpoint, exc)
        if hint:
            print(f"fleetkey: {hint}", file=sys.stderr)
        # 1: the API answered with an error; 2: it could not be reached (like a local problem).
        return 2 if exc.response.status == 0 else 1
    except (OSError, ValueError) as exc:  # unreadable files, bad key material
        print(f"fleetkey: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
