"""The local gateway runs every function in one process, on threads; Powertools keeps the event
and context being resolved on its router class, one per process. Two functions answering at once
must each still see their own request, as each would in its own Lambda process."""

from __future__ import annotations

import json
import threading
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.event_handler.api_gateway import Router

from fleetkey_local.api_gateway import LocalApiGateway, Route

ROUNDS = 25
WAIT = 5.0  # seconds; both functions meet well before, unless something serialises them


def _functions(meet: threading.Barrier) -> dict[str, Any]:
    """A device-facing function (its resolver's own routes, as the token function) and an
    IAM-side one (a Router included in a resolver, as the admin and validations functions). Each
    answers what Powertools tells it about its request, read once both are inside their routes,
    after both resolvers have taken their events."""
    device = APIGatewayRestResolver()

    @device.get("/device/<name>")
    def device_route(name: str) -> dict[str, Any]:
        meet.wait(WAIT)
        return _seen(device, name)

    router = Router()
    relying_party = APIGatewayRestResolver()

    @router.get("/party/<name>")
    def party_route(name: str) -> dict[str, Any]:
        meet.wait(WAIT)
        return _seen(router, name)

    relying_party.include_router(router)
    return {
        "device": lambda event, context: device.resolve(event, context),
        "party": lambda event, context: relying_party.resolve(event, context),
    }


def _seen(app: APIGatewayRestResolver | Router, name: str) -> dict[str, Any]:
    event = app.current_event
    return {
        "name": name,
        "path": event.path,
        "authorization": event.headers.get("authorization"),
        "function": app.lambda_context.function_name,
    }


def test_concurrent_functions_each_see_their_own_event_and_context():
    # Given a device-facing function and an IAM-side one behind the local gateway
    meet = threading.Barrier(2)
    routes = (
        Route("GET", "/device/{name}", "device"),
        Route("GET", "/party/{name}", "party"),
    )
    requests = {
        "device": ("/device/well-0001", []),
        "party": ("/party/rp-1", [("Authorization", "AWS4-HMAC-SHA256 Credential=rp")]),
    }
    with LocalApiGateway(0, routes=routes, functions=_functions(meet)) as gateway:

        def call(function: str, answers: dict[str, Any]) -> None:
            path, headers = requests[function]
            response = gateway.handle("GET", path, headers, b"")
            answers[function] = (response.status, json.loads(response.body))

        for _ in range(ROUNDS):
            # When both are invoked at once, each reading its request while the other is inside
            answers: dict[str, Any] = {}
            threads = [threading.Thread(target=call, args=(f, answers)) for f in requests]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(2 * WAIT)
            meet.reset()
            # Then each saw its own path, headers and context, never the other's
            assert answers["device"] == (
                200,
                {
                    "name": "well-0001",
                    "path": "/device/well-0001",
                    "authorization": None,
                    "function": "fleetkey-device",
                },
            )
            assert answers["party"] == (
                200,
                {
                    "name": "rp-1",
                    "path": "/party/rp-1",
                    "authorization": "AWS4-HMAC-SHA256 Credential=rp",
                    "function": "fleetkey-party",
                },
            )
