"""distill-prep: packing rules, readers, Beam transforms (TestPipeline) and full runs checked independently."""

from __future__ import annotations

import collections
import dataclasses
import gzip
import json
import os
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import read_split as _read_split

from data_prep.config import PrepConfig
from data_prep.driver import run_prep
from data_prep.manifest import load_manifest, verify_shards
from data_prep.packing import PackSpec, make_packer, pack_document, split_of
from data_prep.sources import Document, Dropped, read_documents
from data_prep.tokenization import load_tokenizer

BIN = os.path.dirname(sys.executable)
CLS, SEP, UNK = 2, 3, 1


def test_pack_document_windows_specials_and_drops():
    ids = np.arange(10, 30)  # 20 content tokens
    starts = np.array([i % 3 == 0 for i in range(20)])
    packed = pack_document(ids, starts, CLS, SEP, UNK, max_seq_len=8, min_seq_len=5, max_unk_fraction=0.5)
    # windows of 6: [10..15] [16..21] [22..27] [28, 29] -> the last has 2 + 2 = 4 < 5 tokens: dropped
    assert [s.ids.tolist() for s in packed.sequences] == [
        [CLS, 10, 11, 12, 13, 14, 15, SEP],
        [CLS, 16, 17, 18, 19, 20, 21, SEP],
        [CLS, 22, 23, 24, 25, 26, 27, SEP],
    ]
    assert packed.sequences[1].flags.tolist() == [True] + starts[6:12].tolist() + [True]
    assert packed.dropped == {"too_short": [1, 2]}
    unk_heavy = np.array([UNK, UNK, UNK, 40, 41, 42, UNK, UNK])
    packed = pack_document(unk_heavy, np.ones(8, bool), CLS, SEP, UNK, 8, 3, 0.5)
    # windows: [UNK UNK UNK 40 41 42] (3/6 = 0.5, kept) and [UNK UNK] (2/2 > 0.5, dropped)
    assert len(packed.sequences) == 1 and packed.dropped == {"mostly_unknown": [1, 2]}


def test_document_packing_in_numpy_equals_the_per_document_loop():
    """pack_documents (all documents of a batch at once) == pack_document on each: rows, order, flags, drops."""
    from data_prep.packing import pack_documents

    rng = np.random.default_rng(0)
    reasons = set()
    for max_len, min_len in ((8, 5), (16, 3), (5, 5)):
        docs = []
        for _ in range(300):
            n = int(rng.choice([0, 1, 3, 6, 7, int(rng.integers(0, 60))]))
            ids = rng.integers(4, 40, n)
            ids[rng.random(n) < rng.choice([0.0, 0.3, 0.9])] = UNK
            docs.append((ids, rng.random(n) < 0.6))
        spec = PackSpec("document", max_len, min_len, 0.5, UNK, CLS, SEP)
        dropped: dict = {}
        block = pack_documents(docs, spec, dropped)
        want, want_dropped = [], {}
        for ids, starts in docs:
            packed = pack_document(ids, starts, CLS, SEP, UNK, max_len, min_len, 0.5)
            want += packed.sequences
            for reason, (n, t) in packed.dropped.items():
                entry = want_dropped.setdefault(reason, [0, 0])
                entry[0] += n
                entry[1] += t
        assert [(ids.tolist(), flags.tolist()) for ids, flags in block.rows()] == [(s.ids.tolist(), s.flags.tolist()) for s in want]
        assert dropped == want_dropped
        reasons |= set(dropped)
    assert reasons == {"too_short", "mostly_unknown"}


def _run_packer(spec, docs):
    packer = make_packer(spec)
    seqs = [s for d in docs for s in packer.add(np.asarray(d), np.ones(len(d), bool))] + packer.flush()
    return seqs, packer.dropped


def test_full_sentences_packing_crosses_documents_with_a_separator():
    spec = PackSpec("full_sentences", max_seq_len=6, min_seq_len=4, max_unk_fraction=0.5, unk_id=UNK, cls_id=CLS, sep_id=SEP)
    seqs, dropped = _run_packer(spec, [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34], [40]])
    # stream: 10 11 12 SEP 20 21 SEP 30 31 32 33 34 | 40 -> windows of 4; no separator after an exact cut
    assert [s.ids.tolist() for s in seqs] == [[CLS, 10, 11, 12, SEP, SEP], [CLS, 20, 21, SEP, 30, SEP], [CLS, 31, 32, 33, 34, SEP]]
    assert [s.content_tokens for s in seqs] == [3, 3, 4]
    assert dropped == {"too_short": [1, 1]}  # the remainder [CLS 40 SEP] has 3 < 4 tokens


