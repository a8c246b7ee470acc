"""Masking statistics: rates, 80/10/10, specials never masked, smoothing, whole words, determinism."""
import numpy as np
import pytest

from distill.masking import IGNORE_INDEX, MaskingCollator, MaskingPolicy, mask_sequence, sample_rng

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIALS = [PAD, UNK, CLS, SEP, MASK]
V = 200


def _policy(**kw):
    return MaskingPolicy(mask_id=MASK, pad_id=PAD, vocab_size=V, special_ids=SPECIALS, **kw)


def _sequence(rng, n=126):
    return np.concatenate([[CLS], rng.integers(5, V, n), [SEP]])


def test_rates_and_80_10_10_and_specials():
    policy = _policy()
    data_rng = np.random.default_rng(0)
    selected = kept = masked = randomised = total = 0
    for g in range(3000):
        ids = _sequence(data_rng)
        ids[10] = UNK  # a special inside the text
        out, labels = mask_sequence(ids, None, policy, sample_rng(7, g))
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


def test_rate_over_varied_lengths():
    policy = _policy()
    rng = np.random.default_rng(9)
    selected = maskable = 0
    for g in range(2000):
        ids = _sequence(rng, int(rng.integers(5, 300)))
        _, labels = mask_sequence(ids, None, policy, sample_rng(1, g))
        selected += (labels != IGNORE_INDEX).sum()
        maskable += len(ids) - 2
    assert selected / maskable == pytest.approx(0.15, abs=0.003)


def test_smoothing_selection_probabilities():
    """With weights count^-0.7, a rare token is selected (1000/10)^0.7 = 25x more often than a frequent one."""
    counts = np.full(V, 10, dtype=np.int64)
    counts[6] = 1000  # frequent
    counts[7] = 10  # rare
    policy = MaskingPolicy.with_smoothing(counts, 0.7, mask_id=MASK, pad_id=PAD, vocab_size=V, special_ids=SPECIALS, mlm_probability=0.01)
    assert policy.token_weights[6] == pytest.approx(1000 ** -0.7)
    assert policy.token_weights[CLS] == 0.0
    # sequence: 50 frequent tokens and 50 rare ones; exactly one is selected per draw (round(0.01*100) = 1)
    ids = np.array([CLS] + [6] * 50 + [7] * 50 + [SEP])
    hits = {6: 0, 7: 0}
    for g in range(20000):
        _, labels = mask_sequence(ids, None, policy, sample_rng(3, g))
        (pos,) = np.flatnonzero(labels != IGNORE_INDEX)
        hits[int(ids[pos])] += 1
    expected_frequent = 1 / (1 + (1000 / 10) ** 0.7)
    assert hits[6] / 20000 == pytest.approx(expected_frequent, abs=0.01)
    # and a uniform policy picks both halves equally
    uniform = _policy(mlm_probability=0.01)
    hits_u = sum(int(ids[np.flatnonzero(mask_sequence(ids, None, uniform, sample_rng(3, g))[1] != IGNORE_INDEX)[0]] == 6) for g in range(4000))
    assert hits_u / 4000 == pytest.approx(0.5, abs=0.03)


def test_whole_word_masking_selects_complete_words():
    policy = _policy(whole_word=True, mlm_probability=0.3)
    data_rng = np.random.default_rng(1)
    covered = []
    for g in range(500):
        ids = _sequence(data_rng, 60)
        word_start = np.ones(len(ids), dtype=bool)
        word_start[data_rng.random(len(ids)) < 0.5] = False  # ~half the tokens continue a word
        word_start[0] = word_start[-1] = True
        _, labels = mask_sequence(ids, word_start, policy, sample_rng(5, g))
        sel = labels != IGNORE_INDEX
        assert not sel[0] and not sel[-1]
        word_of = np.cumsum(word_start) - 1
        for w in np.unique(word_of[sel]):
            assert sel[word_of == w].all(), "a selected word is selected whole"
        n_words = len(np.unique(word_of[sel]))
        assert sel.sum() <= 18 or n_words == 1, "the budget round(0.3 * 60) = 18 is only exceeded by a single long word"
        covered.append(sel.sum())
    assert np.mean(covered) > 0.9 * 18


def test_masks_are_a_pure_function_of_seed_and_stream_index():
    policy = _policy()
    ids = _sequence(np.random.default_rng(2))
    a = mask_sequence(ids, None, policy, sample_rng(11, 42))
    b = mask_sequence(ids, None, policy, sample_rng(11, 42))
    c = mask_sequence(ids, None, policy, sample_rng(11, 43))
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
