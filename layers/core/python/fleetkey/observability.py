"""Logger, metrics and tracer, created once and shared by every function.

The service name comes from POWERTOOLS_SERVICE_NAME; every function publishes its metrics in the
`fleetkey` namespace.
"""

from aws_lambda_powertools import Logger, Metrics, Tracer

logger = Logger()
metrics = Metrics(namespace="fleetkey")
tracer = Tracer()
