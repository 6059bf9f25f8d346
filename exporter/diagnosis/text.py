"""Numbers as a person reads them in a one-line summary: `850 ms`, `35.2 MiB/s`, `92%`."""

from __future__ import annotations

import math


def secs(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "?"
    if value < 0.001:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 10:
        return f"{value:.1f} s"
    if value < 600:
        return f"{value:.0f} s"
    return f"{value / 60:.0f} min"


def size(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "?"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("kB", 2**10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}".replace(".0 ", " ")
    return f"{value:.0f} B"


def pct(share: float | None) -> str:
    return "?" if share is None or math.isnan(share) else f"{share * 100:.0f}%"


def num(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "?"
    if math.isinf(value):
        return "unbounded"
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 1 else f"{value:.2g}"


def work_mem_bytes(value: float) -> int:
    """The smallest power-of-two work_mem (64 kB at least) that holds `value` bytes."""
    kb = max(64, 2 ** math.ceil(math.log2(max(value, 1) / 1024)))
    return kb * 1024


def work_mem(value: float) -> str:
    """That setting as PostgreSQL writes it: `4MB`, `512kB`."""
    kb = work_mem_bytes(value) // 1024
    return f"{kb // 1024}MB" if kb >= 1024 else f"{kb}kB"
