"""`teacher.source: cache`: the teacher's outputs read from a `distill-cache` cache instead of running the teacher.

No teacher model is in memory while training (with `student.init=teacher` its weights are read once on the CPU for
the copy, then dropped). Each micro batch's targets are looked up by the dataset row every sample came from
(`Batch.rows`, from the data order, a pure function of (seed, epoch, index)), so data order, resume and elastic
resume are those of an online run. `teacher.path` is optional: the manifest records the teacher's config, the tokenizer
(checked against the dataset's) and the teacher's content sha256 (checked against a teacher.path given). The soft-target loss (ce / reverse_kl / jsd) is computed by the student's
ChunkedLogitLoss from the cached support (distill/objective/sparse_logits.py). Refused with one line: a cache of another
dataset, teacher, split, temperature or vocabulary, one with fewer (or more) rows than the data, a damaged part,
losses that need the live teacher (hidden states, attention), and on masked-LM data dynamic masking or static masks
other than the cache's (data.static_masks, seed, every masking setting: `distill.data.masking.mask_settings`).

Masked-LM data with static masks (data.static_masks = D, `distill-cache --static-masks D`): the cache holds D rows
per dataset row, the teacher on each variant's masked input; a sample is looked up by (row, variant), the variant a
pure function of its stream index (epoch mod D), so data order and resume are unchanged here too.
"""

from __future__ import annotations

import hashlib
import logging
import os

import numpy as np
import torch

from data_prep.cache_manifest import MANIFEST_FILE as CACHE_MANIFEST
from data_prep.cache_manifest import CacheError, CacheManifest, load_cache_manifest, support_label, verify_cache_parts
from data_prep.manifest import TokenizerIdentity, check_tokenizer_matches
from distill.data.masking import mask_settings
from distill.model_outputs import ModelOutputs
from distill.models.build import init_student_from_teacher, load_teacher
from distill.models.fingerprint import content_identity, differing_files, shape_fingerprint, weights_sha256
from distill.objective.sparse_logits import SparseTargets

log = logging.getLogger("distill.cache")


