"""A policer's limits and the checks both dpd and policyd make on its rate and burst
(pure Python), so that policyd accepts exactly what dpd accepts."""

from __future__ import annotations

from xlbcore.errors import ValidationError, quote

MIN_RATE = 8_000  # bits/s
MAX_RATE = 400_000_000_000
MIN_BURST = 1_500  # bytes: one full-size Ethernet frame
MAX_BURST = 1 << 30


def check_rate(rate_bps: int, field: str) -> int:
    if not MIN_RATE <= rate_bps <= MAX_RATE:
        raise ValidationError(f"{field}: {quote(rate_bps)} is outside "
                              f"{MIN_RATE}..{MAX_RATE} bits per second")
    return rate_bps


def check_burst(burst_bytes: int, field: str) -> int:
    if not MIN_BURST <= burst_bytes <= MAX_BURST:
        raise ValidationError(f"{field}: {quote(burst_bytes)} is outside "
                              f"{MIN_BURST}..{MAX_BURST} bytes")
    return burst_bytes
