"""The `fleetkey` operator command line (development and operations tooling, not Lambda code)."""
