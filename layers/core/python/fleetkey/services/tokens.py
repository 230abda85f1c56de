"""Token vending: a device proves its identity with a JWT client assertion signed by its own key
(RFC 7523 §2.2 in an RFC 6749 §4.4 client-credentials grant) and receives a short-lived access
token (RFC 9068) signed by a KMS key, bound to its certificate (RFC 8705 `cnf`).

AWS calls per issued token, warm: one KMS Sign, then one conditional write (a transaction) that
records the assertion's jti (and consumes its challenge, or decides the validation it answers)
and checks, in the same transaction, that the device is still ACTIVE with that current
certificate and the profile, epoch, owner and tokens_not_before the decision was made on (and,
for attested firmware, that the measurement is a published release) = 2. The token is signed
before the write and handed out only once the write committed: a failure at either call leaves
nothing used, so the same assertion may be sent again, and no assertion yields two tokens.
The device's credential (state, profile, certificates) is cached by certificate id after a
token was granted on it; a cache miss reads it (3 calls). A failed device condition reports the
device as it is: the cache is refreshed from it and the request decided again (no extra read).
Public keys of device certificates and of signing keys are cached (they never change for an
id); the signing-key registry for a minute.

Assertion rules (RFC 8725, RFC 7515 §4.1.11, RFC 7521 §4.2, RFC 7523 as updated by
draft-ietf-oauth-rfc7523bis-11 §4):
- parsed strictly before anything else (`fleetkey.crypto.jose.parse_compact_jws`): a `crit` (or
  `b64`) header, duplicate member names, non-UTF-8 or non-canonical encodings are refused;
- `typ`, when present, must say the JWT is a client assertion: `client-authentication+jwt`
  (7523bis's explicit type) or the generic `JWT` (7523bis: servers should not refuse untyped
  assertions), "application/" optional, any case (RFC 7515 §4.1.9). Any other type, `at+jwt`
  above all, is refused (RFC 8725 §3.11: an access token is never taken for an assertion);
- `aud` is the issuer identifier as its sole value: the string itself, or an array holding only
  it (7523bis -03 allowed the one-element array); the token endpoint URL, or the issuer among
  other values, is refused;
- a `client_id` form parameter, when sent, must name the device the assertion authenticates
  (RFC 7521 §4.2); if not, `invalid_client` (RFC 7521 §4.2.1);
- the assertion is the only client authentication (RFC 6749 §2.3): a `client_secret` parameter
  (or, at the function, an `Authorization` header) beside it is `invalid_request`;
- `firmware_version`, copied into the token, is printable ASCII without spaces, 1-64 characters
  (`FIRMWARE_VERSION`, the rule of `jti`); anything else is `invalid_client`.

Equal work on every refusal: refusals that depend only on the request are made before any AWS
call (they say nothing about any device). Once the device is read (or found in the cache, which
holds only certificates that were granted a token on this instance: a cached one is answered
sooner, which tells only that its device got a token here lately), the assertion's signature is
verified in every case: against the device key, or, when the device is unknown, not ACTIVE, the
kid is not its current certificate, or the algorithm does not fit its key, against a stand-in key
of the same algorithm made at cold start (`stand_in_keys`). The device read is a projection of
the fields that authenticate it, and a miss decodes a decoy item of the same shape
(`DeviceRepository.credential`). So an unknown device costs what a known one with a bad signature
costs: one device read, one item decoded and one signature verification.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from fleetkey.clock import Clock, utc_now
from fleetkey.crypto.jose import (
    MalformedJws,
    UnverifiedJws,
    algorithms_for,
    b64url,
    media_type,
    parse_compact_jws,
    sign_jwt,
    stand_in_keys,
)
from fleetkey.domain.firmware import FIRMWARE_VERSION
from fleetkey.domain.ids import DEVICE_ID
from fleetkey.domain.lifecycle import DeviceState
from fleetkey.domain.models import CertificateRole, HeldCertificate
from fleetkey.domain.oauth import (
    InvalidClient,
    InvalidGrant,
    InvalidScope,
    OAuthError,
    OAuthInvalidRequest,
    UnsupportedGrantType,
)
from fleetkey.domain.profiles import TokenRules, get_profile
from fleetkey.domain.validation import (
    VALIDATION_TOKEN_SECONDS,
    RefusalReason,
    ValidationAnswer,
    ValidationStatus,
    validation_answer,
)
from fleetkey.ports import (
    AssertionReplayed,
    ChallengeUnusable,
    DeviceCredential,
    DeviceNotEligible,
    DeviceRepository,
    FirmwareNotReleased,
    FirmwareReleases,
    TokenRecords,
    ValidationRecords,
    ValidationUnanswerable,
    Write,
)
from fleetkey.services.signing_keys import SigningKeys
from fleetkey.settings import Settings

if TYPE_CHECKING:
    from fleetkey.services.validations import OutcomeObserver

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = frozenset({"ES256", "ES384", "PS256", "RS256"})
MAX_ASSERTION_BYTES = 8 * 1024
MAX_ASSERTION_LIFETIME = 300
CLOCK_SKEW = 60
CHALLENGE_SECONDS = 120
ACCESS_TOKEN_TYPE = "at+jwt"
# The `typ` values a client assertion may carry (as media types, RFC 7515 §4.1.9), besides none.
ASSERTION_TYPES = frozenset({"application/client-authentication+jwt", "application/jwt"})
_CERTIFICATE_ID = re.compile(r"[0-9a-f]{64}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,128}")
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
# A media type parameter (RFC 9110 §5.6.6): token "=" ( token / quoted-string without ";").
_TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_MEDIA_TYPE_PARAMETER = re.compile(rf'\s*({_TOKEN_CHARS})=({_TOKEN_CHARS}|"[^";\\]*")\s*')


@dataclass(frozen=True, slots=True)
class AuthenticatedDevice:
    """A device that proved itself with a client assertion signed by its current certificate's
    key (not yet recorded as used: `TokenService.record_assertion`)."""

    device: DeviceCredential
    certificate: HeldCertificate
    claims: dict[str, Any]
    now: int
    nonce: str | None


@dataclass(frozen=True, slots=True)
class Attestation:
    """The firmware claims a grant carries, and the check that the measurement is a published
    release of the device's profile (None when nothing is vouched for), for the grant's write."""

    claims: dict[str, str]
    check: Write | None = None


class AttestationMissing(InvalidGrant):
    """Attestation is required and the assertion does not carry a measurement and version."""


class UnreleasedFirmware(InvalidGrant):
    """The attested measurement is not a published release of the device's profile."""