def test_causal_packing_eos_after_documents_fixed_windows():
    EOS = 7
    spec = PackSpec("causal", max_seq_len=4, min_seq_len=2, max_unk_fraction=0.5, unk_id=None, eos_id=EOS)
    seqs, dropped = _run_packer(spec, [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]])
    # stream: 10 11 12 EOS 20 21 EOS 30 31 32 33 34 EOS -> 3 windows of 4 and a remainder [EOS] (1 < 2, dropped, 0 content)
    assert [s.ids.tolist() for s in seqs] == [[10, 11, 12, EOS], [20, 21, EOS, 30], [31, 32, 33, 34]]
    assert [s.content_tokens for s in seqs] == [3, 3, 4]
    # the flags are document starts: 10, 20 and 30 begin documents; the third row starts inside the third document
    assert [s.flags.tolist() for s in seqs] == [[True, False, False, False], [True, False, False, True], [False] * 4]
    assert dropped == {"too_short": [1, 0]}
    with pytest.raises(ValueError, match="EOS"):
        PackSpec("causal", 8, 2, 0.5, None)


def test_split_is_stable_and_close_to_the_fraction():
    docs = [f"document number {i} with some text" for i in range(20000)]
    splits = [split_of(d, 0.1) for d in docs]
    assert splits == [split_of(d, 0.1) for d in docs]
    assert splits.count("validation") / len(docs) == pytest.approx(0.1, abs=0.01)
    assert all(split_of(d, 0.0) == "train" for d in docs[:100])


def test_readers_line_paragraph_jsonl_gzip(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\n\n   \nsecond doc\nthird line\n\n\nlast\n")
    assert [d.text for d in read_documents(str(txt), "line") if isinstance(d, Document)] == [
        "first doc",
        "second doc",
        "third line",
        "last",
    ]
    assert sum(isinstance(d, Dropped) for d in read_documents(str(txt), "line")) == 1  # the whitespace-only line
    assert [d.text for d in read_documents(str(txt), "paragraph")] == ["first doc", "second doc third line", "last"]
    jsonl = tmp_path / "b.jsonl.gz"
    with gzip.open(jsonl, "wt") as handle:
        handle.write(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "x"}) + "\nnot json\n" + json.dumps({"text": "two"}) + "\n")
    items = list(read_documents(str(jsonl), text_field="text", on_error="skip"))
    assert [i.text for i in items if isinstance(i, Document)] == ["one", "two"]
    assert sorted(i.reason for i in items if isinstance(i, Dropped)) == ["bad_json", "missing_field"]


def test_wordpiece_word_starts_without_offsets_match_word_ids(tmp_path, corpus_dir, tokenizer_dir, gpt2_tokenizer_dir):
    """The WordPiece fast path ('##' table, no offsets) gives the flags the tokenizer's own word ids give, on
    every document of the corpus plus punctuation, digits, accents and unknown characters; causal mode keeps the ids."""
    from data_prep.tokenization import _ids_and_starts

    docs = [
        line.strip()
        for name in sorted(os.listdir(corpus_dir))
        for line in open(os.path.join(corpus_dir, name), encoding="utf-8")
        if line.strip()
    ]
    docs += ["Hello, world!! (x+y)=3.14 -- don't stop", "naïve café ☃ 漢字 [MASK] ##ing", "a" * 300]
    tok = load_tokenizer(tokenizer_dir)
    assert tok.continues_word is not None and tok.continues_word.any()
    reference = [_ids_and_starts(e) for e in tok.backend.encode_batch(docs, add_special_tokens=False)]
    for (ids, starts), (want_ids, want_starts) in zip(tok.encode_batch(docs), reference):
        assert ids.tolist() == want_ids.tolist() and starts.tolist() == want_starts.tolist()
    gpt2 = load_tokenizer(gpt2_tokenizer_dir, packing="causal")
    assert gpt2.continues_word is None
    assert [ids.tolist() for ids, _ in gpt2.encode_batch(docs[:50])] == [
        e.ids for e in gpt2.backend.encode_batch(docs[:50], add_special_tokens=False)
    ]


