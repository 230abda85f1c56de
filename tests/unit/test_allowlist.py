"""Allow-list entries and factory manifests: validation, CSV and JSON parsing, hostile input."""

import json

import pytest
from pydantic import ValidationError

from fleetkey.domain.allowlist import (
    MAX_MANIFEST_BYTES,
    AllowlistEntry,
    RejectedRow,
    parse_entry,
    parse_manifest,
)
from fleetkey.errors import InvalidRequest

FINGERPRINT = "ab" * 32
VALID = {
    "device_id": "pump-0001",
    "serial_number": "SN-0001",
    "manufacturer_ca": "acme",
    "profile": "infusion-pump",
}
HEADER = "device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile"


def invalid_entry(**changes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_entry({**VALID, **changes})
    return caught.value


def invalid_manifest(text, fmt="csv", max_rows=100) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        parse_manifest(text, fmt, max_rows=max_rows)
    return caught.value


def csv_text(*rows, header=HEADER):
    return "\n".join([header, *rows]) + "\n"


# --- parse_entry ----------------------------------------------------------------------------------


def test_valid_entry_parses_with_defaults():
    # Given a minimal entry
    # When it is parsed
    entry = parse_entry(VALID)

    # Then optional fields take their defaults
    assert entry.public_key_fingerprint is None
    assert entry.attributes == {}


def test_full_entry_parses():
    # Given an entry with every field, including the thing-name and attribute characters AWS allows
    data = {
        **VALID,
        "device_id": "Plant_7:line-2",
        "serial_number": "A1/b2.c3_d-4",
        "public_key_fingerprint": FINGERPRINT,
        "attributes": {"site": "plant-7", "geo@pos": "52.1,4.3", "tags": "[a=b]"},
    }

    # When / Then
    entry = parse_entry(data)
    assert entry.public_key_fingerprint == FINGERPRINT
    assert entry.attributes["site"] == "plant-7"


def test_surrounding_whitespace_is_stripped():
    # Given values padded with spaces, as hand-edited manifests often are
    # When / Then: they are stripped before validation
    entry = parse_entry({**VALID, "device_id": " pump-0001 ", "serial_number": "SN-0001\t"})
    assert (entry.device_id, entry.serial_number) == ("pump-0001", "SN-0001")


@pytest.mark.parametrize(
    "device_id",
    ["pump 0001", "pump/0001", "pump.0001", "pümp-0001", "pump#1", "", "a" * 129],
    ids=["space", "slash", "dot", "non-ascii", "hash", "empty", "too-long"],
)
def test_bad_device_id_is_rejected(device_id):
    # Given a device id that is not a valid AWS IoT thing name
    # When / Then: the error names the field
    assert invalid_entry(device_id=device_id).message.startswith("device_id:")


def test_longest_device_id_is_accepted():
    # Given / When / Then: 128 characters is the AWS IoT thing-name limit, inclusive
    assert parse_entry({**VALID, "device_id": "a" * 128}).device_id == "a" * 128


@pytest.mark.parametrize("serial", ["SN 1", "", "S" * 65, "SN#1"])
def test_bad_serial_number_is_rejected(serial):
    assert invalid_entry(serial_number=serial).message.startswith("serial_number:")


@pytest.mark.parametrize("ca", ["Acme", "-acme", "acme_ca", "a" * 64, ""])
def test_bad_manufacturer_ca_name_is_rejected(ca):
    assert invalid_entry(manufacturer_ca=ca).message.startswith("manufacturer_ca:")


def test_unknown_profile_is_rejected_with_the_known_ones():
    # Given a profile fleetkey does not define
    # When / Then
    message = invalid_entry(profile="toaster").message
    assert message.startswith("profile:")
    assert "infusion-pump" in message and "telemetry-sensor" in message


@pytest.mark.parametrize(
    "fingerprint",
    ["ab" * 31, "ab" * 33, "zz" * 32, "ab:" * 31 + "ab", ""],
    ids=["short", "long", "not-hex", "colons", "empty"],
)
def test_bad_fingerprint_is_rejected(fingerprint):
    assert invalid_entry(public_key_fingerprint=fingerprint).message.startswith(
        "public_key_fingerprint:"
    )


def test_uppercase_fingerprint_is_normalised_to_lowercase():
    # Given a fingerprint in uppercase hex (as `openssl ... -fingerprint` prints it)
    # When it is parsed
    entry = parse_entry({**VALID, "public_key_fingerprint": FINGERPRINT.upper()})

    # Then it is stored lowercase, the form fleetkey computes from certificates
    assert entry.public_key_fingerprint == FINGERPRINT


@pytest.mark.parametrize("name", ["serial_number", "profile", "manufacturer_ca"])
def test_reserved_attribute_names_are_rejected(name):
    # Given an attribute that would override one fleetkey sets on the thing
    # When / Then
    message = invalid_entry(attributes={name: "x"}).message
    assert message.startswith("attributes:")
    assert "reserved" in message and name in message


def test_ten_attributes_are_allowed_but_not_eleven():
    # Given 10 and 11 attributes
    ten = {f"a{i}": "v" for i in range(10)}
    eleven = {f"a{i}": "v" for i in range(11)}

    # When / Then
    assert len(parse_entry({**VALID, "attributes": ten}).attributes) == 10
    assert "at most 10 attributes" in invalid_entry(attributes=eleven).message


@pytest.mark.parametrize(
    "attributes",
    [{"bad name": "v"}, {"site": "has space"}, {"site": "v" * 801}, {"floor": 3}, {"": "v"}],
    ids=["name-space", "value-space", "value-too-long", "value-not-string", "empty-name"],
)
def test_bad_attributes_are_rejected(attributes):
    assert invalid_entry(attributes=attributes).message.startswith("attributes.")


def test_extra_fields_are_forbidden():
    # Given an entry with a field the model does not define (e.g. a typo)
    # When / Then
    message = invalid_entry(profle="infusion-pump").message
    assert message.startswith("profle:")
    assert "Extra inputs are not permitted" in message


def test_missing_fields_are_all_reported():
    # Given an empty object
    with pytest.raises(InvalidRequest) as caught:
        parse_entry({})

    # Then every required field is named
    for field in ("device_id", "serial_number", "manufacturer_ca", "profile"):
        assert f"{field}: Field required" in caught.value.message


def test_entry_is_immutable():
    entry = parse_entry(VALID)
    with pytest.raises(ValidationError, match="frozen"):
        entry.device_id = "other"  # type: ignore[misc]


# --- CSV manifests --------------------------------------------------------------------------------


def test_csv_with_attribute_columns_parses():
    # Given a CSV with two attribute columns, one cell left empty, and an empty fingerprint cell
    text = csv_text(
        f"pump-0001,SN-0001,acme,{FINGERPRINT},infusion-pump,plant-7,3",
        "pump-0002,SN-0002,acme,,telemetry-sensor,plant-8,",
        header=HEADER + ",attribute.site,attribute.floor",
    )

    # When
    parsed = parse_manifest(text, "csv", max_rows=10)

    # Then both rows are entries, numbered from 1 after the header
    assert parsed.rejected == []
    (n1, first), (n2, second) = parsed.entries
    assert (n1, n2) == (1, 2)
    assert first.public_key_fingerprint == FINGERPRINT
    assert first.attributes == {"site": "plant-7", "floor": "3"}
    # an empty fingerprint cell means "no expected key"; an empty attribute cell means "not set"
    assert second.public_key_fingerprint is None
    assert second.attributes == {"site": "plant-8"}


def test_csv_columns_may_come_in_any_order_and_fingerprint_column_is_optional():
    text = csv_text(
        "infusion-pump,acme,SN-1,pump-1",
        header="profile,manufacturer_ca,serial_number,device_id",
    )
    parsed = parse_manifest(text, "csv", max_rows=10)
    assert [e.device_id for _, e in parsed.entries] == ["pump-1"]


def test_csv_quoted_fields_with_commas():
    # Given an attribute value with a comma, quoted per RFC 4180, and CRLF line endings
    text = (
        f"{HEADER},attribute.geo\r\n"
        'pump-0001,SN-0001,acme,,infusion-pump,"52.1,4.3"\r\n'
        '"pump-0002","SN-0002","acme","","infusion-pump","1,2"\r\n'
    )

    # When / Then: the quoted comma stays inside the value
    parsed = parse_manifest(text, "csv", max_rows=10)
    assert parsed.rejected == []
    assert [e.attributes["geo"] for _, e in parsed.entries] == ["52.1,4.3", "1,2"]


def test_csv_unknown_column_rejects_the_document():
    # Given a header with a column fleetkey does not know
    # When / Then: the whole manifest is refused, naming the column
    error = invalid_manifest(csv_text("p,S,acme,,infusion-pump,x", header=HEADER + ",colour"))
    assert error.details == {"unknown_columns": ["colour"]}


def test_csv_duplicate_column_rejects_the_document():
    text = csv_text("p,S,acme,,infusion-pump,S2", header=HEADER + ",serial_number")
    error = invalid_manifest(text)
    assert error.details == {"unknown_columns": []}


def test_csv_without_header_rejects_the_document():
    assert isinstance(invalid_manifest(""), InvalidRequest)


def test_csv_header_missing_a_required_column_rejects_each_row():
    # Given a header without serial_number (current behaviour: the header is accepted, since only
    # unknown columns are checked, and every row is then refused for the missing field)
    parsed = parse_manifest(
        csv_text("pump-1,acme,infusion-pump", header="device_id,manufacturer_ca,profile"),
        "csv",
        max_rows=10,
    )

    # Then nothing is imported and the reason names the field
    assert parsed.entries == []
    assert parsed.rejected == [RejectedRow(1, "pump-1", "serial_number: Field required")]


def test_csv_row_with_too_many_fields_is_rejected_with_its_row_number():
    # Given a row with one cell more than the header names
    text = csv_text(
        "pump-1,SN-1,acme,,infusion-pump",
        "pump-2,SN-2,acme,,infusion-pump,surplus",
        "pump-3,SN-3,acme,,infusion-pump",
    )

    # When
    parsed = parse_manifest(text, "csv", max_rows=10)

    # Then only that row is refused, with its (1-based, header excluded) number
    assert [n for n, _ in parsed.entries] == [1, 3]
    assert parsed.rejected == [RejectedRow(2, None, "row has more fields than the header")]


def test_csv_row_with_too_few_fields_is_rejected_per_field():
    # Given a short row: the missing cells read as empty, which fails their patterns
    parsed = parse_manifest(csv_text("pump-1,SN-1"), "csv", max_rows=10)

    # Then the row is refused with field-level reasons
    (rejected,) = parsed.rejected
    assert rejected.row == 1 and rejected.device_id == "pump-1"
    assert "manufacturer_ca:" in rejected.reason and "profile:" in rejected.reason


def test_csv_duplicate_device_ids_are_rejected_after_the_first():
    # Given the same device id in rows 1, 2 and 4
    text = csv_text(
        "pump-1,SN-1,acme,,infusion-pump",
        "pump-1,SN-1b,acme,,infusion-pump",
        "pump-2,SN-2,acme,,infusion-pump",
        " pump-1 ,SN-1c,acme,,infusion-pump",
    )

    # When
    parsed = parse_manifest(text, "csv", max_rows=10)

    # Then the first occurrence wins; every later one (also after whitespace stripping) is refused
    assert [(n, e.serial_number) for n, e in parsed.entries] == [(1, "SN-1"), (3, "SN-2")]
    assert parsed.rejected == [
        RejectedRow(2, "pump-1", "duplicate device_id in manifest"),
        RejectedRow(4, "pump-1", "duplicate device_id in manifest"),
    ]


def test_csv_bad_row_is_rejected_with_a_field_reason_while_others_pass():
    # Given three rows, the middle one with an unknown profile and a bad fingerprint
    text = csv_text(
        "pump-1,SN-1,acme,,infusion-pump",
        "pump-2,SN-2,acme,not-a-fingerprint,toaster",
        "pump-3,SN-3,acme,,telemetry-sensor",
    )

    # When
    parsed = parse_manifest(text, "csv", max_rows=10)

    # Then rows 1 and 3 are entries; row 2 is reported, never silently dropped
    assert [e.device_id for _, e in parsed.entries] == ["pump-1", "pump-3"]
    (rejected,) = parsed.rejected
    assert (rejected.row, rejected.device_id) == (2, "pump-2")
    assert "public_key_fingerprint:" in rejected.reason
    assert "profile: Value error, unknown profile" in rejected.reason


def test_csv_with_utf8_bom_is_read_like_any_other():
    # Given a CSV saved by Excel as "CSV UTF-8", which starts with a byte-order mark
    text = "\ufeff" + csv_text("pump-1,SN-1,acme,,infusion-pump")

    # When it is parsed
    parsed = parse_manifest(text, "csv", max_rows=10)

    # Then the mark is not part of the first column name
    assert [e.device_id for _, e in parsed.entries] == ["pump-1"]


def test_csv_unterminated_quote_rejects_the_document():
    error = invalid_manifest(csv_text("pump-1,SN-1,acme,,infusion-pump", '"pump-2,SN-2,acme,,x'))
    assert "CSV is malformed" in error.message


# --- JSON manifests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "wrap", [lambda rows: rows, lambda rows: {"devices": rows}], ids=["list", "devices"]
)
def test_json_manifest_parses(wrap):
    # Given a JSON manifest, bare or wrapped in {"devices": [...]}
    rows = [VALID, {**VALID, "device_id": "pump-0002", "attributes": {"site": "plant-7"}}]

    # When
    parsed = parse_manifest(json.dumps(wrap(rows)), "json", max_rows=10)

    # Then
    assert parsed.rejected == []
    assert [(n, e.device_id) for n, e in parsed.entries] == [(1, "pump-0001"), (2, "pump-0002")]
    assert parsed.entries[1][1].attributes == {"site": "plant-7"}


