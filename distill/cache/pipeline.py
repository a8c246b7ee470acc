"""distill-cache: run the frozen teacher once over a prepared dataset and keep a sparse view of its distribution.

The Beam graph is small: the launcher cuts every data shard of the split into parts of `rows_per_part` rows
(fixed by the settings, never by the workers), `Create | Reshuffle | ParDo(CacheTeacherLogits)`; the DoFn loads
the teacher once per worker (`setup`, on the GPU when the worker has one), runs it `batch_size` rows at a time,
and writes each part's Parquet file (temp name, then rename: a retried bundle rewrites the same bytes). Every
number of a part depends only on (settings, teacher, rows of the part), and a draw of sampled mode on
(seed, shard, row, position): the output is the same for any worker count. The launcher then re-opens every
part (rows, sha256) and writes manifest.json last (data_prep/cache_manifest.py).

Masked-LM data needs static masks (`--static-masks D`, BERT's dupe factor; the run trains with data.static_masks=D):
for every row and variant d the DoFn builds the masked input exactly as the trainer's collator does (the same
`collator_for`, seed and masking settings, keyed d * N + r: distill/data/masking.py), runs the teacher on it and stores the
targets at every real position (`--positions all`) or the masked ones (`--positions masked`). The seed and masking
settings come from the training config (`--train-config`), one source of truth, and are recorded in the manifest.

Causal data: rows are batched by the trainer's causal collator, so with `--document-attention` (the default, as the
trainer's data.document_attention) the teacher's positions and attention restart at each document of a row
(distill/data/documents.py); the manifest records the setting and a run with the other one refuses the cache.
"""

from __future__ import annotations

import dataclasses
import dataclasses as dc
import datetime
import logging
import os
import shutil
import sys
import time
from types import SimpleNamespace
from typing import Literal, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from apache_beam.options.pipeline_options import PipelineOptions

from data_prep.cache_manifest import CacheError, CacheManifest, CachePart, is_cache_dir, write_cache_manifest
from kd_common.config import Bool, Float, Int, Str, build, read_yaml, section, setting
from kd_common.files import sha256_file
from kd_common.output_rule import replace_when_complete

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
    static_masks: Int = setting(
        0,
        "masked-LM data: D fixed masks per sequence (BERT's dupe factor; train with data.static_masks=D): the teacher is cached "
        "on each row's D masked inputs, built as the trainer builds them; storage grows D-fold. 0 = the training config's "
        "data.static_masks (masked-LM data needs D > 0; causal data 0)",
        ge=0,
        le=255,
    )
    train_config: Optional[Str] = setting(
        None,
        "masked-LM data: the training config (the distill-train --config YAML) whose seed and data.* masking settings "
        "(mlm_probability, mask/random fractions, token_frequency_smoothing, whole_word_masking, masking, static_masks) draw "
        "the masks: one source of truth with the run, which must match them; null = the trainer's defaults",
    )
    document_attention: Bool = setting(
        True,
        "causal data: the teacher sees each document of a row alone (position ids and attention restart at each document), as "
        "training with data.document_attention=true, the default; false = each row as one sequence. A run needs the same setting",
    )
    positions: Literal["all", "masked"] = setting(
        "all",
        "masked-LM data: store the teacher at every real position (serves loss.ce_positions all and masked) or at the masked "
        "positions only (about 15% of the bytes; only loss.ce_positions=masked)",
    )

    @property
    def entries(self) -> int:
        return self.k if self.mode == "topk" else self.n

    def problems(self) -> list[str]:
        return []


def row_uniforms(seed: int, shard: int, row: int, length: int, n: int, variant: int = 0) -> np.ndarray:
    """(length, n) uniforms of one row (of static-mask `variant`): a pure function of (seed, shard, row, variant), position-major."""
    return np.random.Generator(np.random.Philox(key=[seed, (variant << 56) | (shard << 40) | row])).random((length, n))


def train_mask_settings(path: Optional[str]) -> dict:
    """The seed and data.* masking settings of a training config YAML (the trainer's defaults where it says nothing), by
    their training-config keys (distill.data.masking.mask_settings)."""
    from distill.config import Config, DataConfig  # distill.config: not at start-up of distill-cache
    from distill.data.masking import mask_settings  # torch (via distill.data.masking): not at start-up

    raw = read_yaml(path) if path else {}
    data = build(DataConfig, dict(raw.get("data") or {}, path=None))
    default = next(f.default for f in dc.fields(Config) if f.name == "seed")
    seed = raw.get("seed", getattr(default, "default", default))  # a pydantic field's default sits in its FieldInfo
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise CacheError(f"{path}: seed must be a non-negative integer, got {seed!r}")
    return mask_settings(SimpleNamespace(seed=seed, data=data))


