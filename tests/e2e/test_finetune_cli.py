"""distill-finetune's command line: the table and --json (the rest of finetune, in process: tests/unit/test_finetune.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from support import synthetic_rows, write_tsv


@pytest.mark.timeout(120)
def test_cli_table_and_json(tmp_path, tiny_model):
    train = write_tsv(str(tmp_path / "train.tsv"), synthetic_rows(64, 2))
    held = write_tsv(str(tmp_path / "eval.tsv"), synthetic_rows(16, 3))
    out_json = str(tmp_path / "r.json")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.tools.finetune",
            "--model",
            tiny_model,
            "--train",
            train,
            "--eval",
            held,
            "--output",
            str(tmp_path / "o"),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--device",
            "cpu",
            "--no-save-model",
            "--json",
            out_json,
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" in proc.stdout and "majority" in proc.stdout
    result = json.load(open(out_json))
    assert result["eval"]["examples"] == 16 and 0 <= result["accuracy"] <= 1
    assert not os.path.exists(os.path.join(tmp_path, "o", "config.json"))