def test_beam_transforms_with_test_pipeline(tmp_path, tokenizer_dir):
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from data_prep.documents import ReadDocuments
    from data_prep.pipeline import TokenizeAndPack

    docs = ["the list is sorted in place", "a dictionary maps keys to values and more keys"]
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text(f"{docs[0]}\n{docs[1]}\n{docs[0]}\n")  # a duplicate inside one file ...
    second.write_text(f"  {docs[1]} \n\x07\n")  # ... one across files (after cleaning), and a line that cleans to nothing
    files = [str(first), str(second)]
    cfg = PrepConfig(
        inputs=files, tokenizer=tokenizer_dir, output=str(tmp_path / "o"), max_seq_len=8, min_seq_len=3, validation_fraction=0.0
    )
    tok = load_tokenizer(tokenizer_dir)
    expected = []
    for ids, _ in tok.encode_batch(docs):
        for s in range(0, len(ids), 6):
            if len(ids[s : s + 6]) + 2 >= 3:
                expected.append(tuple([tok.cls_id] + ids[s : s + 6].tolist() + [tok.sep_id]))
    with TestPipeline(runner="FnApiRunner") as p:  # the runner distill-prep uses locally (DirectRunner's detour via Prism leaks a temp dir)
        batches, stats = p | beam.Create(list(enumerate(files))) | ReadDocuments(cfg, files, partitions=3)
        kept = batches | beam.FlatMap(lambda batch: batch)
        assert_that(kept, equal_to([(docs[0], None, 2), (docs[1], None, 2)]), label="first copies, with their copy counts")
        assert_that(
            stats | beam.Map(lambda s: (s["files"], s["documents_read"], s.get("dropped.empty.documents", 0))),
            equal_to([(1, 3, 0), (1, 2, 1)]),
            label="per-file counters",
        )
        rows = kept | beam.ParDo(TokenizeAndPack(cfg, tok.payload(), tok.vocab_size)).with_outputs(
            "validation", "stats", "counts", main="train"
        )
        assert_that(
            rows.train | beam.FlatMap(lambda block: [tuple(ids.tolist()) for ids, _ in block.rows()]), equal_to(expected), label="sequences"
        )
        unique = (
            p | "NoDedup" >> beam.Create(list(enumerate(files))) | "ReadAll" >> ReadDocuments(dataclasses.replace(cfg, dedup=False), files)
        )
        assert_that(
            unique[0] | "Unbatch" >> beam.FlatMap(lambda batch: batch),
            equal_to([(docs[0], None, 1), (docs[1], None, 1), (docs[0], None, 1), (docs[1], None, 1)]),
            label="every copy without dedup",
        )


