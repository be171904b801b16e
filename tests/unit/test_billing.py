"""Pricing: billed time from generation time (minimum, rounding unit) and exact decimal amounts."""

from decimal import Decimal

import pytest

from handler.records.billing import Pricing, decimal_text, nanos
from handler.settings import BillingSettings


def pricing(**values) -> Pricing:
    return Pricing(BillingSettings(**values))


def test_per_millisecond_rounds_up_and_prices_exactly():
    charge = pricing(prices={"cpu": "0.0003"}).charge(1.2341, 1, "cpu")
    assert charge.billed_ms == 1235  # 1234.1 ms rounded up to the next whole ms
    assert charge.amount == Decimal("0.0003") * Decimal("1.235")
    assert charge.as_dict()["amount"] == "0.0003705"
    assert charge.as_dict()["price_per_second"] == "0.0003"


def test_per_second_unit_and_minimum_per_image():
    per_second = pricing(prices={"cpu": "1"}, rounding_ms=1000)
    assert per_second.charge(0.2, 1, "cpu").billed_ms == 1000
    assert per_second.charge(1.0, 1, "cpu").billed_ms == 1000
    assert per_second.charge(1.001, 1, "cpu").billed_ms == 2000
    minimum = pricing(prices={"cpu": "1"}, minimum_ms_per_image=500)
    assert minimum.charge(0.1, 4, "cpu").billed_ms == 2000  # 4 images x 500 ms
    assert minimum.charge(3.0, 4, "cpu").billed_ms == 3000


def test_floor_per_image_and_zero_time():
    p = pricing(prices={"cpu": "0.001"}, floor_per_image="0.01")
    assert p.charge(0.5, 3, "cpu").amount == Decimal("0.03")
    assert pricing(prices={"cpu": "5"}).charge(0.0, 1, "cpu").billed_ms == 0


def test_device_price_matching():
    p = pricing(prices={"cpu": "0.1", "H100": "2", "NVIDIA H100 80GB HBM3": "3", "A10": "1", "default": "0.5"})
    assert p.price_for("NVIDIA H100 80GB HBM3") == Decimal(3)  # exact beats contained
    assert p.price_for("NVIDIA H100 PCIe") == Decimal(2)
    assert p.price_for("NVIDIA A10") == Decimal(1)
    assert p.price_for("NVIDIA L20") == Decimal("0.5")
    assert p.price_for("NVIDIA A100-SXM4-80GB") == Decimal("0.5")  # A10 is a word, not a prefix
    assert pricing(prices={"L4": "1", "default": "2"}).price_for("NVIDIA L40S") == 2
    assert pricing(prices={"nvidia l20": "7"}).price_for("NVIDIA L20") == 7
    assert pricing(prices={"cpu": "1"}).price_for("NVIDIA L20") == 0  # unpriced: charged 0, logged


def test_amount_text_and_nanos():
    assert decimal_text(Decimal("0.000120000")) == "0.00012"
    assert decimal_text(Decimal("100")) == "100"
    assert nanos(Decimal("0.0000000015")) == 2  # half-up
    assert nanos(Decimal("1.5")) == 1_500_000_000


@pytest.mark.parametrize("bad", [{"prices": {"cpu": "-1"}}, {"rounding_ms": 0}, {"prices": {"cpu": "nan"}}])
def test_invalid_billing_settings(bad):
    with pytest.raises(ValueError):
        BillingSettings(**bad)
