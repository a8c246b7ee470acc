"""Data prep for real: full Beam runs with worker processes (the demo corpus exact, WikiText-2's accounting, causal
runs, the global shuffle and its spill files), distill-prep's command line on bad input, and the tokenizer travelling
inside the pipeline to worker processes and a fresh interpreter (the in-process tests: tests/unit/test_data_prep.py)."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import BIN, shared_data_path
from support import private_tmpdir as _private_tmpdir
from support import read_split as _read_split

from data_prep.config import PrepConfig
from data_prep.driver import run_prep
from data_prep.manifest import load_manifest, sha256_file, verify_shards
from data_prep.packing import split_of
from data_prep.tokenization import load_tokenizer


def _cli(*args):
    proc = subprocess.run([os.path.join(BIN, "distill-prep"), *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


def test_cli_bad_input(tmp_path, tokenizer_dir, corpus_dir, monkeypatch):
    scratch = _private_tmpdir(tmp_path, monkeypatch)  # every run below, failed or not, must leave it empty
    out = tmp_path / "out"
    code, err = _cli("--input", str(tmp_path / "nothing*.txt"), "--tokenizer", tokenizer_dir, "--output", str(out))
    assert code == 2 and err == [
        f"distill-prep: error: --input '{tmp_path / 'nothing*.txt'}' matches no files; check the path or glob (quote globs so the shell does not expand them)"
    ]
    code, err = _cli("--input", corpus_dir, "--tokenizer", corpus_dir, "--output", str(out))
    assert code == 2 and len(err) == 1 and "holds no tokenizer files" in err[0]
    assert not out.exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, err = _cli("--input", corpus_dir, "--tokenizer", tokenizer_dir, "--output", str(existing))
    assert code == 2 and len(err) == 1 and "already holds data" in err[0] and "--overwrite" in err[0]
    assert os.listdir(existing) == ["keep.txt"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.txt").write_bytes(b"a fine line of text with enough words to keep it as a sequence\nbroken \xff\xfe bytes\n" * 3)
    code, err = _cli("--input", str(bad), "--tokenizer", tokenizer_dir, "--output", str(out), "--workers", "2")
    assert code == 2 and len(err) == 1, err
    assert "a.txt line 2: invalid UTF-8" in err[0] and "--on-decode-error skip" in err[0]
    assert not out.exists(), "a failed run leaves no output (and so no manifest)"
    code, _ = _cli(
        "--input",
        str(bad),
        "--tokenizer",
        tokenizer_dir,
        "--output",
        str(out),
        "--workers",
        "1",
        "--on-decode-error",
        "skip",
        "--min-seq-len",
        "3",
    )
    assert code == 0
    manifest = load_manifest(str(out))
    assert manifest.stats["dropped"]["invalid_utf8"]["documents"] == 3
    assert manifest.stats["documents_read"] == 3

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "e.txt").write_text("\n\n   \n")
    code, err = _cli("--input", str(empty), "--tokenizer", tokenizer_dir, "--output", str(tmp_path / "o2"), "--workers", "1")
    assert code == 2 and len(err) == 1 and "no text found" in err[0]
    assert not (tmp_path / "o2").exists()
    assert os.listdir(scratch) == [], "failed and finished runs leave no temporary files or directories"


def test_tokenizer_travels_inside_the_pipeline(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    """Workers rebuild the tokenizer from bytes pickled with the DoFn, never from the --tokenizer path.

    HF directory: the pipeline is built, the directory deleted, then the job runs in 2 worker processes.
    Sentencepiece .model: the DoFn is pickled, the file deleted, and a fresh interpreter runs it.
    """
    import apache_beam as beam
    from apache_beam.internal import pickler

    from data_prep.pipeline import TokenizeAndPack, build_pipeline
    from data_prep.runner import beam_options, local_runner
    from data_prep.sentencepiece_tok import train_sentencepiece

    docs = list(
        dict.fromkeys(
            line.strip() for line in open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0]), encoding="utf-8") if line.strip()
        )
    )[:300]
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(docs) + "\n")

    tok_dir = str(tmp_path / "hf_tokenizer")
    shutil.copytree(tokenizer_dir, tok_dir)
    out = str(tmp_path / "out")
    cfg = PrepConfig(
        inputs=[str(corpus)], tokenizer=tok_dir, output=out, max_seq_len=32, min_seq_len=3, validation_fraction=0.0, dedup=False
    )
    tok = load_tokenizer(tok_dir)
    options = beam_options(cfg, [], workers=2)
    pipeline = beam.Pipeline(runner=local_runner(options), options=options)
    build_pipeline(pipeline, cfg, [str(corpus)], tok.payload(), tok.vocab_size, "uint16", 1)
    shutil.rmtree(tok_dir)
    pipeline.run().wait_until_finish()
    rows = [
        tuple(r) for path in sorted((tmp_path / "out" / "train").iterdir()) for r in pq.read_table(path).column("input_ids").to_pylist()
    ]
    expected = [
        tuple([tok.cls_id] + ids[s : s + 30] + [tok.sep_id])
        for ids in tok.tokenizer(docs, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), 30)
    ]
    assert collections.Counter(rows) == collections.Counter(expected)

    model = train_sentencepiece(docs, 400, str(tmp_path / "spm"))
    sp_tok = load_tokenizer(model)
    fn = TokenizeAndPack(dataclasses.replace(cfg, tokenizer=model), sp_tok.payload(), sp_tok.vocab_size)
    (tmp_path / "dofn.pkl").write_bytes(pickler.dumps(fn))
    os.unlink(model)
    script = (
        "import json, sys\n"
        "from apache_beam.internal import pickler\n"
        "from data_prep.rows import RowBlock\n"
        "fn = pickler.loads(open(sys.argv[1], 'rb').read())\n"
        "fn.setup(); fn.start_bundle()\n"
        "out = [o for d in sys.argv[2:] for o in fn.process(d)] + [getattr(o, 'value', o) for o in fn.finish_bundle()]\n"
        "print(json.dumps([ids.tolist() for o in out if isinstance(o, RowBlock) for ids, _ in o.rows()]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "dofn.pkl"), *docs[:5]], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    want = [[sp_tok.cls_id] + ids[s : s + 30] + [sp_tok.sep_id] for ids in sp_tok.sp.encode(docs[:5]) for s in range(0, len(ids), 30)]
    assert sorted(json.loads(proc.stdout.strip().splitlines()[-1])) == sorted(w for w in want if len(w) >= 3)


def _expected_sequences(docs, tok, max_len, min_len):
    """Independent tokenization and windowing of every document: {split: Counter(sequence tuples)}."""
    out = {"train": collections.Counter(), "validation": collections.Counter()}
    tokens_read = 0
    encoded = tok.tokenizer(docs, add_special_tokens=False)
    for doc, ids in zip(docs, encoded["input_ids"]):
        tokens_read += len(ids)
        for s in range(0, len(ids), max_len - 2):
            window = ids[s : s + max_len - 2]
            if len(window) + 2 >= min_len and sum(i == tok.unk_id for i in window) <= 0.5 * len(window):
                out[split_of(doc, 0.05)][tuple([tok.cls_id] + window + [tok.sep_id])] += 1
    return out, tokens_read


def test_full_run_on_the_demo_corpus_is_exact(tmp_path, corpus_dir, tokenizer_dir, monkeypatch):
    scratch = _private_tmpdir(tmp_path, monkeypatch)
    out = str(tmp_path / "prepared")
    cfg = PrepConfig(inputs=[corpus_dir], tokenizer=tokenizer_dir, output=out, max_seq_len=64, validation_fraction=0.05, num_shards=3)
    manifest = run_prep(cfg, workers=2)  # local FnApiRunner, multi_processing, 2 worker processes
    assert os.listdir(scratch) == [], "the run left temporary files behind (Beam's beam-temp* directories)"

    reread = load_manifest(out)
    assert reread.to_json() == manifest.to_json()
    assert len(reread.splits["train"].shards) == 3 and reread.token_dtype == "uint16"
    for split in ("train", "validation"):
        verify_shards(out, reread, split, checksums=True)
        for shard in reread.splits[split].shards:
            assert sha256_file(os.path.join(out, shard.path)) == shard.sha256
    tok = load_tokenizer(tokenizer_dir)
    all_docs = [
        line.strip()
        for name in sorted(os.listdir(corpus_dir))
        for line in open(os.path.join(corpus_dir, name), encoding="utf-8")
        if line.strip()
    ]
    docs = list(dict.fromkeys(all_docs))  # exact duplicates are dropped
    expected, unique_tokens = _expected_sequences(docs, tok, 64, 12)
    _, tokens_read = _expected_sequences(all_docs, tok, 64, 12)
    stats = reread.stats
    assert stats["documents_read"] == len(all_docs)
    assert stats["dropped"]["duplicate"] == {"documents": len(all_docs) - len(docs), "tokens": tokens_read - unique_tokens}
    assert stats["tokens_read"] == tokens_read
    assert stats["tokens_read"] == stats["content_tokens_written"] + stats["tokens_dropped"]

    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    for split in ("train", "validation"):
        rows = _read_split(out, reread, split)
        assert collections.Counter(tuple(ids) for ids, _ in rows) == expected[split], (
            f"{split} sequences differ from an independent computation"
        )
        assert sum(len(ids) for ids, _ in rows) == reread.splits[split].tokens
        for ids, starts in rows:
            assert ids[0] == tok.cls_id and ids[-1] == tok.sep_id and len(ids) <= 64 and len(starts) == len(ids)
            if split == "train":
                np.add.at(counts, ids, 1)
    assert np.array_equal(np.load(os.path.join(out, "token_counts.npy")), counts)

    # word starts: tokens that begin a word per the tokenizer's own word_ids, for a few documents
    sample = docs[:20]
    train_rows = {tuple(ids): starts for ids, starts in _read_split(out, reread, "train")}
    enc = tok.tokenizer(sample, add_special_tokens=False)
    checked = 0
    for i, ids in enumerate(enc["input_ids"]):
        words = enc.word_ids(i)
        window = ids[:62]
        key = tuple([tok.cls_id] + window + [tok.sep_id])
        if key in train_rows:
            want = [True] + [j == 0 or words[j] != words[j - 1] for j in range(len(window))] + [True]
            assert train_rows[key] == want
            checked += 1
    assert checked >= 5
    # the per-split equality above means every sequence sits in its document's split: no document is in both
    assert stats["splits"]["validation"]["documents"] + stats["splits"]["train"]["documents"] == len(docs)


def test_wikitext_accounting(tmp_path, tokenizer_dir):
    valid = shared_data_path("wikitext-2", "valid.txt")
    out = str(tmp_path / "wiki")
    manifest = run_prep(
        PrepConfig(inputs=[valid], tokenizer=tokenizer_dir, output=out, max_seq_len=128, validation_fraction=0.01), workers=2
    )
    stats = manifest.stats
    assert stats["tokens_read"] == stats["content_tokens_written"] + stats["tokens_dropped"]
    assert stats["dropped"]["too_short"]["sequences"] > 0  # the " = Title = " lines
    tok = load_tokenizer(tokenizer_dir)
    lines = [text.strip() for text in open(valid, encoding="utf-8") if text.strip()]
    assert stats["documents_read"] == len(lines)
    assert stats["tokens_read"] == sum(len(ids) for ids in tok.tokenizer(lines, add_special_tokens=False)["input_ids"])


def test_causal_run_eos_between_documents_no_masking_metadata(tmp_path, corpus_dir, gpt2_tokenizer_dir):
    out = str(tmp_path / "causal")
    L = 64
    manifest = run_prep(
        PrepConfig(
            inputs=[corpus_dir],
            tokenizer=gpt2_tokenizer_dir,
            output=out,
            max_seq_len=L,
            min_seq_len=8,
            packing="causal",
            validation_fraction=0.05,
        ),
        workers=2,
    )
    assert load_manifest(out).packing == "causal" and manifest.tokenizer.special_token_ids["eos"] >= 0
    tok = load_tokenizer(gpt2_tokenizer_dir, packing="causal")
    eos = tok.eos_id
    docs = [
        line.strip()
        for name in sorted(os.listdir(corpus_dir))
        for line in open(os.path.join(corpus_dir, name), encoding="utf-8")
        if line.strip()
    ]
    encoded = list(zip(docs, tok.tokenizer(docs, add_special_tokens=False)["input_ids"]))
    stats = manifest.stats
    assert stats["tokens_read"] == sum(len(ids) for _, ids in encoded)
    missing = 0
    for split in ("train", "validation"):
        rows = [r for s in manifest.splits[split].shards for r in pq.read_table(os.path.join(out, s.path)).column("input_ids").to_pylist()]
        assert pq.read_schema(os.path.join(out, manifest.splits[split].shards[0].path)).names == ["input_ids", "doc_start"]
        assert sum(len(r) < L for r in rows) <= 4, "only the end of a bundle's stream may be short"
        want = collections.Counter(t for d, ids in encoded if split_of(d, 0.05) == split for t in ids)
        got = collections.Counter(t for r in rows for t in r if t != eos)
        assert not got - want, f"{split}: tokens written that no document of this split holds"
        doc_set = {tuple(ids) for d, ids in encoded if split_of(d, 0.05) == split}
        inner = [tuple(seg) for r in rows for seg in _segments(r, eos)[1:-1]]
        assert inner and all(seg in doc_set for seg in inner), "a run between two EOS is one whole document"
        missing += sum(want.values()) - sum(got.values())
    assert missing == stats["tokens_dropped"], "every token not written is counted as dropped"
    assert stats["tokens_read"] == stats["content_tokens_written"] + stats["tokens_dropped"]


def test_causal_rows_record_every_documents_first_token(tmp_path, gpt2_tokenizer_dir):
    """The `doc_start` flags of causal shards are the documents' first tokens, counted against the raw documents: one flag
    per document (nothing dropped at --min-seq-len 1), each flagged run up to the next flag in a row is a whole document and
    its EOS, and a document whose text holds the EOS token's text stays one document (EOS ids alone would cut it in two)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = ["a document that says <|endoftext|> in its own text"] + [
        " ".join(f"w{i}x{j}" for j in range(1 + (i * 7) % 23)) for i in range(60)
    ]
    (corpus / "docs.txt").write_text("\n".join(docs[:30]) + "\n\n   \n" + "\n".join(docs[30:]) + "\n")
    out = str(tmp_path / "causal")
    manifest = run_prep(
        PrepConfig(
            inputs=[str(corpus)],
            tokenizer=gpt2_tokenizer_dir,
            output=out,
            max_seq_len=40,
            min_seq_len=1,
            packing="causal",
            validation_fraction=0.0,
            num_shards=1,
        ),
        workers=1,
    )
    assert manifest.format_version == 2 and load_manifest(out).document_starts == "doc_start"
    tok = load_tokenizer(gpt2_tokenizer_dir, packing="causal")
    eos = tok.eos_id
    encoded = tok.tokenizer(docs, add_special_tokens=False)["input_ids"]
    assert encoded[0].count(eos) == 1, "the first document's text encodes to the EOS id"
    table = pq.read_table(os.path.join(out, manifest.splits["train"].shards[0].path))
    rows, flags = table.column("input_ids").to_pylist(), table.column("doc_start").to_pylist()
    assert sum(map(sum, flags)) == len(docs) == manifest.stats["documents_read"], "one flag per document"
    whole = collections.Counter()
    for ids, starts in zip(rows, flags):
        at = [i for i, f in enumerate(starts) if f] + [len(ids)]
        whole.update(tuple(ids[a:b]) for a, b in zip(at[:-1], at[1:-1]))  # runs that end at the next flag: complete documents
    want = collections.Counter(tuple(ids) + (eos,) for ids in encoded)
    assert whole and not whole - want, "a run from one flag to the next is one whole document and its EOS"
    from_eos = sum(ids[i - 1] == eos for ids in rows for i in range(1, len(ids)))
    recorded = sum(f for starts in flags for f in starts[1:])
    assert from_eos == recorded + 1, "EOS ids alone would start a document inside the first one"
    # the same rows as a format-1 dataset (no doc_start column): still read, documents begin after each EOS
    from distill.data.masking import CausalLMCollator
    from distill.data.reader import TokenSequences

    shard = os.path.join(out, manifest.splits["train"].shards[0].path)
    pq.write_table(table.drop(["doc_start"]), shard)
    data = json.load(open(os.path.join(out, "manifest.json")))
    data.update(format_version=1, document_starts=None)
    data["splits"]["train"]["shards"][0]["sha256"] = sha256_file(shard)
    json.dump(data, open(os.path.join(out, "manifest.json"), "w"))
    r = next(i for i, ids in enumerate(rows) if ids[: len(encoded[0])] == encoded[0])  # the row the first document opens
    (row,) = TokenSequences(out, "train", cache_dir=str(tmp_path / "arrow")).rows(np.array([r]))
    assert row[1] is None and row[0].tolist() == rows[r]
    positions = CausalLMCollator(0, 1, eos_id=eos)([row], [0])["position_ids"][0].tolist()
    from_eos_starts = [i for i in range(1, len(rows[r])) if rows[r][i - 1] == eos]
    assert [i for i, p in enumerate(positions) if p == 0] == [0] + from_eos_starts
    assert from_eos_starts[0] == encoded[0].index(eos) + 1 and not flags[r][from_eos_starts[0]], "inside the first document"
    data["format_version"] = 3
    json.dump(data, open(os.path.join(out, "manifest.json"), "w"))
    with pytest.raises(ValueError, match="this version reads 'distill-prepared-dataset' v1/v2; re-prepare the corpus"):
        load_manifest(out)


