"""`distill-train --check`: the resolved config and every problem a start would hit, from configs only, in one pass."""

from __future__ import annotations

import os
import subprocess

import yaml
from support import BIN, ENV, REPO_ROOT, train_args

TRAIN = os.path.join(BIN, "distill-train")


def check(*argv):
    return subprocess.run([TRAIN, "--check", *argv], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def test_a_good_recipe_prints_its_resolved_config_and_writes_nothing(tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    proc = check(
        *train_args(teacher_dir, prepared_dir, out),
        "student.init_layers=null",
        "--train.global-batch",
        "32",
        "--train.micro-batch",
        "8",
        "--world-size",
        "2",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    resolved = yaml.safe_load(proc.stdout.split("no problems found")[0])
    assert resolved["train"]["global_batch"] == 32 and resolved["loss"]["weights"] == {"ce": 5.0, "mlm": 2.0, "cos": 1.0}
    assert "no problems found for 2 ranks" in proc.stdout
    assert not out.exists()


def test_every_problem_at_once_before_any_weight_loads(tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    # four independent problems: batch sizes for 2 ranks, init layers beyond the 4-layer teacher, a loss that needs the
    # teacher's width from a narrower student, and a DeepSpeed JSON that does not exist
    proc = check(
        *train_args(teacher_dir, prepared_dir, out),
        "train.global_batch=24",
        "train.micro_batch=8",
        "student.init_layers=[0, 9]",
        "deepspeed.config=missing.json",
        "--world-size",
        "2",
    )
    assert proc.returncode == 2
    problems = proc.stdout.split("problems (2 ranks):")[1]
    for part in (
        "train.global_batch=24 is not divisible by train.micro_batch=8 x 2 ranks",
        "deepspeed.config 'missing.json' does not exist",
        "student.init_layers: teacher layers [9] out of range for a 4-layer teacher",
    ):
        assert part in problems, (part, proc.stdout)
    narrow = check(
        *train_args(teacher_dir, prepared_dir, out),
        "student.init=random",
        "student.init_layers=null",
        "student.hidden_size=32",
        "student.num_heads=2",
        "student.intermediate_size=64",
    )
    assert narrow.returncode == 2 and "loss 'cos' compares hidden states directly and needs the teacher's width 64" in narrow.stdout
    assert not out.exists()


def test_config_problems_are_listed_one_per_line(tmp_path):
    proc = check("output_dir=o", "data.path=d", "optim.lr=2", "loss.temperature=.nan", "train.global_bach=3")
    assert proc.returncode == 2
    lines = [line.strip() for line in proc.stdout.splitlines() if line.strip().startswith("- ")]
    assert any("optim.lr=2 is out of range" in line for line in lines)
    assert any("loss.temperature=nan is not a finite number" in line for line in lines)
    assert any("unknown config key train.global_bach (did you mean train.global_batch?)" in line for line in lines)
