"""Reading a prepared dataset and cutting it into micro batches, deterministically.

Data order is a pure function of (seed, epoch, global stream index): stream index g is sample
`perm_epoch[g % N]` of epoch g // N, and optimizer step s consumes stream indices
[s*G, (s+1)*G). A resumed run, or one on another number of ranks, therefore sees exactly the
samples it had not seen yet. Which rank and micro step gets which sample of a step is free (the
gradient is their sum), so samples of similar length are grouped to save padding.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from data_prep.manifest import (
    DOCUMENT_START_COLUMN,
    WORD_START_COLUMN,
    DatasetError,
    Manifest,
    load_manifest,
    sha256_file,
    verify_shards,
)
from distill.data.documents import batch_documents
from distill.data.masking import collator_for, static_mask_keys, static_mask_variants
from distill.objective.losses import Batch
from kd_common.errors import UserError

log = logging.getLogger(__name__)


class TokenSequences:
    """Random access to the sequences of one split (Arrow files memory-mapped by `datasets`)."""

    def __init__(
        self,
        data_dir: str,
        split: str,
        manifest: Optional[Manifest] = None,
        cache_dir: Optional[str] = None,
        verify_checksums: bool = False,
    ):
        import datasets  # datasets: not at start-up
        import pyarrow.compute as pc  # pyarrow: not at start-up

        self.data_dir, self.split = data_dir, split
        self.manifest = manifest or load_manifest(data_dir)
        verify_shards(data_dir, self.manifest, split, checksums=verify_checksums)
        files = [os.path.join(data_dir, shard.path) for shard in self.manifest.splits[split].shards]
        datasets.disable_progress_bars()
        try:
            self.dataset = datasets.Dataset.from_parquet(files, cache_dir=cache_dir, keep_in_memory=False)
        except Exception as exc:  # pyarrow's ArrowInvalid / OSError, wrapped by datasets: name the file that does not read
            raise DatasetError(
                f"{_unreadable_shard(files) or data_dir} is not a readable Parquet shard ({_first_line(exc)}); "
                f"the dataset is damaged, re-run distill-prep"
            ) from None
        # the per-token flags the collator reads: word starts (masked-LM data) or document starts (causal data, format 2)
        names = self.dataset.column_names
        self.flag_column = next((c for c in (WORD_START_COLUMN, DOCUMENT_START_COLUMN) if c in names), None)
        self.id_limit: Optional[int] = None  # when set, `rows` refuses a token id >= it (the vocabulary) before anything indexes with it
        self._table = None
        column = self.dataset.data.column("input_ids")
        self.lengths = np.concatenate([pc.list_value_length(chunk).to_numpy(zero_copy_only=False) for chunk in column.chunks]).astype(
            np.int32
        )
        if len(self.lengths) != self.manifest.splits[split].rows:
            raise ValueError(f"{data_dir}: read {len(self.lengths)} rows of {split!r}, manifest says {self.manifest.splits[split].rows}")

    def __len__(self) -> int:
        return len(self.lengths)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_table"] = None  # the datasets object pickles by file path; never ship table data to workers
        return state

    def where(self, row: int) -> tuple[str, int]:
        """(shard file, row within it) of row `row` of the split."""
        for shard in self.manifest.splits[self.split].shards:
            if row < shard.rows:
                return os.path.join(self.data_dir, shard.path), row
            row -= shard.rows
        raise IndexError(row)

    def check_ids(self, ids: list[np.ndarray], indices: np.ndarray) -> None:
        """Every token id of these rows is below `id_limit`, else a DatasetError naming the shard and row (ids are unsigned)."""
        top = [int(row.max()) if len(row) else 0 for row in ids]
        if not top or max(top) < self.id_limit:
            return
        bad = int(np.argmax(np.asarray(top) >= self.id_limit))
        path, row = self.where(int(indices[bad]))
        value, limit = top[bad], self.id_limit
        error = DatasetError(
            f"{path} row {row} holds token id {value}, outside the tokenizer's vocabulary of {limit} (ids 0..{limit - 1}); "
            f"the dataset is damaged or was not written by distill-prep with this tokenizer: re-run distill-prep"
        )
        error.rank_local = True  # type: ignore[attr-defined]  # each rank reads its own rows: the rank that met it says so
        raise error

    def rows(self, indices: np.ndarray) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
        """(token ids, word-start or document-start flags, None where the shards hold none) of the given row indices, in that order."""
        if self._table is None:
            self._table = self.dataset.data.table.select(["input_ids"] + ([self.flag_column] if self.flag_column else []))
        table = self._table.take(np.asarray(indices, dtype=np.int64))
        ids = _split_lists(table.column("input_ids"), np.int64)  # numpy views of the list values, no Python lists
        starts = _split_lists(table.column(self.flag_column), bool) if self.flag_column else [None] * len(ids)
        if self.id_limit is not None:
            self.check_ids(ids, indices)
        return list(zip(ids, starts))


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _unreadable_shard(files: list[str]) -> Optional[str]:
    """The first of `files` that pyarrow cannot read in full (only called after a read failed)."""
    import pyarrow.parquet as pq  # pyarrow: not at start-up

    for path in files:
        try:
            pq.read_table(path)
        except Exception:
            return path
    return None


def _split_lists(column, dtype) -> list[np.ndarray]:
    """The rows of an Arrow list column as numpy arrays (one copy of the values, split at the offsets); null rows are empty."""
    array = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    offsets = array.offsets.to_numpy()
    values = array.values.slice(offsets[0], offsets[-1] - offsets[0]).to_numpy(zero_copy_only=False).astype(dtype, copy=True)
    return np.split(values, offsets[1:-1] - offsets[0])


@dataclass
class StepPlan:
    """Which samples go to which rank and micro step at each optimizer step."""

    num_samples: int
    global_batch: int
    micro_batch: int
    world_size: int
    rank: int
    seed: int
    lengths: Optional[np.ndarray] = None  # set to group micro batches by length
    group_steps: int = 1  # >1 (with lengths): pool this many consecutive steps' samples, sort by length, deal out in seeded order

    def __post_init__(self):
        from distill.config import batch_problem  # distill.config: not at start-up of distill-eval

        problem = batch_problem(self.global_batch, self.micro_batch, self.world_size)
        if problem:
            raise ValueError(problem)
        per_step = self.micro_batch * self.world_size
        self.accumulation = self.global_batch // per_step
        self._perms: dict[int, np.ndarray] = {}
        self._pool: Optional[tuple[int, np.ndarray, np.ndarray]] = None  # (pool index, stream, rows) sorted by length

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        return self._perms[epoch]

    def sample_ids(self, stream: np.ndarray) -> np.ndarray:
        """Dataset row of each global stream index."""
        out = np.empty(len(stream), dtype=np.int64)
        epochs = stream // self.num_samples
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self._permutation(int(epoch))[stream[sel] % self.num_samples]
        return out

    def step_stream(self, step: int) -> np.ndarray:
        return np.arange(step * self.global_batch, (step + 1) * self.global_batch, dtype=np.int64)

    def step_samples(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream indices, row ids) of every sample of `step`, sorted by length when grouping.

        With `group_steps` = M > 1 the samples of steps [kM, (k+1)M) are pooled and sorted by length, cut into M
        buckets of `global_batch`, and bucket j trains at step kM + perm_k[j] (perm_k seeded by (seed, k)): micro
        batches of nearly equal lengths even when the global batch is small (Hugging Face's length-grouped
        sampler), still a pure function of (seed, step) and independent of the number of ranks."""
        if self.lengths is None:
            stream = self.step_stream(step)
            return stream, self.sample_ids(stream)
        if self.group_steps <= 1:
            stream = self.step_stream(step)
            rows = self.sample_ids(stream)
            order = np.lexsort((stream, self.lengths[rows]))  # by length, ties by stream position
            return stream[order], rows[order]
        pool = step // self.group_steps
        if self._pool is None or self._pool[0] != pool:
            size = self.group_steps * self.global_batch
            stream = np.arange(pool * size, (pool + 1) * size, dtype=np.int64)
            rows = self.sample_ids(stream)
            order = np.lexsort((stream, self.lengths[rows]))
            self._pool = (pool, stream[order], rows[order])
        _, stream, rows = self._pool
        step_of_bucket = np.random.default_rng([self.seed, pool, 0x6C656E]).permutation(self.group_steps)
        bucket = int(np.flatnonzero(step_of_bucket == step % self.group_steps)[0])
        sl = slice(bucket * self.global_batch, (bucket + 1) * self.global_batch)
        return stream[sl], rows[sl]

    def micro_batch_of(self, step: int, micro: int) -> tuple[np.ndarray, np.ndarray]:
        """(stream indices, row ids) for this rank's `micro`-th micro batch of `step`."""
        stream, rows = self.step_samples(step)
        chunk = micro * self.world_size + self.rank  # same micro step on all ranks has similar lengths
        sl = slice(chunk * self.micro_batch, (chunk + 1) * self.micro_batch)
        return stream[sl], rows[sl]

    def step_fingerprint(self, step: int) -> str:
        """Short hash of the set of rows a step trains on (world-size independent)."""
        rows = np.sort(self.step_samples(step)[1])
        return hashlib.sha1(rows.tobytes()).hexdigest()[:16]


