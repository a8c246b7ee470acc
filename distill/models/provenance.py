"""Where a pruned student came from: the provenance file `distill-prune` writes beside the student's weights.

`prune.json` in a pruned model directory records the teacher (its path, model type and content fingerprint,
distill/models/fingerprint.py), the importance scores the choice was made from (file name and sha256, the calibration
data), the teacher's and the student's shapes, and what was kept: the teacher layer each student layer is, the hidden
(embedding) channels, and per student layer its attention heads, key/value heads, MLP neurons and experts, all as
0-based teacher indices in the order the student holds them. Training from such a directory (`student.path`) reads it:
the layer-wise losses pair each student layer with the teacher layer it was cut from, and the losses that compare
hidden states directly (cos, pkd) compare a width-pruned student with the teacher's kept channels.

Only JSON is read here (no torch): `distill-train --check` reads it too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from kd_common.errors import UserError

PROVENANCE_FILE = "prune.json"
FORMAT = "distill-prune"
VERSION = 1


class ProvenanceError(UserError, ValueError):
    """A provenance file that cannot be read or does not fit the model beside it."""


@dataclass(frozen=True)
class Provenance:
    """What a pruned student kept of its teacher (see the module docstring); indices are the teacher's, 0-based."""

    teacher_path: str
    teacher_model_type: str
    teacher_sha256: Optional[str]
    teacher_files: dict
    layers: tuple[int, ...]  # the teacher layer of each student layer
    hidden_channels: Optional[tuple[int, ...]]  # the teacher's hidden channels the student keeps, in its order; None = all
    teacher_hidden_size: int
    record: dict  # the whole file

    @property
    def width_pruned(self) -> bool:
        return self.hidden_channels is not None


def provenance_path(model_dir: str) -> str:
    return os.path.join(model_dir, PROVENANCE_FILE)


def has_provenance(model_dir: Optional[str]) -> bool:
    return bool(model_dir) and os.path.isfile(provenance_path(model_dir))


def _indices(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise ValueError(f"{where} is not a list of non-negative integers")
    return tuple(value)


def read_provenance(model_dir: str) -> Optional[Provenance]:
    """The provenance of the pruned model in `model_dir`, None when it has none (a model not written by distill-prune); a one-line
    ProvenanceError when the file is damaged or does not fit the model's config.json."""
    path = provenance_path(model_dir)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as handle:
            data = json.load(handle)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"format {data.get('format')!r} v{data.get('version')}, this version reads {FORMAT!r} v{VERSION}")
        teacher, kept = data["teacher"], data["kept"]
        layers = _indices(kept["layers"], "kept.layers")
        channels = kept.get("hidden_channels")
        channels = _indices(channels, "kept.hidden_channels") if channels is not None else None
        hidden = int(data["shape"]["teacher"]["hidden_size"])
        student_layers = int(data["shape"]["student"]["num_layers"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProvenanceError(
            f"{path} is not a readable distill-prune provenance file ({' '.join(str(exc).split())[:160]}); prune the teacher again "
            f"(distill-prune) or remove the file to train the directory as a student of its own"
        ) from None
    if len(layers) != student_layers:
        raise ProvenanceError(f"{path} lists {len(layers)} teacher layers for a {student_layers}-layer student; prune the teacher again")
    return Provenance(
        teacher_path=str(teacher.get("path", "")),
        teacher_model_type=str(teacher.get("model_type", "")),
        teacher_sha256=teacher.get("content_sha256"),
        teacher_files=teacher.get("files") or {},
        layers=layers,
        hidden_channels=channels,
        teacher_hidden_size=hidden,
        record=data,
    )
