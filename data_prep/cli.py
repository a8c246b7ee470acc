"""distill-prep: corpus -> tokenized, packed, sharded dataset with masking metadata (Apache Beam)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import tempfile

from data_prep.config import PrepConfig
from data_prep.errors import extract_message


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distill-prep",
        description="Tokenize, pack and shard a text corpus for distillation. Unknown options are passed to Apache Beam "
        "(e.g. --runner DataflowRunner --project P --region R --temp_location gs://...).",
    )
    p.add_argument("--input", nargs="+", required=True, help="files, directories or globs (.txt, .jsonl, .parquet; .gz/.bz2 compressed)")
    p.add_argument("--tokenizer", default="", help="the teacher's Hugging Face tokenizer directory, or a sentencepiece .model file")
    p.add_argument("--train-sentencepiece", type=int, default=0, metavar="VOCAB_SIZE",
                   help="instead of --tokenizer: train a sentencepiece (unigram) model of this size on a corpus sample; saved in OUTPUT/tokenizer/")
    p.add_argument("--output", required=True, help="new directory for the prepared dataset (built beside it, moved into place when complete)")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per sequence including [CLS] and [SEP] (default 128)")
    p.add_argument("--min-seq-len", type=int, default=12, help="drop shorter sequences (default 12, as DistilBERT)")
    p.add_argument("--packing", choices=["document", "full_sentences", "causal"], default="document",
                   help="document: [CLS] window [SEP] within one document (default); full_sentences: across documents with [SEP] between "
                   "them (RoBERTa); causal: GPT-2 style, EOS after each document, windows of exactly --max-seq-len, no word-start flags")
    p.add_argument("--doc-split", choices=["line", "paragraph"], default="line", help=".txt documents: one per line, or blank-line separated paragraphs")
    p.add_argument("--text-field", default="text", help="field of .jsonl records / column of .parquet files holding the text (default text)")
    p.add_argument("--normalization", choices=["NFC", "NFKC", "none"], default="NFC", help="Unicode normalisation of every document (default NFC)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact-duplicate documents (default: drop them, counted as 'duplicate')")
    p.add_argument("--validation-fraction", type=float, default=0.01, help="share of documents held out, by text hash (default 0.01)")
    p.add_argument("--max-unk-fraction", type=float, default=0.5, help="drop sequences with more unknown tokens than this share (default 0.5)")
    p.add_argument("--num-shards", type=int, default=0, help="train shards (default: from --shard-rows / --shard-mb)")
    p.add_argument("--shard-rows", type=int, default=0, help="target rows per shard, estimated from a corpus sample (default: use --shard-mb)")
    p.add_argument("--shard-mb", type=int, default=128, help="target MB of token data per shard (default 128)")
    p.add_argument("--batch-size", type=int, default=256, help="documents per tokenizer call")
    p.add_argument("--workers", type=int, default=0, help="DirectRunner worker processes (default: one per CPU)")
    p.add_argument("--on-decode-error", choices=["error", "skip"], default="error",
                   help="invalid UTF-8 / bad JSON lines, binary, truncated or corrupt files: stop (default) or count and skip")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --output if it holds a prepared dataset, once the new one is complete (not on object stores)")
    p.add_argument("--seed", type=int, default=0, help="salt of the train/validation split hash")
    return p


def print_summary(manifest) -> None:
    """The run's statistics as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    stats = manifest.stats
    table = Table(title="distill-prep summary", show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("files / documents read", f"{manifest.pipeline_options['files']:,} / {stats['documents_read']:,}")
    table.add_row("tokens read (no specials)", f"{stats['tokens_read']:,}")
    for name, info in manifest.splits.items():
        docs = stats["splits"].get(name, {}).get("documents", 0)
        table.add_row(f"{name}: documents / sequences / tokens / shards", f"{docs:,} / {info.rows:,} / {info.tokens:,} / {len(info.shards)}")
    for reason, d in sorted(stats["dropped"].items()):
        units = ", ".join(f"{v:,} {k}" for k, v in d.items())
        table.add_row(f"dropped: {reason}", units)
    table.add_row("packing / max length / token dtype", f"{manifest.packing} / {manifest.max_seq_len} / {manifest.token_dtype}")
    hist = stats.get("length_histogram", {})
    if hist:
        total = sum(hist.values()) or 1
        table.add_row("sequence lengths", "  ".join(f"{k}: {100 * v / total:.0f}%" for k, v in sorted(hist.items(), key=lambda kv: int(kv[0].split("-")[0]))))
    table.add_row("accounting", f"{stats['tokens_read']:,} = {stats['content_tokens_written']:,} written + {stats['tokens_dropped']:,} dropped")
    Console().print(table)


@contextlib.contextmanager
def stderr_to_file(path: str):
    """Send file descriptor 2 (ours and the Beam worker processes') to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "ab") as log_file:
        os.dup2(log_file.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


def _stop(signum, frame):
    """SIGTERM (a scheduler's stop, `kill`) unwinds like Ctrl-C, so the staging directory is removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, beam_args = parser.parse_known_args(argv)
    if not args.tokenizer and not args.train_sentencepiece:
        parser.error("pass --tokenizer DIR_OR_MODEL, or --train-sentencepiece VOCAB_SIZE to train one")
    # Progress goes to stdout; Beam's own chatter (and its worker processes') to a log file.
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("apache_beam").setLevel(logging.CRITICAL)  # worker errors come back as exceptions, handled below
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda record: "apitools not found" not in record.getMessage())
    fd, beam_log = tempfile.mkstemp(prefix="distill-prep-", suffix=".log")  # a new file of our own, never one already there
    os.close(fd)
    cfg = PrepConfig(
        inputs=args.input, tokenizer=args.tokenizer, output=args.output, max_seq_len=args.max_seq_len,
        min_seq_len=args.min_seq_len, packing=args.packing, normalization=args.normalization, dedup=not args.no_dedup, doc_split=args.doc_split, text_field=args.text_field,
        validation_fraction=args.validation_fraction, max_unk_fraction=args.max_unk_fraction,
        num_shards=args.num_shards, shard_rows=args.shard_rows, shard_mb=args.shard_mb, batch_size=args.batch_size, on_decode_error=args.on_decode_error,
        overwrite=args.overwrite, seed=args.seed, train_sentencepiece=args.train_sentencepiece,
    )
    signal.signal(signal.SIGTERM, _stop)
    try:
        with stderr_to_file(beam_log):
            from data_prep.pipeline import run_prep

            manifest = run_prep(cfg, beam_args, args.workers)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # published: nothing left to clean up
    except KeyboardInterrupt:
        print(f"distill-prep: interrupted; nothing was published, --output is as it was (Beam log: {beam_log})", file=sys.stderr)
        return 130
    except Exception as exc:  # Beam re-raises worker errors wrapped in its own types
        message = extract_message(exc)
        if message is None:
            print(f"distill-prep: pipeline failed; Beam log: {beam_log}", file=sys.stderr)
            raise
        print(f"distill-prep: error: {' '.join(message.split())}", file=sys.stderr)
        os.unlink(beam_log)  # the one-line message says it all; keep the log only for unexpected failures
        return 2
    os.unlink(beam_log)
    print_summary(manifest)
    print(os.path.abspath(cfg.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
