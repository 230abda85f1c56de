"""`make demo`: the registration story on the embedded local stack.

A manufacturer CA is registered and a factory manifest imported through the admin API; the
allow-listed devices connect for the first time and are registered just in time by the real
registration function; then they reconnect; rogue devices are refused. Everything runs on this
machine against moto on 127.0.0.1. Exits non-zero if any expectation failed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from fleetkey_cli.client import AdminClient, InProcessTransport
from fleetkey_local.functions import LambdaContext, load_function
from fleetkey_local.instrument import AwsCallCounter
from fleetkey_local.iot import connect_refusal
from fleetkey_local.pki import CertificateAuthority, pem
from fleetkey_local.server import local_aws
from fleetkey_local.stack import EmbeddedStack, client_factory

OPERATOR = "arn:aws:sts::123456789012:assumed-role/fleet-operator/demo"
# Refusals cost different AWS calls: on the certificate alone, for a device that does not exist,
# or recorded in a known device's own audit chain.
REFUSAL_KIND = {
    "not_allowlisted": "registration: refused (no such device)",
    "clone_suspected": "registration: refused (known device)",
    "wrong_issuer": "registration: refused (known device)",
    "expired": "registration: refused (certificate)",
    "weak_key": "registration: refused (certificate)",
}


@dataclass
class Operation:
    name: str
    durations_ms: list[float] = field(default_factory=list)
    calls: list[int] = field(default_factory=list)

    def row(self) -> str:
        d = sorted(self.durations_ms)
        p95 = d[min(len(d) - 1, int(round(0.95 * (len(d) - 1))))] if d else 0.0
        calls = f"{min(self.calls)}-{max(self.calls)}" if self.calls and min(self.calls) != max(self.calls) else (str(self.calls[0]) if self.calls else "-")
        return f"| {self.name:<40} | {len(d):>5} | {calls:>9} | {statistics.median(d) if d else 0:>7.1f} | {p95:>7.1f} |"


class Demo:
    def __init__(self, endpoint: str, devices: int) -> None:
        self.devices = devices
        self.stack = EmbeddedStack(client_factory(endpoint)).provision()
        self.counter = AwsCallCounter().watch_default_session()
        self.registration = load_function("registration")
        self.admin_function = load_function("admin")
        self.admin = AdminClient(InProcessTransport(self.admin_function.handler, OPERATOR, LambdaContext()))
        self.operations: dict[str, Operation] = {}
        self.failures: list[str] = []

    def measure(self, name: str, call):
        operation = self.operations.setdefault(name, Operation(name))
        self.counter.reset()
        start = time.perf_counter()
        result = call()
        operation.durations_ms.append((time.perf_counter() - start) * 1000)
        operation.calls.append(self.counter.count())
        return result

    def expect(self, ok: bool, what: str) -> None:
        print(f"      {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)

    def register_event(self, event: dict | None, operation: str) -> dict | None:
        if event is None:
            return None
        return self.measure(operation, lambda: self.registration.handler(event, LambdaContext()))

    def run(self) -> int:
        started = time.perf_counter()
        print("[1] operator registers manufacturer CAs through the admin API")
        acme = CertificateAuthority.create("acme-2026")
        globex = CertificateAuthority.create("globex-2026")
        for authority in (acme, globex):
            code = self.admin.registration_code()
            ca = self.measure("admin: register CA", lambda a=authority: self.admin.register_ca(
                a.name, a.pem, pem(a.verification_certificate(code))))
            self.expect(ca["status"] == "ACTIVE", f"{authority.name} registered with AWS IoT, auto-registration on")

        print(f"[2] operator imports a factory manifest of {self.devices} devices")
        ids = [f"pump-{i:04d}" if i % 2 else f"well-{i:04d}" for i in range(self.devices)]
        rows = ["device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile,attribute.site"]
        for device_id in ids + ["clone-target", "expired-0001", "weakkey-0001", "wrongca-0001"]:
            profile = "infusion-pump" if device_id.startswith("pump") else "telemetry-sensor"
            rows.append(f"{device_id},SN-{device_id},acme-2026,,{profile},site-{device_id[-2:]}")
        report = self.measure("admin: import manifest", lambda: self.admin.import_manifest("\n".join(rows) + "\n", "csv"))
        self.expect(report["imported"] == len(ids) + 4 and not report["rejected"],
                    f"{report['imported']} imported, {len(report['rejected'])} rejected")

        print(f"[3] {self.devices} devices connect for the first time (just-in-time registration)")
        certificates = {}
        accepted = 0
        for device_id in ids:
            _, cert = acme.issue_device(device_id, serial_number=f"SN-{device_id}")
            event = self.stack.first_connect(pem(cert), acme.pem)
            # The first invocation is a cold start: it also loads the trust-anchor snapshot.
            name = "registration: accepted" if certificates else "registration: accepted (cold)"
            certificates[device_id] = event["certificateId"]
            result = self.register_event(event, name)
            accepted += result["status"] == "accepted"
        self.expect(accepted == self.devices, f"{accepted}/{self.devices} registered and ACTIVE")

        print("[4] devices reconnect with their certificates")
        connected = sum(
            connect_refusal(self.stack.harness_iot, certificates[d], d) is None for d in ids
        )
        self.expect(connected == self.devices, f"{connected}/{self.devices} would be let in by AWS IoT")
        self.expect(
            connect_refusal(self.stack.harness_iot, certificates[ids[0]], ids[1]) is not None,
            "a device using another device's client id is refused",
        )

        print("[5] rogue devices")
        now = datetime.now(timezone.utc)
        _, original = acme.issue_device("clone-target", serial_number="SN-clone-target")
        original_event = self.stack.first_connect(pem(original), acme.pem)
        self.register_event(original_event, "registration: accepted")
        rogues = [
            ("not allow-listed", acme.issue_device("rogue-0001", serial_number="SN-rogue")[1], acme, "not_allowlisted"),
            ("cloned identity", acme.issue_device("clone-target", serial_number="SN-clone-target")[1], acme, "clone_suspected"),
            ("expired certificate", acme.issue_device("expired-0001", serial_number="SN-expired-0001",
                                                      not_before=now - timedelta(days=400), not_after=now - timedelta(days=1))[1], acme, "expired"),
            ("weak key (RSA-1024)", acme.issue_device("weakkey-0001", serial_number="SN-weakkey-0001", key_kind="rsa:1024")[1], acme, "weak_key"),
            ("wrong manufacturer CA", globex.issue_device("wrongca-0001", serial_number="SN-wrongca-0001")[1], globex, "wrong_issuer"),
        ]
        for label, cert, authority, reason in rogues:
            event = self.stack.first_connect(pem(cert), authority.pem)
            result = self.register_event(event, REFUSAL_KIND[reason])
            status = self.stack.certificate_status(event["certificateId"])
            self.expect(result["status"] == "refused" and result["reason"] == reason and status == "REVOKED",
                        f"{label:<24} refused: {result.get('reason')}, certificate {status}")
        unregistered = CertificateAuthority.create("unknown-fab")
        _, cert = unregistered.issue_device("rogue-0002")
        self.expect(self.stack.first_connect(pem(cert), unregistered.pem) is None,
                    f"{'unregistered CA':<24} refused by AWS IoT at connection (no registration event)")
        self.admin.set_ca_enabled("globex-2026", False)
        _, cert = globex.issue_device("wrongca-0002")
        self.expect(self.stack.first_connect(pem(cert), globex.pem) is None,
                    f"{'disabled CA':<24} refused by AWS IoT at connection (auto-registration off)")
        clone_device = self.admin.device("clone-target")
        self.expect(clone_device["state"] == "ACTIVE"
                    and clone_device["certificate_id"] == original_event["certificateId"],
                    "the cloned device keeps its original certificate")

        print("[6] audit trails, verified hash chain by hash chain")
        verified = 0
        for device_id in ids + ["clone-target"]:
            trail = self.measure("admin: read and verify audit", lambda d=device_id: self.admin.audit(d))
            verified += trail["verified"]
        clone_trail = self.admin.audit("clone-target")
        self.expect(verified == len(ids) + 1, f"{verified} device chains verified")
        self.expect([r["action"] for r in clone_trail["records"]] == ["allowlisted", "registered", "registration_refused"],
                    "the clone attempt is in the device's own trail")

        elapsed = time.perf_counter() - started
        print()
        print(f"| {'operation':<40} | count | AWS calls |  p50 ms |  p95 ms |")
        print(f"|{'-' * 42}|-------|-----------|---------|---------|")
        for operation in self.operations.values():
            print(operation.row())
        print()
        if self.failures:
            print(f"demo FAILED ({len(self.failures)} expectations) in {elapsed:.1f} s:")
            for failure in self.failures:
                print(f"  - {failure}")
            return 1
        print(f"demo passed in {elapsed:.1f} s: {self.devices} devices registered, "
              f"{len(rogues) + 2} rogue devices refused, every audit chain verified")
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetkey-demo", description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=100, help="fleet size (default 100)")
    args = parser.parse_args(argv)
    with local_aws() as endpoint:
        print(f"fleetkey demo: local AWS (moto) at {endpoint}")
        return Demo(endpoint, args.devices).run()


if __name__ == "__main__":
    sys.exit(main())