@pytest.mark.parametrize(
    "document",
    [
        '{"device_id": "pump-1"}',
        '"devices"',
        "42",
        "null",
        '{"devices": {"a": 1}}',
        '{"devices": [], "x": 1}',
    ],
)
def test_json_manifest_that_is_not_a_list_is_rejected(document):
    assert "list of entries" in invalid_manifest(document, "json").message


def test_malformed_json_is_rejected():
    assert "JSON is malformed" in invalid_manifest('[{"device_id": ', "json").message


def test_json_non_object_rows_are_rejected_per_row():
    # Given a list mixing an entry with values that are not objects
    document = json.dumps([1, "pump-9", None, [VALID], VALID])

    # When
    parsed = parse_manifest(document, "json", max_rows=10)

    # Then each non-object row is refused on its own, the valid one is kept
    assert [n for n, _ in parsed.entries] == [5]
    assert [r.row for r in parsed.rejected] == [1, 2, 3, 4]
    assert all(r.device_id is None for r in parsed.rejected)
    assert all("valid dictionary" in r.reason for r in parsed.rejected)


def test_json_row_with_non_string_device_id_reports_no_device_id():
    parsed = parse_manifest(json.dumps([{**VALID, "device_id": 7}]), "json", max_rows=10)
    (rejected,) = parsed.rejected
    assert rejected.device_id is None
    assert rejected.reason.startswith("device_id:")