class CacheTeacher:
    """A teacher source (distill/teachers/online.py) that reads a cache: `outputs(batch)` and `fingerprint()`."""

    def __init__(self, cache_dir: str, manifest, table, teacher_config, teacher_path: str, device: torch.device):
        self.cache_dir, self.manifest, self.table = cache_dir, manifest, table
        self.config = self.model = teacher_config  # shapes only (the objective and the student's construction read them)
        self.device = device
        self.path = teacher_path
        self.objective = None

    @classmethod
    def load(cls, teacher_cfg, plan, ctx) -> "CacheTeacher":
        """The cache the plan checked against the run (`check_cache`: dataset, teacher, split, temperature, masks, rows),
        its parts verified (sizes; sha256 with teacher.cache_verify) and opened as one memory-mapped table."""
        manifest = plan.cache_manifest
        paths = verify_cache_parts(teacher_cfg.cache, manifest, checksums=teacher_cfg.cache_verify)
        table = _open_parts(paths, manifest, plan.arrow_cache_dir)
        log.info(
            "teacher from cache %s: %s per position, T=%g, %s values, %.1f bytes per token",
            teacher_cfg.cache,
            support_label(manifest.mode, manifest.k),
            manifest.temperature,
            manifest.value_dtype,
            manifest.stats.get("bytes_per_token", float("nan")),
        )
        return cls(teacher_cfg.cache, manifest, table, plan.teacher_config, teacher_cfg.path, ctx.device)

    def bind(self, objective) -> None:
        if not objective.chunked:
            raise CacheError(
                "teacher.source=cache needs the chunked logit sweep (loss.chunked_logits=true, train.logits_where_needed=true)"
            )
        self.objective = objective

    def compile(self) -> None:
        pass

    def init_student(self, student, layers: list[int], fold_token_type: bool) -> dict[str, str]:
        """`student.init=teacher`: the teacher's weights read once on the CPU for the copy, then dropped."""
        teacher = load_teacher(self.path, torch.float32, "sdpa", torch.device("cpu"))
        return init_student_from_teacher(student, teacher, layers, fold_token_type)

    def describe(self) -> str:
        masks = f", {self.manifest.static_masks} static masks, {self.manifest.positions} positions" if self.manifest.static_masks else ""
        return f"cache {self.cache_dir} ({support_label(self.manifest.mode, self.manifest.k)}, {self.manifest.value_dtype}{masks}); no teacher model in memory"

    def fingerprint(self) -> str:
        """The cache's manifest hash (it binds the teacher, the dataset and the settings)."""
        with open(os.path.join(self.cache_dir, CACHE_MANIFEST), "rb") as handle:
            return "cache:" + hashlib.sha256(handle.read()).hexdigest()

    def part_of(self, row: int) -> str:
        """'part FILE' holding dataset row `row` (parts are listed in shard, then row order)."""
        for part in self.manifest.parts:
            if row < part.rows:
                return f"part {os.path.join(self.cache_dir, part.path)}"
            row -= part.rows
        return "no part"

    def outputs(self, batch) -> ModelOutputs:
        """The cached targets at `batch.logit_positions`, looked up by each sample's dataset row (one gather per column)."""
        if batch.rows is None:
            raise RuntimeError("teacher.source=cache needs each sample's dataset row (Batch.rows)")
        rows = batch.rows.cpu().numpy()
        k = self.manifest.k
        lengths = batch.attention_mask.sum(1).cpu().numpy()
        variants = self.manifest.static_masks
        if variants:  # D cache rows per dataset row: variant d of row r is cache row r * D + d
            if batch.mask_variants is None:
                raise RuntimeError("a static-mask cache needs each sample's mask variant (Batch.mask_variants; data.static_masks > 0)")
            picked = self.table.take(rows * variants + batch.mask_variants.cpu().numpy())
        else:
            picked = self.table.take(rows)
        offsets, ids = _list_column(picked, "indices")
        flat = batch.logit_positions.cpu().numpy()
        sample, position = np.divmod(flat, batch.input_ids.shape[1])
        slot, stored = position, lengths  # the entry of a position within its cache row, and positions per cache row
        if self.manifest.positions == "masked":  # the masked positions only, ascending: a position's slot is its rank among them
            labelled = batch.labels.cpu().numpy() != -100
            slot = (np.cumsum(labelled, axis=1) - 1)[sample, position]
            stored = labelled.sum(1)
        counts = np.diff(offsets)
        bad = np.flatnonzero(counts != stored * k)
        if len(bad):
            b = int(bad[0])
            raise CacheError(
                f"cache row {rows[b]} ({self.part_of(int(rows[b]))}) holds {counts[b] // k} positions, the data row has {stored[b]} to look "
                f"up: the cache is not aligned with the data (or its masks are not the run's); re-run distill-cache"
            )
        entries = (offsets[sample] + slot * k)[:, None] + np.arange(k)
        picked_ids = ids[entries]
        if picked_ids.size and (int(picked_ids.max()) >= self.manifest.vocab_size or int(picked_ids.min()) < 0):
            b = int(sample[int(np.argmax(((picked_ids >= self.manifest.vocab_size) | (picked_ids < 0)).any(1)))])
            raise CacheError(
                f"cache row {rows[b]} ({self.part_of(int(rows[b]))}) holds token ids outside the vocabulary of {self.manifest.vocab_size}: "
                f"the part was modified after distill-cache wrote it; re-run distill-cache"
            )
        _, vals = _list_column(picked, "values")
        tail = None
        if self.manifest.mode == "topk":
            tail_offsets, tails = _list_column(picked, "tail")
            tail = torch.from_numpy(tails[tail_offsets[sample] + slot].astype(np.float32)).to(self.device)
        targets = SparseTargets(
            indices=torch.from_numpy(picked_ids.astype(np.int64)).to(self.device),
            values=torch.from_numpy(vals[entries].astype(np.float32)).to(self.device),
            tail=tail,
            mode=self.manifest.mode,
            temperature=self.manifest.temperature,
        )
        return ModelOutputs(hidden=torch.empty(0, device=self.device), head_input=targets, head=None, causal=not variants)


