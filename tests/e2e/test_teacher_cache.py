"""The teacher-logit cache (issue 18): distill-cache on the Beam local runner with worker processes, its output
checked against the teacher run here; 1 vs 2 workers byte-identical; the sparse losses equal the dense ones at k =
vocabulary; a 2-process DeepSpeed run from the cache has the online run's per-step losses; the refusals."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from support import BIN, cache, cli, losses, save_teacher, train_args
from support import assert_one_line_error_of as assert_one_line_error
from support import deepspeed_recipe as deepspeed
from support import run_log as run  # noqa: F401

pytestmark = pytest.mark.timeout(900)
TINY = [
    "train.global_batch=8",
    "train.micro_batch=4",
    "train.log_every=1",
    "optim.warmup_fraction=0.0",
    "optim.lr=3e-3",
    "deepspeed.config=configs/deepspeed/zero2.json",
    "student.dropout=0.0",
    "train.max_steps=4",
    "checkpoint.every_steps=4",
]


def teacher_log_probs(assets, row: tuple, temperature: float) -> torch.Tensor:
    """The teacher's log-softmax over the tokenizer's vocabulary at every position of one row (ids, document starts),
    computed directly: each document of the row run alone, as the cache (and training) keep them apart."""
    from transformers import AutoModelForCausalLM

    ids, starts = row
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float32).eval()
    cuts = [0] + [i for i in range(1, len(ids)) if starts[i]] + [len(ids)]
    with torch.no_grad():
        logits = torch.cat([model(input_ids=torch.as_tensor(ids[a:b])[None]).logits[0] for a, b in zip(cuts, cuts[1:])])
    return torch.log_softmax(logits[:, : assets["vocab"]] / temperature, -1)


def data_rows(assets, split="train"):
    """(token ids, document-start flags) of every row of `split`, in dataset order."""
    manifest = json.load(open(os.path.join(assets["data"], "manifest.json")))
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        table = pq.read_table(os.path.join(assets["data"], shard["path"]))
        rows += zip(table.column("input_ids").to_pylist(), table.column("doc_start").to_pylist())
    return rows


def cache_rows(out):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    tables = [pq.read_table(os.path.join(out, p["path"])) for p in manifest["parts"]]
    return manifest, {c: sum((t.column(c).to_pylist() for t in tables), []) for c in tables[0].column_names}


def test_topk_cache_with_two_workers_matches_the_teacher_and_one_worker(assets, tmp_path):
    two = tmp_path / "two"
    log = cache(assets, two, "--workers", "2", "--k", "8", "--temperature", "2.0").stdout
    assert "bytes per token" in log
    manifest, cols = cache_rows(two)
    rows = data_rows(assets)
    assert manifest["mode"] == "topk" and manifest["k"] == 8 and manifest["value_dtype"] == "float16" and len(cols["indices"]) == len(rows)
    assert manifest["dataset"]["rows"] == len(rows) and len(manifest["parts"]) > 2
    several = [r for r, (_, starts) in enumerate(rows) if sum(starts[1:]) >= 1]  # rows holding two documents or more
    for r in (several[0], several[len(several) // 2], len(rows) - 1):  # reopened rows against the teacher run here
        ids = np.asarray(rows[r][0])
        lp = teacher_log_probs(assets, rows[r], 2.0)
        top = torch.topk(lp, 8, -1)
        got_idx = np.asarray(cols["indices"][r]).reshape(len(ids), 8)
        got_val = np.asarray(cols["values"][r], dtype=np.float32).reshape(len(ids), 8)
        assert np.array_equal(got_idx, np.sort(top.indices.numpy(), -1))
        want = lp.gather(1, torch.as_tensor(got_idx, dtype=torch.long)).numpy()
        np.testing.assert_allclose(got_val, want, atol=2e-2, rtol=2e-3)  # float16
        tail = 1 - top.values.exp().sum(-1).numpy()
        np.testing.assert_allclose(np.asarray(cols["tail"][r], dtype=np.float32), tail, atol=1e-3)
    one = tmp_path / "one"
    cache(assets, one, "--workers", "1", "--k", "8", "--temperature", "2.0")
    m1 = json.load(open(one / "manifest.json"))
    assert [p["sha256"] for p in m1["parts"]] == [p["sha256"] for p in manifest["parts"]], "1 and 2 workers wrote different shards"


def test_sampled_cache_is_worker_count_independent_and_draws_from_the_teacher(assets, tmp_path):
    outs = []
    for workers in ("1", "2"):
        outs.append(tmp_path / f"w{workers}")
        cache(assets, outs[-1], "--workers", workers, "--mode", "sampled", "--n", "32", "--seed", "7")
    m = [json.load(open(o / "manifest.json")) for o in outs]
    assert [p["sha256"] for p in m[0]["parts"]] == [p["sha256"] for p in m[1]["parts"]]
    _, cols = cache_rows(outs[0])
    row = data_rows(assets)[0]
    ids = np.asarray(row[0])
    lp = teacher_log_probs(assets, row, 1.0)
    draws = np.asarray(cols["indices"][0]).reshape(len(ids), 32)
    values = np.asarray(cols["values"][0], dtype=np.float32).reshape(len(ids), 32)
    np.testing.assert_allclose(values, lp.gather(1, torch.as_tensor(draws, dtype=torch.long)).numpy(), atol=2e-2, rtol=2e-3)
    # draws follow the teacher: the mean log-probability of the draws is near minus the entropy (32 x 48 draws)
    entropy = -(lp.exp() * lp).sum(-1).mean().item()
    assert abs(values.mean() + entropy) < 0.25, (values.mean(), entropy)


COMMON = ["loss.temperature=2.0", "loss.weights={jsd: 1.0, clm: 1.0}", "loss.jsd_beta=0.3"] + TINY


@pytest.fixture(scope="module")
def cached_run(assets, tmp_path_factory):
    """k = vocabulary, 32-bit values, 2 workers; a 2-process DeepSpeed run from it (4 steps)."""
    root = tmp_path_factory.mktemp("cached_run")
    out = root / "full"
    cache(assets, out, "--workers", "2", "--k", str(assets["vocab"]), "--value-bits", "32", "--temperature", "2.0")
    run_dir = str(root / "cached")
    log = deepspeed(
        "llm_kd",
        [
            *train_args(assets["teacher"], assets["data"], run_dir, config=None),
            "teacher.source=cache",
            f"teacher.cache={out}",
        ]
        + COMMON,
        29781,
    )
    assert "no teacher model in memory" in log
    return out, run_dir


def test_training_from_a_full_cache_equals_the_online_teacher_per_step(assets, cached_run, tmp_path):
    """k = vocabulary, 32-bit values: a 2-process DeepSpeed run from the cache has the online run's losses (1e-5)."""
    _, cached = cached_run
    online = str(tmp_path / "online")
    deepspeed("llm_kd", [*train_args(assets["teacher"], assets["data"], online, config=None)] + COMMON, 29782)
    a, b = losses(online, "loss_jsd"), losses(cached, "loss_jsd")
    assert len(a) == 4 and np.allclose(a, b, rtol=0, atol=1e-5), (a, b)
    assert np.allclose(losses(online), losses(cached), rtol=0, atol=1e-5)


