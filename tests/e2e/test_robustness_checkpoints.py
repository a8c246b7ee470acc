"""Nothing lost, nothing executed: checkpoint files that ask for code, damaged checkpoints, outputs that overlap inputs.

Every fault is made for real on a real 2-process DeepSpeed run (ZeRO-1, checkpoints at steps 2, 4, 6); the
crafted files hold a pickle whose `__reduce__` opens (creates) a marker file, and each test first shows that
a plain `torch.load` does run it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys

import pytest
import torch
from support import BIN, run
from support import safetensors_of as _safetensors
from support import train_args as kd_args

pytestmark = pytest.mark.timeout(600)
STEPS = 6


class _OpensMarker:
    """Pickled as `open(marker, "w")`: unpickling it creates the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def craft(path, marker) -> None:
    """Add a code-running object to a real checkpoint file, and show that an unguarded load runs it."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    state["payload"] = _OpensMarker(str(marker))
    torch.save(state, path)
    torch.load(path, map_location="cpu", weights_only=False)
    assert os.path.exists(marker), "the crafted file runs code when loaded with weights_only=False"
    os.remove(marker)


def train_args(teacher_dir, data_dir, out):
    return [
        *kd_args(teacher_dir, data_dir, out),
        "student.init=random",
        "student.init_layers=null",
        "train.global_batch=32",
        "train.micro_batch=8",
        f"train.max_steps={STEPS}",
        "optim.lr=3e-3",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=0",
        "train.log_every=1",
        "deepspeed.config=configs/deepspeed/zero1.json",
    ]


def launch(args, port, check=True):
    return run([os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "--module", "distill"] + args, check=check)


def snapshot(directory) -> dict[str, str]:
    """sha256 of every file under `directory`, by relative path."""
    out = {}
    for here, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(here, name)
            out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def one_line_error(proc, *fragments) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("distill-")]
    assert len(errors) == 1, errors
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def base(tmp_path_factory, teacher_dir, prepared_dir):
    """One uninterrupted run (2 ranks, ZeRO-1, checkpoints at 2, 4, 6) and its final export."""
    home = tmp_path_factory.mktemp("robust")
    out = home / "run"
    launch(train_args(teacher_dir, prepared_dir, out), 29761)
    from distill.tools.export import export_checkpoint

    export_checkpoint(str(out), str(home / "export"))
    return out, _safetensors(str(home / "export"))


def copy_run(base, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(base[0], dest)
    return dest


def tag_dir(run_dir, step):
    return run_dir / "checkpoints" / f"step_{step:08d}"


def test_crafted_checkpoint_file_never_runs_on_export(tmp_path, base):
    run_dir = copy_run(base, tmp_path)
    marker = tmp_path / "PWNED"
    craft(tag_dir(run_dir, 6) / "mp_rank_00_model_states.pt", marker)

    proc = run([os.path.join(BIN, "distill-export"), "--checkpoint", str(run_dir), "--output", str(tmp_path / "export")], check=False)
    one_line_error(proc, "mp_rank_00_model_states.pt is not a plain tensor checkpoint", "io.open", "untrusted")
    assert not marker.exists() and not (tmp_path / "export").exists()

    # DeepSpeed's own loader (zero_to_fp32), called without our check first: refused by the guard, nothing runs
    from distill.tools.export import ExportError, consolidated_state_dict

    with pytest.raises(ExportError, match="not a plain tensor checkpoint"):
        consolidated_state_dict(str(run_dir / "checkpoints"), "step_00000006")
    assert not marker.exists()


def test_crafted_checkpoint_file_never_runs_on_resume(tmp_path, base, teacher_dir, prepared_dir):
    run_dir = copy_run(base, tmp_path)
    marker = tmp_path / "PWNED"
    craft(tag_dir(run_dir, 6) / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    before = snapshot(run_dir / "checkpoints")

    proc = launch(train_args(teacher_dir, prepared_dir, run_dir), 29762, check=False)
    one_line_error(proc, "zero_pp_rank_1_mp_rank_00_optim_states.pt is not a plain tensor checkpoint", "move")
    assert not marker.exists()
    assert snapshot(run_dir / "checkpoints") == before, "a crafted checkpoint is neither loaded nor skipped nor moved"


def test_crafted_checkpoint_file_never_runs_in_universal_conversion(tmp_path, base):
    from deepspeed.checkpoint import ds_to_universal

    from distill.checkpoints import layout as ckpt
    from distill.checkpoints import safe_load

    run_dir = copy_run(base, tmp_path)
    root = str(run_dir / "checkpoints")
    marker = tmp_path / "PWNED"
    craft(tag_dir(run_dir, 6) / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(ckpt.UntrustedCheckpointError, match="zero_pp_rank_0_mp_rank_00_optim_states.pt is not a plain tensor checkpoint"):
        ckpt.universal_checkpoint(root, "step_00000006")
    assert not marker.exists() and not os.path.exists(os.path.join(root, "universal", "step_00000006"))

    # DeepSpeed's converter itself (without the wrapper's check first) under the guard: refused, nothing runs
    sys_argv = sys.argv
    sys.argv = [
        "ds_to_universal",
        "--input_folder",
        str(tag_dir(run_dir, 6)),
        "--output_folder",
        str(tmp_path / "uni"),
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    try:
        args = ds_to_universal.parse_arguments()
    finally:
        sys.argv = sys_argv
    with pytest.raises(Exception, match="Weights only load failed"):
        with safe_load.guard():
            ds_to_universal.main(args)
    assert not marker.exists()

    # a finished conversion whose files were replaced afterwards is refused when it is reused
    universal_root = ckpt.universal_checkpoint(root, "step_00000004")
    fp32 = next(p for p in (tmp_path / "run" / "checkpoints" / "universal" / "step_00000004" / "zero").rglob("fp32.pt"))
    craft(fp32, marker)
    with pytest.raises(ckpt.UntrustedCheckpointError, match="fp32.pt is not a plain tensor checkpoint"):
        ckpt.universal_checkpoint(root, "step_00000004")
    assert not marker.exists() and universal_root == os.path.join(root, "universal")


def test_damaged_newest_checkpoints_fall_back_loudly_and_training_continues(tmp_path, base, teacher_dir, prepared_dir):
    run_dir = copy_run(base, tmp_path)
    shard = tag_dir(run_dir, 6) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with open(shard, "r+b") as handle:  # a shard cut short (disk full, a copy that died)
        handle.truncate(os.path.getsize(shard) // 2)
    (tag_dir(run_dir, 4) / "trainer_state.json").write_text('{"step": 4, "samples_')  # half-written JSON

    proc = launch(train_args(teacher_dir, prepared_dir, run_dir), 29763)
    log = proc.stdout + proc.stderr
    assert "CHECKPOINT DAMAGED" in log and "zero_pp_rank_1_mp_rank_00_optim_states.pt is damaged" in log
    assert "trainer_state.json is not valid JSON" in log
    assert f"resumed from {run_dir}/checkpoints/step_00000002" in log
    kept = sorted(n for n in os.listdir(run_dir / "checkpoints") if ".damaged-" in n)
    assert [n.split(".")[0] for n in kept] == ["step_00000004", "step_00000006"], "the damaged ones are kept aside, not deleted"
    assert open(run_dir / "checkpoints" / "latest").read() == "step_00000006"

    from distill.tools.export import export_checkpoint

    export_checkpoint(str(run_dir), str(tmp_path / "export"))
    got, ref = _safetensors(str(tmp_path / "export")), base[1]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), "same weights as the uninterrupted run"


def flip_a_bit_in_a_tensor(path) -> None:
    """Bit rot: one bit in the middle of the largest tensor record (the archive and the pickle stay valid)."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    with open(path, "r+b") as handle:
        handle.seek(info.header_offset)
        name_len, extra_len = struct.unpack("<HH", handle.read(30)[26:30])
        handle.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, 1)
        handle.write(bytes([byte ^ 0x01]))


