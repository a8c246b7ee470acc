"""Every numeric setting of distill-train declares its range and a bad number is refused with its key, in process (the
training faults themselves: tests/e2e/test_robustness_train.py)."""

from __future__ import annotations

import os

import pytest
from support import REPO_ROOT

from distill.config import Config, ConfigError, load_config


def test_every_numeric_setting_declares_its_range():
    from kd_common.config import leaves

    def bounded(info, tp) -> bool:
        text = str(tp)
        return bool(info.metadata) or "ge=" in text or "gt=" in text or "le=" in text or "lt=" in text

    numeric = {key: (tp, info) for key, tp, info in leaves(Config) if any(t in str(tp) for t in ("int", "float", "Int", "Float"))}
    allowed_without = {"loss.attention_teacher_layer"}  # any layer index, negative counts from the end
    missing = sorted(k for k, (tp, info) in numeric.items() if not bounded(info, tp) and k not in allowed_without)
    assert len(numeric) > 30 and not missing, f"numeric settings without a declared range: {missing}"


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.temperature=.nan", "loss.temperature=nan is not a finite number"),
        ("optim.lr=1e10", "optim.lr=10000000000.0 is out of range: it must be <= 1"),
        ("optim.lr=-1", "optim.lr=-1 is out of range: it must be > 0"),
        ("student.dropout=1.5", "student.dropout=1.5 is out of range: it must be < 1"),
        ("optim.betas=[0.9, 1.5]", "optim.betas[1]=1.5 is out of range"),
        ("loss.weights={ce: .inf, mlm: 1}", "loss.weights.ce=inf is not a finite number"),
        ("seed=-3", "seed=-3 is out of range"),
        ("optim.eps=0", "optim.eps=0 is out of range: it must be > 0"),
        ("train.epochs=.nan", "train.epochs=nan is not a finite number"),
    ],
)
def test_bad_numbers_are_refused_with_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(os.path.join(REPO_ROOT, "configs", "distilbert.yaml"), ["output_dir=o", "data.path=d", "teacher.path=t", override])
    assert message in str(err.value)
