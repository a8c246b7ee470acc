"""The prepared-dataset contract between `distill-prep` and the trainer.

A prepared dataset is a directory::

    manifest.json          written last, atomically: its presence means the pipeline finished
    token_counts.npy       int64[vocab_size]: how often each id occurs in the train split
    tokenizer/             the tokenizer that produced the ids (save_pretrained output)
    train/*.parquet        shards; columns `input_ids` (list<uint16|int32>, with [CLS] ... [SEP]) and
    validation/*.parquet   `word_start` (list<bool>, True where a token begins a word); causal data (--packing causal):
                           `input_ids` (documents each followed by EOS) and `doc_start` (list<bool>, True at the first
                           token of each document that begins in the row; the manifest's `document_starts` names it)

Format 2 added `doc_start` to causal shards. Format 1 is still read: its causal shards have no boundaries recorded, and
the trainer then takes every token after an EOS as a document's first (distill/data/documents.py).

This module has no Beam dependency so that the trainer can import it cheaply.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from kd_common.errors import UserError
from kd_common.files import sha256_file, write_json_atomically  # noqa: F401  (the dataset contract's helpers)
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code

FORMAT_NAME = "distill-prepared-dataset"
FORMAT_VERSION = 2  # written; 2 = causal shards record document starts
READABLE_VERSIONS = (1, 2)  # read: format 1 is format 2 without `doc_start` in causal shards
WORD_START_COLUMN = "word_start"
DOCUMENT_START_COLUMN = "doc_start"
MANIFEST_FILE = "manifest.json"
TOKEN_COUNTS_FILE = "token_counts.npy"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "validation")


class DatasetError(UserError, ValueError):
    """A prepared dataset is missing, unfinished, damaged or does not match the model."""


@dataclass
class TokenizerIdentity:
    """Who produced the token ids: enough to refuse a dataset made with another vocabulary."""

    type: str  # "hf-fast" or "sentencepiece"
    name_or_path: str
    vocab_size: int
    vocab_sha256: str
    special_token_ids: dict[str, int]  # cls, sep, pad, mask, unk (those that exist)
    all_special_ids: list[int]


@dataclass
class ShardInfo:
    path: str  # relative to the dataset directory
    rows: int
    tokens: int  # sum of sequence lengths, special tokens included
    sha256: str
    bytes: int = 0


@dataclass
class SplitInfo:
    shards: list[ShardInfo] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards)


@dataclass
class Manifest:
    tokenizer: TokenizerIdentity
    max_seq_len: int
    packing: str
    token_dtype: str
    splits: dict[str, SplitInfo]
    token_counts: dict[str, Any]  # {"path", "sha256", "split"}
    stats: dict[str, Any]
    pipeline_options: dict[str, Any]
    # causal data: the shard column flagging each document's first token (DOCUMENT_START_COLUMN); None = not recorded
    # (masked-LM data, or causal data of format 1, whose documents are then taken to start after each EOS)
    document_starts: Optional[str] = None
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for name, split in self.splits.items():
            data["splits"][name]["rows"] = split.rows
            data["splits"][name]["tokens"] = split.tokens
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Manifest":
        data = dict(data)
        splits = {name: SplitInfo(shards=[ShardInfo(**s) for s in info["shards"]]) for name, info in data.pop("splits").items()}
        tokenizer = TokenizerIdentity(**data.pop("tokenizer"))
        return cls(tokenizer=tokenizer, splits=splits, **data)


def tokenizer_identity(tokenizer, name_or_path: str, kind: str = "hf-fast") -> TokenizerIdentity:
    """Fingerprint a Hugging Face tokenizer (vocabulary hash + special ids)."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    specials = {}
    for name in ("cls", "sep", "pad", "mask", "unk", "bos", "eos"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            specials[name] = int(token_id)
    return TokenizerIdentity(
        type=kind,
        name_or_path=str(name_or_path),
        vocab_size=len(vocab),
        vocab_sha256=hashlib.sha256(blob).hexdigest(),
        special_token_ids=specials,
        all_special_ids=sorted(int(i) for i in tokenizer.all_special_ids),
    )


def dataset_file(data_dir: str, relative: Any, what: str) -> str:
    """`data_dir`/`relative` for a path read from the manifest, refused unless it stays inside the dataset.

    Only a plain relative path is accepted (no absolute path, no `..`, no drive); after resolving symlinks
    it must still be inside `data_dir`, so a crafted manifest cannot make a reader open a file elsewhere.
    """
    bad = (
        not isinstance(relative, str)
        or not relative
        or "\0" in relative
        or "\\" in relative
        or os.path.isabs(relative)
        or relative.startswith("/")
        or ":" in relative.split("/")[0]
        or ".." in relative.split("/")
        or os.path.normpath(relative) != relative.rstrip("/")
    )
    path = os.path.join(data_dir, relative) if not bad else ""
    root = os.path.realpath(data_dir)
    if bad or not os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep):
        raise DatasetError(
            f"{os.path.join(data_dir, MANIFEST_FILE)} names {what} {relative!r}, which is not a path inside the dataset; "
            f"this manifest is damaged or crafted: re-run distill-prep"
        )
    return path


