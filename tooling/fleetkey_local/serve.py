"""`make serve`: the local stack, running until interrupted.

    python -m fleetkey_local.serve [--api-port 8080] [--mqtt-port 8883] [--state-dir build/local]

AWS (moto) on 127.0.0.1, the resources created from the definitions the CDK stack uses, the API
on a local API gateway, AWS IoT Core as an MQTT broker over TLS, and a demo manufacturer CA whose
files (certificate and key) let you make devices that register just in time.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from fleetkey_local.api_gateway import LocalApiGateway
from fleetkey_local.iot_core import IotCoreEmulator
from fleetkey_local.pki import CertificateAuthority, key_pem
from fleetkey_local.server import local_aws
from fleetkey_local.stack import ACCOUNT, REGION, EmbeddedStack, client_factory

DEMO_CA = "demo-factory"


def write_demo_ca(stack: EmbeddedStack, state_dir: Path) -> CertificateAuthority:
    """A manufacturer CA registered with the local stack; its key is written next to it so that
    a developer can issue factory certificates for test devices."""
    authority = CertificateAuthority.create(DEMO_CA)
    stack.register_ca(authority)
    (state_dir / f"{DEMO_CA}.pem").write_text(authority.pem)
    key_file = state_dir / f"{DEMO_CA}.key"
    key_file.write_text(key_pem(authority.key))
    key_file.chmod(0o600)
    return authority


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fleetkey-serve", description=__doc__.splitlines()[0])
    parser.add_argument("--api-port", type=int, default=8080)
    parser.add_argument("--mqtt-port", type=int, default=8883)
    parser.add_argument("--state-dir", type=Path, default=Path("build/local"))
    args = parser.parse_args(argv)
    args.state_dir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with local_aws() as endpoint:
        stack = EmbeddedStack(client_factory(endpoint)).provision()
        write_demo_ca(stack, args.state_dir)
        api = LocalApiGateway(port=args.api_port)
        iot = IotCoreEmulator(args.state_dir, port=args.mqtt_port, account=ACCOUNT, region=REGION)
        api.start()
        os.environ["FLEETKEY_ISSUER"] = api.url  # the functions' issuer is this API's address
        iot.start()
        print(
            f"fleetkey local stack\n"
            f"  API            {api.url}  (admin routes need SigV4: see README)\n"
            f"  AWS IoT (MQTT) mqtts://{iot.address[0]}:{iot.address[1]}  (client certificate required)\n"
            f"  endpoint CA    {iot.endpoint_ca_path}\n"
            f"  demo factory   {args.state_dir / (DEMO_CA + '.pem')} and .key "
            f"(registered manufacturer CA)\n"
            f"  AWS (moto)     {endpoint}\n"
            f"Ctrl-C to stop.",
            flush=True,
        )
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            iot.stop()
            api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
