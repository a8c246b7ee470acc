"""What a run leaves to read: metrics.jsonl after a resume holds each step once (the redone steps with the resumed run's
values, TensorBoard hides the old ones); an output_dir overlapping an input is refused in the validation pass; a cut
validation shard is named by distill-eval."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
from support import assert_one_line_error, cli, metrics, run

from distill.config import ConfigError, load_config

pytestmark = pytest.mark.timeout(900)


def _one_process(teacher_dir, data_dir, out, *extra):
    return run(
        [sys.executable, "-m", "distill", "--config", "configs/distilbert.yaml"]
        + [f"teacher.path={teacher_dir}", f"data.path={data_dir}", f"output_dir={out}", "student.init=random", "student.init_layers=null"]
        + ["train.global_batch=16", "train.micro_batch=8", "train.max_steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=0"]
        + ["train.log_every=1", "deepspeed.config=configs/deepspeed/zero2.json", *extra]
    )


def test_resume_logs_each_step_once_with_the_resumed_values(tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    _one_process(teacher_dir, prepared_dir, out, "train.halt_at_step=6")  # checkpoints 4 and 6, steps 1-6 logged
    assert [m["step"] for m in metrics(out)] == list(range(1, 7))
    os.remove(out / "checkpoints" / "step_00000006" / "COMPLETE")  # as if the save of step 6 was killed: resume redoes 5, 6
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 7, "loss": 1')  # and a line cut by the kill
    before = {m["step"]: m for m in metrics_lines(out)}

    again = _one_process(teacher_dir, prepared_dir, out, "train.profile_phases=true")  # a switch the redone lines show
    assert f"resumed from {out}/checkpoints/step_00000004" in again.stdout + again.stderr
    after = metrics(out)
    assert [m["step"] for m in after] == list(range(1, 9)), "each step exactly once, in order"
    assert all("phase_seconds" not in m for m in after[:4]), "steps up to the checkpoint keep the first run's lines"
    assert [m["tokens_per_s"] for m in after[:4]] == [before[s]["tokens_per_s"] for s in range(1, 5)]
    assert all("phase_seconds" in m for m in after[4:]), "the redone steps 5, 6 hold the resumed run's values"
    assert [m["loss"] for m in after[4:6]] == [before[5]["loss"], before[6]["loss"]], "same data and state: the same losses"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == list(range(1, 9)), "TensorBoard shows each step once too"


def metrics_lines(out):
    import json

    lines = []
    for line in open(out / "metrics.jsonl"):
        try:
            lines.append(json.loads(line))
        except ValueError:
            pass
    return lines


@pytest.mark.parametrize(
    "relation,output,expected",
    [
        ("is", "{data}", "output_dir {out!r} is data.path"),
        ("is inside", "{data}/run", "is inside data.path"),
        ("is inside", "{teacher}/run", "is inside teacher.path"),
        ("contains", "{parent}", "contains data.path"),
    ],
)
def test_output_dir_overlapping_an_input_is_refused(tmp_path, relation, output, expected):
    data, teacher = tmp_path / "inputs" / "data", tmp_path / "teacher"
    data.mkdir(parents=True)
    teacher.mkdir()
    out = output.format(data=data, teacher=teacher, parent=tmp_path / "inputs")
    with pytest.raises(ConfigError) as err:
        load_config("configs/distilbert.yaml", [f"output_dir={out}", f"data.path={data}", f"teacher.path={teacher}"])
    assert expected.format(out=out) in str(err.value) and "choose an output_dir outside every input" in str(err.value)
    assert len([p for p in err.value.problems if "output_dir" in p]) == 1


def test_train_refuses_output_dir_inside_the_data_in_one_line(tmp_path, prepared_dir, teacher_dir):
    out = os.path.join(prepared_dir, "run")
    before = sorted(os.listdir(prepared_dir))
    code, lines = cli(
        "distill-train", "--config", "configs/demo.yaml", f"teacher.path={teacher_dir}", f"data.path={prepared_dir}", f"output_dir={out}"
    )
    assert_one_line_error(code, lines, f"output_dir {out!r} is inside data.path")
    assert sorted(os.listdir(prepared_dir)) == before, "nothing written into the dataset"
    link = tmp_path / "data_link"  # the same directory through a symlink
    link.symlink_to(prepared_dir)
    code, lines = cli(
        "distill-train", "--config", "configs/demo.yaml", f"teacher.path={teacher_dir}", f"data.path={link}", f"output_dir={prepared_dir}/x"
    )
    assert_one_line_error(code, lines, "is inside data.path")


def test_eval_of_a_cut_validation_shard_names_it(tmp_path, prepared_dir, teacher_dir):
    import json

    data = tmp_path / "data"
    shutil.copytree(prepared_dir, data)
    shard = json.load(open(data / "manifest.json"))["splits"]["validation"]["shards"][0]["path"]
    path = data / shard
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.truncate(size // 2)
    code, lines = cli("distill-eval", "--model", teacher_dir, "--data", str(data))
    assert_one_line_error(code, lines, f"shard {path} is not a readable Parquet file", "re-run distill-prep")
