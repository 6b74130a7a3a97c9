"""Small statistics over latency samples: percentiles the way the report prints them. Pure."""

from __future__ import annotations

import statistics

PERCENTILES = {"p01": 0.01, "p50": 0.50, "p90": 0.90, "p99": 0.99}


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks; sorted_values must be sorted and non-empty."""
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = q * (len(sorted_values) - 1)
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


def summarize_ns(latencies_ns: list[int]) -> dict:
    """p01/p50/p90/p99 and mean in microseconds, with the sample count."""
    if not latencies_ns:
        return {"count": 0}
    values = sorted(latencies_ns)
    summary = {name: round(percentile(values, q) / 1000, 2) for name, q in PERCENTILES.items()}
    summary["mean"] = round(statistics.fmean(values) / 1000, 2)
    summary["count"] = len(values)
    return summary


def summarize_seconds(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {
        "p50": percentile(ordered, 0.5),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1],
        "count": len(ordered),
    }
