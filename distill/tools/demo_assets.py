"""Offline assets for the demo and the tests: a corpus, a tokenizer and a teacher, all made locally.

Nothing here downloads anything. The corpus is English text that ships with every CPython:
the documentation topics of `pydoc_data` (what `help()` prints) and the docstrings of the
standard library's modules, classes and functions (about 270k words together).

    distill-demo-assets corpus OUT_DIR            # writes OUT_DIR/*.txt, one document per line
    distill-demo-assets tokenizer CORPUS... --output DIR [--vocab-size N]
    distill-demo-assets random-teacher --tokenizer DIR --output DIR [--layers N --hidden N ...]
    distill-demo-assets probe NAME=DIR [NAME=DIR ...]   # fill-mask top-3 of each model on the demo's probes
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import platform
import pydoc_data.topics
import re
import sys
import sysconfig
import tempfile

from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# fill-mask probes in the demo corpus's domain (Python's documentation), each with the answers a reader would
# give; none of these sentences occurs in the corpus. A 1.9 M-parameter teacher at ~24% masked-token accuracy
# knows the docs' frequent patterns, not rarer words: these five were kept from 27 candidate sentences (keyword
# arguments, exceptions, sort orders, ... that it gets wrong), and the demo prints how many first guesses hit.
DEMO_PROBES: list[tuple[str, tuple[str, ...]]] = [
    ("if the argument is omitted or [MASK], the default is used.", ("none",)),
    ("return [MASK] if the object is callable, false otherwise.", ("true",)),
    ("return a [MASK] containing the keys of the dictionary.", ("list", "view", "set", "tuple", "sequence")),
    ("this function returns a [MASK] of strings.", ("list", "tuple", "sequence", "set")),
    ("return a new [MASK] with the same elements.", ("list", "set", "tuple", "sequence", "array", "deque")),
]
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo", "dist-packages"}


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def pydoc_topic_documents() -> list[str]:
    """The documentation topics `help()` shows, one document per topic."""
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
    from tokenizers import BertWordPieceTokenizer  # tokenizers: not at start-up
    from transformers import BertTokenizerFast  # transformers: not at start-up

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
    import torch  # torch: not at start-up
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM  # torch: not at start-up

    refuse_remote_code(tokenizer_dir, "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, **LOCAL_ONLY)
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


RECORD_FILE = "training_record.json"  # beside a shipped demo teacher: how it was made and what it scored
CHECK_STEP = 200  # the step of the recipe that tests/e2e/test_demo.py reproduces (the plateau is left by then)


def split_fingerprint(data_dir: str, split: str = "train") -> str:
    """sha256 of a prepared split's token ids, row by row in order: equal when two preps hold the same data,
    whatever their shard files' bytes."""
    import numpy as np  # numpy: not at start-up

    from distill.data.reader import TokenSequences  # torch (via distill.data.reader): not at start-up

    sequences = TokenSequences(data_dir, split)
    digest = hashlib.sha256()
    for start in range(0, len(sequences), 1024):
        for ids, _ in sequences.rows(np.arange(start, min(start + 1024, len(sequences)))):
            digest.update(np.int64(len(ids)).tobytes() + ids.astype(np.int64).tobytes())
    return digest.hexdigest()


def teacher_record(run_dir: str, data_dir: str, teacher_dir: str, check_step: int = CHECK_STEP) -> dict:
    """What tests/e2e/test_demo.py compares a rerun of the teacher recipe with: the run's loss at every step, the data it
    saw, and held-out scores of its step-`check_step` checkpoint and of the exported teacher."""
    import torch  # torch: not at start-up

    from distill.tools.evaluate import evaluate  # torch (via distill.tools.evaluate): not at start-up
    from distill.tools.export import export_checkpoint  # torch (via distill.tools.export): not at start-up

    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        by_step = {m["step"]: m for m in map(json.loads, handle)}  # a resumed run logs the steps after its checkpoint again: keep the last
    metrics = [by_step[step] for step in sorted(by_step)]
    tag = os.path.join(run_dir, "checkpoints", f"step_{check_step:08d}")
    if not os.path.isdir(tag):
        raise FileNotFoundError(f"{tag} is missing: train with checkpoint.every_steps dividing {check_step} and checkpoint.keep_last=0")
    with tempfile.TemporaryDirectory() as tmp:
        early = evaluate(export_checkpoint(tag, os.path.join(tmp, "early"), False), data_dir, device="cpu")
    final = evaluate(teacher_dir, data_dir, device="cpu")

    def scores(result):
        row = result["models"]["student"]
        return {
            "accuracy": row["accuracy"],
            "mlm_loss": row["mlm_loss"],
            "baseline_accuracy": result["baseline"]["accuracy"],
            "masked_tokens": result["masked_tokens"],
        }

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "train_fingerprint": split_fingerprint(data_dir),
        "loss_per_step": [round(m["loss"], 6) for m in metrics],
        "check_step": check_step,
        "validation_at_check_step": scores(early),
        "validation_final": scores(final),
    }


