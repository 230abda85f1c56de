"""Where moto departs from AWS in ways fleetkey depends on, brought back in line.

Each patch names the AWS behaviour it restores. Applied by the embedded stack and the tests.
"""

from __future__ import annotations

import uuid

_applied = False


def apply() -> None:
    global _applied
    if _applied:
        return
    from moto.iot.models import IoTBackend

    def get_registration_code(self) -> str:
        # AWS: one registration code per account and region, the same on every call.
        # moto: a new random code on every call, so no verification certificate can match it.
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"fleetkey:{self.account_id}:{self.region_name}"))

    IoTBackend.get_registration_code = get_registration_code
    _applied = True
