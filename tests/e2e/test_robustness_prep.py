"""Issue 13, data prep: nothing lost, nothing half-read taken as complete, nothing read from outside a dataset.

Every fault is made for real (damaged files written with gzip/bz2/lzma/zstandard/pyarrow, real directories, the
real `distill-prep` in a subprocess where the whole command matters) and the test checks what the user keeps.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import subprocess
import sys

import pytest

from data_prep.config import PrepConfig
from data_prep.driver import run_prep
from data_prep.errors import PrepInputError
from data_prep.manifest import DatasetError, load_manifest, verify_shards
from data_prep.sources import Document, Dropped, read_documents

BIN = os.path.dirname(sys.executable)


def _prep(tmp_path, *args):
    """Run the real CLI with a private TMPDIR; (exit code, stderr lines, stdout). Every run must leave TMPDIR empty."""
    scratch = tmp_path / "tmpdir"
    scratch.mkdir(exist_ok=True)
    proc = subprocess.run(
        [os.path.join(BIN, "distill-prep"), *args], capture_output=True, text=True, timeout=300, env=dict(os.environ, TMPDIR=str(scratch))
    )
    assert os.listdir(scratch) == [], f"the run left {os.listdir(scratch)} in the temp directory"
    return proc.returncode, proc.stderr.strip().splitlines(), proc.stdout


def _tree(path) -> dict:
    """{relative path: bytes} of every file under `path`."""
    return {
        os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read() for d, _, files in os.walk(path) for f in files
    }


@pytest.fixture(scope="module")
def lines(corpus_dir) -> list[str]:
    """300 distinct documents of the demo corpus (standard-library docstrings)."""
    docstrings = os.path.join(corpus_dir, "stdlib_docstrings.txt")
    found = list(dict.fromkeys(line.strip() for line in open(docstrings, encoding="utf-8") if line.strip()))[:300]
    assert len(found) == 300
    return found


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, lines, tokenizer_dir) -> str:
    """A dataset prepared from `lines` (a template: tests copy it before touching it)."""
    root = tmp_path_factory.mktemp("robust")
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    run_prep(
        PrepConfig(
            inputs=[str(root / "corpus.txt")], tokenizer=tokenizer_dir, output=str(root / "data"), max_seq_len=64, validation_fraction=0.1
        ),
        workers=1,
    )
    return str(root / "data")


def test_failed_overwrite_keeps_the_old_dataset_bit_identical(tmp_path, prepared, lines, tokenizer_dir):
    """Before: --overwrite deleted OUTPUT first, so any failure left the old dataset gone. Now the new one is built beside
    it and swapped in only when complete: failures (in the reader, and after the whole pipeline ran) change nothing."""
    out = tmp_path / "data"
    shutil.copytree(prepared, out)
    before = _tree(out)
    (tmp_path / "blank.txt").write_text("\n   \n")
    good = "\n".join(lines[:50]).encode()
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(good)[:-20])
    for bad_input, message in ((tmp_path / "blank.txt", "no text found"), (tmp_path / "cut.txt.gz", "is truncated")):
        code, err, _ = _prep(tmp_path, "--input", str(bad_input), "--tokenizer", tokenizer_dir, "--output", str(out), "--overwrite")
        assert code == 2 and len(err) == 1 and message in err[0], err
        assert _tree(out) == before, "a failed --overwrite run changed the old dataset"
        assert sorted(os.listdir(tmp_path)) == ["blank.txt", "cut.txt.gz", "data", "tmpdir"], "staging left behind"

    (tmp_path / "new.txt").write_text("\n".join(lines[100:]) + "\n")
    run_prep(
        PrepConfig(inputs=[str(tmp_path / "new.txt")], tokenizer=tokenizer_dir, output=str(out), max_seq_len=32, overwrite=True), workers=1
    )
    assert load_manifest(str(out)).max_seq_len == 32 and _tree(out) != before
    assert sorted(os.listdir(tmp_path)) == ["blank.txt", "cut.txt.gz", "data", "new.txt", "tmpdir"], "staging or old copy left behind"


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


def test_output_overlapping_an_input_is_refused_with_the_corpus_intact(tmp_path, lines, tokenizer_dir):
    """Before: `--output CORPUS_DIR --overwrite` deleted the corpus. Now an output that is, contains or is inside an input
    (a file, a directory, a `**` glob's directory, the tokenizer) is refused before anything is written."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(lines) + "\n")
    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    before, tok_before = _tree(corpus), _tree(tok)

    code, err, _ = _prep(tmp_path, "--input", str(corpus), "--tokenizer", str(tok), "--output", str(corpus), "--overwrite")
    assert code == 2 and len(err) == 1 and f"--output '{corpus}' is --input '{corpus}'" in err[0], err

    cases = [
        ([str(corpus / "a.txt")], str(corpus), f"--output '{corpus}' contains --input '{corpus / 'a.txt'}'"),
        ([str(corpus)], str(corpus / "prepared"), "is inside --input"),
        ([str(corpus / "**")], str(corpus / "prepared"), "is inside the directory that --input"),
        ([str(tmp_path / "*" / "a.txt")], str(corpus), "contains --input file"),
        ([str(corpus)], str(tok / "prepared"), "is inside --tokenizer"),
    ]
    for inputs, output, message in cases:
        with pytest.raises(PrepInputError, match=re.escape(message) if "'" in message else message):
            run_prep(PrepConfig(inputs=inputs, tokenizer=str(tok), output=output, overwrite=True))
    assert _tree(corpus) == before and _tree(tok) == tok_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "tmpdir", "tok"]