def _object_store_on_disk():
    """A Beam filesystem for `testobj://` paths that behaves like an object store (no directories, no rename),
    its objects kept as files under `ObjectStoreOnDisk.root`; Beam finds it by its scheme once defined."""
    from apache_beam.io.filesystem import CompressedFile, CompressionTypes, FileMetadata, FileSystem

    class ObjectStoreOnDisk(FileSystem):
        root = ""

        @classmethod
        def scheme(cls):
            return "testobj"

        def _local(self, url):
            return os.path.join(self.root, url[len("testobj://") :])

        def join(self, base, *parts):
            return "/".join([base.rstrip("/")] + [p.strip("/") for p in parts])

        def split(self, url):
            head, _, tail = url.rpartition("/")
            return head, tail

        def mkdirs(self, url):
            pass

        def has_dirs(self):
            return False

        def _list(self, prefix):
            for dirpath, _, names in os.walk(self.root):
                for name in names:
                    local = os.path.join(dirpath, name)
                    url = "testobj://" + os.path.relpath(local, self.root)
                    if url.startswith(prefix):
                        yield FileMetadata(url, os.path.getsize(local), os.path.getmtime(local))

        def _open(self, url, mode, compression_type):
            if "w" in mode:
                os.makedirs(os.path.dirname(self._local(url)), exist_ok=True)
            raw = open(self._local(url), mode)
            if compression_type == CompressionTypes.AUTO:
                compression_type = CompressionTypes.detect_compression_type(url)
            return raw if compression_type == CompressionTypes.UNCOMPRESSED else CompressedFile(raw, compression_type=compression_type)

        def create(self, url, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
            return self._open(url, "wb", compression_type)

        def open(self, url, mime_type="application/octet-stream", compression_type=CompressionTypes.AUTO):
            return self._open(url, "rb", compression_type)

        def copy(self, sources, destinations):
            raise NotImplementedError("distill-prep needs no copy")

        def rename(self, sources, destinations):
            raise NotImplementedError("object stores have no rename")

        def exists(self, url):
            return os.path.isfile(self._local(url))

        def size(self, url):
            return os.path.getsize(self._local(url))

        def last_updated(self, url):
            return os.path.getmtime(self._local(url))

        def checksum(self, url):
            return str(self.size(url))

        def metadata(self, url):
            return FileMetadata(url, self.size(url), self.last_updated(url))

        def delete(self, urls):
            for url in urls:
                os.remove(self._local(url))

    return ObjectStoreOnDisk


def test_output_on_an_object_store(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    """--output gs://...: the driver too goes through Beam's filesystems only (no local directory, no rename)."""
    from data_prep.errors import PrepInputError

    store = _object_store_on_disk()
    store.root = str(tmp_path / "store")
    monkeypatch.chdir(tmp_path)
    docs = list(
        dict.fromkeys(
            line.strip() for line in open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0]), encoding="utf-8") if line.strip()
        )
    )[:400]
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")
    cfg = PrepConfig(
        inputs=[str(tmp_path / "c.txt")],
        tokenizer=tokenizer_dir,
        output="testobj://bucket/prepared",
        max_seq_len=32,
        validation_fraction=0.1,
    )
    manifest = run_prep(cfg, workers=1)  # in-process: the test filesystem is defined in this process only
    local = str(tmp_path / "store" / "bucket" / "prepared")
    assert load_manifest(local).to_json() == manifest.to_json()
    for split in ("train", "validation"):
        verify_shards(local, manifest, split, checksums=True)
    objects = {os.path.relpath(os.path.join(d, f), local).split(os.sep)[0] for d, _, files in os.walk(local) for f in files}
    assert objects == {"manifest.json", "token_counts.npy", "tokenizer", "train", "validation"}  # no _prep_tmp objects left
    assert load_tokenizer(os.path.join(local, "tokenizer")).vocab_size == manifest.tokenizer.vocab_size
    assert sorted(os.listdir(tmp_path)) == ["c.txt", "store"], "nothing written to a local directory named like the URL"
    with pytest.raises(PrepInputError, match="already holds data"):
        run_prep(cfg, workers=1)
    # no rename on an object store: --overwrite would delete the old dataset before the new one is complete, so it is refused
    before = {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, files in os.walk(local) for f in files}
    with pytest.raises(PrepInputError, match="--overwrite is refused on an object store"):
        run_prep(dataclasses.replace(cfg, overwrite=True), workers=1)
    assert {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, files in os.walk(local) for f in files} == before
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(PrepInputError, match="no text found"):
        run_prep(dataclasses.replace(cfg, inputs=[str(tmp_path / "blank.txt")], output="testobj://bucket/other"), workers=1)
    assert not [f for _, _, files in os.walk(tmp_path / "store" / "bucket" / "other") for f in files], (
        "a failed run leaves no objects under the output prefix"
    )


def test_sources_parquet_bz2_long_lines_binary_and_cleaning(tmp_path):
    import bz2

    import pyarrow as pa

    from data_prep.cleaning import clean_text
    from data_prep.errors import PrepInputError

    pq.write_table(pa.table({"body": ["first row", "  ", None, "third row"]}), tmp_path / "p.parquet")
    items = list(read_documents(str(tmp_path / "p.parquet"), text_field="body", on_error="skip"))
    assert [i.text for i in items if isinstance(i, Document)] == ["first row", "third row"]
    assert sorted(i.reason for i in items if isinstance(i, Dropped)) == ["empty", "missing_field"]
    with pytest.raises(PrepInputError, match="has no column 'text'"):
        list(read_documents(str(tmp_path / "p.parquet")))

    (tmp_path / "b.txt.bz2").write_bytes(bz2.compress("ein Dokument\nzwei\n".encode()))
    assert [d.text for d in read_documents(str(tmp_path / "b.txt.bz2"))] == ["ein Dokument", "zwei"]

    words = " ".join(f"w{i}" for i in range(3000))  # ~17 kB on one line, read in pieces of <= 1000 bytes
    (tmp_path / "long.txt").write_text("short doc\n" + words + "\nafter\n")
    docs = list(read_documents(str(tmp_path / "long.txt"), max_line_bytes=1000))
    pieces = [d for d in docs if d.key is not None]
    assert docs[0] == Document("short doc") and docs[-1] == Document("after")
    assert len(pieces) > 10 and all(len(p.text.encode()) <= 1000 for p in pieces)
    assert " ".join(p.text for p in pieces) == words and len({p.key for p in pieces}) == 1
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": words}) + "\n" + json.dumps({"text": "ok"}) + "\n")
    items = list(read_documents(str(tmp_path / "long.jsonl"), max_line_bytes=1000))
    assert items == [Dropped("too_long"), Document("ok")]

    (tmp_path / "bin.txt").write_bytes(b"PK\x03\x04\x00\x00binary")
    with pytest.raises(PrepInputError, match="binary file"):
        list(read_documents(str(tmp_path / "bin.txt")))
    assert list(read_documents(str(tmp_path / "bin.txt"), on_error="skip")) == [Dropped("binary_file")]

    assert clean_text("Cafe\u0301\x07 ok\x1b ") == ("Caf\u00e9 ok", 2)  # NFC composes, controls go
    assert clean_text("\ufb01ne", "NFKC")[0] == "fine" and clean_text("\ufb01ne", "NFC")[0] == "\ufb01ne"


