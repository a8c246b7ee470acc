"""The teacher-logit cache contract between `distill-cache` (distill/cache/pipeline.py) and the trainer
(distill/teachers/cache.py). No Beam import: the trainer reads it cheaply.

A cache directory::

    manifest.json        written last: format, mode (topk | sampled), k, temperature, value dtype, vocabulary, the teacher's
                         identity (fingerprint, full config, content sha256 of its weight files), the dataset manifest's
                         sha256, the tokenizer's identity (vocabulary sha256, special-token ids), and the parts with their
                         rows, tokens, bytes and sha256: all a run needs to check a cache without the teacher's files
    train/SSSSS-RRRRRRRRR.parquet   part files: data shard SSSSS, rows from RRRRRRRRR on, row for row with the data

Masked-LM data (static masks, `distill-cache --static-masks D`): a part holds D rows per dataset row, row-major (part
row j * D + d = variant d of the part's j-th dataset row; the masked input of variant d of split row r is the trainer's,
keyed d * N + r, distill/data/masking.py), each with the teacher's targets on that masked input at the stored positions:
`positions: all` = every real position (L x k entries; serves loss.ce_positions all and masked), `positions: masked` =
the variant's masked positions only, ascending (M x k entries; only loss.ce_positions=masked). The manifest records D
(`static_masks`), `positions` and `masking`: the seed and every masking setting by its training-config key, which a run
from the cache must match. Causal data: `static_masks` 0, `masking` empty, `document_attention` whether the teacher saw each
document of a row alone (a run must have the same data.document_attention).

Columns of a part (one row per dataset row, or per (row, variant); a row of length L holds L x k entries, position-major):
`indices` list<int32> (token ids, ascending within a position), `values` list<float16|float32> (the teacher's
log-probabilities at the cache's temperature at those ids), and for top-k `tail` list<float16|float32> (the
probability mass outside the k ids, one per position). Sampled mode: the k = n entries of a position are n draws from
the teacher's distribution at the temperature (repeats kept), each of weight 1/n.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kd_common.errors import UserError
from kd_common.files import sha256_file, write_json_atomically
from kd_common.output_rule import unlisted

FORMAT_NAME = "distill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
MODES = ("topk", "sampled")


class CacheError(UserError, ValueError):
    """A teacher cache that is missing, damaged, or does not belong to this dataset / teacher / run."""


@dataclass
class CachePart:
    path: str  # relative to the cache directory
    shard: int  # index of the data shard in the dataset manifest's split
    row_start: int  # first row of the data shard it covers
    rows: int
    tokens: int
    sha256: str
    bytes: int


@dataclass
class CacheManifest:
    mode: str
    k: int  # entries per position (top-k ids, or n samples)
    temperature: float
    value_dtype: str  # float16 | float32
    vocab_size: int
    split: str
    seed: int
    teacher: dict[str, Any]  # path, fingerprint, config, content_sha256 + files (distill/models/fingerprint.py; older: weights_sha256)
    dataset: dict[str, Any]  # path, manifest_sha256, rows, tokens
    parts: list[CachePart] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    static_masks: int = 0  # masked-LM data: D masks per row (part rows per dataset row); 0 = causal data
    positions: str = "all"  # all real positions, or (masked-LM) "masked" positions only
    masking: dict[str, Any] = field(default_factory=dict)  # masked-LM: seed and data.* masking settings (training-config keys)
    # the dataset tokenizer's identity (type, vocab size and sha256, special-token ids: data_prep.manifest.TokenizerIdentity),
    # so that a run without the teacher's files checks what the teacher's tokenizer would have
    tokenizer: dict[str, Any] = field(default_factory=dict)
    identity: str = ""  # sha256 of what fixes the bytes (settings, teacher and dataset content, parts): a rerun's "same cache"
    # causal data: whether the teacher saw each document of a row alone (distill-cache --document-attention); None = a
    # masked-LM cache, or a causal one written before the setting existed (the teacher then attended across documents)
    document_attention: Optional[bool] = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created: str = ""

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def tokens(self) -> int:
        return sum(p.tokens for p in self.parts)

    @property
    def rows_per_data_row(self) -> int:
        """Cache rows per dataset row: D for a static-mask (masked-LM) cache, else 1."""
        return max(1, self.static_masks)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CacheManifest":
        data = dict(data)
        parts = [CachePart(**p) for p in data.pop("parts")]
        return cls(parts=parts, **data)


def support_label(mode: str, entries: int) -> str:
    """What a cache holds per position, for logs: 'top-k 8 ids + tail' or 'sampled, 64 draws'."""
    return f"top-k {entries} ids + tail" if mode == "topk" else f"sampled, {entries} draws"


def is_cache_dir(path: str):
    """True when `path` holds a teacher cache and nothing else: its manifest and the parts it lists (what `--overwrite`
    may replace); else False, or why not."""
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as handle:
            data = json.load(handle)
        if data.get("format") != FORMAT_NAME:
            return False
        parts = [str(part["path"]) for part in data.get("parts", [])]
    except (OSError, ValueError, AttributeError, TypeError, KeyError):
        return False
    return unlisted(path, parts + [MANIFEST_FILE]) or True


def write_cache_manifest(cache_dir: str, manifest: CacheManifest) -> None:
    write_json_atomically(os.path.join(cache_dir, MANIFEST_FILE), manifest.to_json())


def _inside(cache_dir: str, relative: Any) -> str:
    bad = (
        not isinstance(relative, str)
        or not relative
        or os.path.isabs(relative)
        or ".." in relative.split("/")
        or "\\" in relative
        or os.path.normpath(relative) != relative
    )
    path = os.path.join(cache_dir, relative) if not bad else ""
    if bad or not os.path.realpath(path).startswith(os.path.realpath(cache_dir).rstrip(os.sep) + os.sep):
        raise CacheError(
            f"{os.path.join(cache_dir, MANIFEST_FILE)} names a part {relative!r} outside the cache; this manifest is damaged: "
            f"re-run distill-cache"
        )
    return path


def load_cache_manifest(cache_dir: str) -> CacheManifest:
    """Read a cache's manifest.json; a directory without one is no (finished) cache."""
    path = os.path.join(cache_dir, MANIFEST_FILE)
    if not os.path.isdir(cache_dir):
        raise CacheError(f"teacher cache {cache_dir!r} does not exist; write it with `distill-cache --output {cache_dir} ...`")
    if not os.path.exists(path):
        raise CacheError(
            f"{cache_dir!r} has no {MANIFEST_FILE}: distill-cache did not finish there (or it is not a teacher cache); re-run distill-cache"
        )
    try:
        with open(path) as handle:
            manifest = CacheManifest.from_json(json.load(handle))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CacheError(
            f"{path} is not a valid teacher-cache manifest ({' '.join(str(exc).split())[:160]}); re-run distill-cache"
        ) from None
    if manifest.format != FORMAT_NAME or manifest.format_version != FORMAT_VERSION:
        raise CacheError(
            f"{path} is a {manifest.format!r} v{manifest.format_version}, not a {FORMAT_NAME!r} v{FORMAT_VERSION}; re-run distill-cache"
        )
    if manifest.mode not in MODES:
        raise CacheError(f"{path} has mode {manifest.mode!r}, expected one of {', '.join(MODES)}; re-run distill-cache")
    if manifest.positions not in ("all", "masked"):
        raise CacheError(f"{path} has positions {manifest.positions!r}, expected all or masked; re-run distill-cache")
    for part in manifest.parts:
        _inside(cache_dir, part.path)
    return manifest


def verify_cache_parts(cache_dir: str, manifest: CacheManifest, checksums: bool = True) -> list[str]:
    """The part files' paths, each checked: present, its size and (with `checksums`) its sha256 as the manifest says."""
    paths = []
    for part in manifest.parts:
        path = _inside(cache_dir, part.path)
        if not os.path.exists(path):
            raise CacheError(f"cache part {path} listed in the manifest is missing; the cache is damaged: re-run distill-cache")
        size = os.path.getsize(path)
        if size != part.bytes:
            raise CacheError(
                f"cache part {path} has {size} bytes, the manifest says {part.bytes} (truncated or replaced); re-run distill-cache"
            )
        if checksums and sha256_file(path) != part.sha256:
            raise CacheError(f"cache part {path} fails its sha256 check (modified after it was written); re-run distill-cache")
        paths.append(path)
    return paths
