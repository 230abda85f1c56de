"""A device id: its AWS IoT thing name and MQTT client id, what every path checks first.

A module of its own, without pydantic: the services that only check ids (tokens, data keys,
rotation, lifecycle, validations) need not import the allow-list's models (docs/cold-start.md).
"""

from __future__ import annotations

import re

# AWS IoT's thing-name syntax, so a valid id always makes a valid thing.
DEVICE_ID = re.compile(r"[a-zA-Z0-9:_-]{1,128}")
