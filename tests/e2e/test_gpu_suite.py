"""bench/gpu_suite.sh --smoke: every step of the GPU suite at tiny sizes on a CPU, so the suite cannot rot before a GPU comes.

Checks each step's result file exists and holds sane numbers, that a rerun skips every finished step, and that a
step whose result is missing is run again (resumable)."""

from __future__ import annotations

import json
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = ["a1", "b", "a2", "c", "a3", "a4", "d0", "d1", "d2"]


def _suite(out: str, **env) -> subprocess.CompletedProcess:
    run_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    return subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--smoke", out], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=1800
    )


def _load(out: str, step: str) -> dict:
    with open(os.path.join(out, f"{step}.json")) as handle:
        return json.load(handle)


def _sane_path(summary: dict, name: str) -> dict:
    s = summary[name]
    assert s is not None, name
    assert s["tokens_per_s_per_proc"] > 0 and s["model_tflops_per_proc"] > 0 and s["peak_memory_mb"] > 100, s
    assert 0 <= s["data_wait_share"] < 1 and s["steps"] >= 1, s
    return s


def test_smoke_suite_runs_every_step_and_resumes(tmp_path):
    out = str(tmp_path / "suite")
    proc = _suite(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for step in STEPS:
        assert os.path.exists(os.path.join(out, f"{step}.log")), step
        assert _load(out, step)["step"] == step and not os.path.exists(os.path.join(out, f"{step}.json.tmp"))
    a1 = _load(out, "a1")
    fast, baseline = _sane_path(a1["summary"], "fast"), _sane_path(a1["summary"], "baseline")
    fpt = fast["flops_per_token"]  # teacher and student FLOPs apart and together
    assert fpt["teacher_fwd"] > 0 and fpt["student_fwd_bwd"] > 0 and fpt["total"] >= fpt["teacher_fwd"] + fpt["student_fwd_bwd"]
    assert baseline["tokens_per_s"] > 0
    profiled = a1["summary"]["fast (profiled)"]
    assert profiled["phase_seconds"] and all(v >= 0 for v in profiled["phase_seconds"].values())
    # step_seconds is timed between the probe's optimizer-step stamps, which fall inside the optimizer phase: the phases of the
    # measured steps may exceed that window by up to one optimizer phase (a few ms of a 10 ms smoke step, nothing on a GPU)
    phases = profiled["phase_seconds"]
    assert 0 < sum(phases.values()) <= 1.05 * profiled["step_seconds"] + phases["optimizer"], (phases, profiled["step_seconds"])
    assert a1["memory_estimate"]["total_mib"] > 0 and set(a1["memory_estimate"]["parts_mib"]) >= {"student states", "teacher weights"}
    assert _load(out, "a2")["largest_micro_batch"] == {"fast": 4, "baseline": 4}
    for step in ("a3", "a4"):
        _sane_path(_load(out, step)["summary"], "fast")
    assert _load(out, "a4")["seq"] == 2 * _load(out, "a3")["seq"]
    b = _load(out, "b")
    for variant in ("chunked", "full"):
        _sane_path(b[variant]["summary"], "fast")
        assert b[variant]["memory_estimate"]["total_mib"] > 0
    assert b["chunked"]["memory_estimate"]["parts_mib"]["logit buffers"] != b["full"]["memory_estimate"]["parts_mib"]["logit buffers"]
    c = _load(out, "c")
    assert c["tokens"] > 0 and c["tokens_per_s"] > 0 and 0 < c["bytes_per_token"] < 4096
    assert _load(out, "d2")["quality"]["rows"]
    summary = open(os.path.join(out, "summary.md")).read()
    assert summary.startswith("| step |") and "| a1 |" in summary and "| c |" in summary

    # a rerun skips every finished step; a step whose result is gone runs again
    os.remove(os.path.join(out, "c.json"))
    again = _suite(out, STEPS="a1 c")
    assert again.returncode == 0, again.stdout[-3000:]
    assert "a1: done before" in again.stdout and "c: running" in again.stdout and os.path.exists(os.path.join(out, "c.json"))


def test_a_step_past_its_bound_is_cut_and_leaves_no_result(tmp_path):
    out = str(tmp_path / "suite")
    proc = _suite(out, STEPS="c", BOUND_c="1")
    assert proc.returncode == 1 and "c: FAILED (cut at its bound of 1 s)" in proc.stdout, proc.stdout
    assert not os.path.exists(os.path.join(out, "c.json")) and os.path.exists(os.path.join(out, "summary.md"))