class TokenService:
    """`on_validation_outcome` is told of a validation this service decides (`validated`, or
    `refused` with its reason), once per validation: right after the write that decided it
    commits, by the request that made it (an answer the validation no longer takes decides
    nothing and is not observed)."""

    def __init__(
        self,
        settings: Settings,
        devices: DeviceRepository,
        records: TokenRecords,
        signing_keys: SigningKeys,
        clock: Clock = utc_now,
        *,
        firmware: FirmwareReleases | None = None,
        validations: ValidationRecords | None = None,
        on_validation_outcome: OutcomeObserver | None = None,
    ) -> None:
        self._settings = settings
        self._devices = devices
        self._records = records
        self._keys = signing_keys
        self._clock = clock
        self._firmware = firmware
        self._validations = validations
        self._on_validation_outcome = on_validation_outcome
        self._public_keys: OrderedDict[str, PublicKey] = OrderedDict()
        # Device credentials by the certificate id a token was last granted on (`issue`).
        self._credentials: OrderedDict[str, DeviceCredential] = OrderedDict()
        # Assertions this instance granted on, until they expire: a replay here is refused
        # before it costs a KMS signature (another instance's write refuses it all the same).
        self._used: OrderedDict[tuple[str, str], int] = OrderedDict()
        # Made at cold start, not on the first refusal: that one would pay for it.
        self._stand_in_keys = stand_in_keys()

    # ---- challenge --------------------------------------------------------------------------

    def challenge(self) -> dict[str, Any]:
        """A single-use nonce for devices without a trusted clock (one conditional write)."""
        nonce = secrets.token_urlsafe(32)
        self._records.put_nonce(nonce, int(self._clock().timestamp()) + CHALLENGE_SECONDS)
        return {"nonce": nonce, "expires_in": CHALLENGE_SECONDS}

    # ---- token ------------------------------------------------------------------------------

    def issue(self, form: Mapping[str, str]) -> dict[str, Any]:
        """Issue an access token for a client-credentials request with a JWT client assertion;
        when the assertion answers a validation (its `validation` claim), the token is that
        validation's result (`fleetkey.domain.validation`) and is also recorded for the relying
        party that asked.

        AWS calls: none for a request refused on its own content; warm, KMS Sign + the grant's
        transaction (2); with the device's credential not cached, + 1 read (GetItem with a
        projection). A refused validation answer that knows the validation's nonce + 1 (the
        refusal recorded). Every refusal after the device is known has decoded one item and
        verified one signature, whichever check failed (see the module's docstring).

        Raises:
            OAuthInvalidRequest, UnsupportedGrantType: the request is malformed.
            InvalidClient: the assertion does not authenticate an ACTIVE device by its current
                certificate, breaks an assertion rule, or its `client_id` names another client
                (one answer for every such case).
            InvalidGrant: a replayed assertion, an unknown or used challenge, unattested or
                unreleased firmware, a validation this answer does not fit.
            InvalidScope: a scope or audience outside the device's profile.
        """
        # RFC 6749 §2.3: one client authentication method per request; with the assertion, a
        # client secret is a second one (and would be a secret sent for nothing).
        if "client_secret" in form:
            raise OAuthInvalidRequest("more than one client authentication method")
        if form.get("grant_type") != "client_credentials":
            if not form.get("grant_type"):
                raise OAuthInvalidRequest("grant_type is required")
            raise UnsupportedGrantType("only the client_credentials grant is supported")
        if form.get("client_assertion_type") != JWT_BEARER:
            raise OAuthInvalidRequest(f"client_assertion_type must be {JWT_BEARER}")
        assertion = form.get("client_assertion") or ""
        if not assertion or len(assertion) > MAX_ASSERTION_BYTES:
            raise OAuthInvalidRequest("client_assertion is required (at most 8 KiB)")

        jws = self._peek(assertion, form.get("client_id"))
        try:
            answer = validation_answer(jws.claims, form.get("audience"))
        except ValueError as exc:
            raise OAuthInvalidRequest(f"validation answer: {exc}") from None
        if answer is not None and (form.get("scope") or self._validations is None):
            raise OAuthInvalidRequest("a validation answer asks for no scope")
        try:
            return self._grant(jws, assertion, form, answer)
        except (InvalidClient, InvalidGrant) as exc:
            reason = _validation_refusal(exc)
            if answer is not None and reason is not None and self._validations is not None:
                device_id: str = jws.claims["sub"]
                now = int(self._clock().timestamp())
                if self._validations.refuse(device_id, answer, reason, now):
                    self._observe(ValidationStatus.REFUSED, reason)
            raise

    def _grant(
        self,
        jws: UnverifiedJws,
        assertion: str,
        form: Mapping[str, str],
        answer: ValidationAnswer | None,
    ) -> dict[str, Any]:
        """Decide, sign, then write. A refusal decided on the cached credential is decided
        again on the device as read; a write that finds the device changed is decided again,
        once, on the device as the write found it."""
        device, cached = self._cached(jws)
        stale_writes = 0
        while True:
            try:
                auth = self._verify(jws, assertion, device)
                rules = get_profile(auth.device.profile).token_rules
                if answer is None:
                    scopes = self._granted(form.get("scope"), rules.scopes, "scope")
                    audiences = self._granted(form.get("audience"), rules.audiences, "audience")
                else:
                    scopes = []
                    audiences = self._granted(answer.audience, rules.audiences, "audience")
                attestation = self.attested_firmware(
                    auth.claims, auth.device.profile, rules, answering=answer is not None
                )
            except OAuthError:
                if not cached:
                    raise
                device, cached = self._devices.credential(jws.claims["sub"]), False
                continue
            used = (auth.device.device_id, str(auth.claims["jti"]))
            if self._used.get(used, 0) >= auth.now:
                raise InvalidGrant("the assertion was already used")
            token, lifetime = self._sign(auth, rules, scopes, audiences, attestation, answer)
            extra = [attestation.check] if attestation.check is not None else []
            if answer is not None and self._validations is not None:
                extra.append(
                    self._validations.answer(
                        auth.device.device_id,
                        answer,
                        epoch=auth.device.epoch,
                        tokens_not_before=auth.device.tokens_not_before,
                        attested=attestation.check is not None,
                        token=token,
                        now=auth.now,
                    )
                )
            try:
                self._record(auth, extra, challenge=answer is None)
            except _Stale as stale:
                device, cached = stale.current, False
                self._remember(auth.certificate.certificate_id, device)
                stale_writes += 1
                if stale_writes == 2 or device is None:
                    raise InvalidClient("device not active") from None
                continue
            except ValidationUnanswerable as exc:
                raise self._unanswerable(exc, auth, answer, attestation) from None
            if answer is not None and self._validations is not None:
                self._observe(ValidationStatus.VALIDATED, None)
            self._remember(auth.certificate.certificate_id, auth.device)
            self._used[used] = _remember_until(auth)
            if len(self._used) > 10_000:
                self._used.popitem(last=False)
            response = {"access_token": token, "token_type": "Bearer", "expires_in": lifetime}
            if scopes:
                response["scope"] = " ".join(scopes)
            return response

    def _sign(
        self,
        auth: AuthenticatedDevice,
        rules: TokenRules,
        scopes: list[str],
        audiences: list[str],
        attestation: Attestation,
        answer: ValidationAnswer | None,
    ) -> tuple[str, int]:
        """The access token (RFC 9068) and its lifetime. AWS calls: 1 (KMS Sign)."""
        device, now = auth.device, auth.now
        certificate_expiry = auth.certificate.not_after_epoch()
        wanted = rules.lifetime_seconds if answer is None else VALIDATION_TOKEN_SECONDS
        lifetime = min(wanted, certificate_expiry - now)
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "sub": device.device_id,
            "aud": audiences[0] if len(audiences) == 1 else audiences,
            "exp": now + lifetime,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "client_id": device.device_id,
            "cnf": {"x5t#S256": b64url(bytes.fromhex(auth.certificate.certificate_id))},
            "device_profile": device.profile,
            **attestation.claims,
        }
        if answer is None:
            claims["scope"] = " ".join(scopes)
        else:
            claims["validation"] = {"id": answer.validation_id, "purpose": answer.purpose}
        signing_key, signer = self._keys.current()
        return sign_jwt(signer, signing_key.kid, claims, ACCESS_TOKEN_TYPE), lifetime

    def _observe(self, status: ValidationStatus, reason: RefusalReason | None) -> None:
        """Report a validation this request has just decided (the write committed)."""
        if self._on_validation_outcome is not None:
            self._on_validation_outcome(status, reason)

    def _unanswerable(
        self,
        exc: ValidationUnanswerable,
        auth: AuthenticatedDevice,
        answer: ValidationAnswer | None,
        attestation: Attestation,
    ) -> OAuthError:
        """Why the validation did not take this answer: the device was suspended, or began
        another life, since the validation was asked, or the answer is unattested where the
        validation requires attestation (the validation is then refused for it); anything else
        leaves the validation as it is."""
        record = exc.current or {}
        device = auth.device
        fits = (
            answer is not None
            and record.get("status") == ValidationStatus.PENDING.value
            and record.get("device_id") == auth.device.device_id
            and record.get("nonce") == answer.nonce
            and record.get("purpose") == answer.purpose
            and record.get("audience") == answer.audience
            and int(record.get("answer_by", 0)) > auth.now
        )
        changed = int(record.get("epoch") or 1) != device.epoch or (
            device.tokens_not_before is not None
            and int(record.get("created_at", 0)) < device.tokens_not_before
        )
        if fits and changed:
            return InvalidClient("device not active")
        if fits and record.get("require_attestation") and attestation.check is None:
            return AttestationMissing("the validation requires attested firmware")
        return InvalidGrant("the validation is unknown, answered, expired or not this device's")

    def authenticate(
        self,
        assertion: str,
        client_id: str | None,
        *,
        role: CertificateRole = CertificateRole.CURRENT,
    ) -> AuthenticatedDevice:
        """Verify a client assertion: the device it names is ACTIVE and signed it with the key
        of its current certificate (or, for a rotation's commit, `role` PENDING: the new one),
        and the assertion keeps every rule (module docstring). Not yet recorded as used
        (`record_assertion`). The device is read (never the cache: the callers, rotation and
        data keys, act on it beyond the grant's write).

        AWS calls: none for an assertion refused on its own content; else 1 (the device's
        credential, a projected GetItem). Every refusal after the read has decoded one item and
        verified one signature, whichever check failed.

        Raises:
            InvalidClient: the assertion does not authenticate an ACTIVE device by its current
                certificate or breaks an assertion rule (one answer for every such case).
        """
        jws = self._peek(assertion, client_id)
        return self._verify(jws, assertion, self._devices.credential(jws.claims["sub"]), role)

    def _cached(self, jws: UnverifiedJws) -> tuple[DeviceCredential | None, bool]:
        """The credential of the device the assertion names, and whether it came from the cache:
        the cached one when a token was granted on the assertion's certificate here and it still
        reads as usable, else the device as read.

        AWS calls: 0 cached, else 1 (projected GetItem)."""
        device_id: str = jws.claims["sub"]
        cached = self._credentials.get(jws.header["kid"])
        if cached is not None and cached.device_id == device_id:
            held = cached.holds(jws.header["kid"])
            if cached.state is DeviceState.ACTIVE and held and held.role is CertificateRole.CURRENT:
                return cached, True
        # The projected read, whose miss decodes a decoy item: equal CPU for unknown and known.
        return self._devices.credential(device_id), False

    def _remember(self, certificate_id: str, device: DeviceCredential | None) -> None:
        """Cache `device` under the certificate a grant was decided on (10,000 at most); a
        device that is gone is forgotten."""
        self._credentials.pop(certificate_id, None)
        if device is None:
            return
        self._credentials[certificate_id] = device
        if len(self._credentials) > 10_000:
            self._credentials.popitem(last=False)

    def _verify(
        self,
        jws: UnverifiedJws,
        assertion: str,
        device: DeviceCredential | None,
        role: CertificateRole = CertificateRole.CURRENT,
    ) -> AuthenticatedDevice:
        """`authenticate` on an assertion already peeked, with the device's credential."""
        header, unverified = jws.header, jws.claims
        device_id: str = unverified["sub"]
        key, certificate, refusal = self._verification_key(
            device, header["kid"], header["alg"], role
        )

        now = int(self._clock().timestamp())
        nonce = unverified.get("nonce")
        required = ["iss", "sub", "aud", "jti"] + ([] if nonce is not None else ["exp", "iat"])
        try:
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key,
                algorithms=[header["alg"]],
                audience=self._settings.issuer,
                issuer=device_id,
                leeway=CLOCK_SKEW,
                options={"require": required},
            )
        except (jwt.PyJWTError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise InvalidClient(refusal or f"assertion: {type(exc).__name__}") from None
        # Verified by a stand-in key (nobody holds its private half): refused all the same.
        if refusal is not None or device is None or certificate is None:
            raise InvalidClient(refusal or "no device key")
        if nonce is None and not 0 < claims["exp"] - claims["iat"] <= MAX_ASSERTION_LIFETIME:
            raise InvalidClient(
                "assertion lifetime",
                proven=True,
                rule="the client assertion's lifetime, exp - iat, must be 1 to "
                f"{MAX_ASSERTION_LIFETIME} seconds",
            )
        if not isinstance(claims["jti"], str) or not _PRINTABLE.fullmatch(claims["jti"]):
            raise InvalidClient("jti", proven=True)
        if nonce is not None and (not isinstance(nonce, str) or not _PRINTABLE.fullmatch(nonce)):
            raise InvalidClient("nonce", proven=True)
        version = claims.get("firmware_version")
        if version is not None and (
            not isinstance(version, str) or not FIRMWARE_VERSION.fullmatch(version)
        ):
            raise InvalidClient("firmware_version", proven=True)
        # With a nonce, iat/exp may be absent; an exp that is present is bounded all the same
        # (without one, exp - iat <= 5 min and pyjwt's iat check bound it).
        if (
            nonce is not None
            and "exp" in claims
            and claims["exp"] > now + MAX_ASSERTION_LIFETIME + CLOCK_SKEW
        ):
            raise InvalidClient(
                "assertion lifetime",
                proven=True,
                rule="a client assertion with a nonce must expire within "
                f"{MAX_ASSERTION_LIFETIME} seconds",
            )
        if now >= certificate.not_after_epoch():
            raise InvalidClient("certificate expired", proven=True)
        if device.tokens_not_before is not None and (
            now < device.tokens_not_before
            or ("iat" in claims and claims["iat"] < device.tokens_not_before)
        ):
            # Resumed within the second of its suspension: a token of that second would be
            # inactive (iat is whole seconds), so none is granted until the next one; and an
            # assertion signed before the suspension (or an earlier life) is not honoured.
            raise InvalidClient("device not active", proven=True)
        return AuthenticatedDevice(device, certificate, claims, now, nonce)

    def record_assertion(
        self, auth: AuthenticatedDevice, attestation: Attestation | None = None
    ) -> None:
        """Record the assertion's jti as used (and consume its challenge) in one conditional
        write that also checks the device is still as it was authenticated (ACTIVE with that
        current certificate, same profile, epoch, owner and tokens_not_before) and, with an
        `attestation` that vouches for a measurement, that it is a published release: once a
        suspension or decommission has committed, nothing more is granted on an assertion that
        was verified before it.

        AWS calls: 1 (TransactWriteItems).

        Raises:
            InvalidGrant: a replayed assertion, an unknown, used or expired challenge, or
                unreleased firmware (`UnreleasedFirmware`).
            InvalidClient: the device changed (suspended, decommissioned, certificate replaced).
        """
        extra = [attestation.check] if attestation and attestation.check is not None else []
        try:
            self._record(auth, extra, challenge=True)
        except _Stale:
            raise InvalidClient("device not active") from None

    def _record(self, auth: AuthenticatedDevice, extra: list[Write], *, challenge: bool) -> None:
        """The grant's one transaction: the device check, the jti, the challenge (`challenge`:
        the nonce is a challenge's, not a validation's) and `extra`.

        Raises:
            _Stale: the device is not as decided on (with its credential as it is).
            InvalidGrant, ValidationUnanswerable: as `record_assertion`, `issue`.
        """
        claims = auth.claims
        remember_until = _remember_until(auth)
        eligible = self._devices.eligibility_check(
            auth.device, auth.certificate.certificate_id, auth.certificate.role
        )
        try:
            self._records.use_assertion(
                auth.device.device_id,
                claims["jti"],
                remember_until,
                auth.now,
                auth.nonce if challenge else None,
                with_writes=[eligible],
                then=extra,
            )
        except DeviceNotEligible as exc:
            raise _Stale(exc.current) from None
        except AssertionReplayed:
            raise InvalidGrant("the assertion was already used") from None
        except ChallengeUnusable:
            raise InvalidGrant("the challenge is unknown, used or expired") from None
        except FirmwareNotReleased:
            raise UnreleasedFirmware("the firmware is not a released version") from None

    def _peek(self, assertion: str, client_id: str | None) -> UnverifiedJws:
        """Header and claims before verification, checked for everything that depends on the
        request alone: to find whose key to verify with, and to refuse early what no device could
        make acceptable. CPU only, no AWS call.

        Raises:
            InvalidClient: malformed, or an assertion rule is broken (see the module docstring).
        """
        try:
            jws = parse_compact_jws(assertion, max_bytes=MAX_ASSERTION_BYTES)
        except MalformedJws as exc:
            raise InvalidClient(
                f"malformed assertion: {exc}",
                rule=f"the client assertion is not a well-formed compact JWS ({exc})",
            ) from None
        header, claims = jws.header, jws.claims
        if header["alg"] not in ASSERTION_ALGORITHMS:
            raise InvalidClient(
                "algorithm not allowed",
                rule="the client assertion's alg must be ES256, ES384, PS256 or RS256, "
                "matching the device's key",
            )
        if not isinstance(header.get("kid"), str) or not _CERTIFICATE_ID.fullmatch(header["kid"]):
            raise InvalidClient(
                "kid",
                rule="the client assertion's kid header must be the AWS IoT certificate id of "
                "the device's certificate (64 lowercase hex digits)",
            )
        if "typ" in header and media_type(header["typ"]) not in ASSERTION_TYPES:
            raise InvalidClient(
                "typ is not a client assertion's",
                rule="the client assertion's typ header, when present, must be "
                "client-authentication+jwt or JWT",
            )
        device_id = claims.get("sub")
        if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
            raise InvalidClient(
                "subject",
                rule="the client assertion's sub must be the device id (1 to 128 of A-Z a-z "
                "0-9 : _ -)",
            )
        if claims.get("iss") != device_id:
            raise InvalidClient(
                "iss differs from sub",
                rule="the client assertion's iss must be its sub, the device id",
            )
        # 7523bis §4: the issuer identifier as the sole audience (simple string comparison).
        audience = claims.get("aud")
        if audience != self._settings.issuer and audience != [self._settings.issuer]:
            raise InvalidClient(
                "aud is not the issuer alone",
                rule="the client assertion's aud must be the issuer identifier "
                f"{self._settings.issuer} alone (a string, or an array holding only it), not "
                "the token endpoint URL",
            )
        if client_id is not None and client_id != device_id:  # RFC 7521 §4.2
            raise InvalidClient(
                "client_id differs from the assertion's subject",
                rule="client_id, when sent, must be the client assertion's sub (the device id)",
            )
        # NumericDate claims must be numbers (pyjwt would coerce strings and fail on others).
        for name in ("exp", "iat", "nbf"):
            if name in claims and type(claims[name]) is not int:
                raise InvalidClient(
                    f"{name} is not an integer",
                    rule=f"the client assertion's {name} must be an integer (a NumericDate)",
                )
        return jws

    def _verification_key(
        self,
        device: DeviceCredential | None,
        kid: str,
        alg: str,
        role: CertificateRole = CertificateRole.CURRENT,
    ) -> tuple[PublicKey, HeldCertificate | None, str | None]:
        """The key to verify the assertion with, the certificate it belongs to, and the refusal
        already decided, if any.

        A device that cannot authenticate (unknown, not ACTIVE, the kid is not its current
        certificate, an algorithm that does not fit its key, a stored key that does not load)
        gets the stand-in key of the assertion's algorithm, so that its refusal costs the same
        signature verification as a bad signature does. CPU only, no AWS call.
        """
        stand_in = self._stand_in_keys[alg]
        if device is None:
            return stand_in, None, "unknown device"
        if device.state is not DeviceState.ACTIVE:
            return stand_in, None, "device not active"
        certificate = device.holds(kid)
        if certificate is None or certificate.role is not role:
            return stand_in, None, f"not the device's {role.value} certificate"
        if alg not in algorithms_for(certificate.key):
            return stand_in, None, "algorithm does not match the certificate key"
        key = self._public_key(certificate.certificate_id, certificate.public_key_pem)
        if key is None or not _key_fits(alg, key):
            return stand_in, None, "the certificate's stored key is unusable"
        return key, certificate, None

    def _public_key(self, certificate_id: str, pem: str) -> PublicKey | None:
        """The certificate's public key, parsed once per certificate id (cached, 10,000 at
        most); None when the stored PEM does not load as an EC or RSA public key."""
        key = self._public_keys.get(certificate_id)
        if key is None:
            try:
                loaded = load_pem_public_key(pem.encode())
            except (ValueError, TypeError, UnsupportedAlgorithm):
                return None
            if not isinstance(loaded, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
                return None
            key = self._public_keys[certificate_id] = loaded
            if len(self._public_keys) > 10_000:
                self._public_keys.popitem(last=False)
        return key

    @staticmethod
    def _granted(requested: str | None, allowed: frozenset[str], what: str) -> list[str]:
        wanted = sorted(set((requested or "").split())) or sorted(allowed)
        if not wanted or not set(wanted) <= allowed:
            raise InvalidScope(f"requested {what} is not allowed for this device")
        return wanted

    def attested_firmware(
        self,
        claims: Mapping[str, Any],
        profile: str,
        rules: TokenRules,
        *,
        answering: bool = False,
    ) -> Attestation:
        """The firmware claims a grant carries and the release check its write must hold.

        A profile that requires attestation, and any validation answer that carries a
        measurement, vouch for it: the measurement and version must be a published release
        of the profile (checked in the grant's transaction, `Attestation.check`). Otherwise a
        well-formed measurement is copied as the device said it (`firmware_version` is already
        checked by `_verify`). CPU only.

        Raises:
            AttestationMissing: attestation is required and the measurement or version is absent.
        """
        measurement = claims.get("firmware_sha256")
        version = claims.get("firmware_version")
        firmware: dict[str, str] = {}
        if isinstance(version, str):
            firmware["firmware_version"] = version
        wellformed = isinstance(measurement, str) and _SHA256_HEX.fullmatch(measurement)
        vouched = rules.require_attestation or (answering and measurement is not None)
        if not vouched:
            if answering:  # a validation's result vouches for what it carries: nothing unchecked
                return Attestation({})
            if wellformed:
                firmware["firmware_sha256"] = str(measurement)
            return Attestation(firmware)
        if not wellformed or not isinstance(version, str):
            raise AttestationMissing("a firmware measurement and version are required")
        firmware["firmware_sha256"] = str(measurement)
        if self._firmware is None:
            raise UnreleasedFirmware("no firmware releases are known here")
        return Attestation(
            firmware, self._firmware.released_check(profile, str(measurement), version)
        )


def _remember_until(auth: AuthenticatedDevice) -> int:
    """Until when an assertion's jti is remembered as used: past its expiry (or, without one,
    the longest lifetime an assertion may have), with the clock skew allowed."""
    return int(auth.claims.get("exp") or auth.now + MAX_ASSERTION_LIFETIME) + CLOCK_SKEW


class _Stale(Exception):
    """The device was not as a grant was decided on; `current` is how it is (None: gone)."""

    def __init__(self, current: DeviceCredential | None) -> None:
        super().__init__("device changed")
        self.current = current


def _validation_refusal(exc: OAuthError) -> RefusalReason | None:
    """The reason a refused validation answer ends its validation with, if it does: the device
    is not ACTIVE (as read, whoever sent the answer), its firmware is not released or not
    attested, or the device's own signed assertion breaks a rule. An answer whose signature
    does not verify under the device's key ends nothing (a tampered copy of a captured answer
    must not turn the device's real one away); nor do a replay, a used challenge or an answer
    that does not fit its validation."""
    if isinstance(exc, InvalidClient):
        if exc.reason in ("device not active", "unknown device"):
            return RefusalReason.DEVICE_NOT_ACTIVE
        return RefusalReason.ASSERTION_INVALID if exc.proven else None
    if isinstance(exc, AttestationMissing):
        return RefusalReason.ATTESTATION_MISSING
    if isinstance(exc, UnreleasedFirmware):
        return RefusalReason.FIRMWARE_NOT_RELEASED
    return None


def read_request_form(
    content_types: Sequence[str], body: Callable[[], str], *, max_fields: int, max_bytes: int
) -> dict[str, str]:
    """A request's form (`read_form`), from the request's Content-Type header values and a
    callable giving its decoded body (API Gateway's base64 flag, UTF-8).

    Raises:
        OAuthInvalidRequest: more than one content type, a body that does not decode, or what
            `read_form` refuses.
    """
    if len(content_types) > 1:
        raise OAuthInvalidRequest("more than one content type")
    try:
        text = body()
    except ValueError:  # UnicodeDecodeError, or binascii.Error for a body flagged base64
        raise OAuthInvalidRequest("the body must be UTF-8 (base64 when flagged so)") from None
    content_type = content_types[0] if content_types else None
    return read_form(content_type, text, max_fields=max_fields, max_bytes=max_bytes)


def read_form(
    content_type: str | None, body: str, *, max_fields: int, max_bytes: int
) -> dict[str, str]:
    """An application/x-www-form-urlencoded body as its parameters, each at most once (RFC 6749
    §3.2; for introspection, RFC 7662 §2.1 sends the same form). CPU only, no AWS call.

    The media type is exactly application/x-www-form-urlencoded, any case, with parameters
    allowed (RFC 9110 §8.3.1) but a charset other than UTF-8 refused: the body is read as UTF-8,
    so a client that says otherwise would be misread. One trailing `&` is tolerated (clients
    that build the form by appending "name=value&" send it); an empty field anywhere else is not.

    Raises:
        OAuthInvalidRequest: another media type or charset, a body over `max_bytes` characters,
            more than `max_fields` fields, a malformed form, or a parameter sent twice.
    """
    media, *parameters = (content_type or "").split(";")
    if media.strip().lower() != FORM_MEDIA_TYPE:
        raise OAuthInvalidRequest(f"the body must be {FORM_MEDIA_TYPE}")
    for parameter in parameters:
        if not parameter.strip():  # RFC 9110 allows empty parameters ("a/b; ; c=d")
            continue
        match = _MEDIA_TYPE_PARAMETER.fullmatch(parameter)
        if match is None:
            raise OAuthInvalidRequest("malformed content type")
        if match.group(1).lower() == "charset" and match.group(2).strip('"').lower() != "utf-8":
            raise OAuthInvalidRequest("the form must be UTF-8")
    if len(body) > max_bytes:
        raise OAuthInvalidRequest("the request is too large")
    if body.endswith("&"):
        body = body[:-1]
    try:
        pairs = parse_qsl(
            body, keep_blank_values=True, strict_parsing=bool(body), max_num_fields=max_fields
        )
    except ValueError:
        raise OAuthInvalidRequest("the body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthInvalidRequest(f"parameter {name} appears more than once")
        form[name] = value
    return form


def _key_fits(alg: str, key: PublicKey) -> bool:
    """Whether `key` is of the kind `alg` verifies with (a stored key whose kind contradicts its
    description is not handed to pyjwt, which would fail on it in its own way). The kinds are
    written as `algorithms_for` reads them, without importing the X.509 module on this path."""
    if isinstance(key, ec.EllipticCurvePublicKey):
        return alg in algorithms_for(f"ec:{key.curve.name}")
    return alg in algorithms_for("rsa")
