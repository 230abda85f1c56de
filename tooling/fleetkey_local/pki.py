"""A factory in a box: manufacturer CAs and device certificates, for the demo, tests and benchmarks.

Device keys are generated here the way a device (or its secure element) would generate them; in a
real fleet they never leave the device.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def generate_key(kind: str = "ec:secp256r1") -> PrivateKey:
    family, _, param = kind.partition(":")
    if family == "ec":
        curve = {
            "secp256r1": ec.SECP256R1(),
            "secp384r1": ec.SECP384R1(),
            "secp521r1": ec.SECP521R1(),
            "secp256k1": ec.SECP256K1(),
        }[param]
        return ec.generate_private_key(curve)
    if family == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=int(param))
    raise ValueError(kind)


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def key_pem(key: PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class CertificateAuthority:
    name: str
    key: PrivateKey
    certificate: x509.Certificate

    @property
    def pem(self) -> str:
        return pem(self.certificate)

    @classmethod
    def create(
        cls,
        name: str,
        *,
        key_kind: str = "ec:secp384r1",
        days: int = 3650,
        not_before: datetime | None = None,
    ) -> CertificateAuthority:
        key = generate_key(key_kind)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"{name} manufacturing"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"{name} device CA"),
            ]
        )
        start = not_before or _now() - timedelta(days=1)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(
                key,
                hashes.SHA384() if isinstance(key, ec.EllipticCurvePrivateKey) else hashes.SHA256(),
            )
        )
        return cls(name=name, key=key, certificate=cert)

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        algorithm = (
            hashes.SHA384() if isinstance(self.key, ec.EllipticCurvePrivateKey) else hashes.SHA256()
        )
        return builder.sign(self.key, algorithm)

    def issue_device(
        self,
        device_id: str,
        *,
        serial_number: str | None = None,
        key: PrivateKey | None = None,
        key_kind: str = "ec:secp256r1",
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        client_auth: bool = True,
        digital_signature: bool = True,
    ) -> tuple[PrivateKey, x509.Certificate]:
        """A factory device certificate: subject CN = device id, serialNumber = hardware serial."""
        key = key or generate_key(key_kind)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, device_id)]
        if serial_number:
            attributes.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial_number))
        start = not_before or _now() - timedelta(hours=1)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(not_after or start + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=digital_signature,
                    content_commitment=False,
                    key_encipherment=not digital_signature,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client_auth else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return key, self._sign(builder)

    def verification_certificate(self, registration_code: str) -> x509.Certificate:
        """AWS IoT's proof that we hold the CA key: CN = the account's registration code."""
        key = generate_key("ec:secp256r1")
        start = _now() - timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_code)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=1))
        )
        return self._sign(builder)