def masking_for(cfg: CacheConfig, manifest) -> Optional[dict]:
    """The masking settings of a masked-LM dataset's static masks (training-config keys), None for causal data."""
    if manifest.packing == "causal":
        if cfg.static_masks:
            raise CacheError(f"--static-masks applies to masked-LM data, {cfg.data} is causal (nothing is masked); drop --static-masks")
        return None
    settings = train_mask_settings(cfg.train_config)
    from_config = settings["data.static_masks"]
    if cfg.static_masks and from_config and cfg.static_masks != from_config:
        raise CacheError(
            f"--static-masks {cfg.static_masks} but {cfg.train_config} has data.static_masks={from_config}; give one value (the run's)"
        )
    variants = cfg.static_masks or from_config
    if not variants:
        raise CacheError(
            f"{cfg.data} is {manifest.packing!r} (masked-LM) data: with dynamic masking the teacher's output depends on a mask drawn "
            f"anew every epoch, so it cannot be cached; cache D fixed masks per sequence with --static-masks D (and "
            f"--train-config YAML for the run's seed and masking settings), then train with data.static_masks=D"
        )
    settings["data.static_masks"] = variants
    return settings


class StaticMasker:
    """The trainer's masked inputs of a masked-LM split: variant d of split row r masked at key d * N + r by the collator
    the trainer builds (`collator_for` with the recorded seed and settings, the dataset's tokenizer and token counts, the
    teacher's vocabulary for random replacements). Picklable; the collator is built on the worker."""

    def __init__(self, data_dir: str, manifest, split: str, settings: dict, vocab_size: int, positions: str):
        self.data_dir, self.split, self.settings, self.vocab_size, self.positions = data_dir, split, settings, vocab_size, positions
        self.variants = int(settings["data.static_masks"])
        shards = manifest.splits[split].shards
        self.num_rows = manifest.splits[split].rows
        self.shard_offsets = [int(x) for x in np.cumsum([0] + [s.rows for s in shards])[:-1]]
        self.collator = None

    def _build(self):
        from data_prep.manifest import load_dataset_tokenizer, load_manifest  # data_prep.manifest: not at start-up of distill-cache
        from distill.data.masking import collator_for  # torch (via distill.data.masking): not at start-up
        from distill.data.reader import load_token_counts  # torch (via distill.data.reader): not at start-up

        manifest = load_manifest(self.data_dir)
        tokenizer = load_dataset_tokenizer(self.data_dir, manifest)
        data = SimpleNamespace(**{key[len("data.") :]: v for key, v in self.settings.items() if key.startswith("data.")})
        counts = load_token_counts(self.data_dir, manifest) if data.token_frequency_smoothing > 0 else np.zeros(0)
        special = manifest.tokenizer.all_special_ids
        return collator_for(data, self.settings["seed"], manifest.packing, tokenizer, self.vocab_size, special, counts, pad_multiple=1)

    def masked(self, rows: list[tuple], shard: int, first_row: int, variant: int) -> dict:
        """The collated micro batch (input_ids, attention_mask, labels) of variant `variant` of these consecutive rows."""
        if self.collator is None:
            self.collator = self._build()
        keys = variant * self.num_rows + self.shard_offsets[shard] + first_row + np.arange(len(rows), dtype=np.int64)
        return self.collator(rows, keys)


def sparse_targets(log_probs, cfg: CacheConfig, uniforms: Optional[np.ndarray] = None):
    """(indices (P, k) int32, values (P, k) fp32 log-probs, tail (P,) or None) from (P, V) log-probabilities at T."""
    import torch  # torch: not at start-up

    if cfg.mode == "topk":
        k = min(cfg.k, log_probs.shape[-1])
        values, indices = torch.topk(log_probs, k, dim=-1)
        indices, order = torch.sort(indices, dim=-1)
        values = values.gather(1, order)
        tail = (1.0 - values.double().exp().sum(-1)).clamp_(min=0.0).float()
        if k == log_probs.shape[-1]:
            tail.zero_()  # every id kept: nothing is outside them (not the rounding of 1 - sum)
        return indices.int(), values.float(), tail
    cdf = log_probs.double().exp().cumsum(-1)
    u = torch.from_numpy(uniforms).to(cdf.device) * cdf[:, -1:]
    indices = torch.searchsorted(cdf, u).clamp_(max=log_probs.shape[-1] - 1)
    indices = torch.sort(indices, dim=-1).values
    return indices.int(), log_probs.gather(1, indices).float(), None


