"""Run identity: what lets a rerun resume an output_dir, and what makes it refuse."""

from __future__ import annotations

import json
import os

import pytest

from distill.checkpoints import layout as ckpt
from distill.config import Config


def _claim_after(tmp_path, previous: dict, now: dict) -> bool:
    """Claim a run directory that holds `previous`'s run.json and one complete checkpoint of it."""
    with open(os.path.join(tmp_path, ckpt.RUN_FILE), "w") as handle:
        json.dump({"identity": previous}, handle)
    step = os.path.join(tmp_path, ckpt.CHECKPOINTS, ckpt.tag_for(4))
    os.makedirs(step, exist_ok=True)
    ckpt.mark_complete(step)
    return ckpt.claim_output_dir(str(tmp_path), now)


def test_an_attempt_that_never_wrote_a_checkpoint_gives_way_to_corrected_settings(tmp_path):
    base = Config().to_dict()
    old, new = ckpt.run_identity(base, "sha"), ckpt.run_identity(dict(base, optim=dict(base["optim"], lr=1e-4)), "sha")
    with open(os.path.join(tmp_path, ckpt.RUN_FILE), "w") as handle:
        json.dump({"identity": old}, handle)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    assert ckpt.claim_output_dir(str(tmp_path), new) is False  # nothing to resume: a fresh start under the new settings
    assert json.load(open(tmp_path / ckpt.RUN_FILE))["identity"] == new
    kept = [os.path.join(d, f) for d, _, files in os.walk(tmp_path / "abandoned") for f in files]
    assert len(kept) == 1 and open(kept[0]).read() == '{"step": 1}\n'  # its logs are kept aside, not deleted


def test_a_key_added_by_a_newer_version_counts_as_its_default_in_older_runs(tmp_path):
    now = ckpt.run_identity(Config().to_dict(), "sha")
    older = {k: v for k, v in now.items() if k != "data.length_group_steps"}  # written before the key existed
    assert _claim_after(tmp_path, older, now) is True
    changed = dict(now, **{"data.length_group_steps": 16})
    with pytest.raises(ckpt.CheckpointError, match=r"data.length_group_steps: 1 -> 16"):
        _claim_after(tmp_path, older, changed)


def test_restartable_keys_may_change_but_what_is_learned_may_not(tmp_path):
    base = Config().to_dict()
    a = ckpt.run_identity(base, "sha")
    b = ckpt.run_identity(dict(base, train=dict(base["train"], micro_batch=4, log_every=1, activation_checkpointing=1)), "sha")
    assert _claim_after(tmp_path, a, b) is True
    with pytest.raises(ckpt.CheckpointError, match="data.manifest_sha256"):
        _claim_after(tmp_path, a, ckpt.run_identity(base, "other"))
    with pytest.raises(ckpt.CheckpointError, match="optim.lr"):
        _claim_after(tmp_path, a, ckpt.run_identity(dict(base, optim=dict(base["optim"], lr=1.0)), "sha"))


def test_a_fresh_directory_with_launcher_logs_is_claimed_but_foreign_files_are_refused(tmp_path):
    ident = ckpt.run_identity(Config().to_dict(), "sha")
    fresh = tmp_path / "fresh"
    (fresh / "logs").mkdir(parents=True)
    assert ckpt.claim_output_dir(str(fresh), ident) is False and (fresh / ckpt.RUN_FILE).exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ckpt.CheckpointError, match="not a run of this tool"):
        ckpt.claim_output_dir(str(foreign), ident)
    assert (foreign / "notes.txt").read_text() == "mine"