def check_cache(cfg, data, manifest_sha: str) -> CacheManifest:
    """The cache at `teacher.cache` fits this run (distill/train/preflight.py asks, before anything loads): written for this
    dataset (`data`: its manifest, `manifest_sha`: the sha256 of its manifest.json), teacher, split, temperature and
    vocabulary, with the run's masks, every row present. Returns its manifest; a CacheError (one line) names the first
    mismatch."""
    problems = cfg.cache_problems()
    if problems:
        raise CacheError(problems[0])
    cache_dir = cfg.teacher.cache
    manifest = load_cache_manifest(cache_dir)
    where = os.path.join(cache_dir, CACHE_MANIFEST)
    if manifest.dataset.get("manifest_sha256") != manifest_sha:
        raise CacheError(
            f"{where} was written for another dataset ({manifest.dataset.get('path')}), not {cfg.data.path}; "
            f"run distill-cache on this dataset"
        )
    if cfg.teacher.path:  # optional: the manifest records the teacher; one given must be the one the cache was written with
        _check_teacher(cfg.teacher.path, manifest.teacher, where)
    if manifest.tokenizer:  # what the teacher's tokenizer was checked against when the cache was written
        check_tokenizer_matches(data, TokenizerIdentity(**manifest.tokenizer), f"teacher cache {cache_dir}")
    if manifest.split != cfg.data.split:
        raise CacheError(f"{where} caches split {manifest.split!r}, the run trains on {cfg.data.split!r}")
    if abs(manifest.temperature - cfg.loss.temperature) > 1e-9:
        raise CacheError(
            f"{where} holds the teacher at temperature {manifest.temperature:g}, the run's loss.temperature is "
            f"{cfg.loss.temperature:g}; set loss.temperature={manifest.temperature:g} or re-run distill-cache --temperature"
        )
    if manifest.vocab_size != data.tokenizer.vocab_size:
        raise CacheError(f"{where} has vocabulary {manifest.vocab_size}, the dataset {data.tokenizer.vocab_size}; re-run distill-cache")
    _check_masking(cfg, manifest, where, data.packing)
    rows = data.splits[cfg.data.split].rows
    if manifest.rows != rows:
        raise CacheError(
            f"{where} holds {manifest.rows} rows of {cfg.data.split!r}, the dataset has {rows}; the cache is incomplete: re-run distill-cache"
        )
    return manifest


def teacher_config_of(manifest, where: str):
    """The teacher's Hugging Face config as the cache recorded it (no teacher files needed): its model type's own config
    class from transformers, filled from the recorded dict (nothing in it can name code to run)."""
    from transformers import AutoConfig  # transformers: not at start-up

    recorded = dict(manifest.teacher.get("config") or {})
    model_type = recorded.pop("model_type", None)
    recorded.pop("auto_map", None)
    try:
        return AutoConfig.for_model(model_type, **recorded)
    except (ValueError, TypeError, KeyError) as exc:
        raise CacheError(
            f"{where} records no usable teacher config (model type {model_type!r}: {' '.join(str(exc).split())[:120]}); set "
            f"teacher.path to the teacher the cache was written with"
        ) from None


def cache_teacher_config(cache_dir: str):
    """The config of the teacher a cache was written with, from its manifest (distill-train without teacher.path)."""
    return teacher_config_of(load_cache_manifest(cache_dir), os.path.join(cache_dir, CACHE_MANIFEST))


def _check_teacher(path: str, recorded: dict, where: str) -> None:
    """The teacher at `path` is the one the cache was written with, by the content of its files (distill/models/fingerprint.py,
    re-hashing only files changed since the cache recorded them); a cache from before content fingerprints is checked
    by the sha256 of its weight files it recorded, one with neither by config and file sizes (with a warning)."""
    if "content_sha256" in recorded:
        now = content_identity(path, recorded.get("files"))
        was, found, changed = recorded["content_sha256"], now["sha256"], differing_files(recorded.get("files"), now["files"])
    elif "weights_sha256" in recorded:
        was, found, changed = recorded["weights_sha256"], weights_sha256(path), []
    else:
        log.warning(
            "%s records no hash of its teacher's weights (an older cache): the teacher is matched by config and file sizes only", where
        )
        was, found, changed = recorded.get("fingerprint"), shape_fingerprint(path), []
    if was != found:
        raise CacheError(
            f"{where} was written with another teacher ({recorded.get('path')}, content sha256 {str(was)[:12]}), not {path} "
            f"(content sha256 {found[:12]}{', differs in ' + ', '.join(changed) if changed else ''}); run distill-cache with this "
            f"teacher, or set teacher.path to the one the cache was written with"
        )


