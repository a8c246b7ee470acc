"""Masking statistics: rates, 80/10/10, specials never masked, smoothing, whole words, determinism."""

import numpy as np
import pytest

from distill.data.masking import (
    IGNORE_INDEX,
    BatchedMaskingCollator,
    MaskingCollator,
    MaskingPolicy,
    counter_uniforms,
    mask_batch,
    mask_sequence,
    sample_rng,
)

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
V = 200


def _policy(**kw):
    return MaskingPolicy(mask_id=MASK, pad_id=PAD, vocab_size=V, special_ids=SPECIALS, **kw)


def _sequence(rng, n=126):
    return np.concatenate([[CLS], rng.integers(5, V, n), [SEP]])


def _mask(kind, ids, word_start, policy, seed, g):
    """One sequence's (masked ids, labels) as each collator draws them: per sequence (a generator per sample) or batched."""
    if kind == "per_sequence":
        return mask_sequence(ids, word_start, policy, sample_rng(seed, g))
    ids = np.asarray(ids, dtype=np.int64)
    out, labels = mask_batch(
        ids[None, :],
        np.array([len(ids)]),
        None if word_start is None else np.asarray(word_start, bool)[None, :],
        policy,
        seed,
        np.array([g]),
    )
    return out[0], labels[0]


KINDS = pytest.mark.parametrize("kind", ["per_sequence", "batched"])


@KINDS
def test_rates_and_80_10_10_and_specials(kind):
    policy = _policy()
    data_rng = np.random.default_rng(0)
    selected = kept = masked = randomised = total = 0
    for g in range(3000):
        ids = _sequence(data_rng)
        ids[10] = UNK  # a special inside the text
        out, labels = _mask(kind, ids, None, policy, 7, g)
        sel = labels != IGNORE_INDEX
        assert not sel[[0, 10, len(ids) - 1]].any(), "special tokens must never be selected"
        assert (labels[sel] == ids[sel]).all()
        assert (out[~sel] == ids[~sel]).all(), "unselected tokens are untouched"
        assert sel.sum() == round(0.15 * 125)
        selected += sel.sum()
        masked += (out[sel] == MASK).sum()
        same = out[sel] == ids[sel]
        kept += same.sum()
        randomised += ((out[sel] != MASK) & ~same).sum()
        assert not np.isin(out[sel & (out != MASK)], SPECIALS).any(), "random replacements are never specials"
        total += 125
    assert selected / total == pytest.approx(19 / 125)  # exactly round(0.15 * 125) per sequence
    assert masked / selected == pytest.approx(0.8, abs=0.01)
    # a random draw can hit the original token (1/195): kept ~ 0.1 + 0.1/195
    assert randomised / selected == pytest.approx(0.1 * (1 - 1 / 195), abs=0.01)
    assert kept / selected == pytest.approx(0.1 + 0.1 / 195, abs=0.01)


@KINDS
def test_rate_over_varied_lengths(kind):
    policy = _policy()
    rng = np.random.default_rng(9)
    selected = maskable = 0
    for g in range(2000):
        ids = _sequence(rng, int(rng.integers(5, 300)))
        _, labels = _mask(kind, ids, None, policy, 1, g)
        selected += (labels != IGNORE_INDEX).sum()
        maskable += len(ids) - 2
    assert selected / maskable == pytest.approx(0.15, abs=0.003)


@KINDS
def test_smoothing_selection_probabilities(kind):
    """With weights count^-0.7, a rare token is selected (1000/10)^0.7 = 25x more often than a frequent one."""
    counts = np.full(V, 10, dtype=np.int64)
    counts[6] = 1000  # frequent
    counts[7] = 10  # rare
    policy = MaskingPolicy.with_smoothing(counts, 0.7, mask_id=MASK, pad_id=PAD, vocab_size=V, special_ids=SPECIALS, mlm_probability=0.01)
    assert policy.token_weights[6] == pytest.approx(1000**-0.7)
    assert policy.token_weights[CLS] == 0.0
    # sequence: 50 frequent tokens and 50 rare ones; exactly one is selected per draw (round(0.01*100) = 1)
    ids = np.array([CLS] + [6] * 50 + [7] * 50 + [SEP])
    hits = {6: 0, 7: 0}
    for g in range(20000):
        _, labels = _mask(kind, ids, None, policy, 3, g)
        (pos,) = np.flatnonzero(labels != IGNORE_INDEX)
        hits[int(ids[pos])] += 1
    expected_frequent = 1 / (1 + (1000 / 10) ** 0.7)
    assert hits[6] / 20000 == pytest.approx(expected_frequent, abs=0.01)
    # and a uniform policy picks both halves equally
    uniform = _policy(mlm_probability=0.01)
    hits_u = sum(int(ids[np.flatnonzero(_mask(kind, ids, None, uniform, 3, g)[1] != IGNORE_INDEX)[0]] == 6) for g in range(4000))
    assert hits_u / 4000 == pytest.approx(0.5, abs=0.03)


