"""Reading documents from corpus files through Beam's filesystems (local, gs://, s3://, hdfs://).

Document rules:
- `.txt` (any other name too) with `doc_split=line`: every non-blank line is a document.
- `.txt` with `doc_split=paragraph`: runs of non-blank lines separated by blank lines; the lines of a
  paragraph are joined with single spaces.
- `.jsonl` / `.json`: every line is a JSON object; its `text_field` is the document.
- `.parquet`: every row's `text_field` column is a document (read one record batch at a time).
- `.gz`, `.bz2`, `.xz`/`.lzma`, `.zst`/`.zstd` and `.deflate` are decompressed by extension; the rules
  above apply to the name without it. Every compressed stream must reach its end-of-stream marker and
  pass its checksums (`CheckedDecompression`; Beam's own reader takes the end of the file for the end of
  the text), and the whole file is checked before any of its documents is read, as is every record batch
  of a `.parquet` file: a truncated or corrupt file stops the run with a one-line error, or with
  `on_error=skip` is counted as `truncated_file` / `corrupt_file` and contributes no document at all.
- A file that is gone, or whose size or modification time differs from its listing at the start
  of a read or at its end, stops the run (in both modes): the corpus changed while it was read.
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

import bz2
import glob as globs
import json
import lzma
import os
import warnings
import zlib
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Union

from data_prep.errors import PrepInputError

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".lzma", ".zst", ".zstd", ".deflate")
READ_BLOCK = 1 << 20
RAW_CHUNK = 1 << 16  # compressed bytes fed to a decompressor at a time
MAX_LINE_BYTES = 4 << 20


@dataclass(frozen=True)
class Document:
    text: str
    key: Optional[str] = None  # split key shared by the pieces of one over-long line (None: the text)


@dataclass(frozen=True)
class Dropped:
    reason: str  # empty, invalid_utf8, bad_json, missing_field, too_long, binary_file, truncated_file, corrupt_file
    count: int = 1
    unit: str = "documents"  # what `count` counts: documents, or files (a damaged file is left out whole)


class InputFile(NamedTuple):
    """A listed input file: its size and modification time when listed (None where the filesystem has none)."""

    path: str
    size: int
    mtime: Optional[float] = None


class DamagedFile(Exception):
    """A compressed or Parquet file that ends early (`truncated_file`) or fails to decode (`corrupt_file`)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def compression_of(path: str) -> Optional[str]:
    """The compression suffix of `path` ('.gz', ...), or None."""
    name = path.lower()
    return next((suffix for suffix in COMPRESSED_SUFFIXES if name.endswith(suffix)), None)


def is_packed(path: str) -> bool:
    """True for inputs that hold more text than their size says (compressed files and Parquet)."""
    return compression_of(path) is not None or path.lower().endswith(PARQUET_SUFFIXES)


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


GLOB_CHARS = "*?["


def names_existing_path(pattern: str) -> bool:
    """True when `pattern` names an existing file or directory: then it is that name, never a glob ('doc[1].txt')."""
    if "://" not in pattern:
        return os.path.exists(pattern)
    if not any(c in pattern for c in GLOB_CHARS):
        return True  # a plain object name (or prefix): Beam's match reads it literally
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    try:
        return FileSystems.exists(pattern)
    except Exception:  # unreachable: listing it reports the problem
        return False


def _match(glob: str):
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    with warnings.catch_warnings():  # an escaped '[' ('[[]') makes re warn about a nested set
        warnings.simplefilter("ignore", FutureWarning)
        return FileSystems.match([glob])[0].metadata_list