def test_a_run_from_the_cache_halts_and_resumes_with_the_same_losses(assets, cached_run, tmp_path):
    cache_dir, cached = cached_run
    resumed = str(tmp_path / "resumed")
    args = (
        [
            *train_args(assets["teacher"], assets["data"], resumed, config=None),
            "teacher.source=cache",
            f"teacher.cache={cache_dir}",
        ]
        + COMMON
        + ["checkpoint.every_steps=2"]
    )
    assert "halted at step 2" in deepspeed("llm_kd", args + ["train.halt_at_step=2"], 29783)
    deepspeed("llm_kd", args, 29783)
    assert losses(resumed) == losses(cached)


def test_a_run_from_the_cache_resumes_on_another_world_size(assets, cached_run, tmp_path):
    """Halted on 2 ranks, resumed on 1: the same samples every step (the cache is read by dataset row), losses to rounding."""
    cache_dir, cached = cached_run
    out = str(tmp_path / "elastic")
    args = (
        [
            *train_args(assets["teacher"], assets["data"], out, config=None),
            "teacher.source=cache",
            f"teacher.cache={cache_dir}",
        ]
        + COMMON
        + ["checkpoint.every_steps=2"]
    )
    deepspeed("llm_kd", args + ["train.halt_at_step=2"], 29784)
    log = run([os.path.join(BIN, "python"), "-m", "distill", "--config", "configs/llm_kd.yaml"] + args)
    assert "resumed from" in log
    ref = [json.loads(line) for line in open(os.path.join(cached, "metrics.jsonl"))]
    got = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        assert a["data"] == b["data"], f"step {a['step']}: other samples after the elastic resume"
        assert abs(a["loss"] - b["loss"]) < 1e-4 * abs(a["loss"]), (a["step"], a["loss"], b["loss"])