@KINDS
def test_whole_word_masking_selects_complete_words(kind):
    policy = _policy(whole_word=True, mlm_probability=0.3)
    data_rng = np.random.default_rng(1)
    covered = []
    for g in range(500):
        ids = _sequence(data_rng, 60)
        word_start = np.ones(len(ids), dtype=bool)
        word_start[data_rng.random(len(ids)) < 0.5] = False  # ~half the tokens continue a word
        word_start[0] = word_start[-1] = True
        _, labels = _mask(kind, ids, word_start, policy, 5, g)
        sel = labels != IGNORE_INDEX
        assert not sel[0] and not sel[-1]
        word_of = np.cumsum(word_start) - 1
        for w in np.unique(word_of[sel]):
            assert sel[word_of == w].all(), "a selected word is selected whole"
        n_words = len(np.unique(word_of[sel]))
        assert sel.sum() <= 18 or n_words == 1, "the budget round(0.3 * 60) = 18 is only exceeded by a single long word"
        covered.append(sel.sum())
    assert np.mean(covered) > 0.9 * 18


@KINDS
def test_masks_are_a_pure_function_of_seed_and_stream_index(kind):
    policy = _policy()
    ids = _sequence(np.random.default_rng(2))
    a = _mask(kind, ids, None, policy, 11, 42)
    b = _mask(kind, ids, None, policy, 11, 42)
    c = _mask(kind, ids, None, policy, 11, 43)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all()
    assert not (a[1] == c[1]).all(), "another stream position (the next time the sequence is seen) gets a fresh mask"


def test_collator_pads_and_never_masks_padding():
    policy = _policy()
    rng = np.random.default_rng(3)
    rows = [(_sequence(rng, 5), None), (_sequence(rng, 20), None)]
    batch = MaskingCollator(policy, seed=1, pad_to_multiple_of=8)(rows, [10, 11])
    assert batch["input_ids"].shape == (2, 24)
    assert batch["attention_mask"].sum(1).tolist() == [7, 22]
    pad = batch["attention_mask"] == 0
    assert (batch["input_ids"][pad] == PAD).all() and (batch["labels"][pad] == IGNORE_INDEX).all()


@pytest.mark.parametrize("whole_word", [False, True])
def test_batched_mask_of_a_sample_does_not_depend_on_its_micro_batch(whole_word):
    """Batched masking stays a pure function of (seed, stream index): the same sample gets the same mask alone, in another
    micro batch, at another row, with other padding (what resume and a different number of ranks rely on)."""
    policy = _policy(whole_word=whole_word, mlm_probability=0.2)
    rng = np.random.default_rng(4)
    rows = []
    for _ in range(12):
        ids = _sequence(rng, int(rng.integers(3, 80)))
        ws = rng.random(len(ids)) < 0.6
        ws[0] = ws[-1] = True
        rows.append((ids, ws))
    stream = list(range(500, 512))
    full = BatchedMaskingCollator(policy, seed=9, pad_to_multiple_of=8)(rows, stream)
    order = [7, 2, 11]
    part = BatchedMaskingCollator(policy, seed=9, pad_to_multiple_of=1)([rows[i] for i in order], [stream[i] for i in order])
    for j, i in enumerate(order):
        n = len(rows[i][0])
        assert (part["input_ids"][j, :n] == full["input_ids"][i, :n]).all() and (part["labels"][j, :n] == full["labels"][i, :n]).all()
    other_seed = BatchedMaskingCollator(policy, seed=10, pad_to_multiple_of=8)(rows, stream)
    assert not (other_seed["labels"] == full["labels"]).all()
    pad = full["attention_mask"] == 0
    assert (full["input_ids"][pad] == PAD).all() and (full["labels"][pad] == IGNORE_INDEX).all()


def test_counter_uniforms_are_uniform_and_independent():
    u = counter_uniforms(3, np.arange(4000), 64, 0)
    assert 0 < u.min() and u.max() < 1
    assert u.mean() == pytest.approx(0.5, abs=0.002) and u.var() == pytest.approx(1 / 12, abs=0.001)
    hist = np.histogram(u, bins=16, range=(0, 1))[0] / u.size
    assert np.abs(hist - 1 / 16).max() < 0.002
    v = counter_uniforms(3, np.arange(4000), 64, 1)  # another draw tag: uncorrelated
    assert abs(np.corrcoef(u.ravel(), v.ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]) < 0.01  # neighbouring positions
    assert abs(np.corrcoef(u[:-1].ravel(), u[1:].ravel())[0, 1]) < 0.01  # neighbouring samples
    assert (counter_uniforms(3, np.array([17]), 64, 0) == u[17]).all()


def test_trainer_collator_is_batched_unless_asked():
    from types import SimpleNamespace

    from distill.data.masking import collator_for

    tok = SimpleNamespace(mask_token_id=MASK, pad_token_id=PAD)
    kw = dict(
        mlm_probability=0.15, token_frequency_smoothing=0.0, mask_token_fraction=0.8, random_token_fraction=0.1, whole_word_masking=False
    )
    batched = collator_for(SimpleNamespace(**kw), 1, "document", tok, V, SPECIALS, np.zeros(0), 1)
    per_sequence = collator_for(SimpleNamespace(masking="per_sequence", **kw), 1, "document", tok, V, SPECIALS, np.zeros(0), 1)
    assert isinstance(batched, BatchedMaskingCollator) and type(per_sequence) is MaskingCollator
