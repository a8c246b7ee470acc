"""The rules of the cache writers that need no process (issue 27): which GPU a rank or Beam worker takes (the device count
given, the one thing faked: there is no GPU here), the placement rule, each rank's share of the parts, when a part counts
as complete, the work directory's refusals, the labels of the log, and the config rules of a cache run without
teacher.path. The writers themselves, for real: tests/e2e/test_cache_ranks.py."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest


def test_each_rank_and_each_beam_worker_takes_its_own_gpu():
    from distill.cache.devices import beam_worker_index, device_for

    assert [device_for(r, 8) for r in range(8)] == [f"cuda:{r}" for r in range(8)]  # 8 ranks of a node of 8 GPUs
    assert [device_for(r, 4) for r in range(8)] == [f"cuda:{r % 4}" for r in range(8)]  # more writers than GPUs: shared in turn
    assert device_for(3, 0) == "cpu" and device_for(3, 8, "cpu") == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        device_for(0, 0, "cuda")
    # local Beam workers: the index in WORKER_ID (the local runner's worker_0, worker_1, ...); in-process: 0
    assert [beam_worker_index({"WORKER_ID": f"worker_{i}"}) for i in range(3)] == [0, 1, 2]
    assert beam_worker_index({}) == 0 and beam_worker_index({"WORKER_ID": "sdk"}) == 0
    assert [device_for(beam_worker_index({"WORKER_ID": f"worker_{i}"}), 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_placement_replicates_what_fits_and_partitions_the_rest():
    from distill.cache.devices import choose_placement, teacher_bytes

    gib = 2**30
    assert choose_placement("auto", 16 * gib, 80 * gib) == "replicated"  # an 8B teacher in bf16 on an 80 GB GPU
    assert choose_placement("auto", 140 * gib, 80 * gib) == "partitioned"  # a 70B teacher
    assert choose_placement("auto", 60 * gib, 80 * gib) == "partitioned"  # over 70%: no room for activations
    assert choose_placement("auto", 10 * gib, 100 * gib, copies=8) == "partitioned"  # CPU: 8 ranks of a node, 8 copies
    assert choose_placement("partitioned", 1, 100) == "partitioned" and choose_placement("replicated", 100, 1) == "replicated"
    import torch
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    params = 2 * 100 * 16 + 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16  # embeddings + head, 2 layers, final norm
    assert teacher_bytes(config, torch.bfloat16) == 2 * params and teacher_bytes(config, torch.float32) == 4 * params


def test_each_rank_share_is_a_pure_balanced_function_of_the_parts_and_the_world_size():
    from distill.cache.parts import forwards_of, shares

    units = [(s, f"s{s}", a, min(a + 100, rows)) for s, rows in enumerate([350, 1000, 20]) for a in range(0, rows, 100)]
    for world in (1, 2, 3, 8, 20):
        split = shares(units, world)
        assert split == shares(list(units), world)  # the same on every rank
        assert sorted(u for share in split for u in share) == sorted(units) and len(split) == world
        rows = [sum(u[3] - u[2] for u in share) for share in split]
        assert max(rows) - min(rows) <= 100, rows  # at most one part's rows apart
        for share in split:
            assert share == [u for u in units if u in share]  # list order within a share
    assert forwards_of((0, "s", 0, 100), 16) == 7 and forwards_of((0, "s", 0, 100), 16, variants=3) == 21
    assert forwards_of((0, "s", 96, 100), 16) == 1


def test_a_part_is_complete_only_with_its_record_and_hash(tmp_path):
    from distill.cache.parts import is_complete, record_path, write_part
    from kd_common.files import sha256_file, write_json_atomically

    work, name = str(tmp_path), "train/00000-000000000.parquet"
    path = os.path.join(work, name)
    rows = [(np.arange(8, dtype=np.int32), np.full(8, -2.0, dtype=np.float32), np.full(2, 0.1, dtype=np.float32))]
    write_part(path, rows, 16)
    assert os.listdir(os.path.dirname(path)) == ["00000-000000000.parquet"], "no temp file left"
    assert not is_complete(work, name, "id"), "a file without its record (killed before the record) is not complete"
    os.makedirs(os.path.dirname(record_path(work, name)))
    write_json_atomically(record_path(work, name), {"identity": "id", "sha256": sha256_file(path), "bytes": os.path.getsize(path)})
    assert is_complete(work, name, "id") and not is_complete(work, name, "another cache")
    blob = bytearray(open(path, "rb").read())
    blob[len(blob) // 2] ^= 1
    open(path, "wb").write(bytes(blob))
    assert not is_complete(work, name, "id"), "same size, one bit changed"
    open(path, "wb").write(bytes(blob[:-5]))
    assert not is_complete(work, name, "id"), "cut short"


def test_work_directory_sits_beside_the_output():
    from distill.cache.job import work_dir_for

    assert work_dir_for("/data/caches/llama-k64") == "/data/caches/.llama-k64.partial"
    assert work_dir_for("/data/caches/llama-k64/") == "/data/caches/.llama-k64.partial"


def test_a_mismatched_unfinished_cache_is_named_in_one_line():
    from distill.cache.job import _differences

    now = {
        "format": "f",
        "settings": {"mode": "topk", "entries": 64},
        "masking": {},
        "teacher_content_sha256": "b" * 64,
        "dataset_manifest_sha256": "d",
        "parts": ["p"],
    }
    before = dict(now, teacher_content_sha256="a" * 64, settings={"mode": "topk", "entries": 8})
    words = _differences(before, now)
    assert words[0] == f"another teacher (content sha256 {'a' * 12}, this one {'b' * 12})"
    assert words[1] == "other settings: entries=8 (now 64)"
    assert _differences(dict(now, parts=["q"]), now) == ["another format or part list (f)"]


def test_cache_settings_rules():
    from distill.cache.settings import CacheConfig
    from kd_common.config import ConfigError, build

    base = {"data": "d", "teacher": "t", "output": "o"}
    with pytest.raises(ConfigError, match="placement=partitioned splits the teacher across the ranks of a launcher"):
        build(CacheConfig, dict(base, placement="partitioned"))
    with pytest.raises(ConfigError, match="drop --workers"):
        build(CacheConfig, dict(base, ranks=True, workers=4))
    assert build(CacheConfig, dict(base, ranks=True, placement="partitioned")).placement == "partitioned"


def test_sampled_caches_are_labelled_with_their_draws():
    from data_prep.cache_manifest import support_label
    from distill.teachers.cache import CacheTeacher

    assert support_label("topk", 8) == "top-k 8 ids + tail" and support_label("sampled", 64) == "sampled, 64 draws"
    manifest = SimpleNamespace(mode="sampled", k=64, value_dtype="float16", static_masks=0)
    teacher = CacheTeacher("/c", manifest, None, None, None, None)  # no teacher.path: the cache stands for the teacher
    assert teacher.describe() == "cache /c (sampled, 64 draws, float16); no teacher model in memory"


def test_a_cache_run_needs_teacher_path_only_to_read_the_teachers_weights(tmp_path):
    from distill.config import load_config

    run = ["data.path=d", f"output_dir={tmp_path / 'o'}", "teacher.source=cache", f"teacher.cache={tmp_path / 'c'}"]
    cfg = load_config("configs/llm_kd.yaml", run + ["student.init=random"])  # no teacher.path, no student shape: the cache's
    assert cfg.teacher.path is None and cfg.teacher_from_cache and not cfg.reads_teacher_weights()
    with pytest.raises(Exception, match="student.init=teacher needs teacher.path .*a teacher cache holds no weights"):
        load_config("configs/llm_kd.yaml", run + ["student.init=teacher"])
    with pytest.raises(Exception, match="losses .* need a teacher: set teacher.path"):  # online still needs one
        load_config("configs/llm_kd.yaml", ["data.path=d", f"output_dir={tmp_path / 'o'}", "student.init=random"])


def test_the_teacher_config_comes_from_the_cache_manifest_without_its_files(tmp_path):
    from transformers import LlamaConfig

    from data_prep.cache_manifest import CacheError
    from distill.teachers.cache import teacher_config_of

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2)
    manifest = SimpleNamespace(teacher={"config": json.loads(config.to_json_string())})
    got = teacher_config_of(manifest, "m")
    assert type(got) is LlamaConfig and got.to_dict() == config.to_dict()
    with pytest.raises(CacheError, match="records no usable teacher config .*set teacher.path"):
        teacher_config_of(SimpleNamespace(teacher={"config": {"model_type": "no-such-model"}}), "m")