class MicroBatches(torch.utils.data.Dataset):
    """Item i = this rank's i-th micro batch from `start_step` on, masked and padded."""

    def __init__(self, sequences: TokenSequences, plan: StepPlan, collator, start_step: int, end_step: int):
        self.sequences = sequences
        self.plan = plan
        self.collator = collator
        self.start_step = start_step
        self.end_step = end_step

    def __len__(self) -> int:
        return (self.end_step - self.start_step) * self.plan.accumulation

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step = self.start_step + i // self.plan.accumulation
        stream, rows = self.plan.micro_batch_of(step, i % self.plan.accumulation)
        variants = getattr(self.collator, "static_masks", 0)
        if not variants:  # dynamic masking (or causal data): keyed by the stream index
            batch = self.collator(self.sequences.rows(rows), stream)
        else:
            batch = self.static_masked(stream, rows, variants)
        batch["rows"] = torch.as_tensor(np.asarray(rows, dtype=np.int64))  # for sources that look the teacher up by row (a cache)
        return batch

    def static_masked(self, stream: np.ndarray, rows: np.ndarray, variants: int) -> dict[str, torch.Tensor]:
        """The micro batch with static masks (data.static_masks = D): each sample masked at its key d * N + r, d = epoch mod D."""
        n = self.plan.num_samples
        batch = self.collator(self.sequences.rows(rows), static_mask_keys(stream, rows, n, variants))
        batch["stream_indices"] = torch.as_tensor(np.asarray(stream, dtype=np.int64))
        batch["mask_variants"] = torch.as_tensor(static_mask_variants(stream, n, variants))  # a cache looks its targets up by it
        return batch


