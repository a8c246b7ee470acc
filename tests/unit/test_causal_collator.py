"""The causal collator: no masking, labels are the next tokens (the recipes' runs: tests/e2e/test_recipes.py)."""

from __future__ import annotations

import numpy as np


def test_causal_collator_does_not_mask_and_labels_are_next_tokens():
    from distill.data.masking import CausalLMCollator

    rows = [(np.array([7, 3, 9, 2, 5]), None), (np.array([4, 8, 6]), None)]
    out = CausalLMCollator(pad_id=0, pad_to_multiple_of=4)(rows, [10, 11])
    assert out["input_ids"].tolist() == [[7, 3, 9, 2, 5, 0, 0, 0], [4, 8, 6, 0, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [[3, 9, 2, 5, -100, -100, -100, -100], [8, 6, -100, -100, -100, -100, -100, -100]]
    assert out["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 3 + [0] * 5]
