"""Typed settings from the function environment."""

import pytest

from fleetkey.errors import FleetkeyError
from fleetkey.settings import Settings, SettingsError

MINIMAL = {"FLEETKEY_TABLE": "fleetkey-devices", "AWS_REGION": "eu-west-1"}


def test_minimal_environment_gives_defaults():
    # Given only the table and the region
    # When
    settings = Settings.from_environ(MINIMAL)

    # Then every other setting has its default
    assert settings == Settings(
        table_name="fleetkey-devices",
        region="eu-west-1",
        name_prefix="fleetkey",
        trust_anchor_cache_seconds=60,
        max_import_rows=10_000,
    )


def test_every_setting_is_read():
    # Given a full environment
    env = {
        **MINIMAL,
        "FLEETKEY_NAME_PREFIX": "fk-staging",
        "FLEETKEY_TRUST_ANCHOR_CACHE_SECONDS": "5",
        "FLEETKEY_MAX_IMPORT_ROWS": "250",
    }

    # When
    settings = Settings.from_environ(env)

    # Then numbers are numbers
    assert settings.name_prefix == "fk-staging"
    assert settings.trust_anchor_cache_seconds == 5
    assert settings.max_import_rows == 250


def test_missing_table_is_a_settings_error():
    # Given no table name
    # When / Then
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ({"AWS_REGION": "eu-west-1"})
    assert "FLEETKEY_TABLE" in caught.value.message
    assert isinstance(caught.value, FleetkeyError)
    assert caught.value.code == "misconfigured"


def test_region_falls_back_to_aws_default_region():
    # Given AWS_DEFAULT_REGION only
    env = {"FLEETKEY_TABLE": "t", "AWS_DEFAULT_REGION": "us-east-2"}

    # When / Then
    assert Settings.from_environ(env).region == "us-east-2"


@pytest.mark.parametrize("region", ["", None], ids=["empty", "absent"])
def test_empty_aws_region_falls_back_too(region):
    env = {"FLEETKEY_TABLE": "t", "AWS_DEFAULT_REGION": "us-east-2"}
    if region is not None:
        env["AWS_REGION"] = region
    assert Settings.from_environ(env).region == "us-east-2"


def test_aws_region_wins_over_the_default_region():
    env = {"FLEETKEY_TABLE": "t", "AWS_REGION": "eu-west-1", "AWS_DEFAULT_REGION": "us-east-2"}
    assert Settings.from_environ(env).region == "eu-west-1"


def test_missing_region_is_a_settings_error():
    with pytest.raises(SettingsError):
        Settings.from_environ({"FLEETKEY_TABLE": "t"})


@pytest.mark.parametrize(
    "name", ["FLEETKEY_TRUST_ANCHOR_CACHE_SECONDS", "FLEETKEY_MAX_IMPORT_ROWS"]
)
@pytest.mark.parametrize("value", ["ten", "", "1.5", "1e3"])
def test_non_numeric_number_is_a_settings_error(name, value):
    # Given a numeric setting that is not an integer
    # When / Then: a typed error at cold start, not a ValueError later
    with pytest.raises(SettingsError) as caught:
        Settings.from_environ({**MINIMAL, name: value})
    assert "not a number" in caught.value.message


def test_from_environ_without_argument_reads_the_process_environment(monkeypatch):
    # Given the process environment
    monkeypatch.setenv("FLEETKEY_TABLE", "from-os")
    monkeypatch.setenv("AWS_REGION", "ap-south-1")

    # When / Then
    settings = Settings.from_environ()
    assert (settings.table_name, settings.region) == ("from-os", "ap-south-1")


def test_settings_are_immutable():
    settings = Settings.from_environ(MINIMAL)
    with pytest.raises(AttributeError):
        settings.table_name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name", ["FLEETKEY_TRUST_ANCHOR_CACHE_SECONDS", "FLEETKEY_MAX_IMPORT_ROWS"]
)
def test_negative_number_is_a_settings_error(name):
    with pytest.raises(SettingsError):
        Settings.from_environ({**MINIMAL, name: "-1"})