def test_bit_rot_missing_rank_file_empty_file_fall_back_or_stop(tmp_path, base, caplog):
    from distill.checkpoints import layout as ckpt
    from distill.checkpoints import safe_load

    run_dir = copy_run(base, tmp_path)
    root = str(run_dir / "checkpoints")
    shard6 = tag_dir(run_dir, 6) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    flip_a_bit_in_a_tensor(shard6)
    safe_load.load(str(shard6))  # torch itself loads it without complaint: only the CRC-32 check finds it
    os.remove(tag_dir(run_dir, 4) / "zero_pp_rank_1_mp_rank_00_optim_states.pt")  # one rank's shard never arrived
    (tag_dir(run_dir, 2) / "mp_rank_00_model_states.pt").write_bytes(b"")
    before = sorted(os.listdir(root))
    with pytest.raises(ckpt.CheckpointError, match="no loadable checkpoint") as err:
        ckpt.latest_loadable(root)
    assert (
        "Bad CRC-32" in str(err.value) and "optim_states.pt is missing" in str(err.value) and "model_states.pt is empty" in str(err.value)
    )
    assert sorted(os.listdir(root)) == before, "nothing is moved when there is nothing to fall back to"

    shutil.copy(tag_dir(base[0], 2) / "mp_rank_00_model_states.pt", tag_dir(run_dir, 2) / "mp_rank_00_model_states.pt")
    with caplog.at_level(logging.WARNING, logger="distill.checkpoints.layout"):
        assert ckpt.latest_loadable(root) == (2, "step_00000002")
    assert caplog.text.count("CHECKPOINT DAMAGED") == 2 and "Bad CRC-32" in caplog.text and "is missing" in caplog.text
    assert sorted(n.split(".")[0] for n in os.listdir(root) if ".damaged-" in n) == ["step_00000004", "step_00000006"]

    json.dump({"step": 2}, open(tag_dir(run_dir, 2) / "trainer_state.json", "w"))
    assert "lacks samples_consumed, world_size, zero_stage, config" in ckpt.checkpoint_problem(root, "step_00000002")