class TeacherScorer:
    """The frozen teacher on one worker: rows of token ids in, sparse targets per row out."""

    def __init__(self, cfg: CacheConfig, vocab_size: int):
        import torch  # torch: not at start-up

        from data_prep.manifest import load_manifest  # data_prep.manifest: not at start-up of distill-cache
        from distill.models.build import load_teacher, resolve_dtype  # torch (via distill.models.build): not at start-up

        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        want = "cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu"
        self.device = torch.device(want)
        self.cfg, self.vocab = cfg, vocab_size
        self.model = load_teacher(cfg.teacher, resolve_dtype(cfg.dtype, self.device), "sdpa", self.device)
        self.eos = load_manifest(cfg.data).tokenizer.special_token_ids.get("eos")  # documents of format-1 rows begin after EOS
        width = self.model.config.hidden_size
        self.chunk = max(1, (1 << 24) // max(vocab_size, width))  # positions projected to the vocabulary at once

    def score(self, rows: list[tuple], shard: int, first_row: int, masker: Optional[StaticMasker] = None) -> list[tuple]:
        """Sparse targets of rows of (token ids, word-start flags): one per row at every position (causal data), or with a
        `masker` one per (row, variant), row-major, on the trainer's masked inputs at the positions it stores."""
        if masker is None:  # causal data, batched as the trainer batches it (its documents kept apart or not, as it will be)
            from distill.data.documents import batch_documents  # torch (via distill.data): not at start-up
            from distill.data.masking import CausalLMCollator  # torch (via distill.data.masking): not at start-up

            batch = CausalLMCollator(0, 1, self.cfg.document_attention, self.eos)(rows, np.arange(len(rows)))
            mask = batch["attention_mask"]
            keys = [(shard, first_row + i, 0) for i in range(len(rows))]
            return self._score(batch["input_ids"], mask, mask.bool(), keys, batch_documents(batch, self.device))
        per_variant = []
        for d in range(masker.variants):
            batch = masker.masked(rows, shard, first_row, d)
            keep = batch["attention_mask"].bool() if masker.positions == "all" else batch["labels"] != -100
            keys = [(shard, first_row + i, d) for i in range(len(rows))]
            per_variant.append(self._score(batch["input_ids"], batch["attention_mask"], keep, keys))
        return [per_variant[d][i] for i in range(len(rows)) for d in range(masker.variants)]

    def _score(self, ids, mask, keep, keys: list[tuple[int, int, int]], documents=None) -> list[tuple]:
        """The teacher on (B, L) `ids` with attention `mask` (and the rows' `documents` kept apart when given): per row, the
        targets at its `keep` positions, ascending; sampled draws keyed by `keys` (shard, row, variant)."""
        import torch  # torch: not at start-up
        import torch.nn.functional as F  # torch: not at start-up

        from distill.models.build import model_forward  # torch (via distill.models.build): not at start-up
        from distill.models.families import vocab_logits  # torch (via distill.models.families): not at start-up

        lengths = keep.sum(1).tolist()
        positions = keep.reshape(-1).nonzero().squeeze(1)
        if len(positions) == 0:  # nothing to store (e.g. masked positions of rows with nothing maskable)
            none = np.zeros(0, dtype=np.float32)
            return [(none.astype(np.int32), none, none if self.cfg.mode == "topk" else None) for _ in lengths]
        with torch.inference_mode():
            out = model_forward(
                self.model, ids.to(self.device), mask.to(self.device), positions.to(self.device), head_input=True, documents=documents
            )
            uniforms = None
            if self.cfg.mode == "sampled":
                uniforms = np.concatenate(
                    [row_uniforms(self.cfg.seed, shard, row, n, self.cfg.n, d) for (shard, row, d), n in zip(keys, lengths)]
                )
            parts = []
            for start in range(0, len(positions), self.chunk):
                sl = slice(start, start + self.chunk)
                # the logits as the teacher's forward makes them (its output transform: scaling, final softcap)
                logits = vocab_logits(out.head, out.head_transform, out.head_input[sl], self.vocab).float()
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


def read_rows(data_dir: str, shard_path: str, start: int, stop: int) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
    """(token ids, word-start or document-start flags, or None) of rows [start, stop) of a data shard."""
    shard = pq.ParquetFile(os.path.join(data_dir, shard_path))
    ids = read_column(shard, "input_ids", start, stop, np.int64)
    flags = next((c for c in ("word_start", "doc_start") if c in shard.schema_arrow.names), None)
    if flags is None:
        return [(r, None) for r in ids]
    return list(zip(ids, read_column(shard, flags, start, stop, bool)))


def read_column(shard, column: str, start: int, stop: int, dtype) -> list[np.ndarray]:
    """Rows [start, stop) of a list column of an open Parquet data shard, as numpy arrays."""
    groups, first, at = [], None, 0  # only the row groups that overlap [start, stop)
    for g in range(shard.metadata.num_row_groups):
        n = shard.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            groups.append(g)
            first = at if first is None else first
        at += n
    table = shard.read_row_groups(groups, columns=[column]) if groups else pa.table({column: pa.array([], pa.list_(pa.int32()))})
    values = table.column(column).slice(start - (first or 0), stop - start)
    return [np.asarray(r, dtype=dtype) for r in values.to_pylist()]


try:
    import apache_beam as beam

    class CacheTeacherLogits(beam.DoFn):
        """Element (shard index, shard path, first row, end row) -> that part's file written; yields its name."""

        def __init__(self, cfg: CacheConfig, vocab_size: int, work_dir: str, masker: Optional[StaticMasker] = None):
            self.cfg, self.vocab, self.work_dir, self.masker = cfg, vocab_size, work_dir, masker
            self.scorer = None

        def setup(self):
            self.scorer = TeacherScorer(self.cfg, self.vocab)  # once per worker

        def process(self, element):
            shard, shard_path, start, stop = element
            t0 = time.time()
            rows = read_rows(self.cfg.data, shard_path, start, stop)
            out = []
            for b in range(0, len(rows), self.cfg.batch_size):
                out += self.scorer.score(rows[b : b + self.cfg.batch_size], shard, start + b, self.masker)
            name = part_name(self.cfg.split, shard, start)
            write_part(os.path.join(self.work_dir, name), out, self.cfg.value_bits)
            tokens = sum(len(r) for r, _ in rows) * (self.masker.variants if self.masker is not None else 1)
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
    # data_prep.manifest: not at start-up of distill-cache
    from data_prep.manifest import load_dataset_tokenizer, load_manifest, verify_shards
    from distill.models.build import check_positions, load_teacher_config  # torch (via distill.models.build): not at start-up

    manifest = load_manifest(cfg.data)
    masking_for(cfg, manifest)  # masked-LM data without static masks: refused here, before any work
    verify_shards(cfg.data, manifest, cfg.split, checksums=True)
    load_dataset_tokenizer(cfg.data, manifest)  # its tokenizer/ folder is the one the manifest records
    config = load_teacher_config(cfg.teacher)
    check_positions(config, manifest.max_seq_len, f"--teacher {cfg.teacher}", f"--data {cfg.data}")
    vocab = manifest.tokenizer.vocab_size
    if config.vocab_size < vocab:
        raise CacheError(
            f"the teacher's vocabulary ({config.vocab_size}) is smaller than the dataset tokenizer's ({vocab}); it is not this data's teacher"
        )
    return manifest, config


def run_cache(cfg: CacheConfig, beam_args: Optional[list[str]] = None) -> CacheManifest:
    """Check inputs and output, run the pipeline into a staging directory beside `output`, verify, write the manifest, publish."""
    from data_prep.manifest import MANIFEST_FILE  # data_prep.manifest: not at start-up of distill-cache
    from data_prep.runner import local_runner  # data_prep.runner: not at start-up of distill-cache

    # distill.models.fingerprint: not at start-up of distill-cache
    from distill.models.fingerprint import content_identity, shape_fingerprint

    t0 = time.time()
    manifest, config = check_inputs(cfg)
    teacher_content = content_identity(cfg.teacher)  # the teacher the workers read, by content (checked again at the end)
    vocab = manifest.tokenizer.vocab_size
    units = parts_of(manifest, cfg.split, cfg.rows_per_part)
    masking = masking_for(cfg, manifest)
    masker = StaticMasker(cfg.data, manifest, cfg.split, masking, config.vocab_size, cfg.positions) if masking else None
    variants = masker.variants if masker else 0
    inputs = [("--data", cfg.data), ("--teacher", cfg.teacher)]
    with replace_when_complete(cfg.output, cfg.overwrite, is_cache_dir, "teacher cache", inputs) as work:
        os.makedirs(os.path.join(work, cfg.split), exist_ok=True)
        options = _options(beam_args or [], cfg.workers)
        runner = local_runner(options)
        log.info(
            "caching %d rows (%d parts%s) of %s with teacher %s: %s, %d entries per position, T=%g, %d-bit values, %s",
            manifest.splits[cfg.split].rows,
            len(units),
            f", {variants} static masks each, {cfg.positions} positions" if variants else "",
            cfg.data,
            cfg.teacher,
            cfg.mode,
            cfg.entries,
            cfg.temperature,
            cfg.value_bits,
            f"{cfg.workers} worker process(es)" if runner is not None else "runner from the Beam options",
        )
        pipeline = beam.Pipeline(runner=runner, options=options)
        try:
            with pipeline:
                (
                    pipeline
                    | "Parts" >> beam.Create(units)
                    | "Spread" >> beam.Reshuffle()
                    | "Teacher" >> beam.ParDo(CacheTeacherLogits(cfg, vocab, work, masker))
                )
        finally:  # Beam removes its temp dir only after a run that was not interrupted
            shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
        elapsed = time.time() - t0
        parts = _verify_parts(work, manifest, cfg, units, variants)
        tokens = sum(p.tokens for p in parts)
        size = sum(p.bytes for p in parts)
        if content_identity(cfg.teacher, teacher_content["files"])["sha256"] != teacher_content["sha256"]:
            raise CacheError(
                f"the teacher's files in {cfg.teacher} changed while the cache was written; nothing was kept: run distill-cache again"
            )
        cached = tokens * max(1, variants)  # tokens the teacher ran on (each row once per static mask)
        result = CacheManifest(
            mode=cfg.mode,
            k=cfg.entries,
            temperature=cfg.temperature,
            value_dtype=f"float{cfg.value_bits}",
            vocab_size=vocab,
            split=cfg.split,
            seed=cfg.seed,
            parts=parts,
            static_masks=variants,
            document_attention=cfg.document_attention if manifest.packing == "causal" else None,
            positions=cfg.positions if variants else "all",
            masking=masking or {},
            teacher={
                "path": os.path.abspath(cfg.teacher),
                "fingerprint": shape_fingerprint(cfg.teacher),
                "config": config.to_dict(),
                "content_sha256": teacher_content["sha256"],  # distill/models/fingerprint.py; "files": its per-file record
                "files": teacher_content["files"],
            },
            dataset={
                "path": os.path.abspath(cfg.data),
                "manifest_sha256": sha256_file(os.path.join(cfg.data, MANIFEST_FILE)),
                "rows": manifest.splits[cfg.split].rows,
                "tokens": manifest.splits[cfg.split].tokens,
            },
            stats={
                "bytes": size,
                "bytes_per_token": size / max(tokens, 1),  # per token of the dataset (all D masks of it, with static masks)
                "bytes_per_masked_copy_token": size / max(cached, 1),  # per token of one masked copy (= bytes_per_token when causal)
                "seconds": elapsed,
                "tokens_per_second": cached / max(elapsed, 1e-9),
                "workers": cfg.workers,
                "settings": dataclasses.asdict(cfg),
            },
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        write_cache_manifest(work, result)
    log.info(
        "wrote %s: %d tokens, %.1f bytes per token%s, %.0f tokens/s",
        cfg.output,
        tokens,
        size / max(tokens, 1),
        f" ({size / max(cached, 1):.1f} per token of each of the {variants} masked copies)" if variants else "",
        cached / max(elapsed, 1e-9),
    )
    return result


def _options(beam_args: list[str], workers: int):
    args = list(beam_args) + ["--no_pipeline_type_check", "--default_sdk_harness_log_level=WARNING"]
    if not any(a.startswith("--runner") for a in beam_args):
        args += (
            ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
            if workers > 1
            else ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
        )
    return PipelineOptions(args)


def _verify_parts(work: str, manifest, cfg: CacheConfig, units, variants: int = 0) -> list[CachePart]:
    """Re-open every part: it exists and holds its rows (x D static masks), each with length x entries ids (masked
    positions only: a multiple of the entries)."""
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
        want = np.repeat(lengths, max(1, variants)) * cfg.entries
        if variants and cfg.positions == "masked":
            ok = len(entries) == len(want) and not np.any(entries % cfg.entries) and np.all(entries <= want)
        else:
            ok = len(entries) == len(want) and np.array_equal(entries, want)
        if not ok:
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
