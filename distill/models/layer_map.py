"""Which teacher layer goes with which student layer: for initialisation and for layer-wise losses.

All indices are 0-based transformer layers (layer i's output is `hidden_states[i + 1]`; index 0 of
`hidden_states` is the embedding output). A strategy maps an N-layer teacher onto an M-layer student:

- `spread`: evenly spaced including the first and the last (12 -> 6: 0,2,4,7,9,11, the DistilBERT release)
- `every_other`: 0, 2, 4, ... (teacher layers 2j; needs N >= 2M - 1)
- `first`: 0 .. M-1 (Patient-KD initialises the student from the teacher's first k layers)
- `last`: N-M .. N-1 (PKD-Last)
- `uniform`: every (N/M)-th ending at the last, round((j+1) N/M) - 1 (TinyBERT's g(m) = m N/M; PKD-Skip)
- an explicit list of M teacher layers.
"""

from __future__ import annotations

from typing import Optional, Sequence

from kd_common.errors import UserError

STRATEGIES = ("spread", "every_other", "first", "last", "uniform")


class LayerMapError(UserError, ValueError):
    """A mapping that does not fit the two models' depths."""


def resolve_layers(
    strategy: str, teacher_layers: int, student_layers: int, explicit: Optional[Sequence[int]] = None, key: str = "layer map"
) -> list[int]:
    """Teacher layer (0-based) for each of the `student_layers` student layers."""
    n, m = teacher_layers, student_layers
    if m < 1:
        raise LayerMapError(f"{key}: the student has {m} layers")
    if explicit is not None:
        layers = [int(i) for i in explicit]
        if len(layers) != m:
            raise LayerMapError(f"{key} lists {len(layers)} teacher layers for a {m}-layer student; give one per student layer")
        bad = [i for i in layers if not 0 <= i < n]
        if bad:
            raise LayerMapError(f"{key}: teacher layers {bad} out of range for a {n}-layer teacher (0-based)")
        return layers
    if strategy not in STRATEGIES:
        raise LayerMapError(f"{key}: unknown strategy {strategy!r} (one of {', '.join(STRATEGIES)}, or an explicit list)")
    if m > n and strategy != "spread":
        raise LayerMapError(f"{key}={strategy}: a {m}-layer student is deeper than the {n}-layer teacher; give an explicit list")
    if strategy == "spread":
        if m == 1:
            return [n - 1]
        return [int(i * (n - 1) / (m - 1) + 0.5) for i in range(m)]
    if strategy == "every_other":
        if 2 * m - 1 > n:
            raise LayerMapError(f"{key}=every_other needs a teacher with at least {2 * m - 1} layers for a {m}-layer student, it has {n}")
        return [2 * j for j in range(m)]
    if strategy == "first":
        return list(range(m))
    if strategy == "last":
        return list(range(n - m, n))
    return [int((j + 1) * n / m + 0.5) - 1 for j in range(m)]  # uniform
