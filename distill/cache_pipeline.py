"""distill-cache: run the frozen teacher once over a prepared dataset and keep a sparse view of its distribution.

The Beam graph is small: the launcher cuts every data shard of the split into parts of `rows_per_part` rows
(fixed by the settings, never by the workers), `Create | Reshuffle | ParDo(CacheTeacherLogits)`; the DoFn loads
the teacher once per worker (`setup`, on the GPU when the worker has one), runs it `batch_size` rows at a time,
and writes each part's Parquet file (temp name, then rename: a retried bundle rewrites the same bytes). Every
number of a part depends only on (settings, teacher, rows of the part), and a draw of sampled mode on
(seed, shard, row, position): the output is the same for any worker count. The launcher then re-opens every
part (rows, sha256) and writes manifest.json last (data_prep/cache_manifest.py).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import os
import sys
import time
from typing import Literal, Optional

import numpy as np

from data_prep.cache_manifest import CacheError, CacheManifest, CachePart, is_cache_dir, write_cache_manifest
from kd_common.config import Bool, Float, Int, Str, section, setting

log = logging.getLogger("distill-cache")


@section
class CacheConfig:
    data: Str = setting(help="prepared dataset directory (distill-prep output; causal data)")
    teacher: Str = setting(help="the teacher: a local Hugging Face directory (config.json + weights)")
    output: Str = setting(help="new directory for the cache (built beside it, moved into place when complete)")
    mode: Literal["topk", "sampled"] = setting(
        "topk",
        "topk: the k most likely ids per position + the remaining mass; sampled: n ids drawn "
        "from the teacher's distribution (weight 1/n each)",
    )
    k: Int = setting(64, "topk: ids kept per position", ge=1)
    n: Int = setting(64, "sampled: draws per position", ge=1)
    temperature: Float = setting(1.0, "the distribution cached is softmax(logits / T); training must use the same loss.temperature", gt=0)
    seed: Int = setting(0, "sampled: draws are a pure function of (seed, shard, row, position)", ge=0)
    value_bits: Literal[16, 32] = setting(16, "bits of each stored log-probability (16 = float16; 32 for exact reproduction)")
    split: Str = setting("train", "split of the dataset to cache")
    batch_size: Int = setting(16, "rows per teacher forward", ge=1)
    rows_per_part: Int = setting(4096, "rows per part file (the unit of parallelism; fixed by this setting, not by the workers)", ge=1)
    workers: Int = setting(1, "local runner worker processes (1 = in-process)", ge=1)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "where each worker runs the teacher; auto = its GPU when it has one")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto", "teacher weights dtype; auto = bf16 on GPU, fp32 on CPU (scores are fp32 either way)"
    )
    threads: Int = setting(
        1, "torch CPU threads per worker (0 = torch's default); fixed so results do not depend on the machine's load", ge=0
    )
    overwrite: Bool = setting(False, "replace --output if it holds a teacher cache, once the new one is complete")

    @property
    def entries(self) -> int:
        return self.k if self.mode == "topk" else self.n

    def problems(self) -> list[str]:
        return []


def weights_sha256(path: str) -> str:
    """sha256 over the teacher's weight files (name + content), in name order."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            digest.update(name.encode())
            with open(os.path.join(path, name), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def teacher_fingerprint(path: str) -> str:
    """The identity the trainer records for a teacher (distill/teacher.py: config + weight file names and sizes)."""
    from distill.teacher import OnlineTeacher

    return OnlineTeacher(None, path).fingerprint()


def row_uniforms(seed: int, shard: int, row: int, length: int, n: int) -> np.ndarray:
    """(length, n) uniforms of one row: a pure function of (seed, shard, row), position-major."""
    return np.random.Generator(np.random.Philox(key=[seed, (shard << 40) | row])).random((length, n))


def sparse_targets(log_probs, cfg: CacheConfig, uniforms: Optional[np.ndarray] = None):
    """(indices (P, k) int32, values (P, k) fp32 log-probs, tail (P,) or None) from (P, V) log-probabilities at T."""
    import torch

    if cfg.mode == "topk":
        k = min(cfg.k, log_probs.shape[-1])
        values, indices = torch.topk(log_probs, k, dim=-1)
        indices, order = torch.sort(indices, dim=-1)
        values = values.gather(1, order)
        tail = (1.0 - values.double().exp().sum(-1)).clamp_(min=0.0).float()
        return indices.int(), values.float(), tail
    cdf = log_probs.double().exp().cumsum(-1)
    u = torch.from_numpy(uniforms).to(cdf.device) * cdf[:, -1:]
    indices = torch.searchsorted(cdf, u).clamp_(max=log_probs.shape[-1] - 1)
    indices = torch.sort(indices, dim=-1).values
    return indices.int(), log_probs.gather(1, indices).float(), None


class TeacherScorer:
    """The frozen teacher on one worker: rows of token ids in, sparse targets per row out."""

    def __init__(self, cfg: CacheConfig, vocab_size: int):
        import torch

        from distill.models import load_teacher, resolve_dtype

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        want = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(want)
        self.cfg, self.vocab = cfg, vocab_size
        self.model = load_teacher(cfg.teacher, resolve_dtype(cfg.dtype, self.device), "sdpa", self.device)
        width = self.model.config.hidden_size
        self.chunk = max(1, (1 << 24) // max(vocab_size, width))  # positions projected to the vocabulary at once

    def score(self, rows: list[np.ndarray], shard: int, first_row: int) -> list[tuple]:
        import torch
        import torch.nn.functional as F

        from distill.models import model_forward

        lengths = [len(r) for r in rows]
        ids = torch.zeros(len(rows), max(lengths), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.from_numpy(np.asarray(r, dtype=np.int64))
            mask[i, : len(r)] = 1
        positions = mask.reshape(-1).nonzero().squeeze(1)
        with torch.inference_mode():
            out = model_forward(self.model, ids.to(self.device), mask.to(self.device), positions.to(self.device), head_input=True)
            weight, bias = (
                out.head.weight[: self.vocab],
                (out.head.bias[: self.vocab] if getattr(out.head, "bias", None) is not None else None),
            )
            uniforms = None
            if self.cfg.mode == "sampled":
                uniforms = np.concatenate([row_uniforms(self.cfg.seed, shard, first_row + i, n, self.cfg.n) for i, n in enumerate(lengths)])
            parts = []
            for start in range(0, len(positions), self.chunk):
                sl = slice(start, start + self.chunk)
                logits = F.linear(out.head_input[sl], weight, bias).float()
                log_probs = F.log_softmax(logits / self.cfg.temperature, dim=-1)
                parts.append(sparse_targets(log_probs, self.cfg, uniforms[sl] if uniforms is not None else None))
        indices = torch.cat([p[0] for p in parts]).cpu().numpy()
        values = torch.cat([p[1] for p in parts]).cpu().numpy()
        tail = torch.cat([p[2] for p in parts]).cpu().numpy() if parts[0][2] is not None else None
        result, at = [], 0
        for n in lengths:
            result.append(
                (indices[at : at + n].reshape(-1), values[at : at + n].reshape(-1), tail[at : at + n] if tail is not None else None)
            )
            at += n
        return result


def part_name(split: str, shard: int, row_start: int) -> str:
    return f"{split}/{shard:05d}-{row_start:09d}.parquet"


def write_part(path: str, rows: list[tuple], value_bits: int) -> None:
    """One part file: a row per dataset row (see data_prep/cache_manifest.py); temp file then rename."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    vtype = np.float16 if value_bits == 16 else np.float32
    columns = {
        "indices": pa.array([r[0].astype(np.int32) for r in rows], type=pa.list_(pa.int32())),
        "values": pa.array([r[1].astype(vtype) for r in rows], type=pa.list_(pa.from_numpy_dtype(vtype))),
    }
    if rows and rows[0][2] is not None:
        columns["tail"] = pa.array([r[2].astype(vtype) for r in rows], type=pa.list_(pa.from_numpy_dtype(vtype)))
    tmp = path + ".tmp"
    pq.write_table(
        pa.table(columns),
        tmp,
        compression="zstd",
        compression_level=9,
        use_dictionary=False,
        column_encoding={
            "indices.list.element": "DELTA_BINARY_PACKED",
            "values.list.element": "BYTE_STREAM_SPLIT",
            **({"tail.list.element": "BYTE_STREAM_SPLIT"} if "tail" in columns else {}),
        },
    )
    os.replace(tmp, path)


def read_rows(data_dir: str, shard_path: str, start: int, stop: int) -> list[np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard = pq.ParquetFile(os.path.join(data_dir, shard_path))
    groups, first, at = [], None, 0  # only the row groups that overlap [start, stop)
    for g in range(shard.metadata.num_row_groups):
        n = shard.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            groups.append(g)
            first = at if first is None else first
        at += n
    table = shard.read_row_groups(groups, columns=["input_ids"]) if groups else pa.table({"input_ids": pa.array([], pa.list_(pa.int32()))})
    column = table.column("input_ids").slice(start - (first or 0), stop - start)
    return [np.asarray(r, dtype=np.int64) for r in column.to_pylist()]


try:
    import apache_beam as beam

    class CacheTeacherLogits(beam.DoFn):
        """Element (shard index, shard path, first row, end row) -> that part's file written; yields its name."""

        def __init__(self, cfg: CacheConfig, vocab_size: int, work_dir: str):
            self.cfg, self.vocab, self.work_dir = cfg, vocab_size, work_dir
            self.scorer = None

        def setup(self):
            self.scorer = TeacherScorer(self.cfg, self.vocab)  # once per worker

        def process(self, element):
            shard, shard_path, start, stop = element
            t0 = time.time()
            rows = read_rows(self.cfg.data, shard_path, start, stop)
            out = []
            for b in range(0, len(rows), self.cfg.batch_size):
                out += self.scorer.score(rows[b : b + self.cfg.batch_size], shard, start + b)
            name = part_name(self.cfg.split, shard, start)
            write_part(os.path.join(self.work_dir, name), out, self.cfg.value_bits)
            tokens = sum(len(r) for r in rows)
            print(
                f"distill-cache: shard {shard} rows {start}-{stop}: {tokens} tokens, {tokens / max(time.time() - t0, 1e-9):,.0f} tokens/s "
                f"({self.scorer.device})",
                file=sys.stderr,
                flush=True,
            )
            yield name
except ImportError:  # the trainer imports this module's helpers without Beam
    beam = None


def parts_of(manifest, split: str, rows_per_part: int) -> list[tuple[int, str, int, int]]:
    """(shard index, shard path, first row, end row) of every part: fixed by the dataset and `rows_per_part` alone."""
    return [
        (i, shard.path, start, min(start + rows_per_part, shard.rows))
        for i, shard in enumerate(manifest.splits[split].shards)
        for start in range(0, shard.rows, rows_per_part)
    ]


def check_inputs(cfg: CacheConfig):
    """The dataset (manifest, causal packing, split), the teacher's config and vocabulary: every problem before any work."""
    from data_prep.manifest import load_manifest, verify_shards
    from distill.models import load_teacher_config

    manifest = load_manifest(cfg.data)
    if manifest.packing != "causal":
        raise CacheError(
            f"{cfg.data} is {manifest.packing!r} (masked-LM) data: the teacher's output depends on the mask, which is drawn anew every "
            f"epoch, so it cannot be cached; cache causal data (distill-prep --packing causal)"
        )
    verify_shards(cfg.data, manifest, cfg.split, checksums=True)
    config = load_teacher_config(cfg.teacher)
    vocab = manifest.tokenizer.vocab_size
    if config.vocab_size < vocab:
        raise CacheError(
            f"the teacher's vocabulary ({config.vocab_size}) is smaller than the dataset tokenizer's ({vocab}); it is not this data's teacher"
        )
    return manifest, config


def run_cache(cfg: CacheConfig, beam_args: Optional[list[str]] = None) -> CacheManifest:
    """Check inputs and output, run the pipeline into a staging directory beside `output`, verify, write the manifest, publish."""
    import apache_beam as beam

    from data_prep.manifest import MANIFEST_FILE
    from data_prep.runner import local_runner
    from kd_common.files import sha256_file
    from kd_common.outputs import replace_when_complete

    t0 = time.time()
    manifest, config = check_inputs(cfg)
    vocab = manifest.tokenizer.vocab_size
    units = parts_of(manifest, cfg.split, cfg.rows_per_part)
    inputs = [("--data", cfg.data), ("--teacher", cfg.teacher)]
    with replace_when_complete(cfg.output, cfg.overwrite, is_cache_dir, "teacher cache", inputs) as work:
        os.makedirs(os.path.join(work, cfg.split), exist_ok=True)
        options = _options(beam_args or [], cfg.workers)
        runner = local_runner(options)
        log.info(
            "caching %d rows (%d parts) of %s with teacher %s: %s, %d entries per position, T=%g, %d-bit values, %s",
            manifest.splits[cfg.split].rows,
            len(units),
            cfg.data,
            cfg.teacher,
            cfg.mode,
            cfg.entries,
            cfg.temperature,
            cfg.value_bits,
            f"{cfg.workers} worker process(es)" if runner is not None else "runner from the Beam options",
        )
        with beam.Pipeline(runner=runner, options=options) as pipeline:
            (
                pipeline
                | "Parts" >> beam.Create(units)
                | "Spread" >> beam.Reshuffle()
                | "Teacher" >> beam.ParDo(CacheTeacherLogits(cfg, vocab, work))
            )
        elapsed = time.time() - t0
        parts = _verify_parts(work, manifest, cfg, units)
        tokens = sum(p.tokens for p in parts)
        size = sum(p.bytes for p in parts)
        result = CacheManifest(
            mode=cfg.mode,
            k=cfg.entries,
            temperature=cfg.temperature,
            value_dtype=f"float{cfg.value_bits}",
            vocab_size=vocab,
            split=cfg.split,
            seed=cfg.seed,
            parts=parts,
            teacher={
                "path": os.path.abspath(cfg.teacher),
                "fingerprint": teacher_fingerprint(cfg.teacher),
                "config": config.to_dict(),
                "weights_sha256": weights_sha256(cfg.teacher),
            },
            dataset={
                "path": os.path.abspath(cfg.data),
                "manifest_sha256": sha256_file(os.path.join(cfg.data, MANIFEST_FILE)),
                "rows": manifest.splits[cfg.split].rows,
                "tokens": manifest.splits[cfg.split].tokens,
            },
            stats={
                "bytes": size,
                "bytes_per_token": size / max(tokens, 1),
                "seconds": elapsed,
                "tokens_per_second": tokens / max(elapsed, 1e-9),
                "workers": cfg.workers,
                "settings": dataclasses.asdict(cfg),
            },
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        write_cache_manifest(work, result)
    log.info(
        "wrote %s: %d tokens, %.1f bytes per token, %.0f tokens/s", cfg.output, tokens, size / max(tokens, 1), tokens / max(elapsed, 1e-9)
    )
    return result


def _options(beam_args: list[str], workers: int):
    from apache_beam.options.pipeline_options import PipelineOptions

    args = list(beam_args) + ["--no_pipeline_type_check", "--default_sdk_harness_log_level=WARNING"]
    if not any(a.startswith("--runner") for a in beam_args):
        args += (
            ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
            if workers > 1
            else ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
        )
    return PipelineOptions(args)


def _verify_parts(work: str, manifest, cfg: CacheConfig, units) -> list[CachePart]:
    """Re-open every part: it exists and holds its rows, each with length x entries ids."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from kd_common.files import sha256_file

    parts = []
    for shard, shard_path, start, stop in units:
        name = part_name(cfg.split, shard, start)
        path = os.path.join(work, name)
        if not os.path.exists(path):
            raise RuntimeError(f"the pipeline finished but part {name} was not written")
        lengths = pc.list_value_length(
            pq.read_table(os.path.join(cfg.data, shard_path), columns=["input_ids"]).column("input_ids").slice(start, stop - start)
        ).to_numpy(zero_copy_only=False)
        entries = pc.list_value_length(pq.read_table(path, columns=["indices"]).column("indices")).to_numpy(zero_copy_only=False)
        if len(entries) != stop - start or not np.array_equal(entries, lengths * cfg.entries):
            raise RuntimeError(
                f"part {name} does not hold rows {start}-{stop} of shard {shard} x {cfg.entries} entries; output is inconsistent"
            )
        parts.append(
            CachePart(
                path=name,
                shard=shard,
                row_start=start,
                rows=stop - start,
                tokens=int(lengths.sum()),
                sha256=sha256_file(path),
                bytes=os.path.getsize(path),
            )
        )
    return parts
