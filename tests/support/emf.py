"""Powertools metrics as the functions print them (CloudWatch embedded metric format, EMF)."""

from __future__ import annotations

import json
from typing import Any


def emitted(stdout: str, name: str) -> list[dict[str, Any]]:
    """The EMF documents on `stdout` that carry metric `name`: each one's directive, its dimension
    names (one set: Powertools writes one), the document, and the metric's total in it (Powertools
    writes a list of values)."""
    found = []
    for line in stdout.splitlines():
        if not line.startswith("{"):
            continue
        document = json.loads(line)
        for directive in document.get("_aws", {}).get("CloudWatchMetrics", []):
            if any(m["Name"] == name for m in directive["Metrics"]):
                values = document[name]
                [dimensions] = directive["Dimensions"]
                found.append(
                    {
                        "directive": directive,
                        "dimensions": set(dimensions),
                        "document": document,
                        "value": sum(values) if isinstance(values, list) else values,
                    }
                )
    return found