def _segments(row, eos):
    segs, cur = [], []
    for t in row:
        if t == eos:
            segs.append(cur)
            cur = []
        else:
            cur.append(t)
    segs.append(cur)
    return segs


def test_shards_are_globally_shuffled_deterministically(tmp_path, corpus_dir, tokenizer_dir):
    docs = list(
        dict.fromkeys(
            line.strip() for line in open(os.path.join(corpus_dir, sorted(os.listdir(corpus_dir))[0]), encoding="utf-8") if line.strip()
        )
    )[:800]
    (tmp_path / "c.txt").write_text("\n".join(docs) + "\n")

    def run(name, seed, workers):
        cfg = PrepConfig(
            inputs=[str(tmp_path / "c.txt")],
            tokenizer=tokenizer_dir,
            output=str(tmp_path / name),
            max_seq_len=32,
            validation_fraction=0.0,
            shard_rows=300,
            seed=seed,
        )
        m = run_prep(cfg, workers=workers)
        return m, [tuple(ids) for ids, _ in _read_split(cfg.output, m, "train")]

    m1, rows1 = run("a", 0, 1)
    m2, rows2 = run("b", 0, 2)
    _, rows3 = run("c", 1, 1)
    assert (
        m1.token_dtype == "uint16"
        and pq.read_schema(os.path.join(str(tmp_path / "a"), m1.splits["train"].shards[0].path)).field("input_ids").type.value_type
        == "uint16"
    )
    assert [s.sha256 for s in m1.splits["train"].shards] == [s.sha256 for s in m2.splits["train"].shards], (
        "same seed, same shards (any worker count)"
    )
    assert rows1 != rows3 and sorted(rows1) == sorted(rows3), "another seed: same rows, another order"
    tok = load_tokenizer(tokenizer_dir)
    in_order = [
        tuple([tok.cls_id] + ids[s : s + 30] + [tok.sep_id])
        for ids in tok.tokenizer(docs, add_special_tokens=False)["input_ids"]
        for s in range(0, len(ids), 30)
    ]
    in_order = [r for r in in_order if len(r) >= 12]
    assert sorted(rows1) == sorted(in_order) and rows1 != in_order
    n = len(rows1)
    assert (
        len(m1.splits["train"].shards) == -(-n // 300) or abs(len(m1.splits["train"].shards) - n / 300) <= 1 + n / 600
    )  # about n / 300 shards
    assert sum(m1.stats["length_histogram"].values()) == n


@pytest.mark.parametrize("packing", ["document", "causal"])
def test_shuffle_through_spill_files_writes_the_runners_shards(
    tmp_path, corpus_dir, tokenizer_dir, gpt2_tokenizer_dir, packing, monkeypatch
):
    """The local route (rows in spill files, only file names grouped) and the distributed route (the runner's
    GroupByKey) write byte-identical shards; tiny spill buffers force many spill files per shard, and tiny
    key ranges many reads of each (the pipeline runs in this process, so the patched limit applies)."""
    import apache_beam as beam

    import data_prep.shards

    monkeypatch.setattr(data_prep.shards, "SHARD_PIECE_BYTES", 5000)
    monkeypatch.setattr(data_prep.shards, "ROW_GROUP", 100)

    from data_prep.pipeline import build_pipeline, token_dtype_for
    from data_prep.runner import beam_options, local_runner

    tok_dir = tokenizer_dir if packing == "document" else gpt2_tokenizer_dir
    tok = load_tokenizer(tok_dir, packing=packing)
    files = [os.path.join(corpus_dir, name) for name in sorted(os.listdir(corpus_dir))]
    contents = {}
    for route, spill_bytes in (("runner", 0), ("spill", 4096)):
        cfg = PrepConfig(
            inputs=files, tokenizer=tok_dir, output=str(tmp_path / route), max_seq_len=32, validation_fraction=0.1, packing=packing
        )
        options = beam_options(cfg, [], workers=1)
        with beam.Pipeline(runner=local_runner(options), options=options) as pipeline:
            build_pipeline(
                pipeline,
                cfg,
                files,
                tok.payload(),
                tok.vocab_size,
                token_dtype_for(tok.vocab_size),
                3,
                spill=route == "spill",
                spill_bytes=spill_bytes or 1 << 26,
            )
        contents[route] = {
            os.path.relpath(os.path.join(d, f), cfg.output): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(cfg.output)
            for f in names
            if f.endswith(".parquet")
        }
        rows = sum(pq.read_metadata(os.path.join(cfg.output, path)).num_rows for path in contents[route])
        assert rows * 16 > 20 * 4096, "the corpus must spill many times over"
        assert sum(pq.read_metadata(os.path.join(cfg.output, path)).num_row_groups for path in contents[route]) > 8
        assert not [f for _, _, names in os.walk(os.path.join(cfg.output, "_prep_tmp")) for f in names if f.endswith(".spill")], (
            "spill files are deleted once their shard is written"
        )
    assert sorted(contents["spill"]) == [
        "train/part-00000-of-00003.parquet",
        "train/part-00001-of-00003.parquet",
        "train/part-00002-of-00003.parquet",
        "validation/part-00000-of-00001.parquet",
    ]
    assert contents["spill"] == contents["runner"]