def test_a_huge_single_line_is_read_in_pieces(tmp_path):
    """Issue point 9 in small: a 16 MB line is never held whole (bench/prep_throughput.py --huge-line-mb 100 runs 100 MB)."""
    import hashlib
    import tracemalloc

    (tmp_path / "warm.txt").write_text("x\n")
    list(read_documents(str(tmp_path / "warm.txt")))  # import Beam's filesystems before measuring
    words = " ".join(f"w{i}" for i in range(100_000))
    path = tmp_path / "one_line.txt"
    with open(path, "w") as handle:
        for _ in range(16_000_000 // len(words)):
            handle.write(words + " ")
        handle.write("\n")
    size = path.stat().st_size
    whole = hashlib.sha256(path.read_bytes().strip()).hexdigest()
    tracemalloc.start()
    digest, pieces, longest, keys = hashlib.sha256(), 0, 0, set()
    for doc in read_documents(str(path), max_line_bytes=256 << 10):
        digest.update((" " if pieces else "").encode() + doc.text.encode())
        pieces, longest = pieces + 1, max(longest, len(doc.text.encode()))
        keys.add(doc.key)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert pieces >= size // (256 << 10) and longest <= 256 << 10 and len(keys) == 1 and None not in keys
    assert digest.hexdigest() == whole, "the pieces, joined at the cut spaces, are the line"
    assert peak < size / 4, f"reading a {size / 1e6:.0f} MB line peaked at {peak / 1e6:.1f} MB of Python memory"


def test_train_sentencepiece_and_use_it(tmp_path, corpus_dir):
    import sentencepiece as spm
    from transformers import AutoTokenizer

    from data_prep.manifest import tokenizer_identity

    docs = list(
        dict.fromkeys(
            line.strip()
            for name in sorted(os.listdir(corpus_dir))
            for line in open(os.path.join(corpus_dir, name), encoding="utf-8")
            if line.strip()
        )
    )[:600]
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")
    out = str(tmp_path / "spm")
    manifest = run_prep(
        PrepConfig(
            inputs=[str(tmp_path / "c.txt")],
            tokenizer="",
            output=out,
            train_sentencepiece=700,
            max_seq_len=32,
            min_seq_len=3,
            validation_fraction=0.0,
        ),
        workers=1,
    )
    assert manifest.tokenizer.type == "sentencepiece" and manifest.tokenizer.vocab_size == 700
    # the model was trained in a temporary directory and reached the pipeline as bytes: the path it is
    # known by was only written by the driver after the pipeline had finished
    assert manifest.tokenizer.name_or_path == os.path.join(out, "tokenizer", "spiece.model")
    sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "tokenizer", "spiece.model"))
    expected = collections.Counter()
    for ids in sp.encode(docs):
        for s in range(0, len(ids), 30):
            expected[tuple([sp.piece_to_id("[CLS]")] + ids[s : s + 30] + [sp.piece_to_id("[SEP]")])] += 1
    rows = _read_split(out, manifest, "train")
    assert collections.Counter(tuple(ids) for ids, _ in rows) == expected
    hf = AutoTokenizer.from_pretrained(os.path.join(out, "tokenizer"))  # what distill-train loads
    assert tokenizer_identity(hf, "x").vocab_sha256 == manifest.tokenizer.vocab_sha256
    assert (hf.mask_token_id, hf.pad_token_id) == (sp.piece_to_id("[MASK]"), 0)
    # the saved .model is itself a --tokenizer for another run, behind the same interface
    tok = load_tokenizer(os.path.join(out, "tokenizer", "spiece.model"))
    ((ids, starts),) = tok.encode_batch([docs[0]])
    assert ids.tolist() == sp.encode(docs[0]) and starts.tolist() == [
        i == 0 or sp.id_to_piece(int(t)).startswith("\u2581") for i, t in enumerate(ids)
    ]