def make_loader(micro_batches: MicroBatches, num_workers: int, pin_memory: bool, prefetch_factor: int = 4) -> torch.utils.data.DataLoader:
    """Ordered loader over micro batches; workers prefetch `prefetch_factor` micro batches each while the model computes."""
    kwargs = {"prefetch_factor": prefetch_factor, "persistent_workers": False} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(
        micro_batches, batch_size=None, shuffle=False, num_workers=num_workers, pin_memory=pin_memory, **kwargs
    )


def document_attention_line(data_dir: str, manifest: Manifest, on: bool) -> str:
    """What a run (or distill-eval) on causal data does with its documents, in one line for the log."""
    if not on:
        return f"{data_dir}: data.document_attention=false: each row is one sequence, its documents attend to each other"
    if manifest.document_starts:
        return (
            f"{data_dir}: attention and position ids restart at each document (the {manifest.document_starts} flags distill-prep recorded)"
        )
    eos = manifest.tokenizer.special_token_ids.get("eos")
    return (
        f"{data_dir} (format {manifest.format_version}) records no document starts: documents are taken to begin after each EOS "
        f"(id {eos}); attention and position ids restart there (re-run distill-prep to record them)"
    )


def load_token_counts(data_dir: str, manifest: Manifest) -> np.ndarray:
    """The train split's token counts (for masking smoothing), checked against the manifest's sha256; never unpickled."""
    path = os.path.join(data_dir, manifest.token_counts["path"])
    expected = manifest.token_counts.get("sha256")
    if expected and sha256_file(path) != expected:
        raise DatasetError(f"{path} fails its sha256 check; the dataset is damaged, re-run distill-prep")
    return np.load(path, allow_pickle=False)


