"""fleetkey's embedded local stack: development tooling, not shipped in the Lambda layer."""
