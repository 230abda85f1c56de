"""Certificate rotation's configuration, and EST (RFC 7030) on a mutual-TLS custom domain.

Configuration (CDK context: cdk.json's "context", or `cdk deploy -c key=value`):

- `rotationCommitSeconds` (FLEETKEY_ROTATION_COMMIT_SECONDS; default 3600, 300 to 604800): how
  long a device has to connect with (or commit) its new certificate before the sweep rolls the
  rotation back.
- `renewalRatePerMinute` (FLEETKEY_RENEWAL_RATE_PER_MINUTE; default 100, 1 to 3000): how many
  renewal commands one sweep (one a minute) sends at most, so that certificates issued together
  do not all come back to the API in the same minute.
- `estDomainName`, `estCertificateArn`, `estTruststoreUri` (`s3://<bucket>/<key>`), and optionally
  `estTruststoreVersion` (the S3 object version): EST's custom domain. All three or none.

EST's `simplereenroll` authenticates the device by the TLS client certificate (RFC 7030 section
3.3.2), and API Gateway offers mutual TLS only on a custom domain. With the EST settings, the
stack creates a regional custom domain with mutual TLS (`mutualTlsAuthentication`: the
truststore lists the CAs whose certificates may connect; put fleetkey's issuing CA chain there,
`GET /v1/pki/ca`, and the factory CAs whose devices enroll by EST) and maps the whole API at its
root, where EST clients look for `/.well-known/est/`. Every route is then also served on that
domain, behind its TLS client authentication; the WAF web ACL and the stage's throttling apply
there as on the default endpoint.

Without them, the EST routes still exist on the API's default (execute-api) endpoint, which has
no mutual TLS: `cacerts` works (public), and `simplereenroll` is refused by the function, which
reads the client certificate only from `requestContext.identity.clientCert`. API Gateway sets
that from the TLS handshake of a mutual-TLS custom domain alone, never from a request header, so
no header a client sends can stand in for a certificate, on either endpoint. The default endpoint
is kept (not disabled): it is the token issuer (unless the API has its own custom domain,
`apiDomainName`: constructs/api_domain.py), and every other route is served there.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from aws_cdk import Stack, Token
from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_s3 as s3
from constructs import Construct

from fleetkey_infra import constants


class RotationConfigError(ValueError):
    """The rotation or EST configuration (CDK context) cannot be deployed as given."""


@dataclass(frozen=True)
class EstConfig:
    """EST's mutual-TLS custom domain: its name, its ACM certificate (of the stack's region: a
    regional endpoint), and the truststore (an S3 object: PEM CA certificates, concatenated)."""

    domain_name: str
    certificate_arn: str
    truststore_bucket: str
    truststore_key: str
    truststore_version: str | None = None

    @property
    def truststore_uri(self) -> str:
        return f"s3://{self.truststore_bucket}/{self.truststore_key}"


@dataclass(frozen=True)
class RotationConfig:
    commit_seconds: int = constants.DEFAULT_ROTATION_COMMIT_SECONDS
    renewal_rate_per_minute: int = constants.DEFAULT_RENEWAL_RATE_PER_MINUTE
    est: EstConfig | None = None

    @classmethod
    def from_context(cls, get: Callable[[str], object]) -> RotationConfig:
        """From CDK context (`node.try_get_context`, or a dict's `get`): absent keys take the
        defaults, and no EST setting means no custom domain.

        Raises:
            RotationConfigError: a value out of range or malformed, or the EST settings given in
                part.
        """
        return cls(
            commit_seconds=_bounded(
                get(constants.ROTATION_COMMIT_SECONDS_CONTEXT_KEY),
                constants.ROTATION_COMMIT_SECONDS_CONTEXT_KEY,
                constants.DEFAULT_ROTATION_COMMIT_SECONDS,
                constants.ROTATION_COMMIT_SECONDS_RANGE,
            ),
            renewal_rate_per_minute=_bounded(
                get(constants.RENEWAL_RATE_CONTEXT_KEY),
                constants.RENEWAL_RATE_CONTEXT_KEY,
                constants.DEFAULT_RENEWAL_RATE_PER_MINUTE,
                constants.RENEWAL_RATE_RANGE,
            ),
            est=_est(get),
        )


# Shared with the API's custom domain (constructs/api_domain.py): a lowercase DNS name, and an
# ACM certificate's ARN (group 1: its Region).
DNS_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
CERTIFICATE_ARN = re.compile(r"^arn:aws[a-z-]*:acm:([a-z0-9-]+):\d{12}:certificate/[A-Za-z0-9-]+$")
_S3_URI = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/(.+)$")


def _est(get: Callable[[str], object]) -> EstConfig | None:
    required = (
        constants.EST_DOMAIN_NAME_CONTEXT_KEY,
        constants.EST_CERTIFICATE_ARN_CONTEXT_KEY,
        constants.EST_TRUSTSTORE_URI_CONTEXT_KEY,
    )
    values = {key: _text(get(key), key) for key in required}
    version = _text(
        get(constants.EST_TRUSTSTORE_VERSION_CONTEXT_KEY),
        constants.EST_TRUSTSTORE_VERSION_CONTEXT_KEY,
    )
    given = [key for key, value in values.items() if value]
    if not given:
        if version:
            raise RotationConfigError(
                f"{constants.EST_TRUSTSTORE_VERSION_CONTEXT_KEY} is set without EST's domain: "
                f"set {', '.join(required)} too"
            )
        return None
    missing = [key for key in required if not values[key]]
    if missing:
        raise RotationConfigError(
            f"EST's mutual-TLS domain needs {', '.join(required)}; missing: {', '.join(missing)}"
        )
    domain = values[constants.EST_DOMAIN_NAME_CONTEXT_KEY].lower()
    if not DNS_NAME.match(domain):
        raise RotationConfigError(
            f"{constants.EST_DOMAIN_NAME_CONTEXT_KEY} must be a DNS name, not {domain!r}"
        )
    certificate_arn = values[constants.EST_CERTIFICATE_ARN_CONTEXT_KEY]
    if not CERTIFICATE_ARN.match(certificate_arn):
        raise RotationConfigError(
            f"{constants.EST_CERTIFICATE_ARN_CONTEXT_KEY} must be an ACM certificate ARN, not "
            f"{certificate_arn!r}"
        )
    truststore = _S3_URI.match(values[constants.EST_TRUSTSTORE_URI_CONTEXT_KEY])
    if not truststore:
        raise RotationConfigError(
            f"{constants.EST_TRUSTSTORE_URI_CONTEXT_KEY} must be s3://<bucket>/<key>, not "
            f"{values[constants.EST_TRUSTSTORE_URI_CONTEXT_KEY]!r}"
        )
    return EstConfig(
        domain_name=domain,
        certificate_arn=certificate_arn,
        truststore_bucket=truststore.group(1),
        truststore_key=truststore.group(2),
        truststore_version=version or None,
    )


def _text(value: object, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RotationConfigError(f"{key} must be a string, not {value!r}")
    return value.strip()


def _bounded(value: object, key: str, default: int, bounds: tuple[int, int]) -> int:
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)  # `cdk synth -c key=N` passes a string
    if isinstance(value, bool) or not isinstance(value, int):
        raise RotationConfigError(f"{key} must be a whole number, not {value!r}")
    low, high = bounds
    if not low <= value <= high:
        raise RotationConfigError(f"{key} must be between {low} and {high}, not {value}")
    return value


def certificate_region_mismatch(scope: Construct, certificate_arn: str) -> str | None:
    """Why a regional custom domain in `scope`'s stack cannot take `certificate_arn`, or None.

    A regional endpoint takes an ACM certificate of its own Region. The reason reads after the
    setting's name ("<key> is a certificate of ..."); None also when the stack's Region is not
    known at synth (an environment-agnostic stack) or the ARN is malformed (refused earlier).
    """
    region = Stack.of(scope).region
    match = CERTIFICATE_ARN.match(certificate_arn)
    if not match or Token.is_unresolved(region) or match.group(1) == region:
        return None
    return (
        f"a certificate of {match.group(1)}; a regional custom domain in {region} needs one of "
        f"{region}"
    )


class EstDomain(Construct):
    """A regional custom domain with mutual TLS (TLS 1.2 at least), the whole API mapped at its
    root, for EST's `simplereenroll` (see the module doc).

    Attributes: `domain` (apigateway.DomainName), `mapping` (apigateway.BasePathMapping),
    `config` (EstConfig).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        api: apigateway.RestApi,
        config: EstConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        self.config = config
        mismatch = certificate_region_mismatch(self, config.certificate_arn)
        if mismatch:
            raise RotationConfigError(f"{constants.EST_CERTIFICATE_ARN_CONTEXT_KEY} is {mismatch}")
        self.domain = self._build_domain(config)
        # No base path: EST clients ask for https://<domain>/.well-known/est/... (RFC 7030 3.2.2).
        self.mapping = apigateway.BasePathMapping(
            self, "Mapping", domain_name=self.domain, rest_api=api, stage=api.deployment_stage
        )

    def _build_domain(self, config: EstConfig) -> apigateway.DomainName:
        return apigateway.DomainName(
            self,
            "Domain",
            domain_name=config.domain_name,
            certificate=acm.Certificate.from_certificate_arn(
                self, "Certificate", config.certificate_arn
            ),
            endpoint_type=apigateway.EndpointType.REGIONAL,
            # Mutual TLS requires TLS 1.2.
            security_policy=apigateway.SecurityPolicy.TLS_1_2,
            mtls=apigateway.MTLSConfig(
                bucket=s3.Bucket.from_bucket_name(self, "Truststore", config.truststore_bucket),
                key=config.truststore_key,
                version=config.truststore_version,
            ),
        )
