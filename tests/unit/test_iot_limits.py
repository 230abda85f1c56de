"""AWS IoT's documented rate limits for the local stack: the table, the token buckets, the binding
quota of a registration."""

from __future__ import annotations

import pytest

from fleetkey_local.iot_limits import (
    DOCUMENTED,
    DOCUMENTED_RATES,
    JITR,
    SOURCES,
    IotRateLimits,
    TokenBucket,
    binding_rate,
)

# What an accepted just-in-time registration calls (fleetkey.services.registration's budget),
# and AWS IoT's own registration of the certificate before it.
REGISTRATION_CALLS = {
    "DescribeCertificate": 1,
    "CreateThing": 1,
    "AttachPolicy": 1,
    "AttachThingPrincipal": 1,
    "UpdateCertificate": 1,
    JITR: 1,
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_every_documented_rate_names_its_sources():
    # Each rate cites at least one of the public copies of AWS's table, once per API
    assert len(DOCUMENTED) == len(DOCUMENTED_RATES)
    for rate in DOCUMENTED_RATES:
        assert rate.per_second > 0
        assert rate.sources and set(rate.sources) <= set(SOURCES), rate


def test_the_registration_apis_have_their_documented_rates():
    rates = IotRateLimits.documented().rates
    assert {op: rates[op] for op in REGISTRATION_CALLS} == {
        "DescribeCertificate": 10,
        "CreateThing": 100,
        "AttachPolicy": 15,
        "AttachThingPrincipal": 100,
        "UpdateCertificate": 10,
        JITR: 15,
    }


def test_describe_and_update_certificate_bind_a_registration_at_ten_a_second():
    # Given the documented rates, when a registration makes one call of each API
    rate, binding = binding_rate(REGISTRATION_CALLS, IotRateLimits.documented().rates)
    # Then the two 10-per-second APIs bind it
    assert rate == pytest.approx(10.0)
    assert sorted(binding) == ["DescribeCertificate", "UpdateCertificate"]
    # and an API without a limit does not
    assert binding_rate({"DescribeEndpoint": 1}, {}) == (float("inf"), [])


def test_scale_overrides_and_jitr_are_options():
    limits = IotRateLimits.documented(scale=2, overrides={"AttachPolicy": 1}, jitr=False)
    assert limits.rates["DescribeCertificate"] == 20
    assert limits.rates["AttachPolicy"] == 1
    assert JITR not in limits.rates


def test_a_bucket_allows_a_second_of_its_rate_then_its_rate():
    # Given a bucket of 10 a second, full
    clock = Clock()
    bucket = TokenBucket(10, 10, clock)
    # Then ten requests pass at once and the eleventh does not
    assert all(bucket.take() for _ in range(10))
    assert not bucket.take()
    # and a tenth of a second later one more passes, and only one
    clock.now += 0.1
    assert bucket.take()
    assert not bucket.take()
    # and it never holds more than its capacity
    clock.now += 60
    assert sum(bucket.take() for _ in range(20)) == 10


def test_admit_counts_the_limited_apis_and_passes_the_others():
    clock = Clock()
    limits = IotRateLimits({"UpdateCertificate": 2}, clock=clock)
    assert [limits.admit("UpdateCertificate") for _ in range(3)] == [True, True, False]
    assert limits.admit("DescribeEndpoint")  # not limited
    assert limits.statistics() == {"UpdateCertificate": {"allowed": 2, "throttled": 1}}
    limits.reset_statistics()
    assert limits.statistics() == {}


def test_a_slow_rate_still_allows_one_request():
    limits = IotRateLimits({"OpenTunnel": 0.5}, clock=Clock())
    assert limits.admit("OpenTunnel")
    assert not limits.admit("OpenTunnel")