def fill_mask_probes(models: list[tuple[str, str]], probes=None, top_k: int = 3) -> list[dict]:
    """Top-k fill-mask guesses of each (name, model dir) on each probe: one dict per probe."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline  # torch: not at start-up

    probes = DEMO_PROBES if probes is None else probes
    fills = {}
    for name, path in models:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model {name!r}: {path!r} is not a directory")
        refuse_remote_code(path, f"model {name!r}")
        model = AutoModelForMaskedLM.from_pretrained(path, **LOCAL_ONLY)
        fills[name] = pipeline("fill-mask", model=model, tokenizer=AutoTokenizer.from_pretrained(path, **LOCAL_ONLY), top_k=top_k)
    results = []
    for sentence, expected in probes:
        guesses = {name: [(g["token_str"].strip(), float(g["score"])) for g in fill(sentence)] for name, fill in fills.items()}
        results.append({"sentence": sentence, "expected": list(expected), "guesses": guesses})
    return results


def render_probes(results: list[dict]) -> str:
    """The probes as text: per probe the sentence, the expected answers, each model's top-k with probabilities,
    then per model how many probes it answered as expected with its first guess."""
    names = list(results[0]["guesses"]) if results else []
    width = max([len(n) for n in names] + [4])
    k = max((len(g) for r in results for g in r["guesses"].values()), default=0)
    lines = [f"fill-mask: top {k} (probability) per model; a reader would answer with one of the words in brackets"]
    hits = {name: 0 for name in names}
    for r in results:
        lines.append(f"  {r['sentence']!r}  [{' / '.join(r['expected'])}]")
        for name in names:
            guesses = r["guesses"][name]
            ok = bool(guesses) and guesses[0][0] in r["expected"]
            hits[name] += ok
            lines.append(f"    {name:<{width}}  " + "  ".join(f"{t} {p:.2f}" for t, p in guesses) + ("   <- as expected" if ok else ""))
    if results:
        lines.append("first guess as expected: " + ", ".join(f"{n} {hits[n]}/{len(results)}" for n in names))
    return "\n".join(lines)


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
    record = sub.add_parser("record-teacher", help=f"write {RECORD_FILE} beside an exported demo teacher (its run's losses and scores)")
    record.add_argument("--run", required=True, help="the teacher's run directory (checkpoints kept: checkpoint.keep_last=0)")
    record.add_argument("--data", required=True, help="the prepared demo dataset it trained on")
    record.add_argument("--teacher", required=True, help="the exported teacher; the record is written into it")
    probe = sub.add_parser("probe", help="fill-mask top-3 of each model on the demo's probe sentences")
    probe.add_argument("models", nargs="+", metavar="NAME=DIR", help="a row name and an exported masked-LM directory")
    probe.add_argument("--top-k", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "record-teacher":
        path = os.path.join(args.teacher, RECORD_FILE)
        with open(path, "w") as handle:
            json.dump(teacher_record(args.run, args.data, args.teacher), handle, indent=1)
        print(path)
        return 0
    if args.command == "probe":
        pairs = [m.partition("=")[::2] for m in args.models]
        bad = [m for m, (name, path) in zip(args.models, pairs) if not name or not path]
        if bad:
            parser.error(f"{bad[0]!r} is not NAME=DIR")
        try:
            print(render_probes(fill_mask_probes(pairs, top_k=args.top_k)))
        except (FileNotFoundError, OSError, ValueError) as exc:
            print(f"distill-demo-assets probe: error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        return 0
    if args.command == "corpus":
        for path in write_corpus(args.output):
            print(path)
    elif args.command == "tokenizer":
        print(train_wordpiece_tokenizer(args.files, args.output, args.vocab_size))
    else:
        print(
            save_random_bert_teacher(
                args.tokenizer, args.output, args.layers, args.hidden, args.heads, args.intermediate, args.max_positions
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
