"""Counters of what the pipeline read, wrote and dropped; merged with a Beam CombineFn."""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import apache_beam as beam

HISTOGRAM_BIN = 16


def new_stats() -> Counter:
    return Counter()


def add_drop(stats: Counter, reason: str, units: int, tokens: int, unit_name: str) -> None:
    stats[f"dropped.{reason}.{unit_name}"] += units
    stats[f"dropped.{reason}.tokens"] += tokens


class MergeCounters(beam.CombineFn):
    """Sum dictionaries of integers."""

    def create_accumulator(self) -> Counter:
        return Counter()

    def add_input(self, acc: Counter, element: dict) -> Counter:
        acc.update(element)
        return acc

    def merge_accumulators(self, accumulators: Iterable[Counter]) -> Counter:
        out = Counter()
        for acc in accumulators:
            out.update(acc)
        return out

    def extract_output(self, acc: Counter) -> dict:
        return dict(acc)


def structure(flat: dict[str, int]) -> dict[str, Any]:
    """Turn flat counters ('dropped.too_short.tokens', 'hist.3') into the manifest's stats section."""
    out: dict[str, Any] = {"dropped": {}, "length_histogram": {}, "splits": {}}
    for key, value in sorted(flat.items()):
        parts = key.split(".")
        if parts[0] == "dropped":
            out["dropped"].setdefault(parts[1], {})[parts[2]] = value
        elif parts[0] == "hist":
            lo = int(parts[1]) * HISTOGRAM_BIN
            out["length_histogram"][f"{lo}-{lo + HISTOGRAM_BIN - 1}"] = value
        elif parts[0] == "split":
            out["splits"].setdefault(parts[1], {})[parts[2]] = value
        else:
            out[key] = value
    out["tokens_dropped"] = sum(d.get("tokens", 0) for d in out["dropped"].values())
    out["content_tokens_written"] = sum(s.get("content_tokens", 0) for s in out["splits"].values())
    return out
