"""The API's custom domain: an issuer that survives replacing the API.

Configuration (CDK context): `apiDomainName` (a DNS name, e.g. `id.fleet.example.com`) and
`apiCertificateArn` (an ACM certificate of the stack's Region that covers it). Both, or neither.

Without them the token issuer is the stage's execute-api URL,
`https://<api id>.execute-api.<region>.<url suffix>/prod`: the API's id is in it, so a replaced
REST API (a destroyed and redeployed stack, a change CloudFormation can only make by
replacement) has another issuer, and every relying party that pinned it, every device assertion
addressed to it and every certificate whose CRL distribution point names it is left behind.

With them the stack creates a regional custom domain (TLS 1.2) that maps the whole API at its
root, and the issuer is `https://<apiDomainName>`: the functions' FLEETKEY_ISSUER, hence the
tokens' `iss`, the audience device assertions must name, the metadata document's endpoints
(`https://<apiDomainName>/v1/token`, `/.well-known/jwks.json`) and the CRL distribution point
(`https://<apiDomainName>/v1/pki/crl`) of every certificate fleetkey issues. A new API is mapped
to the same name and nothing a client holds changes. The execute-api endpoint keeps serving
every route (the operators' CLI may use either); the WAF web ACL, the stage's throttling and the
resource policy apply on both, as they apply to the stage.

The DNS record is the operator's (outputs `ApiDomainTarget` and `ApiDomainHostedZoneId`: a CNAME,
or a Route 53 alias record). EST's mutual-TLS domain (`estDomainName`, constructs/rotation.py)
is another name: mutual TLS would ask every relying party fetching the JWKS for a client
certificate, so the issuer is never EST's domain, and the two names must differ.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aws_cdk import aws_apigateway as apigateway
from aws_cdk import aws_certificatemanager as acm
from constructs import Construct

from fleetkey_infra import constants
from fleetkey_infra.constructs.rotation import (
    CERTIFICATE_ARN,
    DNS_NAME,
    certificate_region_mismatch,
)


class ApiDomainConfigError(ValueError):
    """The custom domain's configuration (CDK context) cannot be deployed as given."""


@dataclass(frozen=True)
class ApiDomainConfig:
    domain_name: str
    certificate_arn: str

    @property
    def issuer(self) -> str:
        """The token issuer on this domain: the API is mapped at its root."""
        return f"https://{self.domain_name}"

    @classmethod
    def from_context(cls, get: Callable[[str], object]) -> ApiDomainConfig | None:
        """From CDK context (`node.try_get_context`, or a dict's `get`); None without it.

        Raises:
            ApiDomainConfigError: one setting without the other, a malformed name or ARN, or
                EST's domain name.
        """
        keys = (constants.API_DOMAIN_NAME_CONTEXT_KEY, constants.API_CERTIFICATE_ARN_CONTEXT_KEY)
        domain, certificate_arn = (_text(get(key), key) for key in keys)
        if not domain and not certificate_arn:
            return None
        missing = [
            key for key, value in zip(keys, (domain, certificate_arn), strict=True) if not value
        ]
        if missing:
            raise ApiDomainConfigError(
                f"the API's custom domain needs {' and '.join(keys)}; missing: {', '.join(missing)}"
            )
        domain = domain.lower()
        if not DNS_NAME.match(domain):
            raise ApiDomainConfigError(
                f"{constants.API_DOMAIN_NAME_CONTEXT_KEY} must be a DNS name, not {domain!r}"
            )
        if not CERTIFICATE_ARN.match(certificate_arn):
            raise ApiDomainConfigError(
                f"{constants.API_CERTIFICATE_ARN_CONTEXT_KEY} must be an ACM certificate ARN, not "
                f"{certificate_arn!r}"
            )
        est = _text(
            get(constants.EST_DOMAIN_NAME_CONTEXT_KEY), constants.EST_DOMAIN_NAME_CONTEXT_KEY
        )
        if est.lower() == domain:
            raise ApiDomainConfigError(
                f"{constants.API_DOMAIN_NAME_CONTEXT_KEY} is EST's mutual-TLS domain "
                f"({constants.EST_DOMAIN_NAME_CONTEXT_KEY}): the issuer must be reachable "
                "without a client certificate; give the API another name"
            )
        return cls(domain_name=domain, certificate_arn=certificate_arn)


def _text(value: object, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ApiDomainConfigError(f"{key} must be a string, not {value!r}")
    return value.strip()


class ApiDomain(Construct):
    """A regional custom domain (TLS 1.2 at least) with the whole API mapped at its root.

    Attributes: `domain` (apigateway.DomainName), `mapping` (apigateway.BasePathMapping),
    `config` (ApiDomainConfig).
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        api: apigateway.RestApi,
        config: ApiDomainConfig,
    ) -> None:
        super().__init__(scope, construct_id)
        self.config = config
        mismatch = certificate_region_mismatch(self, config.certificate_arn)
        if mismatch:
            raise ApiDomainConfigError(f"{constants.API_CERTIFICATE_ARN_CONTEXT_KEY} is {mismatch}")
        self.domain = apigateway.DomainName(
            self,
            "Domain",
            domain_name=config.domain_name,
            certificate=acm.Certificate.from_certificate_arn(
                self, "Certificate", config.certificate_arn
            ),
            endpoint_type=apigateway.EndpointType.REGIONAL,
            security_policy=apigateway.SecurityPolicy.TLS_1_2,
        )
        # No base path: the issuer is https://<domain> and the routes hang off it as they hang
        # off the stage's URL (/v1/token, /.well-known/jwks.json, /v1/pki/crl).
        self.mapping = apigateway.BasePathMapping(
            self, "Mapping", domain_name=self.domain, rest_api=api, stage=api.deployment_stage
        )
