"""Offline assets for the demo and the tests: a corpus, a tokenizer and a teacher, all made locally.

Nothing here downloads anything. The corpus is English text that ships with every CPython:
the documentation topics of `pydoc_data` (what `help()` prints) and the docstrings of the
standard library's modules, classes and functions (about 270k words together).

    distill-demo-assets corpus OUT_DIR            # writes OUT_DIR/*.txt, one document per line
    distill-demo-assets tokenizer CORPUS... --output DIR [--vocab-size N]
    distill-demo-assets random-teacher --tokenizer DIR --output DIR [--layers N --hidden N ...]
"""
from __future__ import annotations

import argparse
import ast
import os
import re
import sys
import sysconfig

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "dist-packages"}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def pydoc_topic_documents() -> list[str]:
    """The documentation topics `help()` shows, one document per topic."""
    import pydoc_data.topics

    return [_one_line(text) for _, text in sorted(pydoc_data.topics.topics.items()) if text.strip()]


def stdlib_docstring_documents(min_words: int = 20) -> list[str]:
    """Docstrings of the standard library (parsed with `ast`, nothing imported), sorted for determinism."""
    root = sysconfig.get_paths()["stdlib"]
    docs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, filename), encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc.split()) >= min_words:
                        docs.append(_one_line(doc))
    return docs


def write_corpus(out_dir: str) -> list[str]:
    """Write the demo corpus as two `.txt` files with one document per line; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, docs in (("python_topics.txt", pydoc_topic_documents()), ("stdlib_docstrings.txt", stdlib_docstring_documents())):
        path = os.path.join(out_dir, name)
        with open(path, "w", encoding="utf-8") as handle:
            for doc in docs:
                handle.write(doc + "\n")
        paths.append(path)
    return paths


def train_wordpiece_tokenizer(files: list[str], out_dir: str, vocab_size: int = 8000, lowercase: bool = True) -> str:
    """Train a BERT WordPiece tokenizer on `files` and save it as a Hugging Face fast tokenizer dir."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    wordpiece = BertWordPieceTokenizer(lowercase=lowercase)
    wordpiece.train(files, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece._tokenizer, do_lower_case=lowercase)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_random_bert_teacher(
    tokenizer_dir: str,
    out_dir: str,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    intermediate: int = 256,
    max_positions: int = 128,
    seed: int = 0,
) -> str:
    """Save a randomly initialised `BertForMaskedLM` (+ its tokenizer) for tests and benchmarks."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = BertForMaskedLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-demo-assets", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    corpus = sub.add_parser("corpus", help="write the demo corpus (text shipped with Python)")
    corpus.add_argument("output")
    tok = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on text files")
    tok.add_argument("files", nargs="+")
    tok.add_argument("--output", required=True)
    tok.add_argument("--vocab-size", type=int, default=8000)
    teacher = sub.add_parser("random-teacher", help="save a randomly initialised BERT masked LM")
    teacher.add_argument("--tokenizer", required=True)
    teacher.add_argument("--output", required=True)
    teacher.add_argument("--layers", type=int, default=4)
    teacher.add_argument("--hidden", type=int, default=64)
    teacher.add_argument("--heads", type=int, default=4)
    teacher.add_argument("--intermediate", type=int, default=256)
    teacher.add_argument("--max-positions", type=int, default=128)
    args = parser.parse_args(argv)
    if args.command == "corpus":
        for path in write_corpus(args.output):
            print(path)
    elif args.command == "tokenizer":
        print(train_wordpiece_tokenizer(args.files, args.output, args.vocab_size))
    else:
        print(save_random_bert_teacher(args.tokenizer, args.output, args.layers, args.hidden, args.heads, args.intermediate, args.max_positions))
    return 0


if __name__ == "__main__":
    sys.exit(main())
