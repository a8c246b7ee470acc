"""Dynamic masking: a fresh mask every time a sequence is seen, drawn in the collator.

The mask of a sequence is a pure function of (seed, mask key), so a resumed run, or a run on another number of
ranks, draws exactly the same masks. With dynamic masking (data.static_masks = 0, the default) the key is the
sample's global stream position: a fresh mask every time a sequence is seen. With static masks (data.static_masks =
D > 0, BERT's dupe factor) row r of a split of N rows has D fixed masks: the sample of row r seen in epoch e uses
variant d = e mod D, keyed d * N + r (`static_mask_keys`), so the variants are drawn by the very same function and
have the same statistics; `distill-cache` builds the same masked inputs to cache the teacher on them.

Per sequence: n = max(1, round(p * maskable tokens)) positions are selected without replacement,
uniformly or with probability ~ count(token)^-s (DistilBERT's smoothing, s = 0.7), by
Efraimidis-Spirakis keys (u^(1/w)); with whole-word masking whole words are selected (a word's
weight is the mean of its tokens' weights) until n tokens are covered. Of the selected tokens
80% become [MASK], 10% a random non-special token, 10% stay; special tokens and padding are never
selected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from distill.data.documents import document_layout, document_starts, drop_cross_document_labels
from kd_common.config import ConfigError

IGNORE_INDEX = -100


@dataclass
class MaskingPolicy:
    mask_id: int
    pad_id: int
    vocab_size: int
    special_ids: Sequence[int]
    mlm_probability: float = 0.15
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    whole_word: bool = False
    token_weights: Optional[np.ndarray] = None  # (vocab,) selection weight per id; None = uniform

    def __post_init__(self):
        is_special = np.zeros(self.vocab_size, dtype=bool)
        is_special[np.asarray(list(self.special_ids), dtype=np.int64)] = True
        self.is_special = is_special
        self.random_candidates = np.flatnonzero(~is_special)

    @classmethod
    def with_smoothing(cls, token_counts: np.ndarray, smoothing: float, **kw) -> "MaskingPolicy":
        """Policy whose selection weights are max(count, 1)^-smoothing (0 = uniform), specials 0."""
        policy = cls(**kw)
        if smoothing > 0:
            counts = np.zeros(policy.vocab_size, dtype=np.float64)
            counts[: len(token_counts)] = token_counts[: policy.vocab_size]
            weights = np.maximum(counts, 1.0) ** (-smoothing)
            weights[policy.is_special] = 0.0
            policy.token_weights = weights
        return policy


STATIC_MASK_LIMIT = 255  # variants per sequence (the cache's sampled-mode draws key the variant in 8 bits)
MASK_SETTING_KEYS = (
    "static_masks",
    "mlm_probability",
    "mask_token_fraction",
    "random_token_fraction",
    "token_frequency_smoothing",
    "whole_word_masking",
    "masking",
)


def static_mask_variants(stream: np.ndarray, num_rows: int, variants: int) -> np.ndarray:
    """Static-mask variant of each sample: d = epoch mod D, the epoch of stream index g being g // N."""
    return (np.asarray(stream, dtype=np.int64) // num_rows) % variants


def static_mask_keys(stream: np.ndarray, rows: np.ndarray, num_rows: int, variants: int) -> np.ndarray:
    """Mask key of each sample under static masking: variant d of dataset row r is keyed d * N + r (the stream index the
    sample of row r would have in epoch d under an identity order), so the masks come from the dynamic-mask function."""
    return static_mask_variants(stream, num_rows, variants) * num_rows + np.asarray(rows, dtype=np.int64)


def mask_settings(cfg) -> dict:
    """Every setting a masked input depends on, by its training-config key (`seed`, `data.*`): what a static-mask cache
    records in its manifest and a run from it must match."""
    return {"seed": int(cfg.seed), **{f"data.{key}": getattr(cfg.data, key) for key in MASK_SETTING_KEYS}}


def sample_rng(seed: int, stream_index: int) -> np.random.Generator:
    """The generator that masks the sample at global stream position `stream_index`."""
    return np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, stream_index]))


