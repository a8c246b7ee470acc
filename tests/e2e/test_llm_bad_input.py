"""Bad input to a decoder-LLM run (configs/llm_kd.yaml on causal data): one line, exit 2, no traceback, nothing written —
said by the checks that read only configs, before any weights load."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from support import BIN, ENV, REPO_ROOT, assert_one_line_error, save_teacher, train_args
from support import LLM_TINY as TINY

pytestmark = pytest.mark.timeout(600)


def train(tmp_path, teacher: str, data: str, *extra: str):
    proc = subprocess.run(
        [
            os.path.join(BIN, "distill-train"),
            *train_args(teacher, data, tmp_path / "run", config="configs/llm_kd.yaml"),
            *TINY,
            *extra,
        ],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert not (tmp_path / "run").exists(), "nothing written for a run that could not start"
    return proc.returncode, proc.stderr.strip().splitlines()


def test_a_teacher_that_is_not_a_causal_lm(tmp_path, bpe_data):  # noqa: F811
    from transformers import BertConfig, BertForMaskedLM, T5Config

    tokenizer, data = bpe_data
    bert = str(tmp_path / "bert")
    torch.manual_seed(0)
    BertForMaskedLM(
        BertConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=tokenizer.eos_token_id,
        )
    ).save_pretrained(bert)
    tokenizer.save_pretrained(bert)
    assert_one_line_error(*train(tmp_path, bert, data), f"teacher {bert!r} is a masked LM (bert), not a causal LM", "causal-LM teacher")
    t5 = tmp_path / "t5"
    T5Config(vocab_size=len(tokenizer), d_model=32, num_layers=2, num_heads=2, d_ff=64).save_pretrained(str(t5))
    assert_one_line_error(*train(tmp_path, str(t5), data), "model type 't5' is not a causal LM", "masked-LM families here (bert")


def test_a_masked_lm_student_of_a_causal_teacher(tmp_path, bpe_data):  # noqa: F811
    tokenizer, data = bpe_data
    teacher = save_teacher("llama", tokenizer, str(tmp_path / "llama"), vocab_rows=len(tokenizer))
    for architecture in ("distilbert", "bert"):
        assert_one_line_error(
            *train(tmp_path, teacher, data, f"student.architecture={architecture}"),
            "a llama (causal) teacher needs a student of the same kind",
            f"student.architecture={architecture} is masked",
        )


def test_vocabulary_mismatch(tmp_path, bpe_data, small_corpus):  # noqa: F811
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer, data = bpe_data
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    other.train(
        sorted(os.path.join(small_corpus, f) for f in os.listdir(small_corpus)),
        trainers.BpeTrainer(vocab_size=450, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    other = PreTrainedTokenizerFast(tokenizer_object=other, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    foreign = save_teacher("llama", other, str(tmp_path / "foreign"), vocab_rows=len(other))
    assert_one_line_error(*train(tmp_path, foreign, data), "does not match", "not supported (yet)")
    small = save_teacher("llama", tokenizer, str(tmp_path / "small"), vocab_rows=len(tokenizer) - 10)
    for name in os.listdir(small):
        if "token" in name or name.endswith((".txt", ".model")) and name != "config.json":
            os.remove(os.path.join(small, name))  # no tokenizer files: only the vocabulary size can be checked
    assert_one_line_error(
        *train(tmp_path, small, data), f"teacher vocabulary ({len(tokenizer) - 10}) is smaller than the dataset's tokenizer"
    )
