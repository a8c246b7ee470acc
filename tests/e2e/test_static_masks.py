"""Static masks (data.static_masks = D, BERT's dupe factor) and the teacher-logit cache on masked-LM data (issue 18,
point 2): the variants are the dynamic-mask function at key d * N + r and cycle with the epoch; distill-cache with 2
workers stores the teacher on exactly the trainer's masked inputs (1 and 2 workers byte-identical); a 2-process
DeepSpeed run from a full cache has the online run's per-step losses with the same static masks; the refusals."""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from support import BIN, ENV, REPO_ROOT, losses, train_args
from support import run_log as run
from support import trainer_samples as _samples

pytestmark = pytest.mark.timeout(900)


# ------------------------------------------------------------------------------------------------
# (b-d) distill-cache on masked-LM data, training from it, refusals

VARIANTS = 2
TRAIN_CONFIG = {
    "student": {"architecture": "distilbert", "init": "teacher", "num_layers": 1, "dropout": 0.0},
    "data": {"static_masks": VARIANTS, "token_frequency_smoothing": 0.7, "whole_word_masking": True, "mlm_probability": 0.2},
    "loss": {"weights": {"ce": 5.0, "mlm": 2.0}, "temperature": 2.0, "ce_positions": "all"},
    "optim": {"lr": 3e-3, "warmup_fraction": 0.0},
    "train": {"global_batch": 8, "micro_batch": 4, "log_every": 1},
    "checkpoint": {"every_steps": 100},
    "deepspeed": {"config": "configs/deepspeed/zero2.json"},
    "seed": 11,
}


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, corpus_dir):
    """A WordPiece tokenizer (vocab 200), a few dozen rows of masked-LM data (32 tokens, 2 shards), a tiny BERT teacher,
    and the training config (static masks) that both distill-cache and the runs read."""
    from transformers import AutoModelForMaskedLM

    from distill.tools.demo_assets import save_random_bert_teacher, train_wordpiece_tokenizer

    root = tmp_path_factory.mktemp("static_masks")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in sorted(os.listdir(corpus_dir)):
        with open(os.path.join(corpus_dir, name)) as handle:
            (corpus / name).write_text("\n".join(line[:120] for line in handle.read().splitlines()[:8]) + "\n")
    tok_dir = train_wordpiece_tokenizer(sorted(str(corpus / f) for f in os.listdir(corpus)), str(root / "tokenizer"), vocab_size=200)
    data = str(root / "data")
    run(
        [
            os.path.join(BIN, "distill-prep"),
            "--input",
            str(corpus),
            "--tokenizer",
            tok_dir,
            "--output",
            data,
            "--max-seq-len",
            "32",
            "--validation-fraction",
            "0.05",
            "--workers",
            "1",
            "--num-shards",
            "2",
        ]
    )
    teacher = save_random_bert_teacher(tok_dir, str(root / "teacher"), layers=2, hidden=32, heads=2, intermediate=64, max_positions=64)
    model = AutoModelForMaskedLM.from_pretrained(teacher)
    with torch.no_grad():  # a peaked teacher (a random one is near uniform): soft targets far from the student's
        model.cls.predictions.transform.LayerNorm.weight.mul_(20.0)
    model.save_pretrained(teacher)
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump(TRAIN_CONFIG))
    manifest = json.load(open(os.path.join(data, "manifest.json")))
    return {
        "root": root,
        "data": data,
        "teacher": teacher,
        "config": str(config),
        "vocab": manifest["tokenizer"]["vocab_size"],
        "rows": manifest["splits"]["train"]["rows"],
    }


def _cache_cli(mlm, out, *extra):
    cmd = [os.path.join(BIN, "distill-cache"), "--data", mlm["data"], "--teacher", mlm["teacher"], "--output", str(out), *extra]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _cache_in_process(mlm, out, **settings):
    from distill.cache.pipeline import CacheConfig, run_cache

    base = {"data": mlm["data"], "teacher": mlm["teacher"], "output": str(out), "train_config": mlm["config"], "rows_per_part": 8}
    return run_cache(CacheConfig(**{**base, **settings}))


FULL = {"k": 200, "value_bits": 32, "temperature": 2.0}  # k = the vocabulary: exact targets