def list_inputs(patterns: list[str]) -> list[InputFile]:
    """Every file the inputs name, sorted by path, with its size and modification time; directories are searched recursively.

    A name that exists is taken literally (brackets and all, and also when it begins with '.' or '_'); only a name
    that does not exist is a glob. Files found by a glob or in a directory skip hidden ('.x') and '_x' names
    (Hadoop's _SUCCESS, Beam's temp files).
    """
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    found: dict[str, InputFile] = {}
    for pattern in patterns:
        try:
            if "://" not in pattern and os.path.isdir(pattern):
                files = [
                    m for m in _match(os.path.join(globs.escape(pattern), "**")) if not os.path.basename(m.path).startswith((".", "_"))
                ]
            elif os.path.isfile(pattern) if "://" not in pattern else names_existing_path(pattern):
                files = [FileSystems.get_filesystem(pattern).metadata(pattern)]
            else:
                files = [m for m in _match(pattern) if not os.path.basename(m.path).startswith((".", "_"))]
        except Exception as exc:  # Beam raises BeamIOError for unreachable filesystems
            raise PrepInputError(f"cannot list --input {pattern!r} ({exc}); check the path and its filesystem") from None
        if not files:
            raise PrepInputError(
                f"--input {pattern!r} matches no files; check the path or glob (quote globs so the shell does not expand them)"
            )
        for meta in files:
            found[meta.path] = InputFile(meta.path, meta.size_in_bytes, getattr(meta, "last_updated_in_seconds", None))
    return [found[path] for path in sorted(found)]


def _decompressor(suffix: str):
    if suffix == ".gz":
        return zlib.decompressobj(zlib.MAX_WBITS | 16)
    if suffix == ".deflate":
        return zlib.decompressobj()
    if suffix == ".bz2":
        return bz2.BZ2Decompressor()
    if suffix in (".xz", ".lzma"):
        return lzma.LZMADecompressor()
    import zstandard  # zstandard: not at start-up

    return zstandard.ZstdDecompressor().decompressobj()


class CheckedDecompression:
    """`read(n)` of the text in a compressed file, which ends only at an end-of-stream marker.

    Beam's CompressedFile takes the end of the file for the end of the text, so a file cut short reads as a
    shorter, complete one. Here every stream (a file may hold several, as `cat a.gz b.gz` makes) must reach
    its end marker: the file ending before it, bytes that do not decompress, or a failed checksum raise
    DamagedFile. NUL padding after a gzip stream is skipped, as the gzip module does. At most `n` bytes of
    text are produced per call (zstd: what one RAW_CHUNK decodes to).
    """

    def __init__(self, raw, suffix: str):
        self.raw, self.suffix = raw, suffix
        self.dec = _decompressor(suffix)
        self.tail = b""  # compressed bytes read but not yet fed
        self.started = False  # a compressed byte was seen
        self.done = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.raw.close()

    def read(self, size: int = READ_BLOCK) -> bytes:
        while not self.done:
            out = self._step(max(1, size))
            if out:
                return out
        return b""

    def _feed(self) -> Optional[bytes]:
        """The next compressed bytes to decompress: b'' while the decompressor still holds input, None at the end of the file."""
        if self.tail:
            data, self.tail = self.tail, b""
            return data
        if getattr(self.dec, "unconsumed_tail", b""):  # zlib hands back what it did not consume
            return self.dec.unconsumed_tail
        if not getattr(self.dec, "needs_input", True):  # bz2 / lzma keep it and want b''
            return b""
        data = self.raw.read(RAW_CHUNK)
        return data or None

    def _decompress(self, data: bytes, size: int) -> bytes:
        try:
            if self.suffix in (".zst", ".zstd"):  # zstandard's decompressobj takes no output limit
                return self.dec.decompress(data)
            return self.dec.decompress(data, size)
        except Exception as exc:  # zlib.error, OSError, EOFError, zstd.ZstdError: the bytes are not a valid stream
            raise DamagedFile("corrupt_file", f"is corrupt: it does not decompress ({str(exc).splitlines()[0][:120]})") from None

    def _step(self, size: int) -> bytes:
        if self.dec.eof:  # one stream ended: another follows, or padding, or the end of the file
            self.tail = self.dec.unused_data + self.tail
            if self.suffix == ".gz":
                self.tail = self.tail.lstrip(b"\0")
            if not self.tail:
                more = self.raw.read(RAW_CHUNK)
                self.done = not more
                self.tail = more
                return b""
            self.dec = _decompressor(self.suffix)
        data = self._feed()
        if data is None:  # the file ended inside a stream: what the decompressor still holds, then the damage
            out = self._decompress(b"", size)
            if out:
                return out
            if not self.started:
                raise DamagedFile("truncated_file", f"is empty (0 bytes), not a {self.suffix} stream")
            raise DamagedFile("truncated_file", f"is truncated: it ends inside its {self.suffix} stream (an interrupted download or copy?)")
        self.started = self.started or bool(data)
        return self._decompress(data, size)


