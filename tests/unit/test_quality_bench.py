"""bench/quality.py's summary: retention, seed spread and the issue's checks, computed from known scores
(the benchmark itself takes minutes to hours; its stages are the CLIs tested elsewhere)."""

from __future__ import annotations

import argparse
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench"))
import quality  # noqa: E402


def scored(
    acc: float, ppl: float, agree: float | None, sst2: float | None, params: int = 1000, variant: str = "teacher", seed=None
) -> dict:
    test = {"models": {"student": {"accuracy": acc, "perplexity": ppl, "parameters": params}}}
    if agree is not None:
        test["top1_agreement"] = agree
    return {
        "variant": variant,
        "seed": seed,
        "model": "unused",
        "curve": [],
        "test": test,
        "sst2": None if sst2 is None else {"accuracy": sst2},
    }


@pytest.fixture
def runner(tmp_path):
    args = argparse.Namespace(out=str(tmp_path), scale="smoke", seeds=[1, 2], threads=1)
    return quality.Runner(args)


def test_summary_retention_spread_and_checks(runner):
    runs = {"teacher": scored(0.40, 50.0, None, 0.80)}
    # (a) keeps 0.39/0.40 = 97.5% (mean of 0.388 and 0.392); (b) and (c) far below, (c) with a wide seed spread
    for seed, (a, b, c) in enumerate([(0.388, 0.10, 0.30), (0.392, 0.11, 0.38)], start=1):
        runs[f"a_seed{seed}"] = scored(a, 60.0 + seed, 0.9, 0.79, variant="a", seed=seed)
        runs[f"b_seed{seed}"] = scored(b, 900.0, 0.1, 0.78, variant="b", seed=seed)
        runs[f"c_seed{seed}"] = scored(c, 80.0, 0.5, 0.785, variant="c", seed=seed)
    result = runner.summarise(runs)
    rows, checks = result["rows"], result["checks"]
    assert rows["a"]["mask_acc_mean"] == pytest.approx(0.39)
    assert rows["a"]["mask_acc_retained"] == pytest.approx(0.39 / 0.40)
    assert rows["a"]["mask_acc_spread"] == pytest.approx(0.004)
    assert rows["a"]["ppl_mean"] == pytest.approx(61.5)
    assert rows["a"]["sst2_retained"] == pytest.approx(0.79 / 0.80)
    assert rows["c"]["mask_acc_spread"] == pytest.approx(0.08)
    assert checks["a_keeps_97pct_mask_acc"] is True
    assert checks["a_keeps_97pct_sst2"] is True
    assert checks["a_beats_b_mask_acc_by_more_than_seed_spread"] is True  # 0.39 - 0.105 > 0.01
    # 0.39 - 0.34 = 0.05 is less than (c)'s spread of 0.08: not a win by the issue's rule
    assert checks["a_beats_c_mask_acc_by_more_than_seed_spread"] is False
    assert checks["a_beats_b_sst2_by_more_than_seed_spread"] is True  # 0.79 - 0.78 > 0
    table = quality.render_table(result)
    assert "[FAIL] a_beats_c_mask_acc_by_more_than_seed_spread" in table
    assert "[PASS] a_keeps_97pct_mask_acc" in table
    assert "97.5%" in table


def test_summary_below_97_percent_fails(runner):
    runs = {
        "teacher": scored(0.2556, 207.0, None, 0.7535),
        "a_seed1": scored(0.1852, 523.0, 0.37, 0.79, variant="a", seed=1),
        "a_seed2": scored(0.1825, 543.0, 0.36, 0.79, variant="a", seed=2),
    }
    result = runner.summarise(runs)
    assert result["rows"]["a"]["mask_acc_retained"] == pytest.approx((0.1852 + 0.1825) / 2 / 0.2556)
    assert result["checks"]["a_keeps_97pct_mask_acc"] is False


def test_summary_teacher_with_zero_accuracy_skips_the_ratio_check(runner):
    runs = {"teacher": scored(0.0, 2000.0, None, None), "a_seed1": scored(0.0, 2000.0, 0.0, None, variant="a", seed=1)}
    result = runner.summarise(runs)
    assert result["rows"]["a"]["mask_acc_retained"] is None
    assert "a_keeps_97pct_mask_acc" not in result["checks"]
    quality.render_table(result)  # renders without a ratio


def test_summary_compares_pruned_students_with_their_baselines(runner):
    """Issue 26: (e) against (a) (the same shape, layers by importance vs evenly spaced), (f) against (g) (pruned vs random init)."""
    runs = {"teacher": scored(0.25, 200.0, None, None)}
    for seed, (a, e, f, g) in enumerate([(0.18, 0.19, 0.15, 0.10), (0.182, 0.184, 0.151, 0.11)], start=1):
        for variant, acc in (("a", a), ("e", e), ("f", f), ("g", g)):
            runs[f"{variant}_seed{seed}"] = scored(acc, 500.0, 0.4, None, variant=variant, seed=seed)
    result = runner.summarise(runs)
    checks = result["checks"]
    assert result["rows"]["e"]["mask_acc_spread"] == pytest.approx(0.006)
    assert checks["e_beats_a_mask_acc_by_more_than_seed_spread"] is False  # 0.187 - 0.181 = 0.006: not more than (e)'s spread
    assert checks["f_beats_g_mask_acc_by_more_than_seed_spread"] is True  # 0.1505 - 0.105 > 0.01
    assert "(e) as (a), depth-pruned teacher" in quality.render_table(result)