def train_from(assets, cache_dir, out, *extra):
    return cli(
        "distill-train",
        "--config",
        "configs/llm_kd.yaml",
        f"teacher.path={assets['teacher']}",
        f"data.path={assets['data']}",
        "teacher.source=cache",
        f"teacher.cache={cache_dir}",
        f"output_dir={out}",
        "student.init=random",
        "student.num_layers=1",
        "deepspeed.zero_stage=0",
        *TINY[:2],
        "train.max_steps=1",
        *extra,
    )


def test_training_refuses_a_damaged_or_short_cache(assets, small_cache, tmp_path):
    out = tmp_path / "run"
    # truncated part
    bad = tmp_path / "truncated"
    shutil.copytree(small_cache, bad)
    part = bad / json.load(open(bad / "manifest.json"))["parts"][1]["path"]
    part.write_bytes(part.read_bytes()[:-10])
    assert_one_line_error(*train_from(assets, bad, out), "distill-train", "truncated or replaced")
    # tampered part: same size, one byte changed
    bad = tmp_path / "tampered"
    shutil.copytree(small_cache, bad)
    part = bad / json.load(open(bad / "manifest.json"))["parts"][0]["path"]
    blob = bytearray(part.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    part.write_bytes(bytes(blob))
    assert_one_line_error(*train_from(assets, bad, out), "distill-train", "fails its sha256 check")
    # fewer rows than the data: the manifest lists one part less
    bad = tmp_path / "short"
    shutil.copytree(small_cache, bad)
    manifest = json.load(open(bad / "manifest.json"))
    manifest["parts"] = manifest["parts"][:-1]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line_error(*train_from(assets, bad, out), "distill-train", "the cache is incomplete")
    assert not out.exists(), "a refused run left a run directory"


def test_training_refuses_a_cache_of_another_dataset_or_teacher_and_live_teacher_losses(assets, small_cache, tmp_path):
    out = tmp_path / "run"
    # another dataset (same rows, another manifest) and another teacher
    other_data = tmp_path / "other_data"
    shutil.copytree(assets["data"], other_data)
    with open(other_data / "manifest.json", "a") as handle:
        handle.write("\n")
    code, lines = cli(
        "distill-train",
        "--config",
        "configs/llm_kd.yaml",
        f"teacher.path={assets['teacher']}",
        f"data.path={other_data}",
        "teacher.source=cache",
        f"teacher.cache={small_cache}",
        f"output_dir={out}",
        "student.init=random",
        "deepspeed.zero_stage=0",
        *TINY[:2],
    )
    assert_one_line_error(code, lines, "distill-train", "written for another dataset")
    other_teacher = save_teacher("llama", assets["tokenizer"], str(tmp_path / "t2"), vocab_rows=assets["vocab"])
    code, lines = cli(
        "distill-train",
        "--config",
        "configs/llm_kd.yaml",
        f"teacher.path={other_teacher}",
        f"data.path={assets['data']}",
        "teacher.source=cache",
        f"teacher.cache={small_cache}",
        f"output_dir={out}",
        "student.init=random",
        "deepspeed.zero_stage=0",
        *TINY[:2],
    )
    assert_one_line_error(code, lines, "distill-train", "written with another teacher")
    # losses that need the live teacher; another temperature
    assert_one_line_error(
        *train_from(assets, small_cache, out, "loss.weights={ce: 1.0, cos: 1.0}"), "distill-train", "['cos'] need the live teacher"
    )
    assert_one_line_error(*train_from(assets, small_cache, out, "loss.temperature=2.0"), "distill-train", "temperature 1")
    assert not out.exists(), "a refused run left a run directory"


def test_masked_lm_data_is_refused_by_both_sides(assets, small_cache, tmp_path):
    from data_prep.cache_manifest import CacheError
    from distill.config import load_config
    from distill.teachers.cache import CacheTeacher
    from kd_common.files import sha256_file

    masked = tmp_path / "masked"
    shutil.copytree(assets["data"], masked)
    manifest = json.load(open(masked / "manifest.json"))
    manifest["packing"] = "document"  # what a masked-LM dataset says
    (masked / "manifest.json").write_text(json.dumps(manifest))
    code, lines = cli("distill-cache", "--data", str(masked), "--teacher", assets["teacher"], "--output", str(tmp_path / "c"))
    assert_one_line_error(code, lines, "distill-cache", "masked-LM", "cannot be cached", "--static-masks D")
    # a causal cache bound to this (masked-LM) dataset: it holds no static masks; dynamic masking is refused too
    # (tests/e2e/test_static_masks.py: static-mask caches, their refusals and exactness)
    bound = tmp_path / "bound"
    shutil.copytree(small_cache, bound)
    cache_manifest = json.load(open(bound / "manifest.json"))
    cache_manifest["dataset"]["manifest_sha256"] = sha256_file(str(masked / "manifest.json"))
    (bound / "manifest.json").write_text(json.dumps(cache_manifest))
    overrides = [
        f"teacher.path={assets['teacher']}",
        f"data.path={masked}",
        "teacher.source=cache",
        f"teacher.cache={bound}",
        f"output_dir={tmp_path / 'o'}",
    ]
    with pytest.raises(CacheError, match="holds no static masks"):
        CacheTeacher.load(load_config("configs/llm_kd.yaml", overrides), torch.device("cpu"))


def test_cache_output_rule(assets, small_cache, tmp_path):
    code, lines = cli(
        "distill-cache", "--data", assets["data"], "--teacher", assets["teacher"], "--output", os.path.join(assets["data"], "cache")
    )
    assert_one_line_error(code, lines, "distill-cache", "must not overlap an input")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    code, lines = cli("distill-cache", "--data", assets["data"], "--teacher", assets["teacher"], "--output", str(occupied), "--overwrite")
    assert_one_line_error(code, lines, "distill-cache", "not a teacher cache")
    assert (occupied / "notes.txt").read_text() == "mine"
    earlier = tmp_path / "earlier"
    shutil.copytree(small_cache, earlier)
    code, lines = cli("distill-cache", "--data", assets["data"], "--teacher", assets["teacher"], "--output", str(earlier), "--k", "4")
    assert_one_line_error(code, lines, "distill-cache", "--overwrite")
    cache(assets, earlier, "--k", "4", "--overwrite")
    assert json.load(open(earlier / "manifest.json"))["k"] == 4
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "a staging directory was left behind"
