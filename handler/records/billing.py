"""Generation time -> a charge.

Billable time is the device's generation time of a successful request, synchronised around the pipeline call
on GPU (pipelines.generate): never queueing, model loading, encoding, saving or any part of a failed request.
It is raised to `minimum_ms_per_image` x images, then rounded up to a whole `rounding_ms` unit (1 = per
millisecond, 1000 = per second). The amount is billed seconds x the device's price per second, at least
`floor_per_image` x images, in exact decimal arithmetic, rounded half-up to 1e-9 of the currency. Amounts are
kept as integer nano-units in the ledger so that sums are exact in every database.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from handler.settings import BillingSettings

log = logging.getLogger(__name__)

NANO = Decimal("1e-9")


def decimal_text(value: Decimal) -> str:
    """A plain decimal string without exponent or trailing zeros ("0.00012", "3")."""
    text = format(value.normalize(), "f")
    return text if text != "-0" else "0"


def nanos(value: Decimal) -> int:
    """`value` in whole nano-units, rounded half-up."""
    return int((value / NANO).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def from_nanos(value: int) -> Decimal:
    return Decimal(value) * NANO


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _contains(words: list[str], key: list[str]) -> bool:
    """`key` appears as consecutive whole words of `words`."""
    n = len(key)
    return n > 0 and any(words[i:i + n] == key for i in range(len(words) - n + 1))


@dataclass(frozen=True)
class Charge:
    """What one request costs. `amount_nanos` is the amount in 1e-9 units of `currency`."""

    device: str
    generation_ms: float
    billed_ms: int
    price_per_second: Decimal
    currency: str
    amount_nanos: int
    images: int
    rounding_ms: int
    minimum_ms_per_image: int

    @property
    def amount(self) -> Decimal:
        return from_nanos(self.amount_nanos)

    def as_dict(self) -> dict[str, Any]:
        """`parameters.billing` of the response (money as decimal strings, never floats)."""
        return {
            "billed_ms": self.billed_ms,
            "amount": decimal_text(self.amount),
            "currency": self.currency,
            "price_per_second": decimal_text(self.price_per_second),
            "device": self.device,
            "generation_ms": round(self.generation_ms, 3),
            "images": self.images,
            "rounding_ms": self.rounding_ms,
            "minimum_ms_per_image": self.minimum_ms_per_image,
        }


def zero_charge(settings: BillingSettings, device: str = "") -> Charge:
    """The charge of a failed request."""
    return Charge(device=device, generation_ms=0.0, billed_ms=0, price_per_second=Decimal(0),
                  currency=settings.currency, amount_nanos=0, images=0, rounding_ms=settings.rounding_ms,
                  minimum_ms_per_image=settings.minimum_ms_per_image)


class Pricing:
    """The price table of the settings, applied to one device."""

    def __init__(self, settings: BillingSettings) -> None:
        self.settings = settings
        self._warned: set[str] = set()

    def price_for(self, device: str) -> Decimal:
        """Price per second for a device name (`cpu`, `NVIDIA H100 80GB HBM3`): the key whose words appear
        together in the name, the longest such key winning (`H100` and `NVIDIA H100` match it, `A10` does not
        match `NVIDIA A100-SXM4-80GB`), else `default`, else 0. The choice is logged once per device."""
        words = _words(device)
        found = [key for key in self.settings.prices if key.lower() != "default" and _contains(words, _words(key))]
        chosen = max(found, key=lambda k: len(_words(k))) if found else next(
            (k for k in self.settings.prices if k.lower() == "default"), None)
        if device not in self._warned:
            self._warned.add(device)
            if chosen is None:
                log.warning("no price for device %r in billing.prices: its generations are charged 0", device)
            else:
                log.info("device %r is billed at the price of %r", device, chosen)
        return self.settings.prices[chosen] if chosen is not None else Decimal(0)

    def charge(self, generation_seconds: float, images: int, device: str) -> Charge:
        """The charge for `images` images generated in `generation_seconds` of device time on `device`."""
        s = self.settings
        generation_ms = max(0.0, generation_seconds * 1000)
        billable = max(generation_ms, float(s.minimum_ms_per_image * images))
        billed_ms = math.ceil(billable / s.rounding_ms) * s.rounding_ms
        price = self.price_for(device)
        amount = price * Decimal(billed_ms) / Decimal(1000)
        amount = max(amount, s.floor_per_image * images)
        return Charge(device=device, generation_ms=generation_ms, billed_ms=billed_ms, price_per_second=price,
                      currency=s.currency, amount_nanos=nanos(amount), images=images, rounding_ms=s.rounding_ms,
                      minimum_ms_per_image=s.minimum_ms_per_image)
