"""One rank of tests/e2e/test_partitioned_teacher.py (started by the deepspeed launcher, 2 processes, gloo on CPU).

First, on the saved teacher at BIG (`main(out_dir, tiny, big)`), this rank's peak host memory (VmHWM, reset through
/proc/self/clear_refs before each phase) above its resident memory when the phase starts, for: the partitioned load
(`load_partitioned`), the copy of 2 of its layers into a student (`GatheredWeights`), then the replicated load
(`load_teacher`) of the same teacher, alone and with every weight read once (as its first forward does: the weights
may be mapped from the file and only read then); with the teacher's bytes, this rank's partition bytes, the largest
tensor's bytes, and the largest difference between the partitioned teacher's tensors (gathered) and the replicated
one's, and between the two students' weights. Every path runs once on the teacher at TINY (of the same family, its
output projection tied) first, so the modules it imports and the buffers its first collectives allocate are not
counted; there it also records whether the tied projection stayed one parameter, and whether a bf16 partitioned load
equals the bf16 replicated one tensor for tensor. Written to OUT/load<r>.json.

Then builds the same tiny random Llama teacher on every rank, keeps a whole copy, partitions the other with
distill.teachers.partitioned.partition (ZeRO-3, no optimizer), and writes to OUT/rank<r>.json: the bytes of
teacher parameters this rank holds (its actual partition tensors) before and after the forwards, and with
DeepSpeed's default persistence threshold (every parameter of this tiny model stays whole), the whole teacher's bytes, and the largest
difference between the partitioned and the whole teacher's outputs on the same micro batch (packed documents kept apart,
data.document_attention), for the chunked (hidden states + gathered head) and the logits paths.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import sys

import numpy as np
import torch


def _memory() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in bytes."""
    values = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount, _unit = line.split()
                values[key] = int(amount) * 1024
    return values["VmRSS:"], values["VmHWM:"]


def _peak_above_start(phase):
    """Run `phase()`; its peak resident memory above the resident memory at its start (the high-water mark reset first)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current VmRSS (Linux)
    start, _ = _memory()
    value = phase()
    return value, _memory()[1] - start


def _read_all(model) -> float:
    return sum(float(p.sum()) for p in model.parameters())


def measure_loads(out_dir: str, tiny: str, teacher: str, rank: int) -> None:
    from distill.config import StudentConfig
    from distill.models.build import init_layers_for, init_student_from_teacher, load_teacher, make_student, student_config
    from distill.teachers.partitioned import GatheredWeights, full_parameter_bytes, load_partitioned, zero3_inference_config

    ds = zero3_inference_config({"stage3_param_persistence_threshold": 0}, 1, torch.float32)  # every tensor partitioned
    # the first time of every path, not measured; on the tiny teacher (its output projection tied to its input embedding):
    # tied weights stay one parameter, and in bf16 (teacher.dtype) every tensor equals the replicated load's
    warm = load_partitioned(tiny, torch.float32, "sdpa", ds)
    tied = warm.get_output_embeddings().weight is warm.get_input_embeddings().weight
    [GatheredWeights(warm)[name] for name in GatheredWeights(warm)]
    _read_all(load_teacher(tiny, torch.float32, "sdpa", torch.device("cpu")))
    half = load_partitioned(tiny, torch.bfloat16, "sdpa", zero3_inference_config({}, 1, torch.bfloat16))
    reference = load_teacher(tiny, torch.bfloat16, "sdpa", torch.device("cpu")).state_dict()
    gathered = GatheredWeights(half)
    bf16_same = set(gathered) == set(reference) and all(
        gathered[k].dtype == reference[k].dtype and torch.equal(gathered[k], reference[k]) for k in reference
    )
    del warm, half, reference, gathered
    split, split_peak = _peak_above_start(lambda: load_partitioned(teacher, torch.float32, "sdpa", ds))
    result = {
        "tied": tied,
        "bf16_same": bf16_same,
        "partitioned_peak": split_peak,
        "full_bytes": full_parameter_bytes(split),
        "partition_bytes": sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in split.parameters()),
        "largest_tensor_bytes": max(p.ds_numel * p.element_size() for p in split.parameters()),
    }
    section = StudentConfig(architecture="same", num_layers=2)
    shape = student_config(section, split.config, split.config.vocab_size, 0, 64)
    layers = init_layers_for(section, split.config, 2)
    student = make_student(shape, "sdpa")
    result["student_bytes"] = sum(p.numel() * p.element_size() for p in student.parameters())
    _, result["copy_peak"] = _peak_above_start(lambda: init_student_from_teacher(student, split, layers, True, GatheredWeights(split)))
    whole, result["replicated_load_peak"] = _peak_above_start(lambda: load_teacher(teacher, torch.float32, "sdpa", torch.device("cpu")))
    _, result["replicated_read_peak"] = _peak_above_start(lambda: _read_all(whole))
    gathered, reference = GatheredWeights(split), whole.state_dict()
    assert set(gathered) == set(reference), set(gathered) ^ set(reference)
    result["weights_diff"] = max(float((gathered[k] - reference[k]).abs().max()) for k in reference)
    again = make_student(shape, "sdpa")
    init_student_from_teacher(again, whole, layers, True)
    mine = again.state_dict()
    result["student_diff"] = max(float((v - mine[k]).abs().max()) for k, v in student.state_dict().items())
    with open(os.path.join(out_dir, f"load{rank}.json"), "w") as handle:
        json.dump(result, handle)


def main(out_dir: str, tiny: str, big: str) -> None:
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
    measure_loads(out_dir, tiny, big, rank)
    gc.collect()
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
    main(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")])
