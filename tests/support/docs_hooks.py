"""Values a docs block names in a comment and leaves to its reader, made for the test that runs it.

A run block (tests/integration/test_docs_commands.py) may hold a comment line `# NAME: what it
is`, e.g. `# ASSERTION: a JWT as for /v1/token, signed by the current key`. Where a reader makes
that value with the library of their choice, the test makes it here, in the block's working
directory, and exports it as $NAME before the next command:

    python -m tests.support.docs_hooks NAME

The block's runner says how, in the JSON file $FLEETKEY_DOCS_HOOKS names: for each NAME, the
device's key (a PEM file, relative to the working directory), its certificate (the AWS IoT
certificate id, or a PEM file, or a JSON answer holding `certificate_id`), the device id, the
audience (the issuer) and optionally a CSR (a PEM file) the assertion binds with `csr_sha256`.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleetkey_local.device import client_assertion, rotation_assertion


def certificate_id(spec: dict, here: Path) -> str:
    if "certificate_id" in spec:
        return spec["certificate_id"]
    if "certificate_pem" in spec:
        certificate = x509.load_pem_x509_certificate((here / spec["certificate_pem"]).read_bytes())
        return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()
    return json.loads((here / spec["certificate_from"]).read_text())["certificate_id"]


def make(name: str, here: Path) -> str:
    specs = json.loads(Path(os.environ["FLEETKEY_DOCS_HOOKS"]).read_text())
    spec = specs[name]
    key = serialization.load_pem_private_key((here / spec["key"]).read_bytes(), password=None)
    arguments = (key, certificate_id(spec, here), spec["device_id"], spec["audience"])
    if "csr" in spec:
        csr = x509.load_pem_x509_csr((here / spec["csr"]).read_bytes())
        return rotation_assertion(*arguments, csr)  # type: ignore[arg-type]
    return client_assertion(*arguments)  # type: ignore[arg-type]


if __name__ == "__main__":
    print(make(sys.argv[1], Path.cwd()))
