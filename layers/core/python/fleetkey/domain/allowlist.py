"""Allow-list entries and factory manifests (CSV or JSON).

An entry says which device may register: its id (the AWS IoT thing name), hardware serial number,
the manufacturer CA that must have issued its certificate, optionally the expected public-key
fingerprint, its profile and thing attributes.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

# A device id (its AWS IoT thing name and MQTT client id): what every path checks first.
from fleetkey.domain.ids import DEVICE_ID as DEVICE_ID  # re-exported: its earlier home
from fleetkey.domain.profiles import PROFILES, RESERVED_THING_ATTRIBUTES
from fleetkey.errors import InvalidRequest

# AWS IoT thing names and attribute syntax, so a valid entry always makes a valid thing.
DeviceId = Annotated[str, StringConstraints(pattern=rf"^{DEVICE_ID.pattern}$")]
SerialNumber = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._/-]{1,64}$")]
CaName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
Fingerprint = Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{64}$", to_lower=True)]
AttributeName = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_.,@/:#-]{1,128}$")]
AttributeValue = Annotated[str, StringConstraints(pattern=r"^[a-zA-Z0-9_.,@/:#=\[\]-]{0,800}$")]

# Thing attributes fleetkey sets itself; an entry may not override them.
RESERVED_ATTRIBUTES = RESERVED_THING_ATTRIBUTES
MAX_ATTRIBUTES = 10
# A synchronous Lambda invocation carries at most 6 MB, event envelope included.
MAX_MANIFEST_BYTES = 5 * 1024 * 1024
CSV_ATTRIBUTE_PREFIX = "attribute."
CSV_COLUMNS = ("device_id", "serial_number", "manufacturer_ca", "public_key_fingerprint", "profile")


class AllowlistEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    device_id: DeviceId
    serial_number: SerialNumber
    manufacturer_ca: CaName
    profile: str
    public_key_fingerprint: Fingerprint | None = None
    attributes: dict[AttributeName, AttributeValue] = Field(default_factory=dict)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile; expected one of {sorted(PROFILES)}")
        return value

    @field_validator("attributes")
    @classmethod
    def _attribute_rules(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_ATTRIBUTES:
            raise ValueError(f"at most {MAX_ATTRIBUTES} attributes")
        reserved = RESERVED_ATTRIBUTES.intersection(value)
        if reserved:
            raise ValueError(f"reserved attribute names: {sorted(reserved)}")
        return value


@dataclass(frozen=True, slots=True)
class RejectedRow:
    row: int  # 1-based data row (CSV header not counted)
    device_id: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class ParsedManifest:
    entries: list[tuple[int, AllowlistEntry]]
    rejected: list[RejectedRow]


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "entry"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_entry(data: Any) -> AllowlistEntry:
    """Raises InvalidRequest with a field-level explanation."""
    try:
        return AllowlistEntry.model_validate(data)
    except ValidationError as exc:
        raise InvalidRequest(describe_validation_error(exc)) from None


def _csv_rows(text: str) -> list[dict[str, Any]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), strict=True)
    header = reader.fieldnames or []
    unknown = [c for c in header if c not in CSV_COLUMNS and not c.startswith(CSV_ATTRIBUTE_PREFIX)]
    if not header or unknown or len(set(header)) != len(header):
        raise InvalidRequest(
            "CSV header must name the columns "
            f"{', '.join(CSV_COLUMNS)} and optional {CSV_ATTRIBUTE_PREFIX}<name> columns",
            details={"unknown_columns": unknown},
        )
    rows = []
    try:
        for record in reader:
            if None in record:  # more fields than the header names
                rows.append({"__error__": "row has more fields than the header"})
                continue
            row: dict[str, Any] = {"attributes": {}}
            for column, value in record.items():
                value = value if value is not None else ""
                if column.startswith(CSV_ATTRIBUTE_PREFIX):
                    if value != "":
                        row["attributes"][column[len(CSV_ATTRIBUTE_PREFIX) :]] = value
                elif column == "public_key_fingerprint" and value.strip() == "":
                    continue
                else:
                    row[column] = value
            rows.append(row)
    except csv.Error as exc:
        raise InvalidRequest(f"CSV is malformed at line {reader.line_num}: {exc}") from None
    return rows


def _json_rows(text: str) -> list[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"JSON is malformed: {exc.msg} at line {exc.lineno}") from None
    except (ValueError, RecursionError):  # e.g. a 5,000-digit number, or nesting 100,000 deep
        raise InvalidRequest(
            "JSON is malformed: a value is too large or too deeply nested"
        ) from None
    if isinstance(data, dict) and set(data) == {"devices"}:
        data = data["devices"]
    if not isinstance(data, list):
        raise InvalidRequest('a JSON manifest is a list of entries or {"devices": [...]}')
    return data


def parse_manifest(text: str, fmt: str, *, max_rows: int) -> ParsedManifest:
    """Parse a factory manifest. Rows that fail validation are reported, never silently dropped;
    a device id that appears twice is rejected in every row after the first.

    Raises:
        InvalidRequest: the document as a whole is unusable (format, header, size, row count).
    """
    if len(text.encode()) > MAX_MANIFEST_BYTES:
        raise InvalidRequest(f"manifest is larger than {MAX_MANIFEST_BYTES} bytes")
    text = text.removeprefix("\ufeff")  # spreadsheets write a byte-order mark
    if fmt == "csv":
        raw_rows: list[Any] = _csv_rows(text)
    elif fmt == "json":
        raw_rows = _json_rows(text)
    else:
        raise InvalidRequest("manifest format must be csv or json")
    if len(raw_rows) > max_rows:
        raise InvalidRequest(f"manifest has {len(raw_rows)} rows; at most {max_rows} per import")
    entries: list[tuple[int, AllowlistEntry]] = []
    rejected: list[RejectedRow] = []
    seen: set[str] = set()
    for number, raw in enumerate(raw_rows, start=1):
        claimed = raw.get("device_id") if isinstance(raw, dict) else None
        claimed = claimed if isinstance(claimed, str) else None
        if isinstance(raw, dict) and "__error__" in raw:
            rejected.append(RejectedRow(number, claimed, raw["__error__"]))
            continue
        try:
            entry = AllowlistEntry.model_validate(raw)
        except ValidationError as exc:
            rejected.append(RejectedRow(number, claimed, describe_validation_error(exc)))
            continue
        if entry.device_id in seen:
            rejected.append(RejectedRow(number, entry.device_id, "duplicate device_id in manifest"))
            continue
        seen.add(entry.device_id)
        entries.append((number, entry))
    return ParsedManifest(entries=entries, rejected=rejected)