def open_text(path: str):
    """A binary handle on the text of `path`: decompressed and checked (CheckedDecompression) by extension, else as stored."""
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    raw = FileSystems.open(path, compression_type="uncompressed")
    suffix = compression_of(path)
    return CheckedDecompression(raw, suffix) if suffix else raw


def _parquet_damage(path: str, text_field: str) -> Optional[DamagedFile]:
    """Why a Parquet file cannot be read whole (no footer at its end, or a record batch that does not decode), or None."""
    import pyarrow.parquet as pq  # pyarrow: not at start-up
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    with FileSystems.open(path) as handle:
        try:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 4))
            if handle.read(4) != b"PAR1":
                return DamagedFile(
                    "truncated_file",
                    "is truncated: it does not end with a Parquet footer (an interrupted download or copy, or not a Parquet file)",
                )
            handle.seek(0)
            reader = pq.ParquetFile(handle, page_checksum_verification=True)
            if text_field in reader.schema_arrow.names:
                for _ in reader.iter_batches(batch_size=8192, columns=[text_field]):
                    pass
        except Exception as exc:
            return DamagedFile("corrupt_file", f"is corrupt: not a readable Parquet file ({str(exc).splitlines()[0][:120]})")
    return None


def _damage(path: str, text_field: str) -> Optional[DamagedFile]:
    """Read a compressed or Parquet file through once: why it is damaged, or None (plain text: nothing to check)."""
    if file_kind(path) == "parquet":
        return _parquet_damage(path, text_field)
    if compression_of(path) is None:
        return None
    try:
        with open_text(path) as handle:
            while handle.read(READ_BLOCK):
                pass
    except DamagedFile as damage:
        return damage
    return None


def _stamp(path: str) -> tuple[int, Optional[float]]:
    """(size, modification time) of `path` now; a vanished file is an error."""
    from apache_beam.io.filesystem import BeamIOError  # apache_beam: not at start-up
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    try:
        meta = FileSystems.get_filesystem(path).metadata(path)
    except (BeamIOError, OSError) as exc:
        raise PrepInputError(
            f"{path} cannot be found any more ({str(exc).splitlines()[0][:120]}): it was listed at the start of the run; "
            f"rerun once nothing moves or deletes files of the corpus"
        ) from None
    return meta.size_in_bytes, getattr(meta, "last_updated_in_seconds", None)


def _check_unchanged(path: str, before: tuple[int, Optional[float]], when: str) -> tuple[int, Optional[float]]:
    """Refuse a file whose size or modification time is no longer `before`."""
    now = _stamp(path)
    if now[0] != before[0] or (now[1] and before[1] and now[1] != before[1]):
        raise PrepInputError(
            f"{path} changed {when} (size {before[0]} -> {now[0]} bytes, or rewritten); rerun once nothing writes to the corpus"
        )
    return now


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
    with open_text(path) as handle:
        return b"\x00" in handle.read(8192)