def test_json_extra_field_is_rejected_per_row():
    parsed = parse_manifest(json.dumps([{**VALID, "owner": "x"}]), "json", max_rows=10)
    assert "owner: Extra inputs are not permitted" in parsed.rejected[0].reason


# --- document-level limits ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_too_many_rows_rejects_the_document(fmt):
    # Given three rows and a limit of two
    rows = [{**VALID, "device_id": f"pump-{i}"} for i in range(3)]
    text = (
        csv_text(*(f"pump-{i},SN,acme,,infusion-pump" for i in range(3)))
        if fmt == "csv"
        else json.dumps(rows)
    )

    # When / Then: refused as a whole; at the limit it is accepted
    assert "at most 2" in invalid_manifest(text, fmt, max_rows=2).message
    assert len(parse_manifest(text, fmt, max_rows=3).entries) == 3


def test_oversized_text_is_rejected_before_parsing():
    # Given a document one byte over the limit (counted in UTF-8 bytes, not characters)
    text = "é" * (MAX_MANIFEST_BYTES // 2) + "x"
    assert len(text) < MAX_MANIFEST_BYTES < len(text.encode())

    # When / Then
    assert "larger than" in invalid_manifest(text, "json").message


@pytest.mark.parametrize("fmt", ["xml", "CSV", "", "yaml"])
def test_unknown_format_is_rejected(fmt):
    assert "csv or json" in invalid_manifest(csv_text(), fmt).message


def test_ten_thousand_row_csv_parses():
    # Given a 10,000-row CSV (the default import limit), with an attribute column
    rows = (f"dev-{i:05d},SN{i},acme,{i:064x},telemetry-sensor,site-{i % 7}" for i in range(10_000))
    text = csv_text(*rows, header=HEADER + ",attribute.site")

    # When it is parsed (no timing assertion: this guards against pathological slowness)
    parsed = parse_manifest(text, "csv", max_rows=10_000)

    # Then every row is an entry
    assert len(parsed.entries) == 10_000
    assert parsed.rejected == []
    assert isinstance(parsed.entries[-1][1], AllowlistEntry)
