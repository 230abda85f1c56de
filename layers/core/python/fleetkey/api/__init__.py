"""fleetkey's HTTP APIs over Powertools' event handler: `common` (what the admin API's routers
share), `admin` (the operator routers), `validations` (relying parties), `device` (the
device-facing endpoints), `models` (request and response bodies).

Imports nothing: it runs before any of its submodules, and the device-facing functions must not
pay for the admin API's pydantic models (docs/cold-start.md).
"""
