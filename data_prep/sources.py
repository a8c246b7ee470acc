"""Reading documents from corpus files through Beam's filesystems (local, gs://, s3://, hdfs://).

Document rules:
- `.txt` with `doc_split=line`: every non-blank line is a document.
- `.txt` with `doc_split=paragraph`: runs of non-blank lines separated by blank lines; the lines of a
  paragraph are joined with single spaces.
- `.jsonl`: every line is a JSON object; its `text_field` is the document.
- `.gz` (gzip) is decompressed by extension; the rules above apply to the name without `.gz`.
Whitespace-only documents are dropped and counted (`empty`); undecodable lines and bad JSON records
either stop the run with a one-line error or are counted and skipped (`on_decode_error=skip`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Union

from data_prep.errors import PrepInputError

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
COMPRESSED_SUFFIXES = (".gz",)


@dataclass(frozen=True)
class Document:
    text: str


@dataclass(frozen=True)
class Dropped:
    reason: str  # empty, invalid_utf8, bad_json, missing_field
    count: int = 1


def _base_name(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_kind(path: str) -> str:
    """'txt' or 'jsonl' from the file name; anything else is read as text."""
    return "jsonl" if _base_name(path).endswith(JSONL_SUFFIXES) else "txt"


def expand_inputs(patterns: list[str]) -> list[tuple[str, int]]:
    """(path, size in bytes) of every file the inputs name; directories are searched recursively."""
    from apache_beam.io.filesystems import FileSystems

    found: dict[str, int] = {}
    for pattern in patterns:
        glob = pattern
        if "://" not in pattern and os.path.isdir(pattern):
            glob = os.path.join(pattern, "**")
        try:
            results = FileSystems.match([glob])[0].metadata_list
        except Exception as exc:  # Beam raises BeamIOError for unreachable filesystems
            raise PrepInputError(f"cannot list --input {pattern!r} ({exc}); check the path and its filesystem") from None
        files = [m for m in results if not os.path.basename(m.path).startswith((".", "_"))]
        if not files:
            raise PrepInputError(f"--input {pattern!r} matches no files; check the path or glob (quote globs so the shell does not expand them)")
        for meta in files:
            found[meta.path] = meta.size_in_bytes
    return sorted(found.items())


def _decode_lines(handle, path: str, on_error: str) -> Iterator[Union[str, Dropped]]:
    """Lines of a binary stream decoded as UTF-8; a bad line raises or yields Dropped('invalid_utf8')."""
    for number, raw in enumerate(handle, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            if on_error == "skip":
                yield Dropped("invalid_utf8")
                continue
            raise PrepInputError(
                f"{path} line {number}: invalid UTF-8 at byte {exc.start} (is this a text file?); "
                f"re-encode it as UTF-8 or pass --on-decode-error skip to count and skip such lines"
            ) from None


def read_documents(path: str, doc_split: str = "line", text_field: str = "text", on_error: str = "error") -> Iterator[Union[Document, Dropped]]:
    """Documents of one file, in file order, with drop records for what was skipped."""
    from apache_beam.io.filesystems import FileSystems

    kind = file_kind(path)
    with FileSystems.open(path) as handle:  # decompresses .gz by extension
        lines = _decode_lines(iter(handle.readline, b""), path, on_error)
        if kind == "jsonl":
            yield from _jsonl_documents(lines, path, text_field, on_error)
        elif doc_split == "paragraph":
            yield from _paragraph_documents(lines)
        else:
            yield from _line_documents(lines)


def _line_documents(lines) -> Iterator[Union[Document, Dropped]]:
    for line in lines:
        if isinstance(line, Dropped):
            yield line
        elif line.strip():
            yield Document(line.strip())
        elif line.strip("\r\n"):  # whitespace-only, not just an empty line
            yield Dropped("empty")


def _paragraph_documents(lines) -> Iterator[Union[Document, Dropped]]:
    buffer: list[str] = []
    for line in lines:
        if isinstance(line, Dropped):
            yield line
            continue
        if line.strip():
            buffer.append(line.strip())
        elif buffer:
            yield Document(" ".join(buffer))
            buffer = []
    if buffer:
        yield Document(" ".join(buffer))


def _jsonl_documents(lines, path: str, text_field: str, on_error: str) -> Iterator[Union[Document, Dropped]]:
    for number, line in enumerate(lines, start=1):
        if isinstance(line, Dropped):
            yield line
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if on_error == "skip":
                yield Dropped("bad_json")
                continue
            raise PrepInputError(f"{path} line {number}: not valid JSON; fix the line or pass --on-decode-error skip to count and skip such lines") from None
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(text, str):
            if on_error == "skip":
                yield Dropped("missing_field")
                continue
            raise PrepInputError(
                f"{path} line {number}: no string field {text_field!r}; set --text-field to the field that holds the text "
                f"or pass --on-decode-error skip to count and skip such records"
            )
        if text.strip():
            yield Document(text.strip())
        else:
            yield Dropped("empty")