def test_export_into_the_run_it_reads_is_refused_and_the_run_is_intact(tmp_path, base):
    from distill.tools.export import export_checkpoint
    from kd_common.output_rule import OutputError

    run_dir = copy_run(base, tmp_path)
    before = snapshot(run_dir)
    proc = run([os.path.join(BIN, "distill-export"), "--checkpoint", str(run_dir), "--output", str(run_dir), "--overwrite"], check=False)
    one_line_error(proc, "must not overlap an input")
    for checkpoint, output in (
        (run_dir, run_dir / "checkpoints"),
        (tag_dir(run_dir, 6), run_dir),
        (tag_dir(run_dir, 6), tag_dir(run_dir, 6) / "export"),
        (run_dir / "checkpoints", run_dir / "checkpoints" / "step_00000008"),
    ):
        with pytest.raises(OutputError, match="must not overlap an input"):
            export_checkpoint(str(checkpoint), str(output), overwrite=True)
    assert snapshot(run_dir) == before

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    proc = run([os.path.join(BIN, "distill-export"), "--checkpoint", str(run_dir), "--output", str(precious), "--overwrite"], check=False)
    one_line_error(proc, "not a distill-export output")
    assert os.listdir(precious) == ["notes.txt"]


def test_failed_export_with_overwrite_keeps_the_previous_export(tmp_path, base):
    from distill.tools.export import ExportError, export_checkpoint

    run_dir = copy_run(base, tmp_path)
    out = tmp_path / "model"
    export_checkpoint(str(tag_dir(run_dir, 4)), str(out))
    before = snapshot(out)
    config = tag_dir(run_dir, 6) / "hf_config" / "config.json"  # a checkpoint whose config does not match its weights
    data = json.loads(config.read_text())
    data["n_layers"] += 1
    config.write_text(json.dumps(data))
    with pytest.raises(ExportError, match="lacks weights"):
        export_checkpoint(str(run_dir), str(out), overwrite=True)
    assert snapshot(out) == before and json.load(open(out / "distill_provenance.json"))["step"] == 4
    assert sorted(os.listdir(tmp_path)) == ["model", "run"], "no staging directory is left behind"

    export_checkpoint(str(tag_dir(run_dir, 2)), str(out), overwrite=True)  # a good one replaces it
    assert json.load(open(out / "distill_provenance.json"))["step"] == 2


def test_finetune_and_eval_outputs_never_overwrite_their_inputs(tmp_path, tokenizer_dir, prepared_dir, capsys):
    from distill.tools.demo_assets import save_random_bert_teacher
    from distill.tools.finetune import main as finetune_main

    model = str(tmp_path / "model")
    save_random_bert_teacher(tokenizer_dir, model, layers=1, hidden=32, heads=2, intermediate=64, max_positions=64)
    tsv = tmp_path / "train.tsv"
    tsv.write_text("".join(f"{'good' if i % 2 else 'bad'} film number {i}\t{i % 2}\n" for i in range(40)))
    before = snapshot(model)
    common = ["--model", model, "--train", str(tsv), "--epochs", "1", "--batch-size", "8", "--device", "cpu"]

    def refused(argv, fragment):
        assert finetune_main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("distill-")]
        assert len(err) == 1 and fragment in err[0], err

    refused(common + ["--output", model], "--output")
    refused(common + ["--output", model, "--overwrite"], "must not overlap an input")
    refused(common + ["--output", os.path.join(model, "finetuned")], "must not overlap an input")
    refused(common + ["--output", str(tmp_path / "o"), "--json", os.path.join(model, "r.json")], "--json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "n.txt").write_text("mine")
    refused(common + ["--output", str(tmp_path / "notes"), "--overwrite"], "not a distill-finetune output")
    proc = run(
        [os.path.join(BIN, "distill-eval"), "--model", model, "--data", prepared_dir, "--json", os.path.join(prepared_dir, "eval.json")],
        check=False,
    )
    one_line_error(proc, "--json", "must not overlap an input")
    assert snapshot(model) == before and os.listdir(tmp_path / "notes") == ["n.txt"]
    assert not os.path.exists(os.path.join(prepared_dir, "eval.json"))

    out = str(tmp_path / "o")
    assert finetune_main(common + ["--output", out, "--no-save-model"]) == 0
    capsys.readouterr()
    refused(common + ["--output", out], "already holds data")
    assert finetune_main(common + ["--output", out, "--overwrite"]) == 0  # its own earlier result: replaced
    assert os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "eval_results.json"))
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