@pytest.fixture(scope="module")
def full_cache(mlm):
    """k = vocabulary, 32-bit values, D = 2 static masks from the training config, every position, 2 worker processes."""
    out = mlm["root"] / "cache_full"
    proc = _cache_cli(
        mlm,
        out,
        "--train-config",
        mlm["config"],
        "--workers",
        "2",
        "--rows-per-part",
        "8",
        "--k",
        "200",
        "--value-bits",
        "32",
        "--temperature",
        "2.0",
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "bytes per token" in proc.stdout
    return out


def _cache_columns(out):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    tables = [pq.read_table(os.path.join(out, p["path"])) for p in manifest["parts"]]
    return manifest, {c: sum((t.column(c).to_pylist() for t in tables), []) for c in tables[0].column_names}


def _trainer_data(mlm, *overrides):
    """The trainer's reader, step plan and collator for the training config (as distill/train/trainer.py builds them, one rank)."""
    from transformers import AutoTokenizer

    from data_prep.manifest import TOKENIZER_DIR, load_manifest
    from distill.config import load_config
    from distill.data.masking import collator_for
    from distill.data.reader import StepPlan, TokenSequences, load_token_counts

    cfg = load_config(mlm["config"], [f"data.path={mlm['data']}", f"teacher.path={mlm['teacher']}", "output_dir=unused", *overrides])
    manifest = load_manifest(mlm["data"])
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(mlm["data"], TOKENIZER_DIR), local_files_only=True)
    seqs = TokenSequences(mlm["data"], "train", manifest)
    plan = StepPlan(len(seqs), 8, 4, 1, 0, cfg.seed, seqs.lengths)
    counts = load_token_counts(mlm["data"], manifest)
    collator = collator_for(cfg.data, cfg.seed, manifest.packing, tokenizer, mlm["vocab"], manifest.tokenizer.all_special_ids, counts, 1)
    return cfg, seqs, plan, collator


def test_mlm_cache_holds_the_teacher_on_the_trainers_masked_inputs_and_is_worker_count_independent(mlm, full_cache, tmp_path):
    from transformers import AutoModelForMaskedLM

    manifest, cols = _cache_columns(full_cache)
    n = mlm["rows"]
    assert manifest["static_masks"] == VARIANTS and manifest["positions"] == "all" and len(cols["indices"]) == n * VARIANTS
    assert manifest["masking"] == {
        "seed": 11,
        "data.static_masks": 2,
        "data.mlm_probability": 0.2,
        "data.mask_token_fraction": 0.8,
        "data.random_token_fraction": 0.1,
        "data.token_frequency_smoothing": 0.7,
        "data.whole_word_masking": True,
        "data.masking": "batched",
    }
    assert manifest["stats"]["bytes_per_token"] > 1.9 * manifest["stats"]["bytes_per_masked_copy_token"]
    # samples as the trainer's loader gives them in epochs 0 and 1 (variants 0 and 1), the teacher run on them here
    _, seqs, plan, collator = _trainer_data(mlm)
    samples = _samples(seqs, plan, collator, 2 * n // 8)
    model = AutoModelForMaskedLM.from_pretrained(mlm["teacher"], dtype=torch.float32).eval()
    picked = [s for s in samples if s[0] // n == 0][:3] + [s for s in samples if s[0] // n == 1][:3]
    for stream, row, ids, labels, variant in picked:
        assert variant == stream // n
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.as_tensor(ids)[None]).logits[0, :, :200] / 2.0, -1).numpy()
        got_idx = np.asarray(cols["indices"][row * VARIANTS + variant]).reshape(len(ids), 200)
        got = np.asarray(cols["values"][row * VARIANTS + variant], dtype=np.float32).reshape(len(ids), 200)
        assert np.array_equal(got_idx, np.broadcast_to(np.arange(200), got_idx.shape))
        np.testing.assert_allclose(got, lp, atol=2e-5, rtol=0)
    # the same row's two variants are two different masked inputs: different teacher outputs
    assert not np.allclose(np.asarray(cols["values"][0], dtype=np.float32), np.asarray(cols["values"][1], dtype=np.float32), atol=1e-3)
    one = _cache_in_process(mlm, tmp_path / "one", workers=1, **FULL)
    assert [p.sha256 for p in one.parts] == [p["sha256"] for p in manifest["parts"]], "1 and 2 workers wrote different parts"


