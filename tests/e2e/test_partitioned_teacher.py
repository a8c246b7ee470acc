"""`teacher.source: partitioned` (distill/teachers/partitioned.py) in 2 DeepSpeed processes on CPU: each rank loads only its
partition (peak host memory measured against the replicated load of the same 110 MiB teacher), its tensors equal the
checkpoint's and a student's layer copy from it equals the copy from the whole teacher; each rank holds half of the
teacher's parameter bytes (its actual partition tensors), the partitioned teacher's outputs equal the whole teacher's,
a short distillation run with it has the replicated-teacher run's losses, and the settings it cannot work with are
refused in one line before anything loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch
from safetensors.torch import load_file
from support import BIN, ENV, REPO_ROOT, losses, save_teacher, tiny_teacher, train_args
from support import LLM_TINY as TINY
from support import deepspeed_recipe as deepspeed

pytestmark = pytest.mark.timeout(900)


def _teacher_of_110_mib(path: str) -> str:
    """A random 16-layer Llama, hidden 384, of 28.7M parameters: 110 MiB in fp32, its largest tensor 1.5 MiB."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama",
        vocab_size=512,
        hidden_size=384,
        intermediate_size=1024,
        num_hidden_layers=16,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def test_each_rank_loads_and_holds_half_of_the_teacher_and_its_outputs_are_the_whole_teachers(tmp_path):
    tiny = tiny_teacher("llama", path=str(tmp_path / "tiny"), tie=True)
    big = _teacher_of_110_mib(str(tmp_path / "big"))
    proc = subprocess.run(
        [
            os.path.join(BIN, "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            "29771",
            "tests/e2e/partitioned_teacher_worker.py",
            str(tmp_path),
            tiny,
            big,
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for r in range(2):
        load = json.load(open(tmp_path / f"load{r}.json"))
        full, part, largest = load["full_bytes"], load["partition_bytes"], load["largest_tensor_bytes"]
        assert full > 100 * 2**20 and full / 2 <= part <= full / 2 + 4 * 1024, load  # half of every tensor (+ 1 element of padding)
        # the replicated load holds the whole teacher (mapped from the file, then read: as its first forward does)
        assert load["replicated_load_peak"] + load["replicated_read_peak"] >= 0.95 * full, load
        # the partitioned load holds its partition, plus what is alive at once besides it: one parameter whole while
        # zero.Init builds its module, one tensor's slice read from the file (2 x the largest tensor), and 8 MiB for the
        # allocator and the model's Python objects; never the whole teacher, nor the whole and half of it (the load before)
        assert load["partitioned_peak"] <= part + 2 * largest + 8 * 2**20, load
        # the layer copy gathers one tensor at a time: above the student it holds the gathered tensors and what the
        # allocator keeps of them (14-20 MiB measured), far below a gather of the whole teacher (110 MiB)
        assert load["copy_peak"] <= full / 4, load
        assert load["weights_diff"] == 0.0 and load["student_diff"] == 0.0, load
        assert load["tied"] and load["bf16_same"], load
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    full = ranks[0]["full_bytes"]
    assert full == ranks[0]["whole_bytes_here"] > 0
    for r in ranks:
        for key in ("local_bytes", "local_bytes_after_forward"):
            assert full / 2 <= r[key] <= full / 2 + 4 * 64, (key, r)  # half, up to the padding of each parameter to 2 ranks
        # every parameter under DeepSpeed's default threshold (100,000 elements) is held whole besides its partition
        assert r["local_bytes_default_threshold"] >= full, r
        for key, diff in r.items():
            if key.startswith(("chunked.", "logits.")):
                assert diff <= 1e-6, (key, diff)


@pytest.fixture(scope="module")
def llama_teacher(tmp_path_factory, bpe_data):  # noqa: F811
    tokenizer, data = bpe_data
    return save_teacher("llama", tokenizer, str(tmp_path_factory.mktemp("pt") / "teacher"), vocab_rows=len(tokenizer) + 24), data


@pytest.mark.parametrize("student_zero", ["zero2", "zero3"])  # zero3: the recipe's, two stage-3 engines in one process
def test_a_run_with_the_partitioned_teacher_has_the_replicated_runs_losses(tmp_path, llama_teacher, student_zero):
    teacher, data = llama_teacher
    args = (
        [f"teacher.path={teacher}", f"data.path={data}", "train.max_steps=8", "checkpoint.every_steps=8", "train.log_every=1"]
        + TINY
        + [f"deepspeed.config=configs/deepspeed/{student_zero}.json"]
    )
    deepspeed("llm_kd", args + [f"output_dir={tmp_path / 'replicated'}"], 29772)
    log = deepspeed("llm_kd", args + [f"output_dir={tmp_path / 'partitioned'}", "teacher.source=partitioned"], 29772)
    assert "teacher partitioned across the ranks" in log
    for key in ("loss", "loss_ce", "loss_clm"):
        a, b = losses(tmp_path / "replicated", key), losses(tmp_path / "partitioned", key)
        assert len(a) == len(b) == 8
        assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (key, a, b)


def test_where_it_cannot_work_it_is_refused_in_one_line(tmp_path, llama_teacher):
    """Spelled with the deprecated alias teacher.partition=true: read as teacher.source=partitioned, with a warning."""
    teacher, data = llama_teacher
    base = [
        os.path.join(BIN, "distill-train"),
        *train_args(teacher, data, tmp_path / "o", config="configs/llm_kd.yaml"),
        "teacher.partition=true",
    ] + TINY
    proc = subprocess.run(base, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("distill-train")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "teacher.source=partitioned splits the teacher's parameters across the data-parallel ranks, but this run has 1 rank" in errors[0]
    assert "teacher.partition is deprecated: use teacher.source=partitioned" in proc.stderr
    assert not (tmp_path / "o").exists()
    check = subprocess.run(base + ["--check", "--world-size", "2"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and "ready to run" in check.stdout and "source: partitioned" in check.stdout, check.stdout[-3000:]
    # a pickled checkpoint (pytorch_model.bin) is not read a partition at a time: refused before anything loads
    pickled = tmp_path / "pickled"
    shutil.copytree(teacher, pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    os.remove(pickled / "model.safetensors")
    check = subprocess.run(
        base + [f"teacher.path={pickled}", "--check", "--world-size", "2"],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 2 and "has no safetensors weights" in check.stdout and "convert it once" in check.stdout, check.stdout[
        -3000:
    ]
    no_teacher = [
        "teacher.path=null",
        "student.init=random",
        "student.architecture=llama",
        "student.hidden_size=32",
        "student.num_heads=4",
        "student.intermediate_size=64",
        "student.num_layers=2",
        "loss.weights={clm: 1.0}",
    ]
    check = subprocess.run(
        base + no_teacher + ["--check", "--world-size", "1"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300
    )
    assert (
        check.returncode == 2
        and "teacher.source=partitioned needs a teacher to partition" in check.stdout
        and "this run has 1 rank" in check.stdout
    )