def load_manifest(data_dir: str) -> Manifest:
    """Read `manifest.json`; a directory without one is an unfinished or wrong path.

    Every path it names (shards, token counts) must stay inside `data_dir` (`dataset_file`).
    """
    path = os.path.join(data_dir, MANIFEST_FILE)
    if not os.path.isdir(data_dir):
        raise DatasetError(f"prepared dataset {data_dir!r} does not exist; run `distill-prep --output {data_dir} ...` first")
    if not os.path.exists(path):
        raise DatasetError(
            f"{data_dir!r} has no {MANIFEST_FILE}: the data-prep pipeline did not finish there "
            f"(or this is not a prepared dataset); rerun `distill-prep` into an empty directory"
        )
    try:
        with open(path) as handle:
            raw = json.load(handle)
        manifest = Manifest.from_json(raw)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DatasetError(f"{path} is not a valid manifest ({' '.join(str(exc).split())[:200]}); rerun `distill-prep`") from None
    if manifest.format != FORMAT_NAME or manifest.format_version not in READABLE_VERSIONS:
        raise DatasetError(
            f"{path} has format {manifest.format!r} v{manifest.format_version}, this version reads "
            f"{FORMAT_NAME!r} v{'/v'.join(map(str, READABLE_VERSIONS))}; re-prepare the corpus with this version's `distill-prep`"
        )
    if manifest.document_starts not in (None, DOCUMENT_START_COLUMN):
        raise DatasetError(f"{path} is not a valid manifest (document_starts {manifest.document_starts!r}); rerun `distill-prep`")
    for split, info in manifest.splits.items():
        for shard in info.shards:
            dataset_file(data_dir, shard.path, f"a {split} shard")
    if not isinstance(manifest.token_counts, dict):
        raise DatasetError(f"{path} is not a valid manifest (token_counts is not an object); rerun `distill-prep`")
    if "path" in manifest.token_counts:
        dataset_file(data_dir, manifest.token_counts["path"], "token counts")
    return manifest


