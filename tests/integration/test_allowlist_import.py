"""Allow-list import at the store level: rows are whole, conflicts settle, imports end."""

from fleetkey.domain.audit import ChainHead
from fleetkey.store import schema


def test_an_orphan_trail_settles_its_row_and_the_import_ends(stack):
    # Given an audit record left for an id that has no device (e.g. written by hand)
    record = ChainHead().next_record(
        subject="device:orphan",
        at="2026-01-01T00:00:00.000+00:00",
        action="note",
        actor="op",
        details={},
    )
    stack.store.table.transact([stack.store.table.audit_put(record)])
    manifest = (
        "device_id,serial_number,manufacturer_ca,public_key_fingerprint,profile\n"
        + "\n".join(f"{d},SN-{d},acme,,telemetry-sensor" for d in ["a-1", "orphan", "a-2"])
    )
    # When a manifest naming it is imported
    report = stack.allowlist.import_manifest(manifest, "csv", actor="op")
    # Then the other rows are in, the orphan's row is reported, and nothing was half-written
    assert report.imported == 2
    assert [(r.row, r.device_id) for r in report.rejected] == [(2, "orphan")]
    assert stack.store.devices.get("orphan") is None
    assert stack.store.audit.read(schema.device_subject("orphan")) == [(record.body, record.hash)]


def test_bom_from_spreadsheet_exports_is_accepted(stack):
    # Given a CSV saved by a spreadsheet, starting with a UTF-8 byte-order mark
    manifest = (
        "\ufeffdevice_id,serial_number,manufacturer_ca,public_key_fingerprint,profile\n"
        "b-1,SN-1,acme,,telemetry-sensor\n"
    )
    # When it is imported
    report = stack.allowlist.import_manifest(manifest, "csv", actor="op")
    # Then it is read like any other
    assert (report.imported, report.rejected) == (1, [])
