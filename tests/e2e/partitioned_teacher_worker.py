"""One rank of tests/e2e/test_partitioned_teacher.py (started by the deepspeed launcher, 2 processes, gloo on CPU).

Builds the same tiny random Llama teacher on every rank, keeps a whole copy, partitions the other with
distill.teachers.partitioned.partition (ZeRO-3, no optimizer), and writes to OUT/rank<r>.json: the bytes of
teacher parameters this rank holds (its actual partition tensors) before and after the forwards, and with
DeepSpeed's default persistence threshold (every parameter of this tiny model stays whole), the whole teacher's bytes, and the largest
difference between the partitioned and the whole teacher's outputs on the same micro batch (packed documents kept apart,
data.document_attention), for the chunked (hidden states + gathered head) and the logits paths.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import torch


def main(out_dir: str) -> None:
    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM

    from distill.config import LossConfig
    from distill.data.documents import batch_documents
    from distill.data.masking import CausalLMCollator
    from distill.model_outputs import ModelOutputs
    from distill.objective.losses import Batch, select_logit_positions
    from distill.objective.objective import Objective
    from distill.teachers.partitioned import full_parameter_bytes, local_parameter_bytes, partition, zero3_inference_config

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = AutoConfig.for_model(
        "llama",
        vocab_size=301,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    whole = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval().requires_grad_(False)
    split = copy.deepcopy(whole)
    torch.manual_seed(1 + rank)  # each rank its own micro batch, as in training
    ids = torch.randint(3, 301, (2, 12)).numpy()
    starts = [np.isin(np.arange(12), [0, 5]), np.isin(np.arange(8), [0, 3, 7])]  # packed documents, the second row padded
    raw = CausalLMCollator(0, 1, eos_id=2)([(ids[0], starts[0]), (ids[1, :8], starts[1])], [0, 1])
    batch = select_logit_positions(
        Batch(raw["input_ids"], raw["attention_mask"], raw["labels"], documents=batch_documents(raw, torch.device("cpu"))), "masked"
    )

    engine, wrapper = partition(split, zero3_inference_config({"stage3_param_persistence_threshold": 0}, 2, torch.float32))
    result = {
        "local_bytes": local_parameter_bytes(split),
        "full_bytes": full_parameter_bytes(whole),
        "whole_bytes_here": sum(p.numel() * p.element_size() for p in whole.parameters()),
    }
    for chunked in (True, False):
        objective = Objective(
            LossConfig(weights={"ce": 1.0, "clm": 1.0, "cos": 1.0}, ce_positions="masked", temperature=1.0),
            whole,
            whole,
            vocab_size=301,
            chunked=chunked,
        )
        wrapper.objective = objective
        got = ModelOutputs(**engine(batch))
        want = objective.teacher_forward(whole, batch)
        pairs = [("hidden", got.hidden, want.hidden)]
        if chunked:
            pairs += [("head_input", got.head_input, want.head_input), ("head_weight", got.head[0], want.head.weight)]
        else:
            pairs += [("logits", got.logits, want.logits)]
        for name, a, b in pairs:
            assert a.shape == b.shape, (name, a.shape, b.shape)
            result[f"{'chunked' if chunked else 'logits'}.{name}"] = float((a.float() - b.float()).abs().max())
    result["local_bytes_after_forward"] = local_parameter_bytes(split)
    engine_default, _ = partition(copy.deepcopy(whole), zero3_inference_config({}, 2, torch.float32))  # DeepSpeed's default persistence
    result["local_bytes_default_threshold"] = local_parameter_bytes(engine_default.module.model)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[-1])
