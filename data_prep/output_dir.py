"""Where distill-prep writes: the output rule of kd_common/output_rule.py, and its object-store form.

- `--output` must not overlap an input: a listed file, an `--input` path (a glob's fixed directory part:
  the output may not contain it, nor lie inside it when the glob has `**`), or `--tokenizer`.
- Local output: the new dataset is built in a hidden staging directory beside `--output` and moved into
  place when complete (manifest.json written, every shard checked); an existing non-empty `--output` is
  replaced then, only with `--overwrite` and only if it is a prepared dataset (`is_prepared_dataset`).
  A failed run removes its staging directory and leaves `--output` as it was.
- Object stores (gs://, s3://, hdfs://): no rename, so a swap would have to copy every object after
  deleting the old dataset, and a failure in between would lose both. distill-prep therefore writes
  only into an empty prefix (manifest.json last) and removes what it wrote if the run fails;
  `--overwrite` of a prefix that holds data is refused with a one-line error that says what to do.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
from typing import Iterator

from data_prep.errors import PrepInputError
from data_prep.manifest import FORMAT_NAME, MANIFEST_FILE, TOKEN_COUNTS_FILE, TOKENIZER_DIR
from data_prep.sources import GLOB_CHARS, names_existing_path
from kd_common.output_rule import OutputError, check_no_overlap, check_replaceable, is_url, overlap, replace_when_complete

log = logging.getLogger("distill-prep")
TMP_DIR = "_prep_tmp"  # spill files and stats of a run, inside the dataset being written; removed before the manifest
DATASET_ENTRIES = {MANIFEST_FILE, TOKEN_COUNTS_FILE, TOKENIZER_DIR, "train", "validation", TMP_DIR}
# what a tokenizer's save_pretrained (HF fast, or the sentencepiece adapter: spiece.model + its AutoTokenizer copy) writes
TOKENIZER_FILES = {
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
}
KIND = "prepared dataset"


def is_remote(path: str) -> bool:
    """True for object-store / cluster paths (gs://, s3://, hdfs://): no directories, no rename; Beam's filesystems only."""
    return is_url(path)


def _manifest_format(path: str):
    try:
        with open(os.path.join(path, MANIFEST_FILE)) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def is_prepared_dataset(path: str) -> bool:
    """What `--overwrite` may replace: a directory holding only what distill-prep writes, with a manifest.json
    of our format, or without one but with `_prep_tmp/` (an unfinished dataset of a run killed before it could
    clean up, e.g. by an older version that wrote in place). Split directories hold only Parquet shards (and
    Beam's `beam-temp-*` of older versions)."""
    names = os.listdir(path)
    if any(name not in DATASET_ENTRIES and not re.fullmatch(r"\.tmp-.*\.json", name) for name in names):
        return False
    for split in ("train", "validation"):
        directory = os.path.join(path, split)
        if not os.path.lexists(directory):
            continue
        if os.path.islink(directory) or not os.path.isdir(directory):
            return False
        if any(not (name.endswith(".parquet") or name.startswith("beam-temp-")) for name in os.listdir(directory)):
            return False
    tokenizer = os.path.join(path, TOKENIZER_DIR)
    if os.path.lexists(tokenizer):  # a file the user put beside the tokenizer's own is not ours to delete
        if os.path.islink(tokenizer) or not os.path.isdir(tokenizer):
            return False
        for name in os.listdir(tokenizer):
            if name not in TOKENIZER_FILES or os.path.islink(os.path.join(tokenizer, name)):
                return False
    if MANIFEST_FILE in names:
        return _manifest_format(path) == FORMAT_NAME
    return TMP_DIR in names


def _glob_base(pattern: str):
    """The fixed directory part of a glob ('/data/wiki/*.gz' -> '/data/wiki'), or None for a plain path."""
    cut = min((pattern.find(c) for c in GLOB_CHARS if c in pattern), default=-1)
    if cut < 0:
        return None
    head = pattern[:cut]
    base = head.rstrip("/") if head.endswith("/") else head.rpartition("/")[0]
    return base or ("/" if head.startswith("/") else ".")


def check_apart(output: str, patterns: list[str], files: list[str], tokenizer: str = "") -> None:
    """Refuse an `output` that overlaps `--tokenizer`, an `--input` path or glob directory, or a listed input file."""
    inputs = [("--tokenizer", tokenizer)] if tokenizer else []
    for pattern in patterns:
        base = None if names_existing_path(pattern) else _glob_base(pattern)
        if base is None:  # a plain path, or an existing name taken literally ('doc[1].txt')
            inputs.append(("--input", pattern))
            continue
        how = overlap(output, base)
        if how in ("is", "contains") or (how == "is inside" and "**" in pattern):
            raise OutputError(
                f"--output {output!r} {how} the directory that --input {pattern!r} reads; an output must not overlap "
                f"an input (it could overwrite or re-read it): choose an --output outside it"
            )
    check_no_overlap(output, inputs)
    check_no_overlap(output, [("--input file", path) for path in files])


def _list_files(pattern: str) -> list:
    """FileMetadata of the files matching `pattern`, sorted by path (none: empty)."""
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    return sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path)