def read_documents(
    path: str,
    doc_split: str = "line",
    text_field: str = "text",
    on_error: str = "error",
    max_line_bytes: int = MAX_LINE_BYTES,
    listed: Optional[tuple[int, Optional[float]]] = None,
    verify: bool = True,
) -> Iterator[Union[Document, Dropped]]:
    """Documents of one file, in file order, with drop records for what was skipped.

    A damaged compressed or Parquet file is found before any document is read (`verify`; without it, where
    the damage is, for readers of a sample): PrepInputError, or with `on_error='skip'` one
    Dropped(reason, unit='files') and no document. `listed`: the (size, mtime) the file had when listed;
    a file that differs from it, or changes while it is read, stops the run.
    """
    before = _check_unchanged(path, listed, "since it was listed") if listed else _stamp(path)
    damage = _damage(path, text_field) if verify else None
    try:
        if damage is None:
            yield from _file_documents(path, file_kind(path), doc_split, text_field, on_error, max_line_bytes)
    except DamagedFile as found:
        if verify:  # it read whole a moment ago
            raise PrepInputError(
                f"{path} changed while it was read (it now {found.detail}); rerun once nothing writes to the corpus"
            ) from None
        damage = found
    if damage is not None:
        if on_error != "skip":
            raise PrepInputError(
                f"{path} {damage.detail}; restore the complete file, remove it from --input, "
                f"or pass --on-decode-error skip to leave it out (counted as {damage.reason})"
            )
        yield Dropped(damage.reason, unit="files")
        return
    _check_unchanged(path, before, "while it was read")


def _file_documents(
    path: str, kind: str, doc_split: str, text_field: str, on_error: str, max_line_bytes: int
) -> Iterator[Union[Document, Dropped]]:
    if kind == "parquet":
        yield from _parquet_documents(path, text_field, on_error)
        return
    if _is_binary(path):
        if on_error != "skip":
            raise PrepInputError(
                f"{path} is a binary file (it holds NUL bytes), not text; remove it from --input or pass --on-decode-error skip to count and skip it"
            )
        yield Dropped("binary_file")
        return
    with open_text(path) as handle:
        lines = _decode_lines(_raw_lines(handle, max_line_bytes), path, on_error)
        if kind == "jsonl":
            yield from _jsonl_documents(lines, path, text_field, on_error)
        elif doc_split == "paragraph":
            yield from _paragraph_documents(lines, path)
        else:
            yield from _line_documents(lines, path)


def _parquet_documents(path: str, text_field: str, on_error: str) -> Iterator[Union[Document, Dropped]]:
    import pyarrow.parquet as pq  # pyarrow: not at start-up
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    with FileSystems.open(path) as handle:
        try:
            reader = pq.ParquetFile(handle, page_checksum_verification=True)
        except Exception as exc:
            raise DamagedFile("corrupt_file", f"is corrupt: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
        if text_field not in reader.schema_arrow.names:
            raise PrepInputError(
                f"{path} has no column {text_field!r} (it has {', '.join(reader.schema_arrow.names)}); set --text-field to the text column"
            )
        for batch in _checked_batches(reader, text_field):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    if on_error != "skip":
                        raise PrepInputError(
                            f"{path}: column {text_field!r} holds a non-string value ({type(text).__name__}); pick a string column or pass --on-decode-error skip"
                        )
                    yield Dropped("missing_field")
                elif text.strip():
                    yield Document(text.strip())
                else:
                    yield Dropped("empty")


def _checked_batches(reader, text_field: str):
    """Record batches of the text column; a batch that fails to decode raises DamagedFile."""
    batches = reader.iter_batches(batch_size=1024, columns=[text_field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as exc:
            raise DamagedFile("corrupt_file", f"is corrupt: not a readable Parquet file ({str(exc).splitlines()[0][:120]})") from None
        yield batch


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
            raise PrepInputError(
                f"{path} line {number}: not valid JSON; fix the line or pass --on-decode-error skip to count and skip such lines"
            ) from None
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
