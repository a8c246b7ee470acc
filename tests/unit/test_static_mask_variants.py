"""Static masks (data.static_masks = D, BERT's dupe factor), in process: the variants are the dynamic-mask function at key
d * N + r and cycle with the epoch; dynamic masking unchanged; the statistics; refused on causal data (the cache on masked-LM
data, end to end, is tests/e2e/test_static_masks.py)."""

from __future__ import annotations

import numpy as np
import pytest
from support import trainer_samples as _samples


class _Rows:
    """A stand-in for TokenSequences: random rows of ids (specials 0-3) with word starts."""

    def __init__(self, n: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.data = []
        for _ in range(n):
            length = int(rng.integers(12, 40))
            ids = rng.integers(4, 60, size=length)
            ids[0], ids[-1] = 1, 2  # [CLS] ... [SEP]
            self.data.append((ids.astype(np.int64), rng.random(length) < 0.6))
        self.lengths = np.asarray([len(ids) for ids, _ in self.data], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, indices):
        return [self.data[int(i)] for i in indices]


def _policy(whole_word=False, smoothing=0.0):
    from distill.data.masking import MaskingPolicy

    counts = np.arange(1, 61, dtype=np.float64) ** 2
    return MaskingPolicy.with_smoothing(
        counts, smoothing, mask_id=3, pad_id=0, vocab_size=60, special_ids=[0, 1, 2, 3], whole_word=whole_word
    )


def _collator(kind, policy, seed, variants):
    from distill.data.masking import BatchedMaskingCollator, MaskingCollator

    collator = (BatchedMaskingCollator if kind == "batched" else MaskingCollator)(policy, seed, 1)
    collator.static_masks = variants
    return collator


@pytest.mark.parametrize("kind", ["batched", "per_sequence"])
def test_static_masks_are_the_dynamic_function_at_the_documented_key_and_cycle_with_the_epoch(kind):
    from distill.data.masking import mask_batch, mask_sequence, sample_rng
    from distill.data.reader import StepPlan

    seqs, seed, variants = _Rows(24), 5, 3
    policy = _policy(whole_word=True, smoothing=0.7)
    plan = StepPlan(len(seqs), 8, 4, 1, 0, seed, seqs.lengths)
    steps = 4 * len(seqs) // 8  # 4 epochs: variants 0, 1, 2, 0
    got = _samples(seqs, plan, _collator(kind, policy, seed, variants), steps)
    assert len(got) == 4 * len(seqs)
    by_row_epoch = {}
    for stream, row, ids, labels, variant in got:
        epoch = stream // len(seqs)
        assert variant == epoch % variants
        key = variant * len(seqs) + row  # the documented key
        raw, ws = seqs.data[row]
        if kind == "batched":
            want_ids, want_labels = mask_batch(raw[None], np.asarray([len(raw)]), ws[None], policy, seed, np.asarray([key]))
            want_ids, want_labels = want_ids[0], want_labels[0]
        else:
            want_ids, want_labels = mask_sequence(raw, ws, policy, sample_rng(seed, key))
        assert np.array_equal(ids, want_ids) and np.array_equal(labels, want_labels), (stream, row)
        by_row_epoch[row, epoch] = (ids, labels)
    for row in range(len(seqs)):
        assert np.array_equal(by_row_epoch[row, 0][1], by_row_epoch[row, 3][1]), "epoch 3 should repeat epoch 0's mask (D = 3)"
        assert np.array_equal(by_row_epoch[row, 0][0], by_row_epoch[row, 3][0])
    differ = sum(not np.array_equal(by_row_epoch[r, 0][1], by_row_epoch[r, 1][1]) for r in range(len(seqs)))
    assert differ >= len(seqs) // 2, "variants 0 and 1 should be different masks"
    # deterministic: a second loader (as a resumed run builds) gives the same samples
    again = _samples(seqs, plan, _collator(kind, policy, seed, variants), steps)
    assert all(a[0] == b[0] and np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3]) for a, b in zip(got, again))


def test_dynamic_masking_is_unchanged():
    """static_masks = 0 keys every sample by its stream index, exactly as before (no variant in the batch)."""
    from distill.data.reader import StepPlan

    seqs, seed = _Rows(16), 3
    policy = _policy()
    plan = StepPlan(len(seqs), 8, 4, 1, 0, seed, seqs.lengths)
    got = _samples(seqs, plan, _collator("batched", policy, seed, 0), 4)
    for stream, row, ids, labels, variant in got:
        ref = _collator("batched", policy, seed, 0)([seqs.data[row]], [stream])
        assert variant is None and np.array_equal(ids, ref["input_ids"][0].numpy()) and np.array_equal(labels, ref["labels"][0].numpy())


@pytest.mark.parametrize("kind", ["batched", "per_sequence"])
def test_static_mask_statistics(kind):
    """Over 300 rows x 4 variants: each sequence selects max(1, round(0.15 x maskable)) tokens (counted here), never a
    special one; of the selected 80% become [MASK], 10% a random token, 10% stay (binomial bounds)."""
    from distill.data.masking import static_mask_keys

    seqs, seed, variants = _Rows(300, seed=1), 9, 4
    policy = _policy()
    collator = _collator(kind, policy, seed, variants)
    counts = {"mask": 0, "random_or_kept": 0, "kept": 0, "selected": 0}
    rows = np.arange(len(seqs))
    for d in range(variants):
        stream = d * len(seqs) + rows  # epoch d in an identity order
        keys = static_mask_keys(stream, rows, len(seqs), variants)
        assert np.array_equal(keys, d * len(seqs) + rows)
        batch = collator(seqs.rows(rows), keys)
        for r in rows:
            raw, _ = seqs.data[r]
            n = len(raw)
            labels, ids = batch["labels"][r, :n].numpy(), batch["input_ids"][r, :n].numpy()
            selected = labels != -100
            maskable = raw >= 4
            assert selected.sum() == max(1, int(round(0.15 * maskable.sum()))), (d, r)
            assert not np.any(selected & ~maskable) and np.array_equal(labels[selected], raw[selected])
            assert np.array_equal(ids[~selected], raw[~selected])
            counts["selected"] += int(selected.sum())
            counts["mask"] += int((ids[selected] == 3).sum())
            counts["kept"] += int((ids[selected] == raw[selected]).sum())
    n = counts["selected"]
    for name, p in (("mask", 0.8), ("kept", 0.1 + 0.1 / 56)):  # a random replacement can draw the same id (1 in 56)
        sigma = np.sqrt(n * p * (1 - p))
        assert abs(counts[name] - n * p) < 4 * sigma, (name, counts[name], n * p)


def test_static_masks_are_refused_on_causal_data():
    from types import SimpleNamespace

    from distill.data.masking import collator_for
    from kd_common.config import ConfigError

    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    with pytest.raises(ConfigError, match="data.static_masks=2 applies to masked-LM data"):
        collator_for(SimpleNamespace(static_masks=2), 0, "causal", tok, 10, [0], np.zeros(0), 1)
