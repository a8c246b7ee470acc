"""Identity by content (issue 23, item 1), in process: twin teachers (same config and file sizes) differ only in their
weights' sha256, the fingerprint follows one tensor byte and not touch/copy/move, an older run.json resumes with a
warning (the refusals by the real commands: tests/e2e/test_identity_by_content.py)."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

from distill.checkpoints import layout as ckpt
from distill.models import fingerprint as fp


def flip_tensor_byte(path: str) -> None:
    """Change one byte of a safetensors file's tensor data (past its header), keeping its size and mtime."""
    before = os.stat(path)
    with open(path, "r+b") as handle:
        header = struct.unpack("<Q", handle.read(8))[0]
        handle.seek(8 + header + 5)
        byte = handle.read(1)
        handle.seek(8 + header + 5)
        handle.write(bytes([byte[0] ^ 0x01]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same size and mtime: only the content differs


def test_twins_differ_only_in_content_and_the_old_fingerprint_cannot_tell(twin_teachers):
    from distill.teachers.online import OnlineTeacher

    a, b = twin_teachers
    assert open(os.path.join(a, "config.json"), "rb").read() == open(os.path.join(b, "config.json"), "rb").read()
    assert {n: os.path.getsize(os.path.join(a, n)) for n in fp.identity_files(a)} == {
        n: os.path.getsize(os.path.join(b, n)) for n in fp.identity_files(b)
    }
    assert OnlineTeacher(None, a).fingerprint() == OnlineTeacher(None, b).fingerprint()  # what let issue 23 resume
    assert fp.content_sha256(a) != fp.content_sha256(b)


def test_fingerprint_follows_one_tensor_byte_not_touch_copy_or_move(twin_teachers, tmp_path):
    model = str(tmp_path / "m")
    shutil.copytree(twin_teachers[0], model)
    first = fp.content_identity(model)
    assert first["sha256"] == fp.content_sha256(twin_teachers[0])  # a copy is the same model
    weights = os.path.join(model, "model.safetensors")
    os.utime(weights, ns=(1, 1))  # touched: stat changed, so hashed again, and the same
    fp._MEMO.clear()
    again = fp.content_identity(model, first["files"])
    assert again["sha256"] == first["sha256"] and again["files"]["model.safetensors"]["mtime_ns"] == 1
    moved = str(tmp_path / "moved")
    os.rename(model, moved)
    assert fp.content_sha256(moved, again["files"]) == first["sha256"]
    # one tensor byte, same size and mtime restored: ctime moved, so the recorded hash is not reused
    flip_tensor_byte(os.path.join(moved, "model.safetensors"))
    changed = fp.content_identity(moved, again["files"])
    assert changed["sha256"] != first["sha256"]
    assert fp.differing_files(again["files"], changed["files"]) == ["model.safetensors"]
    # an unchanged file keeps its recorded hash without being read (a record with a wrong hash is believed: proof it is reused)
    forged = {n: dict(r, sha256="0" * 64) for n, r in changed["files"].items()}
    fp._MEMO.clear()
    assert fp.content_identity(moved, forged)["files"]["model.safetensors"]["sha256"] == "0" * 64


def test_a_run_json_without_the_content_key_resumes_with_a_warning_then_records_it(twin_teachers, tmp_path, caplog):
    from distill.config import Config

    teacher = str(tmp_path / "teacher")
    shutil.copytree(twin_teachers[0], teacher)
    identity = ckpt.run_identity(Config().to_dict(), "sha")
    out = tmp_path / "run"
    (out / ckpt.CHECKPOINTS / ckpt.tag_for(3)).mkdir(parents=True)
    ckpt.mark_complete(str(out / ckpt.CHECKPOINTS / ckpt.tag_for(3)))
    (out / ckpt.RUN_FILE).write_text(json.dumps({"identity": identity}))  # an older version's run.json
    assert ckpt.claim_output_dir(str(out), identity, teacher) is True
    assert "predates content fingerprints" in caplog.text
    record = json.loads((out / ckpt.RUN_FILE).read_text())
    assert record["identity"][ckpt.CONTENT_KEY] == fp.content_sha256(twin_teachers[0]) and "model.safetensors" in record["teacher_files"]
    shutil.rmtree(teacher)
    shutil.copytree(twin_teachers[1], teacher)
    with pytest.raises(ckpt.CheckpointError, match="holds a run of another teacher"):
        ckpt.claim_output_dir(str(out), identity, teacher)
