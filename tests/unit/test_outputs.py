"""The output-directory rule shared by every command (kd_common/output_rule.py), on real directories."""

from __future__ import annotations

import os

import pytest

from kd_common.output_rule import OutputError, check_no_overlap, overlap, replace_when_complete


def _ours(path: str) -> bool:
    return os.path.exists(os.path.join(path, "MARK"))


def _write_result(directory: str, text: str) -> None:
    with open(os.path.join(directory, "MARK"), "w") as handle:
        handle.write(text)


def test_overlap_is_found_in_every_direction_and_through_symlinks(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    link = tmp_path / "link"
    link.symlink_to(corpus)
    assert overlap(str(corpus), str(corpus)) == "is"
    assert overlap(str(corpus / "sub"), str(corpus)) == "is inside"
    assert overlap(str(tmp_path), str(corpus)) == "contains"
    assert overlap(str(link / "out"), str(corpus)) == "is inside"
    assert overlap(str(tmp_path / "corpus2"), str(corpus)) is None  # a shared prefix is not nesting
    with pytest.raises(OutputError, match="--output .* is inside --input"):
        check_no_overlap(str(corpus / "prepared"), [("--input", str(corpus))])
    check_no_overlap(str(tmp_path / "elsewhere"), [("--input", str(corpus)), ("--tokenizer", "")])


def test_new_output_is_published_only_when_complete(tmp_path):
    out = tmp_path / "out"
    with replace_when_complete(str(out), False, _ours, "result") as staging:
        _write_result(staging, "new")
        assert not out.exists()  # nothing visible under the final name while writing
    assert (out / "MARK").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind


def test_failed_run_keeps_the_old_output_and_leaves_no_staging(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write_result(str(out), "old")
    with pytest.raises(RuntimeError, match="boom"):
        with replace_when_complete(str(out), True, _ours, "result") as staging:
            _write_result(staging, "half")
            raise RuntimeError("boom")
    assert (out / "MARK").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_overwrite_replaces_only_our_kind_and_only_when_asked(tmp_path):
    ours = tmp_path / "ours"
    ours.mkdir()
    _write_result(str(ours), "old")
    with pytest.raises(OutputError, match="already holds data; .*--overwrite"):
        with replace_when_complete(str(ours), False, _ours, "result"):
            pass
    with replace_when_complete(str(ours), True, _ours, "result") as staging:
        _write_result(staging, "new")
    assert (ours / "MARK").read_text() == "new"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("only copy")
    with pytest.raises(OutputError, match="not a result; --overwrite replaces only a result"):
        with replace_when_complete(str(foreign), True, _ours, "result"):
            pass
    assert (foreign / "thesis.tex").read_text() == "only copy"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_empty_directory_and_file_outputs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with replace_when_complete(str(empty), False, _ours, "result") as staging:
        _write_result(staging, "new")
    assert (empty / "MARK").read_text() == "new"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        with replace_when_complete(str(a_file), True, _ours, "result"):
            pass


def test_output_inside_input_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint").write_text("weights")
    with pytest.raises(OutputError, match="is --checkpoint"):
        with replace_when_complete(str(run), True, lambda p: True, "model", inputs=[("--checkpoint", str(run))], output_name="--output"):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert (run / "checkpoint").read_text() == "weights"
