"""`streamd bench --repeat N`: the same bench run N times, one after the other, and each figure's
spread over the runs. A shared or virtual machine's speed drifts (BENCHMARKS.md, machine D: the
same model 25% slower a quarter of an hour later), so a figure from one run can mislead; the
spread says how far to trust it. Pure apart from ``repeated``, which calls the runs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Figures whose spread is worth reporting: every number of a run, less what is the same in each
# run by construction or is not a measurement.
LEFT_OUT = ("streams", "audio_s", "machine", "providers", "provider", "network", "nats", "gallery", "per_node",
            "nodes", "cores", "streams_per_node", "pace", "mode", "silent")


def numbers(result: dict, prefix: str = "") -> dict[str, float]:
    """A run's numeric figures, nested ones as ``outer.inner`` (None and text left out)."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if key in LEFT_OUT:
            continue
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numbers(value, name + "."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out


def spread(runs: list[dict]) -> dict[str, dict[str, float]]:
    """For each figure present in every run: its min, median and max over the runs."""
    figures = [numbers(r) for r in runs]
    common = [k for k in figures[0] if all(k in f for f in figures[1:])]
    return {k: {"min": min(v), "median": float(np.median(v)), "max": max(v)}
            for k in common for v in [[f[k] for f in figures]]}


def repeated(run_once: Callable[[], dict], times: int, on_run: Callable[[int, dict], None] | None = None) -> dict:
    """``times`` runs of ``run_once``, one after the other: each run's result and the spread."""
    runs = []
    for i in range(times):
        runs.append(run_once())
        if on_run is not None:
            on_run(i, runs[-1])
    return {"repeat": times, "machine": runs[0].get("machine"), "spread": spread(runs), "runs": runs}


def run_line(i: int, result: dict) -> str:
    """One run's headline figures on a line."""
    keys = ("overruns", "latency_s_p50", "latency_s_p99", "cpu_cores", "realtime_factor")
    return f"run {i + 1}: " + ", ".join(f"{k} {rounded(result.get(k))}" for k in keys)


def spread_table(spread: dict[str, dict[str, float]]) -> list[str]:
    """The spread as text: a line per figure."""
    lines = [f"{'figure':36} {'min':>12} {'median':>12} {'max':>12}"]
    for key, s in spread.items():
        lines.append(f"{key:36} {rounded(s['min']):>12} {rounded(s['median']):>12} {rounded(s['max']):>12}")
    return lines


def rounded(value):
    """A figure as printed: floats to 4 places."""
    return round(value, 4) if isinstance(value, float) else value