def test_truncated_and_corrupt_compressed_inputs(tmp_path, lines, tokenizer_dir):
    """Before: a truncated .gz was read up to the cut (rc 0, the cut line kept as a document), a truncated .bz2 beside a good
    file added 0 documents silently, a corrupt .gz gave a zlib traceback and an empty output dir. Now: one line naming the
    file, rc 2, no output; with --on-decode-error skip the damaged file is left out whole and counted."""
    text = ("\n".join(lines) + "\n").encode()
    good = tmp_path / "good.txt"
    good.write_text("\n".join(lines[:100]) + "\n")
    damaged = {
        "truncated_gz": ("cut.txt.gz", gzip.compress(text)[: len(gzip.compress(text)) // 2], "is truncated"),
        "truncated_bz2": ("cut.txt.bz2", bz2.compress(text)[:-100], "is truncated"),
        "corrupt_gz": ("bad.txt.gz", _flip(gzip.compress(text)), "is corrupt"),
    }
    out = tmp_path / "out"
    runs = {}
    for name, (file_name, data, message) in damaged.items():  # the three runs side by side, to save time
        folder = tmp_path / name
        folder.mkdir()
        (folder / file_name).write_bytes(data)
        shutil.copy(good, folder / "good.txt")
        command = [
            os.path.join(BIN, "distill-prep"),
            "--input",
            str(folder),
            "--tokenizer",
            tokenizer_dir,
            "--output",
            str(tmp_path / f"out_{name}" / "data"),
        ]
        runs[name] = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=dict(os.environ, TMPDIR=str(tmp_path))
        )
    for name, (file_name, _, message) in damaged.items():
        err = runs[name].communicate(timeout=300)[1].strip().splitlines()
        assert runs[name].returncode == 2 and len(err) == 1, err
        assert err[0].startswith(f"distill-prep: error: {tmp_path / name / file_name} {message}") and "--on-decode-error skip" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt_gz", "good.txt", "truncated_bz2", "truncated_gz"], (
        "output or staging left"
    )

    code, err, stdout = _prep(
        tmp_path,
        "--input",
        *(str(tmp_path / name) for name in damaged),
        "--tokenizer",
        tokenizer_dir,
        "--output",
        str(out),
        "--on-decode-error",
        "skip",
        "--min-seq-len",
        "3",
    )
    assert code == 0, err
    stats = load_manifest(str(out)).stats
    assert stats["dropped"]["truncated_file"] == {"files": 2, "tokens": 0}
    assert stats["dropped"]["corrupt_file"] == {"files": 1, "tokens": 0}
    assert stats["files"] == 6 and stats["documents_read"] == 300, "only the three good copies were read"
    assert stats["dropped"]["duplicate"]["documents"] == 200
    assert stats["tokens_read"] == stats["content_tokens_written"] + stats["tokens_dropped"]
    assert "truncated_file" in stdout and "corrupt_file" in stdout


def _flip(data: bytes) -> bytes:
    """`data` with 64 bytes in the middle inverted."""
    out = bytearray(data)
    middle = len(out) // 2
    out[middle : middle + 64] = bytes(b ^ 0xFF for b in out[middle : middle + 64])
    return bytes(out)


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
    spill = SpillRows(str(tmp_path), 1, 0, "uint16")
    spill.start_bundle()
    list(spill.process(block))
    ((_, path),) = [out.value for out in spill.finish_bundle()]
    keys, rows = SpillFile(path, "uint16").read(0, 1 << 64)
    assert len(rows) == 150 and len(rows.ids) == len(rows.flags) == lengths.sum()  # the whole file reads back
    data = open(path, "rb").read()
    for cut in (len(data) - 7, 8 + 8 * 150 + 10):  # in the flags, in the lengths
        with open(path, "wb") as handle:
            handle.write(data[:cut])
        with pytest.raises(OSError, match="is cut short"):
            SpillFile(path, "uint16").read(0, 1 << 64)
