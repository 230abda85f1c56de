"""The fleetkey CDK application: one stack composing one construct per concern."""