class DataSource:
    """This rank's micro batches, one optimizer step at a time, on the device.

    The reader, the step plan (which samples each rank and micro step trains on) and the collator
    (masking, padding) are built once; `start` opens a loader at the step a run starts or resumes from.
    """

    def __init__(
        self,
        sequences: TokenSequences,
        plan: StepPlan,
        collator,
        device: torch.device,
        num_workers: int,
        pin_memory: bool,
        prefetch_factor: int,
    ):
        self.sequences = sequences
        self.plan = plan
        self.collator = collator
        self.device = device
        self.loader_options = (num_workers, pin_memory, prefetch_factor)
        self._batches = None

    @classmethod
    def build(cls, data_cfg, plan, ctx) -> "DataSource":
        """This rank's data from section `data` and the run's plan (distill/train/preflight.py: manifest, tokenizer, batch sizes, seed)."""
        manifest, cuda = plan.manifest, ctx.device.type == "cuda"
        sequences = TokenSequences(data_cfg.path, data_cfg.split, manifest, data_cfg.cache_dir, data_cfg.verify_checksums)
        sequences.id_limit = manifest.tokenizer.vocab_size  # an id beyond the dataset's vocabulary: one line naming shard and row
        steps = StepPlan(
            len(sequences),
            plan.global_batch,
            plan.micro_batch,
            ctx.world_size,
            ctx.rank,
            plan.seed,
            sequences.lengths if data_cfg.group_by_length else None,
            data_cfg.length_group_steps,
        )
        counts = load_token_counts(data_cfg.path, manifest) if data_cfg.token_frequency_smoothing > 0 else np.zeros(0)
        if ctx.rank == 0 and manifest.packing == "causal":
            log.info("%s", document_attention_line(data_cfg.path, manifest, data_cfg.document_attention))
        collator = collator_for(
            data_cfg,
            plan.seed,
            manifest.packing,
            plan.tokenizer,
            plan.vocab_size,
            manifest.tokenizer.all_special_ids,
            counts,
            pad_multiple=data_cfg.pad_to_multiple_of or (8 if cuda else 1),
        )
        return cls(
            sequences,
            steps,
            collator,
            ctx.device,
            data_cfg.num_workers if data_cfg.num_workers is not None else (2 if cuda else 0),
            data_cfg.pin_memory if data_cfg.pin_memory is not None else cuda,
            data_cfg.prefetch_factor,
        )

    @property
    def accumulation(self) -> int:
        return self.plan.accumulation

    def start(self, start_step: int, total_steps: int) -> None:
        self._batches = iter(
            make_loader(MicroBatches(self.sequences, self.plan, self.collator, start_step, total_steps), *self.loader_options)
        )

    def next(self):
        """(Batch on the device, the collated CPU tensors) of the next micro batch."""
        try:
            raw = next(self._batches)
        except UserError as exc:
            text = str(exc).strip()
            if "Original Traceback" not in text:
                raise
            # raised in a loader worker: torch re-raises it with the worker's traceback in the message; keep the one line
            error = type(exc)(text.splitlines()[-1].split(": ", 1)[-1])
            error.rank_local = True  # type: ignore[attr-defined]  # met by this rank's loader, on its own rows
            raise error from None
        # what the step needs to know about the batch's layout is computed here, on the host, before the copy: the flat
        # positions of the real tokens and of the labelled ones, and whether anything is padded (no device read later)
        attention = raw["attention_mask"]
        documents = batch_documents(raw, self.device)  # causal data with data.document_attention: documents kept apart
        tokens = attention.reshape(-1).nonzero(as_tuple=True)[0]
        masked = (raw["labels"].reshape(-1) != -100).nonzero(as_tuple=True)[0]
        batch = Batch(
            input_ids=raw["input_ids"].to(self.device, non_blocking=True),
            attention_mask=attention.to(self.device, non_blocking=True),
            labels=raw["labels"].to(self.device, non_blocking=True),
            rows=raw.get("rows"),
            mask_variants=raw.get("mask_variants"),
            token_positions=tokens.to(self.device, non_blocking=True),
            masked_positions=masked.to(self.device, non_blocking=True),
            padded=tokens.numel() != attention.numel(),
            documents=documents,
        )
        return batch, raw

    def step_fingerprint(self, step: int) -> str:
        return self.plan.step_fingerprint(step)