def _weighted_order(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices ordered as a weighted sample without replacement (Efraimidis-Spirakis), 0-weight last."""
    u = rng.random(len(weights))
    with np.errstate(divide="ignore"):
        keys = np.where(weights > 0, np.log(u) / np.where(weights > 0, weights, 1.0), -np.inf)
    return np.argsort(-keys, kind="stable")


def mask_sequence(
    ids: np.ndarray, word_start: Optional[np.ndarray], policy: MaskingPolicy, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Return (input ids with replacements, labels with -100 where nothing is predicted)."""
    ids = np.asarray(ids, dtype=np.int64)
    maskable = ~policy.is_special[ids]
    n_maskable = int(maskable.sum())
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    if n_maskable == 0:
        return ids.copy(), labels
    n_target = max(1, int(round(policy.mlm_probability * n_maskable)))
    if policy.token_weights is not None:
        token_w = policy.token_weights[ids] * maskable
    else:
        token_w = maskable.astype(np.float64)

    if policy.whole_word and word_start is not None:
        starts = np.asarray(word_start, dtype=bool) | ~maskable  # specials are words of their own
        starts[0] = True
        word_of = np.cumsum(starts) - 1
        n_words = int(word_of[-1]) + 1
        sizes = np.bincount(word_of, minlength=n_words)
        word_maskable = np.bincount(word_of, weights=maskable, minlength=n_words) == sizes
        word_w = np.bincount(word_of, weights=token_w, minlength=n_words) / sizes
        word_w[~word_maskable] = 0.0
        chosen_words = []
        covered = 0
        for w in _weighted_order(word_w, rng):
            if word_w[w] <= 0 or covered >= n_target:
                break
            if covered + sizes[w] > n_target and covered > 0:
                continue  # as BERT's whole-word masking: skip words that overshoot the budget
            chosen_words.append(w)
            covered += sizes[w]
        selected = np.flatnonzero(np.isin(word_of, chosen_words))
    else:
        selected = _weighted_order(token_w, rng)[:n_target]
        selected = selected[token_w[selected] > 0]

    selected = np.sort(selected)
    labels[selected] = ids[selected]
    out = ids.copy()
    roll = rng.random(len(selected))
    to_mask = selected[roll < policy.mask_token_fraction]
    to_random = selected[(roll >= policy.mask_token_fraction) & (roll < policy.mask_token_fraction + policy.random_token_fraction)]
    out[to_mask] = policy.mask_id
    if len(to_random):
        out[to_random] = rng.choice(policy.random_candidates, size=len(to_random))
    return out, labels


def _padded_arrays(rows, pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input ids filled with `pad_id`, labels filled with -100, zero attention) for the longest row, rounded up to `multiple`."""
    length = max(len(ids) for ids, _ in rows)
    length = ((length + multiple - 1) // multiple) * multiple
    shape = (len(rows), length)
    return np.full(shape, pad_id, dtype=np.int64), np.full(shape, IGNORE_INDEX, dtype=np.int64), np.zeros(shape, dtype=np.int64)


def _as_batch(batch_ids, attention, labels, stream_indices) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.from_numpy(batch_ids),
        "attention_mask": torch.from_numpy(attention),
        "labels": torch.from_numpy(labels),
        "stream_indices": torch.as_tensor(np.asarray(stream_indices, dtype=np.int64)),
    }


class MaskingCollator:
    """Mask each sequence with its own generator and pad the micro batch."""

    def __init__(self, policy: MaskingPolicy, seed: int, pad_to_multiple_of: int = 8):
        self.policy = policy
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[tuple[np.ndarray, Optional[np.ndarray]]], stream_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch_ids, labels, attention = _padded_arrays(rows, self.policy.pad_id, self.pad_to_multiple_of)
        for i, ((ids, word_start), g) in enumerate(zip(rows, stream_indices)):
            masked, seq_labels = mask_sequence(ids, word_start, self.policy, sample_rng(self.seed, int(g)))
            n = len(masked)
            batch_ids[i, :n] = masked
            labels[i, :n] = seq_labels
            attention[i, :n] = 1
        return _as_batch(batch_ids, attention, labels, stream_indices)


# ------------------------------------------------------------------------------------------------
# Batched masking (the trainer's default, data.masking=batched): the same policy drawn for a whole micro batch in numpy
# array operations, from counter-based random numbers. Each uniform is a hash of (seed, the sample's global stream
# index, a draw tag, the position in the sequence), so a sample's mask is still a pure function of (seed, stream index)
# (independent of the micro batch it lands in, its padding and the number of ranks) with no generator built per sequence.
# A one-time change of the masks against the per-sequence collator (data.masking=per_sequence, and distill-eval's
# masks), with the same statistics: n = max(1, round(p * maskable)) tokens per sequence, Efraimidis-Spirakis selection
# with the smoothing weights, 80/10/10, whole words under the same budget rule, specials and padding never selected.

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_TAG_SELECT, _TAG_ROLL, _TAG_RANDOM = 0, 1, 2


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 whose outputs pass as independent uniform bits."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, stream_indices: np.ndarray, length: int, tag: int) -> np.ndarray:
    """(len(stream_indices), length) uniforms in (0, 1): a hash of (seed, stream index, tag, position), float64 with 53 bits."""
    with np.errstate(over="ignore"):
        base = _mix64(
            _mix64(np.asarray([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)) ^ np.asarray(stream_indices, dtype=np.int64).astype(np.uint64)
        )
        counter = (np.arange(length, dtype=np.uint64) * np.uint64(3) + np.uint64(tag)) * np.uint64(0xD1B54A32D192ED03)
        bits = _mix64(base[:, None] ^ counter[None, :])
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / 2**53)


def mask_batch(
    ids: np.ndarray, lengths: np.ndarray, word_start: Optional[np.ndarray], policy: MaskingPolicy, seed: int, stream_indices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(input ids with replacements, labels with -100 where nothing is predicted) of a padded (B, L) micro batch whose row b
    holds `lengths[b]` tokens; `word_start` (B, L) flags for whole-word masking (None: token masking)."""
    batch, length = ids.shape
    real = np.arange(length)[None, :] < lengths[:, None]
    maskable = ~policy.is_special[ids] & real
    n_maskable = maskable.sum(1)
    n_target = np.where(n_maskable > 0, np.maximum(1, np.rint(policy.mlm_probability * n_maskable)), 0).astype(np.int64)
    weights = policy.token_weights[ids] * maskable if policy.token_weights is not None else maskable.astype(np.float64)
    u_select = counter_uniforms(seed, stream_indices, length, _TAG_SELECT)
    if policy.whole_word and word_start is not None:
        selected = np.zeros((batch, length), dtype=bool)
        for b in range(batch):
            n = int(lengths[b])
            if n_target[b]:
                selected[b, :n] = _whole_words(word_start[b, :n], maskable[b, :n], weights[b, :n], u_select[b, :n], int(n_target[b]))
    else:
        with np.errstate(divide="ignore"):
            keys = np.where(weights > 0, np.log(u_select) / np.where(weights > 0, weights, 1.0), -np.inf)
        order = np.argsort(-keys, axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.arange(length)[None, :].repeat(batch, 0), axis=1)
        selected = (rank < n_target[:, None]) & (weights > 0)
    roll = counter_uniforms(seed, stream_indices, length, _TAG_ROLL)
    to_mask = selected & (roll < policy.mask_token_fraction)
    to_random = selected & (roll >= policy.mask_token_fraction) & (roll < policy.mask_token_fraction + policy.random_token_fraction)
    labels = np.where(selected, ids, IGNORE_INDEX)
    out = np.where(to_mask, policy.mask_id, ids)
    if to_random.any():
        pick = (counter_uniforms(seed, stream_indices, length, _TAG_RANDOM)[to_random] * len(policy.random_candidates)).astype(np.int64)
        out[to_random] = policy.random_candidates[np.minimum(pick, len(policy.random_candidates) - 1)]
    return out, labels


def _whole_words(word_start: np.ndarray, maskable: np.ndarray, token_w: np.ndarray, u: np.ndarray, n_target: int) -> np.ndarray:
    """Selected positions (bool) of one sequence under whole-word masking, as mask_sequence; a word's key is drawn at its first token."""
    starts = np.asarray(word_start, dtype=bool) | ~maskable
    starts[0] = True
    word_of = np.cumsum(starts) - 1
    n_words = int(word_of[-1]) + 1
    sizes = np.bincount(word_of, minlength=n_words)
    word_maskable = np.bincount(word_of, weights=maskable, minlength=n_words) == sizes
    word_w = np.bincount(word_of, weights=token_w, minlength=n_words) / sizes
    word_w[~word_maskable] = 0.0
    with np.errstate(divide="ignore"):
        keys = np.where(word_w > 0, np.log(u[np.flatnonzero(starts)]) / np.where(word_w > 0, word_w, 1.0), -np.inf)
    chosen = np.zeros(n_words, dtype=bool)
    covered = 0
    for w in np.argsort(-keys, kind="stable"):
        if word_w[w] <= 0 or covered >= n_target:
            break
        if covered + sizes[w] > n_target and covered > 0:
            continue  # as BERT's whole-word masking: skip words that overshoot the budget
        chosen[w] = True
        covered += sizes[w]
    return chosen[word_of]


class BatchedMaskingCollator:
    """Mask a whole micro batch at once (`mask_batch`) and pad it; what the trainer uses unless data.masking=per_sequence."""

    def __init__(self, policy: MaskingPolicy, seed: int, pad_to_multiple_of: int = 8):
        self.policy = policy
        self.seed = seed
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[tuple[np.ndarray, Optional[np.ndarray]]], stream_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch_ids, _, attention = _padded_arrays(rows, self.policy.pad_id, self.pad_to_multiple_of)
        lengths = np.fromiter((len(ids) for ids, _ in rows), dtype=np.int64, count=len(rows))
        whole_word = self.policy.whole_word and all(ws is not None for _, ws in rows)
        word_start = np.zeros(batch_ids.shape, dtype=bool) if whole_word else None
        for i, (ids, ws) in enumerate(rows):
            batch_ids[i, : lengths[i]] = ids
            if whole_word:
                word_start[i, : lengths[i]] = ws
        attention[np.arange(batch_ids.shape[1])[None, :] < lengths[:, None]] = 1
        stream = np.asarray(stream_indices, dtype=np.int64)
        masked, labels = mask_batch(batch_ids, lengths, word_start, self.policy, self.seed, stream)
        return _as_batch(masked, attention, labels, stream)


class CausalLMCollator:
    """Micro batches of causal-LM data (`distill-prep --packing causal`): nothing is masked, the labels are
    the next tokens (-100 at each sequence's last token, which has no next token, and on padding).

    `input_ids` stay as stored; padding (right side, `pad_id`, attention 0) only fills the micro batch. With
    `documents` (data.document_attention) the rows' documents are kept apart (distill/data/documents.py): the batch also
    holds `position_ids` (restarting at each document), the segments' offsets `cu_seqlens` and their longest `max_document`,
    and a document's last token has no label. Rows are (ids, document-start flags); flags None (a format-1 dataset) =
    documents begin after each `eos_id`.
    """

    def __init__(self, pad_id: int, pad_to_multiple_of: int = 8, documents: bool = True, eos_id: Optional[int] = None):
        self.pad_id = pad_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.documents = documents
        self.eos_id = eos_id

    def __call__(self, rows: list[tuple[np.ndarray, Optional[np.ndarray]]], stream_indices: Sequence[int]) -> dict[str, torch.Tensor]:
        batch_ids, labels, attention = _padded_arrays(rows, self.pad_id, self.pad_to_multiple_of)
        starts = []
        for i, (ids, flags) in enumerate(rows):
            ids = np.asarray(ids, dtype=np.int64)
            n = len(ids)
            batch_ids[i, :n] = ids
            labels[i, : n - 1] = ids[1:]
            attention[i, :n] = 1
            if self.documents:
                starts.append(document_starts(ids, flags, self.eos_id))
                drop_cross_document_labels(labels[i], starts[-1])
        batch = _as_batch(batch_ids, attention, labels, stream_indices)
        if self.documents:
            position_ids, cu_seqlens, longest = document_layout(starts, batch_ids.shape[1])
            batch.update(
                position_ids=torch.from_numpy(position_ids),
                cu_seqlens=torch.from_numpy(cu_seqlens),
                max_document=torch.tensor(longest),
            )
        return batch


def collator_for(
    data_cfg, seed: int, packing: str, tokenizer, vocab_size: int, special_ids: Sequence[int], token_counts: np.ndarray, pad_multiple: int
):
    """The collator a dataset needs: masking for masked-LM data, next-token labels for causal data.

    A masking collator carries `static_masks` (data.static_masks): when > 0, the caller (distill/data/reader.py MicroBatches)
    passes each sample's static mask key (`static_mask_keys`) instead of its stream index."""
    static_masks = getattr(data_cfg, "static_masks", 0)
    if packing == "causal":  # no masking: labels are the next tokens
        if static_masks:
            raise ConfigError(
                f"data.static_masks={static_masks} applies to masked-LM data, this dataset is causal (nothing is masked); set data.static_masks=0"
            )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        return CausalLMCollator(pad, pad_multiple, getattr(data_cfg, "document_attention", True), tokenizer.eos_token_id)
    policy = MaskingPolicy.with_smoothing(
        token_counts,
        data_cfg.token_frequency_smoothing,
        mask_id=tokenizer.mask_token_id,
        pad_id=tokenizer.pad_token_id,
        vocab_size=vocab_size,
        special_ids=special_ids,
        mlm_probability=data_cfg.mlm_probability,
        mask_token_fraction=data_cfg.mask_token_fraction,
        random_token_fraction=data_cfg.random_token_fraction,
        whole_word=data_cfg.whole_word_masking,
    )
    collator = (BatchedMaskingCollator if getattr(data_cfg, "masking", "batched") == "batched" else MaskingCollator)(
        policy, seed, pad_multiple
    )
    collator.static_masks = static_masks
    return collator
