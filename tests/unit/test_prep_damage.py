"""Issue 13, data prep, in process: an overwrite replaces only a prepared dataset, damaged files beside good ones in the
reader, crafted manifest paths refused, a cut spill file never read as complete (the faults that need the real
`distill-prep` command: tests/e2e/test_robustness_prep.py)."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil

import pytest
from support import file_tree as _tree
from support import flip_middle_bytes as _flip

from data_prep.config import PrepConfig
from data_prep.driver import run_prep
from data_prep.errors import PrepInputError
from data_prep.manifest import DatasetError, load_manifest, verify_shards
from data_prep.sources import Document, Dropped, read_documents


def test_overwrite_replaces_only_a_prepared_dataset(tmp_path, prepared, tokenizer_dir):
    """--overwrite of a directory that is not a prepared dataset (or a dataset someone added files to) is refused, untouched;
    an unfinished dataset of an older version (shards + _prep_tmp, no manifest: a killed run) counts as ours."""
    from data_prep.output_dir import is_prepared_dataset

    corpus = tmp_path / "c.txt"
    corpus.write_text(open(os.path.join(prepared, "..", "corpus.txt")).read())
    cfg = PrepConfig(inputs=[str(corpus)], tokenizer=tokenizer_dir, output="", max_seq_len=64, overwrite=True)

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("only copy")
    added = tmp_path / "added"
    shutil.copytree(prepared, added)
    (added / "notes.txt").write_text("mine")
    fake = tmp_path / "fake"
    shutil.copytree(prepared, fake)
    (fake / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    for directory in (thesis, added, fake):
        before = _tree(directory)
        with pytest.raises(PrepInputError, match="not a prepared dataset; --overwrite replaces only a prepared dataset"):
            run_prep(PrepConfig(**{**cfg.to_json(), "output": str(directory)}))
        assert _tree(directory) == before

    unfinished = tmp_path / "unfinished"
    shutil.copytree(os.path.join(prepared, "train"), unfinished / "train")
    (unfinished / "_prep_tmp" / "spill" / "train" / "00000").mkdir(parents=True)
    (unfinished / "_prep_tmp" / "spill" / "train" / "00000" / "x.spill").write_bytes(b"\0" * 64)
    assert is_prepared_dataset(str(unfinished)) and is_prepared_dataset(prepared)
    assert not is_prepared_dataset(str(thesis)) and not is_prepared_dataset(str(added)) and not is_prepared_dataset(str(fake))
    run_prep(PrepConfig(**{**cfg.to_json(), "output": str(unfinished)}))
    assert sorted(os.listdir(unfinished)) == ["manifest.json", "token_counts.npy", "tokenizer", "train", "validation"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["added", "c.txt", "fake", "thesis", "unfinished"]


def test_damaged_file_siblings_in_the_reader(tmp_path, lines):
    """Every compressed format and Parquet: damage is found before any document is read; a good file in any framing
    (several gzip members, NUL padding) reads whole; a file that vanishes or changes while read stops the run."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    text = "\n".join(lines) + "\n"
    body = text.encode()
    jsonl = "".join(json.dumps({"text": line}) + "\n" for line in lines).encode()

    def write(name: str, data: bytes) -> str:
        (tmp_path / name).write_bytes(data)
        return str(tmp_path / name)

    pq.write_table(pa.table({"text": lines}), tmp_path / "t.parquet", row_group_size=50)
    parquet = (tmp_path / "t.parquet").read_bytes()
    whole = {
        "members.txt.gz": gzip.compress(body[:999]) + gzip.compress(body[999:]),
        "padded.txt.gz": gzip.compress(body) + b"\0" * 512,
        "a.txt.xz": lzma.compress(body),
        "a.txt.zst": zstandard.ZstdCompressor().compress(body),
        "a.jsonl.zst": zstandard.ZstdCompressor().compress(jsonl),
    }
    for name, data in whole.items():
        assert [d.text for d in read_documents(write(name, data))] == lines, name
    assert list(read_documents(write("empty.txt.gz", gzip.compress(b"")))) == [], "an empty stream is an empty file"
    damaged = {
        "zero.txt.gz": (b"", "truncated_file"),
        "cut.jsonl.gz": (gzip.compress(jsonl)[: len(gzip.compress(jsonl)) * 2 // 3], "truncated_file"),
        "cut.txt.xz": (lzma.compress(body)[:-30], "truncated_file"),
        "cut.txt.zst": (zstandard.ZstdCompressor().compress(body)[:-30], "truncated_file"),
        "tail.txt.gz": (gzip.compress(body) + b"trailing junk", "corrupt_file"),
        "plain.txt.gz": (body, "corrupt_file"),
        "cut.parquet": (parquet[: len(parquet) // 2], "truncated_file"),
        "bad.parquet": (_flip(parquet), "corrupt_file"),
    }
    for name, (data, reason) in damaged.items():
        path = write(name, data)
        with pytest.raises(PrepInputError, match=f"^{re.escape(path)} is (truncated|corrupt|empty).*counted as {reason}"):
            list(read_documents(path))
        assert list(read_documents(path, on_error="skip")) == [Dropped(reason, 1, "files")], name

    path = write("growing.txt", body)
    reader = read_documents(path)
    assert isinstance(next(reader), Document)
    with open(path, "ab") as handle:
        handle.write(b"appended while being read\n")
    with pytest.raises(PrepInputError, match="changed while it was read"):
        list(reader)
    listed = (os.path.getsize(path) - 1, os.path.getmtime(path))
    with pytest.raises(PrepInputError, match="changed since it was listed"):
        list(read_documents(path, listed=listed))
    os.unlink(path)
    with pytest.raises(PrepInputError, match="cannot be found any more"):
        list(read_documents(path))


def test_crafted_manifest_paths_are_refused(tmp_path, prepared):
    """Shard and token-count paths from manifest.json stay inside the dataset: '..', absolute paths and symlinks out are
    refused with one-line DatasetErrors by load_manifest (every reader, the trainer's token counts included) and verify_shards."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (tmp_path / "secret.npy").write_bytes(open(os.path.join(prepared, "token_counts.npy"), "rb").read())
    original = json.loads((data / "manifest.json").read_text())
    os.symlink(tmp_path, data / "train" / "escape")
    crafted = {
        ("splits", "train", "shards", 0, "path"): [
            "../../etc/passwd",
            "/etc/passwd",
            "train/../../secret.npy",
            "train/escape/secret.npy",
            7,
        ],
        ("token_counts", "path"): ["../secret.npy", str(tmp_path / "secret.npy"), "train/escape/secret.npy"],
    }
    for keys, values in crafted.items():
        for value in values:
            manifest = json.loads(json.dumps(original))
            target = manifest
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value
            (data / "manifest.json").write_text(json.dumps(manifest))
            with pytest.raises(DatasetError, match="which is not a path inside the dataset") as caught:
                load_manifest(str(data))
            assert "\n" not in str(caught.value)
    (data / "manifest.json").write_text(json.dumps(original))
    good = load_manifest(str(data))
    verify_shards(str(data), good, "train", checksums=True)
    good.splits["train"].shards[0].path = "../secret.npy"  # a Manifest built in code is checked where shards are opened
    with pytest.raises(DatasetError, match="not a path inside the dataset"):
        verify_shards(str(data), good, "train")


def test_a_cut_spill_file_is_never_read_as_complete(tmp_path):
    """The shuffle's spill files (in `_prep_tmp/` of the dataset being written) are read back with exact lengths: before,
    a spill file cut in its flags read back 493 flags for 500 tokens without an error (np.frombuffer of a short read)."""
    import numpy as np

    from data_prep.rows import RowBlock
    from data_prep.shards import SpillFile, SpillRows

    lengths = np.array([3, 5, 2] * 50)
    block = RowBlock(lengths, np.arange(lengths.sum(), dtype=np.uint16) % 1000, np.ones(lengths.sum(), dtype=bool))
    spill = SpillRows(str(tmp_path), 1, 0, "uint16", True)
    spill.start_bundle()
    list(spill.process(block))
    ((_, path),) = [out.value for out in spill.finish_bundle()]
    keys, rows = SpillFile(path, "uint16", True).read(0, 1 << 64)
    assert len(rows) == 150 and len(rows.ids) == len(rows.flags) == lengths.sum()  # the whole file reads back
    data = open(path, "rb").read()
    for cut in (len(data) - 7, 8 + 8 * 150 + 10):  # in the flags, in the lengths
        with open(path, "wb") as handle:
            handle.write(data[:cut])
        with pytest.raises(OSError, match="is cut short"):
            SpillFile(path, "uint16", True).read(0, 1 << 64)