def _check_masking(cfg, manifest, where: str, packing: str) -> None:
    """The run's masks are the cache's: the same static masks, seed and masking settings (masked-LM data), or none (causal,
    where the teacher must have seen the documents of a row as the run's student does: data.document_attention)."""
    if packing == "causal":
        cached = bool(manifest.document_attention)
        if cached != cfg.data.document_attention:
            how = "each document of a row alone" if cached else "each row as one sequence, its documents attending to each other"
            raise CacheError(
                f"{where} holds the teacher on {how}"
                + ("" if cached or manifest.document_attention is not None else " (written before distill-cache kept documents apart)")
                + f", the run has data.document_attention={str(cfg.data.document_attention).lower()}; set "
                f"data.document_attention={str(cached).lower()} or re-run distill-cache "
                + ("--document-attention" if cfg.data.document_attention else "--no-document-attention")
            )
        return
    if not manifest.static_masks:
        raise CacheError(
            f"{where} holds no static masks (a cache of causal data); re-run distill-cache --static-masks D on {cfg.data.path}"
        )
    if not cfg.data.static_masks:
        raise CacheError(
            f"teacher.source=cache on masked-LM data needs static masks: with dynamic masking (data.static_masks=0) the mask is drawn "
            f"anew every epoch and no cache holds the teacher's output; set data.static_masks={manifest.static_masks} (the cache's, "
            f"{where}) or use teacher.source=online"
        )
    run = mask_settings(cfg)
    for key, cached in manifest.masking.items():
        if run.get(key) != cached:
            raise CacheError(
                f"{where} was written with {key}={cached}, the run has {key}={run.get(key)}: its masks would not be the cache's; "
                f"set {key}={cached} or re-run distill-cache with the run's settings (--train-config)"
            )
    if manifest.positions == "masked" and cfg.loss.ce_positions != "masked":
        raise CacheError(
            f"{where} holds the teacher at the masked positions only (distill-cache --positions masked), the run's soft-target loss "
            f"reads every position (loss.ce_positions={cfg.loss.ce_positions}); set loss.ce_positions=masked or re-run distill-cache "
            f"--positions all"
        )


def _damaged(path: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
    return (
        f"cache part {path} is unreadable ({first}): it was modified after distill-cache wrote it (teacher.cache_verify=false "
        f"skips its sha256 check, not this); re-run distill-cache"
    )


def _read_problem(path: str):
    """The exception reading part `path` in full raises, or None."""
    import pyarrow.parquet as pq  # pyarrow: not at start-up

    try:
        pq.read_table(path)
    except Exception as exc:
        return exc
    return None


def _list_column(table, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (rows + 1,), values) of a list column: row i is values[offsets[i]:offsets[i + 1]]."""
    array = table.column(column).combine_chunks()
    return array.offsets.to_numpy().astype(np.int64), array.values.to_numpy(zero_copy_only=False)


def _open_parts(paths: list[str], manifest, cache_dir):
    """The parts as one memory-mapped Arrow table, rows in dataset order (parts are listed in shard, then row order; a
    static-mask cache has its D variants of each row consecutive)."""
    import datasets  # datasets: not at start-up
    import pyarrow.parquet as pq  # pyarrow: not at start-up

    datasets.disable_progress_bars()
    for path, part in zip(paths, manifest.parts):  # footers only: cheap, and names the part (the sha256 may be skipped)
        try:
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:
            raise CacheError(_damaged(path, exc)) from None
        if rows != part.rows * manifest.rows_per_data_row:
            raise CacheError(
                f"cache part {path} holds {rows} rows, the manifest says {part.rows * manifest.rows_per_data_row}; the cache is damaged: "
                f"re-run distill-cache"
            )
    try:
        dataset = datasets.Dataset.from_parquet(paths, cache_dir=cache_dir, keep_in_memory=False)
    except Exception as exc:  # a part whose pages do not decode (pyarrow / datasets errors): find and name it
        for path in paths:
            problem = _read_problem(path)
            if problem is not None:
                raise CacheError(_damaged(path, problem)) from None
        raise CacheError(f"the cache parts do not read ({exc}); re-run distill-cache") from None
    want = manifest.rows * manifest.rows_per_data_row
    if len(dataset) != want:
        raise CacheError(f"the cache parts hold {len(dataset)} rows, the manifest says {want}; re-run distill-cache")
    return dataset.data.table