def verify_shards(data_dir: str, manifest: Manifest, split: str, checksums: bool = False) -> None:
    """Check that every shard of `split` exists and holds the rows the manifest says.

    Row counts come from the Parquet footers (cheap); `checksums=True` also re-hashes every file.
    """
    import pyarrow.parquet as pq  # pyarrow: not at start-up

    if split not in manifest.splits:
        raise DatasetError(
            f"{data_dir!r} has no {split!r} split (it has {sorted(manifest.splits)}); prepare it with distill-prep or pick another split"
        )
    info = manifest.splits[split]
    if not info.shards or info.rows == 0:
        raise DatasetError(f"split {split!r} of {data_dir!r} is empty; prepare a larger corpus")
    for shard in info.shards:
        path = dataset_file(data_dir, shard.path, f"a {split} shard")
        if not os.path.exists(path):
            raise DatasetError(f"shard {path} listed in the manifest is missing; re-run distill-prep")
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow.ArrowInvalid for a cut or overwritten file, OSError for an unreadable one
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DatasetError(
                f"shard {path} is not a readable Parquet file ({first}); the dataset is damaged, re-run distill-prep"
            ) from None
        if rows != shard.rows:
            raise DatasetError(
                f"shard {path} holds {rows} rows but the manifest says {shard.rows}; the dataset is damaged, re-run distill-prep"
            )
        if checksums and sha256_file(path) != shard.sha256:
            raise DatasetError(f"shard {path} fails its sha256 check; the dataset is damaged, re-run distill-prep")


def check_tokenizer_matches(manifest: Manifest, identity: TokenizerIdentity, what: str) -> None:
    """Refuse to train or evaluate `what` on ids produced by a different vocabulary."""
    prepared = manifest.tokenizer
    # the ids mean the same tokens, and every special the dataset was built with is the same id on both sides; a
    # special only one side names (Qwen2's tokenizer class adds unk = <|endoftext|>) changes no id in the data
    shared = set(prepared.special_token_ids) & set(identity.special_token_ids)
    specials_differ = any(prepared.special_token_ids[name] != identity.special_token_ids[name] for name in shared)
    if prepared.vocab_sha256 != identity.vocab_sha256 or specials_differ:
        raise DatasetError(
            f"the tokenizer of {what} ({identity.name_or_path}, vocab {identity.vocab_size}) does not match the "
            f"one the dataset was prepared with ({prepared.name_or_path}, vocab {prepared.vocab_size}); "
            f"re-run distill-prep with --tokenizer {identity.name_or_path}"
            + (
                "; distilling across tokenizers is not supported (yet): the teacher, the student and the data share one tokenizer"
                if what.startswith("teacher")
                else ""
            )
        )


def check_tokenizer_folder(folder: str, expected: TokenizerIdentity, source: str, advice: str = "restore it or prepare the data again"):
    """Load the tokenizer in `folder` and refuse it unless it is `expected` (the identity `source` recorded: the same
    vocabulary hash, the hash distill-prep computed, and the same special-token ids); returns the tokenizer."""
    from transformers import AutoTokenizer  # torch: not at start-up

    refuse_remote_code(folder, "the tokenizer")  # one line naming the auto_map entry, before anything loads
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **LOCAL_ONLY)
        found = tokenizer_identity(tokenizer, folder, expected.type)
    except Exception as exc:  # transformers raises many types for a damaged folder
        first = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DatasetError(f"{folder} cannot be read as the tokenizer {source} records ({first}); {advice}") from None
    shared = set(expected.special_token_ids) & set(found.special_token_ids)
    specials = {n: (expected.special_token_ids[n], found.special_token_ids[n]) for n in sorted(shared)}
    if found.vocab_sha256 != expected.vocab_sha256 or any(a != b for a, b in specials.values()):
        raise DatasetError(
            f"{folder} does not match the tokenizer this dataset was prepared with ({source}: vocab {expected.vocab_size}, vocab sha256 "
            f"{expected.vocab_sha256[:12]}; the folder: vocab {found.vocab_size}, vocab sha256 {found.vocab_sha256[:12]}"
            + "".join(f", {n} id {a} -> {b}" for n, (a, b) in specials.items() if a != b)
            + f"): {advice}"
        )
    return tokenizer


def load_dataset_tokenizer(data_dir: str, manifest: Manifest):
    """The dataset's `tokenizer/` folder, loaded and checked against its manifest (`check_tokenizer_folder`)."""
    return check_tokenizer_folder(
        os.path.join(data_dir, TOKENIZER_DIR), manifest.tokenizer, f"manifest {os.path.join(data_dir, MANIFEST_FILE)}"
    )