def test_row_blocks_keys_order_and_gather():
    """RowBlock: keys depend on the ids and their order only (and the seed); equal keys are ordered by content,
    so the same rows in any input order give the same output; take() gathers whole rows."""
    from data_prep.rows import RowBlock

    rows = [([5, 6, 7], [1, 0, 1]), ([7, 6, 5], [1, 1, 1]), ([5, 6, 7], [1, 1, 0]), ([9], [1]), ([5, 6, 7], [1, 0, 1])]

    def block(items):
        return RowBlock(
            np.array([len(i) for i, _ in items]),
            np.array([t for i, _ in items for t in i], dtype=np.uint16),
            np.array([f for _, fl in items for f in fl], dtype=bool),
        )

    b = block(rows)
    keys = b.shuffle_keys(0)
    assert keys[0] == keys[2] == keys[4] and len(set(keys.tolist())) == 3, "same ids, same key; reversed ids, another key"
    assert not np.array_equal(keys, b.shuffle_keys(1))
    assert np.array_equal(block(rows[:1]).shuffle_keys(0), keys[:1]), "a row's key does not depend on its block"
    out = [(ids.tolist(), flags.tolist()) for ids, flags in b.take(b.sort_order(keys)).rows()]
    assert sorted(out) == sorted((list(i), [bool(f) for f in fl]) for i, fl in rows)
    shuffled = block(rows[::-1])
    again = [(ids.tolist(), flags.tolist()) for ids, flags in shuffled.take(shuffled.sort_order(shuffled.shuffle_keys(0))).rows()]
    assert again == out, "the order is a function of the rows, not of their arrival"
    tied = [i for i, (ids, _) in enumerate(out) if ids == [5, 6, 7]]
    assert [out[i][1] for i in tied] == sorted(out[i][1] for i in tied) and len(tied) == 3


def test_worker_processes_chosen_by_input_size_and_file_count():
    from data_prep.runner import IN_PROCESS_MAX_BYTES, choose_workers

    cpus = os.cpu_count() or 1
    assert choose_workers(3, [("a.txt", 10)]) == 3, "an explicit --workers wins"
    assert choose_workers(0, [("a.txt", IN_PROCESS_MAX_BYTES)]) == 1, "small inputs run in-process"
    quarter = IN_PROCESS_MAX_BYTES // 4
    assert choose_workers(0, [("a.txt", quarter), ("b.txt", quarter)]) == 1
    assert choose_workers(0, [("a.txt.gz", quarter), ("b.txt.gz", quarter)]) == min(cpus, 2), "compressed input counts 4x"
    assert choose_workers(0, [("a.txt", IN_PROCESS_MAX_BYTES + 1)]) == 1, "one file: one worker (files are the unit of parallelism)"
    assert choose_workers(0, [(f"{i}.txt", IN_PROCESS_MAX_BYTES) for i in range(64)]) == cpus


def test_tokenizer_match_compares_the_vocabulary_and_the_specials_both_sides_name():
    """Same vocabulary and shared specials: accepted even when one side names an extra special (Qwen2's tokenizer class
    adds unk = <|endoftext|>); another vocabulary or another id for a shared special: refused with the one-line error."""
    from types import SimpleNamespace

    from data_prep.manifest import DatasetError, TokenizerIdentity, check_tokenizer_matches

    def identity(sha="v1", **specials):
        return TokenizerIdentity("hf-fast", "tok", 600, sha, dict(specials), sorted(set(specials.values())))

    manifest = SimpleNamespace(tokenizer=identity(pad=0, bos=0, eos=0))
    check_tokenizer_matches(manifest, identity(pad=0, bos=0, eos=0, unk=0), "teacher t")
    with pytest.raises(DatasetError, match="across tokenizers is not supported"):
        check_tokenizer_matches(manifest, identity("v2", pad=0, bos=0, eos=0), "teacher t")
    with pytest.raises(DatasetError, match="does not match the one the dataset was prepared with"):
        check_tokenizer_matches(manifest, identity(pad=1, bos=0, eos=0), "student s")