def _deepspeed(mlm, out, port, *extra):
    return run(
        [
            os.path.join(BIN, "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(port),
            "--module",
            "distill",
            *train_args(mlm["teacher"], mlm["data"], out, config=mlm["config"]),
            "train.max_steps=9",  # 72 samples of 34 rows: epochs 0, 1, 2 (variants 0, 1, 0)
            *extra,
        ]
    )


def test_training_from_a_full_mlm_cache_equals_the_online_teacher_with_the_same_static_masks(mlm, full_cache, tmp_path):
    """k = vocabulary, 32-bit values: 2-process DeepSpeed runs from the cache and from the online teacher, both with
    data.static_masks = 2, have the same per-step losses (1e-5) over 2+ epochs."""
    online, cached = tmp_path / "online", tmp_path / "cached"
    _deepspeed(mlm, online, 29791)
    log = _deepspeed(mlm, cached, 29792, "teacher.source=cache", f"teacher.cache={full_cache}")
    assert "no teacher model in memory" in log and "2 static masks" in log
    a, b = losses(online, "loss_ce"), losses(cached, "loss_ce")
    assert len(a) == 9 and np.allclose(a, b, rtol=0, atol=1e-5), (a, b)
    # the total adds the student's own mlm term (14-19 here): fp32 rounding of updates that differ by 1e-7 moves it ~1e-5
    # absolute, i.e. 1e-6 relative
    assert np.allclose(losses(online), losses(cached), rtol=1e-6, atol=1e-5), (losses(online), losses(cached))
    assert losses(online, "data") == losses(cached, "data")


def _load(mlm, cache_dir, *overrides):
    from support import cache_teacher

    from distill.config import load_config

    cfg = load_config(
        mlm["config"],
        [
            f"data.path={mlm['data']}",
            f"teacher.path={mlm['teacher']}",
            "output_dir=unused",
            "teacher.source=cache",
            f"teacher.cache={cache_dir}",
            *overrides,
        ],
    )
    return cfg, cache_teacher(cfg)


def test_a_masked_positions_cache_gives_the_same_targets_at_the_masked_positions(mlm, full_cache, tmp_path):
    from distill.data.reader import DataSource
    from distill.objective.losses import select_logit_positions

    masked = _cache_in_process(mlm, tmp_path / "masked", positions="masked", **FULL)
    assert masked.positions == "masked" and masked.stats["bytes"] < 0.4 * json.load(open(full_cache / "manifest.json"))["stats"]["bytes"]
    _, from_all = _load(mlm, full_cache, "loss.ce_positions=masked")
    _, from_masked = _load(mlm, tmp_path / "masked", "loss.ce_positions=masked")
    _, seqs, plan, collator = _trainer_data(mlm)
    source = DataSource(seqs, plan, collator, torch.device("cpu"), 0, False, 4)
    source.start(0, 12)
    seen = set()
    for _ in range(12 * plan.accumulation):  # 96 samples: every variant
        batch, _ = source.next()
        batch = select_logit_positions(batch, "masked")
        seen.update(batch.mask_variants.tolist())
        a, b = from_all.outputs(batch).head_input, from_masked.outputs(batch).head_input
        assert a.indices.shape[0] == len(batch.logit_positions)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values) and torch.equal(a.tail, b.tail)
    assert seen == {0, 1}
    with pytest.raises(Exception, match="masked positions only.*loss.ce_positions=masked"):
        _load(mlm, tmp_path / "masked")


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("data.static_masks=0", ["needs static masks", "data.static_masks=2"]),
        ("data.static_masks=3", ["data.static_masks=2, the run has data.static_masks=3"]),
        ("seed=12", ["seed=11, the run has seed=12"]),
        ("data.whole_word_masking=false", ["data.whole_word_masking=True, the run has data.whole_word_masking=False"]),
        ("data.token_frequency_smoothing=0.0", ["data.token_frequency_smoothing=0.7"]),
        ("data.masking=per_sequence", ["data.masking=batched"]),
    ],
)
def test_a_run_whose_masks_are_not_the_caches_is_refused(mlm, full_cache, override, fragments):
    from distill.config import ConfigError

    with pytest.raises(ConfigError) as info:  # the weight-free pass (preflight) checks the cache against the run
        _load(mlm, full_cache, override)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)


def test_refusals_from_the_command_lines(mlm, full_cache, tmp_path):
    """distill-cache on masked-LM data without static masks; distill-train with dynamic masking from an MLM cache: exit 2,
    one line naming the fix, nothing trained."""
    from support import assert_one_line_error_of as assert_one_line_error

    proc = _cache_cli(mlm, tmp_path / "c")
    assert_one_line_error(proc.returncode, proc.stderr.strip().splitlines(), "distill-cache", "masked-LM", "--static-masks D")
    assert not (tmp_path / "c").exists()
    out = tmp_path / "run"
    cmd = [
        os.path.join(BIN, "distill-train"),
        *train_args(mlm["teacher"], mlm["data"], out, config=mlm["config"]),
        "teacher.source=cache",
        f"teacher.cache={full_cache}",
        "data.static_masks=0",
        "deepspeed.zero_stage=0",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc.returncode, proc.stderr.strip().splitlines(), "distill-train", "data.static_masks=2")
    assert not out.exists(), "a refused run left a run directory"
