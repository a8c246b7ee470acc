"""An incomplete checkpoint is never the latest, in process (distill-train's bad-input refusals: tests/e2e/test_train_bad_input.py)."""

from __future__ import annotations

import os

import pytest


def test_incomplete_checkpoint_is_never_latest(tmp_path):
    from distill.checkpoints import layout as ckpt

    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        d = root / ckpt.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            ckpt.mark_complete(str(d))
    assert ckpt.latest_complete(str(root)) == (4, "step_00000004")
    with pytest.raises(ckpt.CheckpointError, match="incomplete"):
        ckpt.resolve_checkpoint(str(root / "step_00000006"))
    assert ckpt.resolve_checkpoint(str(tmp_path)) == (str(root), "step_00000004")
    ckpt.prune(str(root), keep_last=1)
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000006"]
