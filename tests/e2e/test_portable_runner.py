"""distill-prep through Beam's portable runner: a Prism job server and an EXTERNAL SDK worker pool, separate
processes on loopback (launch/portable_cluster.py), against the local runner on the same input and seed.

Beam's Flink job server jar is not served by Maven Central as reached here, so the cluster is Prism (the
portable job API, SDK workers in their own processes, the runner's own GroupByKey), not Flink.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from support import REPO_ROOT, cache, shared_data_path

from launch.portable_cluster import PortableCluster, prism_binary

BIN = os.path.dirname(sys.executable)
ENV = dict(os.environ, PYTHONPATH=REPO_ROOT)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if prism_binary() is None and shutil.which("go") is None:
        pytest.skip("no Prism binary and no Go toolchain to build it (launch/install.sh builds it where Go exists)")
    with PortableCluster(prism=prism_binary(build=True), log_dir=str(tmp_path_factory.mktemp("cluster_logs"))) as c:
        yield c


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_dir):
    """WikiText-2 valid and test, a .gz and a .jsonl (of the demo corpus' two files)."""
    files = [shared_data_path("wikitext-2", "valid.txt"), shared_data_path("wikitext-2", "test.txt")]
    extra = tmp_path_factory.mktemp("extra")
    topics, docstrings = (os.path.join(corpus_dir, name) for name in sorted(os.listdir(corpus_dir)))
    with open(topics, "rb") as src, gzip.open(extra / "topics.txt.gz", "wb") as dst:
        dst.write(src.read())
    with open(docstrings, encoding="utf-8") as src, open(extra / "docstrings.jsonl", "w", encoding="utf-8") as dst:
        for line in src:
            if line.strip():
                dst.write(json.dumps({"text": line.strip()}) + "\n")
    return files + [str(extra / "topics.txt.gz"), str(extra / "docstrings.jsonl")]


def _prep(inputs, tokenizer_dir, out, *beam_args, timeout=300):
    cmd = [os.path.join(BIN, "distill-prep"), "--input", *inputs, "--tokenizer", tokenizer_dir, "--output", out, "--max-seq-len", "64"]
    cmd += ["--num-shards", "2", "--seed", "7", *beam_args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)


def _files(directory: str) -> dict[str, str]:
    found = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, directory)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def _manifest_without_run_details(directory: str) -> dict:
    """The manifest less what records the run itself: when, where to, and the Beam options."""
    with open(os.path.join(directory, "manifest.json")) as handle:
        manifest = json.load(handle)
    manifest.pop("created")
    manifest["pipeline_options"].pop("beam")
    manifest["pipeline_options"]["prep"].pop("output")
    return manifest


@pytest.fixture(scope="module")
def local_out(tmp_path_factory, inputs, tokenizer_dir):
    out = str(tmp_path_factory.mktemp("local") / "data")
    proc = _prep(inputs, tokenizer_dir, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_portable_run_writes_the_local_runners_bytes_and_trains(tmp_path, cluster, inputs, local_out, tokenizer_dir, teacher_dir):
    out = str(tmp_path / "data")
    start = time.monotonic()
    proc = _prep(inputs, tokenizer_dir, out, *cluster.beam_args())
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"portable prep: {time.monotonic() - start:.1f}s")
    local, portable = _files(local_out), _files(out)
    assert sorted(portable) == sorted(local)
    assert {k: v for k, v in portable.items() if k != "manifest.json"} == {k: v for k, v in local.items() if k != "manifest.json"}
    assert _manifest_without_run_details(out) == _manifest_without_run_details(local_out)
    with open(os.path.join(out, "manifest.json")) as handle:
        beam = json.load(handle)["pipeline_options"]["beam"]
    assert beam["runner"] == "PortableRunner" and beam["environment_type"] == "EXTERNAL"
    assert len([k for k in portable if k.startswith("train/")]) == 2

    run = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "distill", "--config", os.path.join(REPO_ROOT, "configs", "demo.yaml"), f"teacher.path={teacher_dir}"]
    cmd += [f"data.path={out}", f"output_dir={run}", "train.max_steps=3", "train.micro_batch=2", "train.global_batch=4"]
    cmd += ["student.num_layers=1", "student.init_layers=null", "checkpoint.every_steps=3", "checkpoint.keep_last=0"]
    train = subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "step_00000003" in os.listdir(os.path.join(run, "checkpoints")), train.stdout[-2000:]


def test_worker_pool_killed_mid_run_fails_in_one_line_and_keeps_the_old_dataset(tmp_path, cluster, inputs, local_out, tokenizer_dir):
    out = str(tmp_path / "data")
    shutil.copytree(local_out, out)
    before = _files(out)
    cmd = [os.path.join(BIN, "distill-prep"), "--input", *inputs, "--tokenizer", tokenizer_dir, "--output", out, "--max-seq-len", "64"]
    cmd += ["--num-shards", "2", "--seed", "7", "--overwrite", *cluster.beam_args()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 120
        while len(cluster.pool_pids()) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)  # wait until the pool has started an SDK harness for the job: the job is running
        assert proc.poll() is None and len(cluster.pool_pids()) >= 2, "the job never reached the worker pool"
        time.sleep(1.0)
        cluster.kill("worker_pool")  # the pool and its SDK harness, SIGKILL: a lost worker machine
        stdout, stderr = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
        cluster.start_pool()  # the same port again, for the tests after this one
    assert proc.returncode == 1, stderr[-3000:]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill-prep: error: the runner failed job"), stderr[-3000:]
    assert "nothing was published" in lines[0]
    assert _files(out) == before, "the old dataset changed after a failed run"
    assert sorted(os.listdir(tmp_path)) == ["data"], "a staging directory was left beside --output"

    rerun = _prep(inputs, tokenizer_dir, out, "--overwrite", *cluster.beam_args())  # a restarted pool: the same run completes
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {k: v for k, v in _files(out).items() if k != "manifest.json"} == {k: v for k, v in before.items() if k != "manifest.json"}


@pytest.mark.parametrize(
    "beam_args, expected",
    [
        (["--runner=FlinkRunner", "--flink_master=localhost:1"], "--environment_type=EXTERNAL"),
        (["--runner=PortableRunner", "--job_endpoint=localhost:1", "--environment_type=DOCKER"], "--environment_type=EXTERNAL"),
        (["--runner=DataflowRunner", "--project=p", "--region=r"], "put --input and --output on gs://"),
    ],
)
def test_runners_whose_workers_cannot_see_local_paths_are_refused(tmp_path, corpus_dir, tokenizer_dir, beam_args, expected):
    out = str(tmp_path / "data")
    proc = _prep([corpus_dir], tokenizer_dir, out, *beam_args, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill-prep: error: --runner=") and expected in lines[0], lines
    assert os.listdir(tmp_path) == [], "a refused run left files beside --output"


def test_distill_cache_on_the_portable_runner_writes_the_local_runners_parts(tmp_path, cluster, assets):
    """A tiny random Llama teacher over ~100 causal rows (the `assets` fixture of tests/e2e/conftest.py)."""
    local, portable = tmp_path / "local", tmp_path / "portable"
    cache(assets, local)
    cache(assets, portable, *cluster.beam_args())
    a, b = _files(str(local)), _files(str(portable))
    assert sorted(a) == sorted(b) and len(a) > 2
    assert {k: v for k, v in a.items() if k != "manifest.json"} == {k: v for k, v in b.items() if k != "manifest.json"}
