"""One process at ZeRO-1/2 (issue 16): DeepSpeed runs a lean ZeRO-1 underneath (deepspeed.lean_single_process: no gradient
hooks or buckets in backward, all-reduces skipped), yet learns exactly what the configured engine learns, and its
checkpoints resume bit for bit with the switch on or off and convert to a universal checkpoint (elastic resume)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import train_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
ENV.pop("WORLD_SIZE", None)
pytestmark = pytest.mark.timeout(900)


def _run(teacher_dir, prepared_dir, out, *extra) -> subprocess.CompletedProcess:
    """distill-train, one process, on the small run every test here uses; `extra` overrides it."""
    cmd = [
        sys.executable,
        "-m",
        "distill",
        *train_args(teacher_dir, prepared_dir, out, config=os.path.join(REPO, "configs", "demo.yaml")),
        "train.max_steps=6",
        "train.micro_batch=2",
        "train.global_batch=4",
        "student.num_layers=1",
        "student.init_layers=null",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=0",
        "train.log_every=1000",
        "loss.ce_positions=all",
        *extra,
    ]
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)


def _train(teacher_dir, prepared_dir, out, *extra) -> str:
    proc = _run(teacher_dir, prepared_dir, out, *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def _same(a: list[dict], b: list[dict]) -> bool:
    keys = ("loss", "loss_ce", "loss_mlm", "loss_cos", "grad_norm", "lr")
    return len(a) == len(b) and all(x[k] == y[k] for x, y in zip(a, b) for k in keys)


def test_lean_single_process_learns_what_zero2_learns_and_resumes_exactly_across_the_switch(tmp_path, teacher_dir, prepared_dir):
    lean, plain = tmp_path / "lean", tmp_path / "plain"
    log = _train(teacher_dir, prepared_dir, lean)
    assert "DeepSpeed ZeRO-2" in log  # the configured stage is what the run reports and its checkpoints record
    _train(teacher_dir, prepared_dir, plain, "deepspeed.lean_single_process=false")
    assert _same(_metrics(lean), _metrics(plain)), "the lean 1-process engine must compute what ZeRO-2 computes, bit for bit"
    with open(lean / "checkpoints" / "step_00000003" / "trainer_state.json") as handle:
        assert json.load(handle)["zero_stage"] == 2
    # halt at step 3 (lean), resume the rest with the switch off, and the other way round: the straight runs' numbers
    for first, then, straight in (("true", "false", lean), ("false", "true", plain)):
        out = tmp_path / f"resume_{first}"
        _train(teacher_dir, prepared_dir, out, f"deepspeed.lean_single_process={first}", "train.halt_at_step=3")
        log = _train(teacher_dir, prepared_dir, out, f"deepspeed.lean_single_process={then}")
        assert "resumed from" in log and "universal" not in log
        assert _same(_metrics(out), _metrics(straight))


def test_lean_single_process_checkpoint_converts_for_an_elastic_resume(tmp_path, teacher_dir, prepared_dir):
    out = tmp_path / "run"
    _train(teacher_dir, prepared_dir, out, "train.halt_at_step=3")
    log = _train(teacher_dir, prepared_dir, out, "deepspeed.zero_stage=3")  # another stage: through DeepSpeed's universal checkpoint
    assert "through a universal checkpoint" in log and "resumed from" in log
    assert len(_metrics(out)) == 6


def test_lean_single_process_skips_a_non_finite_update_as_zero2_does(tmp_path, teacher_dir, prepared_dir):
    """The deferred update (its gradient norm read with the step's sums, DeepSpeed's own reads skipped when it is finite) still
    leaves the weights untouched when the norm is not finite, and the non-finite guard counts and reports the skip."""
    from support import blow_up_weights as _blow_up_weights

    out = tmp_path / "run"
    _train(teacher_dir, prepared_dir, out, "train.halt_at_step=3")
    _blow_up_weights(str(out), "step_00000003")
    proc = _run(teacher_dir, prepared_dir, out, "train.max_nonfinite_steps=2")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "skipped this update (1 of train.max_nonfinite_steps=2" in proc.stderr
    assert "step 6: loss term" in proc.stderr and "train.max_nonfinite_steps=2 skips are used up" in proc.stderr, proc.stderr[-1500:]
    rows = _metrics(out)[-3:]
    assert [r["step"] for r in rows] == [4, 5, 6] and all(r.get("skipped_update") for r in rows[:2])
    assert all(r["grad_norm"] == float("inf") for r in rows)
    assert "step_00000006" not in os.listdir(out / "checkpoints")  # nothing saved after the bad steps


def test_bf16_on_a_cpu_with_native_bf16_trains_like_fp32_and_is_refused_elsewhere(tmp_path, teacher_dir, prepared_dir):
    """train.precision=bf16 / teacher.dtype=bf16 on a CPU: allowed where the CPU multiplies bf16 in hardware (AVX512-BF16, AMX),
    where it is several times faster than fp32 (README Performance); the run's losses follow fp32's. Elsewhere: one line, exit 2."""
    from distill.models.build import cpu_has_native_bf16

    bf16 = ("train.precision=bf16", "teacher.dtype=bf16")
    if not cpu_has_native_bf16():
        proc = _run(teacher_dir, prepared_dir, tmp_path / "refused", *bf16)
        assert proc.returncode == 2 and "AVX512-BF16 or AMX" in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "refused").exists()
        return
    _train(teacher_dir, prepared_dir, tmp_path / "fp32")
    log = _train(teacher_dir, prepared_dir, tmp_path / "bf16", *bf16)
    assert "precision bfloat16" in log
    fp32, half = _metrics(tmp_path / "fp32"), _metrics(tmp_path / "bf16")
    assert len(half) == len(fp32) == 6
    for a, b in zip(fp32, half):  # same weights, batches and masks: bf16 rounding only
        assert abs(a["loss"] - b["loss"]) <= 0.03 * abs(a["loss"]), (a["loss"], b["loss"])
