"""Turn a DeepSpeed checkpoint (any ZeRO stage) into a standard Hugging Face model directory."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import torch

from distill import checkpoint as ckpt

log = logging.getLogger(__name__)
_WRAPPER_PREFIX = "model."
_CAUSAL_TYPES = {"gpt2"}


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked."""


def consolidated_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the student gathered from the per-rank ZeRO shards (no GPU, no process group needed).

    Only the student (`model.*` inside the training wrapper) is kept: what exists only for training, such
    as TinyBERT's projections W_e / W_h (`projections.*`), is dropped.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    dropped = sorted(k for k in state if not k.startswith(_WRAPPER_PREFIX))
    if dropped:
        log.info("not exported (training-only weights): %s", ", ".join(dropped))
    return {k[len(_WRAPPER_PREFIX):]: v for k, v in state.items() if k.startswith(_WRAPPER_PREFIX)}


def export_checkpoint(checkpoint: str, output: str, overwrite: bool = False) -> str:
    """Write `output` with safetensors weights, config and tokenizer; returns `output`.

    `checkpoint` may be a run directory (its newest complete checkpoint is used), its
    `checkpoints/` directory, or one `step_XXXXXXXX` directory.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise ExportError(f"output {output!r} already holds files; choose a new --output or pass --overwrite")
    root, tag = ckpt.resolve_checkpoint(checkpoint)
    tag_dir = os.path.join(root, tag)
    config = AutoConfig.from_pretrained(os.path.join(tag_dir, "hf_config"), local_files_only=True)
    model = (AutoModelForCausalLM if config.model_type in _CAUSAL_TYPES else AutoModelForMaskedLM).from_config(config)
    state = consolidated_state_dict(root, tag)
    expected = set(model.state_dict())
    missing = expected - set(state)
    tied = {k for k in missing if k.endswith(("vocab_projector.weight", "decoder.weight", "decoder.bias", "lm_head.weight"))}
    if missing - tied:
        raise ExportError(f"checkpoint {tag_dir} lacks weights {sorted(missing - tied)[:5]}; it does not belong to this student config")
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ExportError(f"checkpoint {tag_dir} has unexpected weights {result.unexpected_keys[:5]}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(tag_dir, "tokenizer"), local_files_only=True)
    if config.model_type == "distilbert":
        tokenizer.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT takes no token_type_ids

    parent = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        state_info = ckpt.read_trainer_state(root, tag)
        with open(os.path.join(staging, "distill_provenance.json"), "w") as handle:
            json.dump({"checkpoint": tag_dir, "step": state_info["step"], "samples_consumed": state_info["samples_consumed"], "config": state_info["config"]}, handle, indent=2)
        if os.path.exists(output):
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported %s (step %d) to %s", tag_dir, state_info["step"], output)
    return output
