"""Reading documents from corpus files through Beam's filesystems (local, gs://, s3://, hdfs://).

Document rules:
- `.txt` (any other name too) with `doc_split=line`: every non-blank line is a document.
- `.txt` with `doc_split=paragraph`: runs of non-blank lines separated by blank lines; the lines of a
  paragraph are joined with single spaces.
- `.jsonl` / `.json`: every line is a JSON object; its `text_field` is the document.
- `.parquet`: every row's `text_field` column is a document (read one record batch at a time).
- `.gz` and `.bz2` are decompressed by extension; the rules above apply to the name without it.
- A physical line longer than `max_line_bytes` is read in pieces cut at whitespace, never whole:
  in line/paragraph mode each piece becomes a document of its own (all pieces of one line share a
  split key, so they land in the same train/validation split); a longer `.jsonl` line is skipped
  and counted as `too_long`.
- A file whose first 8 KiB hold a NUL byte is binary: it stops the run, or is counted as
  `binary_file` and skipped with `on_error=skip`.
Whitespace-only documents are dropped and counted (`empty`); undecodable lines and bad JSON records
either stop the run with a one-line error or are counted and skipped (`on_error=skip`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Union

from data_prep.errors import PrepInputError

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".bz2")
READ_BLOCK = 1 << 20
MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True)
class Document:
    text: str
    key: Optional[str] = None  # split key shared by the pieces of one over-long line (None: the text)


@dataclass(frozen=True)
class Dropped:
    reason: str  # empty, invalid_utf8, bad_json, missing_field, too_long, binary_file
    count: int = 1


def _base_name(path: str) -> str:
    name = os.path.basename(path).lower()
    for suffix in COMPRESSED_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def file_kind(path: str) -> str:
    """'txt', 'jsonl' or 'parquet' from the file name; anything else is read as text."""
    base = _base_name(path)
    if base.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if base.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "txt"


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


def _cut_point(buf: bytes) -> int:
    """Where to cut an over-long line: after the last space, else before the last UTF-8 lead byte."""
    cut = buf.rfind(b" ")
    if cut > 0:
        return cut + 1
    i = len(buf) - 1
    while i > 0 and (buf[i] & 0xC0) == 0x80:
        i -= 1
    return i if i > 0 else len(buf)


def _raw_lines(handle, max_line_bytes: int) -> Iterator[tuple[bytes, bool]]:
    """(bytes, continues) of each line, read in blocks; lines over `max_line_bytes` come in pieces."""
    buf = b""
    while True:
        block = handle.read(READ_BLOCK)
        if not block:
            break
        buf += block
        start = 0
        while True:
            nl = buf.find(b"\n", start)
            if nl == -1:
                break
            line = buf[start : nl + 1]
            while len(line) > max_line_bytes:
                cut = _cut_point(line[:max_line_bytes])
                yield line[:cut], True
                line = line[cut:]
            yield line, False
            start = nl + 1
        buf = buf[start:]
        while len(buf) > max_line_bytes:
            cut = _cut_point(buf[:max_line_bytes])
            yield buf[:cut], True
            buf = buf[cut:]
    if buf:
        yield buf, False


def _decode_lines(raw_lines, path: str, on_error: str) -> Iterator[Union[tuple[str, bool, int], Dropped]]:
    """(text, continues, line number) of each raw line decoded as UTF-8, or Dropped('invalid_utf8')."""
    number = 1
    for raw, continues in raw_lines:
        try:
            yield raw.decode("utf-8"), continues, number
        except UnicodeDecodeError as exc:
            if on_error != "skip":
                raise PrepInputError(
                    f"{path} line {number}: invalid UTF-8 at byte {exc.start} (is this a text file?); "
                    f"re-encode it as UTF-8 or pass --on-decode-error skip to count and skip such lines"
                ) from None
            yield Dropped("invalid_utf8")
        if not continues:
            number += 1


def _is_binary(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        return b"\x00" in handle.read(8192)


def read_documents(path: str, doc_split: str = "line", text_field: str = "text", on_error: str = "error",
                   max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Union[Document, Dropped]]:
    """Documents of one file, in file order, with drop records for what was skipped."""
    from apache_beam.io.filesystems import FileSystems

    kind = file_kind(path)
    if kind == "parquet":
        yield from _parquet_documents(path, text_field, on_error)
        return
    if _is_binary(path):
        if on_error != "skip":
            raise PrepInputError(f"{path} is a binary file (it holds NUL bytes), not text; remove it from --input or pass --on-decode-error skip to count and skip it")
        yield Dropped("binary_file")
        return
    with FileSystems.open(path) as handle:  # decompresses .gz / .bz2 by extension
        lines = _decode_lines(_raw_lines(handle, max_line_bytes), path, on_error)
        if kind == "jsonl":
            yield from _jsonl_documents(lines, path, text_field, on_error)
        elif doc_split == "paragraph":
            yield from _paragraph_documents(lines, path)
        else:
            yield from _line_documents(lines, path)


def _parquet_documents(path: str, text_field: str, on_error: str) -> Iterator[Union[Document, Dropped]]:
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(path) as handle:
        try:
            reader = pq.ParquetFile(handle)
        except Exception as exc:
            raise PrepInputError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0][:120]}); fix or remove it") from None
        if text_field not in reader.schema_arrow.names:
            raise PrepInputError(f"{path} has no column {text_field!r} (it has {', '.join(reader.schema_arrow.names)}); set --text-field to the text column")
        for batch in reader.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    if on_error != "skip":
                        raise PrepInputError(f"{path}: column {text_field!r} holds a non-string value ({type(text).__name__}); pick a string column or pass --on-decode-error skip")
                    yield Dropped("missing_field")
                elif text.strip():
                    yield Document(text.strip())
                else:
                    yield Dropped("empty")


def _line_documents(lines, path: str) -> Iterator[Union[Document, Dropped]]:
    in_long = False  # the previous piece continues on this one
    for line in lines:
        if isinstance(line, Dropped):
            yield line
            continue
        text, continues, number = line
        key = f"{path}:{number}" if continues or in_long else None
        in_long = continues
        if text.strip():
            yield Document(text.strip(), key)
        elif text.strip("\r\n") and key is None:  # whitespace-only, not just an empty line
            yield Dropped("empty")


def _paragraph_documents(lines, path: str) -> Iterator[Union[Document, Dropped]]:
    buffer: list[str] = []
    key = None  # set once a paragraph had to be cut because one of its lines is over-long
    for line in lines:
        if isinstance(line, Dropped):
            yield line
            continue
        text, continues, number = line
        if text.strip():
            buffer.append(text.strip())
            if continues:
                key = key or f"{path}:{number}"
                yield Document(" ".join(buffer), key)
                buffer = []
        else:
            if buffer:
                yield Document(" ".join(buffer), key)
            buffer, key = [], None
    if buffer:
        yield Document(" ".join(buffer), key)


def _jsonl_documents(lines, path: str, text_field: str, on_error: str) -> Iterator[Union[Document, Dropped]]:
    skipping = False  # inside an over-long record
    for line in lines:
        if isinstance(line, Dropped):
            yield line
            continue
        text, continues, number = line
        if continues or skipping:
            if not skipping:
                yield Dropped("too_long")
            skipping = continues
            continue
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            if on_error == "skip":
                yield Dropped("bad_json")
                continue
            raise PrepInputError(f"{path} line {number}: not valid JSON; fix the line or pass --on-decode-error skip to count and skip such lines") from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            if on_error == "skip":
                yield Dropped("missing_field")
                continue
            raise PrepInputError(
                f"{path} line {number}: no string field {text_field!r}; set --text-field to the field that holds the text "
                f"or pass --on-decode-error skip to count and skip such records"
            )
        if value.strip():
            yield Document(value.strip())
        else:
            yield Dropped("empty")