def remove_output(path: str) -> None:
    """Delete a (partial) output: the directory locally, every object under the prefix on an object store."""
    from apache_beam.io.filesystems import FileSystems  # apache_beam: not at start-up

    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        found = [m.path for m in _list_files(path.rstrip("/") + "/**")]
        if found:
            FileSystems.delete(found)
    except Exception as exc:  # the run's own error matters more; say what is left behind
        log.warning("could not remove %s (%s); delete it before reusing the path", path, exc)


def _check_remote_empty(output: str, overwrite: bool) -> None:
    try:
        existing = _list_files(output.rstrip("/") + "/**")
    except Exception as exc:
        raise PrepInputError(
            f"cannot list --output {output!r} ({str(exc).splitlines()[0][:160]}); check the path and its filesystem"
        ) from None
    if not existing:
        return
    if overwrite:
        raise PrepInputError(
            f"--output {output!r} already holds data and --overwrite is refused on an object store: with no rename there, "
            f"the old dataset would be deleted before the new one is complete; write to a new --output prefix, "
            f"or delete the old one yourself first{f' (gsutil -m rm -r {output})' if output.startswith('gs://') else ''}"
        )
    raise PrepInputError(
        f"--output {output!r} already holds data; choose a new --output prefix "
        f"(on an object store distill-prep never replaces data: delete it yourself first to reuse the prefix)"
    )


def check_output(output: str, overwrite: bool, patterns: list[str], files: list[str], tokenizer: str = "") -> None:
    """PrepInputError unless `output` may be written (`claim_output` checks it again when it starts)."""
    try:
        check_apart(output, patterns, files, tokenizer)
        if is_remote(output):
            _check_remote_empty(output, overwrite)
        else:
            check_replaceable(output, overwrite, is_prepared_dataset, KIND)
    except OutputError as exc:
        raise PrepInputError(str(exc)) from None


def _warn_about_leftovers(output: str) -> None:
    """Say so when a killed run left its hidden staging directory (or, killed mid-swap, the previous dataset) beside `output`."""
    stem = os.path.join(glob.escape(os.path.dirname(os.path.abspath(output))), "." + glob.escape(os.path.basename(os.path.abspath(output))))
    found = sorted(glob.glob(stem + ".partial-*") + glob.glob(stem + ".old-*"))
    if found:
        log.warning(
            "found %s beside --output: left by a distill-prep that was killed (or is still running); a .old-* one holds "
            "the dataset it was replacing; delete them when you no longer need them",
            ", ".join(found),
        )


@contextlib.contextmanager
def claim_output(output: str, overwrite: bool, patterns: list[str], files: list[str], tokenizer: str = "") -> Iterator[str]:
    """Check `output` against the rule and yield the directory to write the new dataset into.

    Local: a staging directory beside `output`, moved into place when the block ends without error, else removed.
    Object store: `output` itself (empty), whose objects are deleted again if the block fails.
    Rule violations raise PrepInputError before anything is written.
    """
    check_output(output, overwrite, patterns, files, tokenizer)
    if is_remote(output):
        try:
            yield output
        except BaseException:
            remove_output(output)
            raise
        return
    _warn_about_leftovers(output)
    try:
        with replace_when_complete(output, overwrite, is_prepared_dataset, KIND) as staging:
            yield staging
    except OutputError as exc:
        raise PrepInputError(str(exc)) from None
