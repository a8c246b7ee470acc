"""Turn a DeepSpeed checkpoint (any ZeRO stage) into a standard Hugging Face model directory."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
from dataclasses import asdict
from typing import Union

import torch

from data_prep.manifest import MANIFEST_FILE, TokenizerIdentity, check_tokenizer_folder, load_manifest, sha256_file
from distill.checkpoints import layout as ckpt
from distill.checkpoints import safe_load
from distill.models.families import FamilyError, family_of
from kd_common.config import Bool, Str, section, setting
from kd_common.errors import UserError, first_line
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code
from kd_common.output_rule import record_files, replace_when_complete, written_by

log = logging.getLogger(__name__)
_WRAPPER_PREFIX = "model."


@section
class ExportConfig:
    checkpoint: Str = setting(help="run directory (its newest complete checkpoint), its checkpoints/ dir, or one step_XXXXXXXX dir")
    output: Str = setting(help="new directory for the Hugging Face model (not inside the run)")
    overwrite: Bool = setting(False, "replace --output if it holds an earlier distill-export result (only once the new export is complete)")


class ExportError(UserError, RuntimeError):
    """The checkpoint cannot be exported as asked."""


def consolidated_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the student gathered from the per-rank ZeRO shards (no GPU, no process group needed).

    Only the student (`model.*` inside the training wrapper) is kept: what exists only for training, such
    as TinyBERT's projections W_e / W_h (`projections.*`), is dropped.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint  # deepspeed: not at start-up

    try:
        with safe_load.guard():  # DeepSpeed's torch.load calls unpickle tensors only, never code
            state = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
    except pickle.UnpicklingError as exc:
        raise ExportError(safe_load.describe(os.path.join(root, tag), exc)) from None
    dropped = sorted(k for k in state if not k.startswith(_WRAPPER_PREFIX))
    if dropped:
        log.info("not exported (training-only weights): %s", ", ".join(dropped))
    return {k[len(_WRAPPER_PREFIX) :]: v for k, v in state.items() if k.startswith(_WRAPPER_PREFIX)}


def check_shapes(tensors: dict, state: dict, hf_config: str) -> None:
    """Every saved weight has the shape the checkpoint's hf_config builds (else a one-line ExportError naming the first)."""
    for name, tensor in tensors.items():
        saved = state.get(name)
        if saved is not None and tuple(saved.shape) != tuple(tensor.shape):
            raise ExportError(
                f"{hf_config}/config.json does not match the checkpoint's weights: {name} is {list(saved.shape)} in the checkpoint "
                f"but {list(tensor.shape)} in a model of that config (another width or vocabulary); restore the hf_config this "
                f"checkpoint was saved with"
            )


PROVENANCE = "distill_provenance.json"
COMMAND = "distill-export"


def is_export_dir(path: str) -> Union[bool, str]:
    """A directory distill-export wrote (it holds distill_provenance.json) and nothing else: True, or why not."""
    if not os.path.isfile(os.path.join(path, PROVENANCE)):
        return False
    return written_by(path, COMMAND)


def checkpoint_tokenizer(tag_dir: str, state: dict):
    """The checkpoint's tokenizer/ folder, refused unless it is the dataset's tokenizer the run trained with (the identity
    its trainer_state.json records; an older checkpoint: the dataset's manifest, if it is still the one the run read)."""
    from transformers import AutoTokenizer  # transformers: not at start-up

    folder = os.path.join(tag_dir, "tokenizer")
    recorded, source = state.get("tokenizer"), f"{os.path.join(tag_dir, ckpt.TRAINER_STATE)}"
    if not isinstance(recorded, dict):
        data = ((state.get("config") or {}).get("data") or {}).get("path")
        manifest = os.path.join(data, MANIFEST_FILE) if isinstance(data, str) else ""
        if manifest and os.path.isfile(manifest) and sha256_file(manifest) == state.get("data_manifest_sha256"):
            recorded, source = asdict(load_manifest(data).tokenizer), f"manifest {manifest}"
        else:
            log.warning("%s records no tokenizer identity and its dataset is gone or changed: exporting %s unchecked", tag_dir, folder)
            refuse_remote_code(folder, "the checkpoint's tokenizer")
            return AutoTokenizer.from_pretrained(folder, **LOCAL_ONLY)
    try:
        expected = TokenizerIdentity(**recorded)
    except TypeError:
        raise ExportError(f"{source} has a malformed tokenizer record; the checkpoint is damaged: export another one") from None
    return check_tokenizer_folder(
        folder, expected, source, "restore it (a copy of the dataset's tokenizer/ folder) or export another checkpoint"
    )


def export_checkpoint(checkpoint: str, output: str, overwrite: bool = False) -> str:
    """Write `output` with safetensors weights, config and tokenizer; returns `output`.

    `checkpoint` may be a run directory (its newest complete checkpoint is used; if that one is damaged the
    export is refused, naming the newest older one that can be exported), its `checkpoints/` directory, or
    one `step_XXXXXXXX` directory. `output` must not overlap the checkpoint; an existing one is replaced
    only with `overwrite`, only if distill-export wrote it, and only once the new export is complete.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, GenerationConfig  # transformers: not at start-up

    root, tag = ckpt.resolve_checkpoint(checkpoint)
    tag_dir = os.path.join(root, tag)
    inputs = [("--checkpoint", checkpoint), ("the checkpoints directory", root)]
    if os.path.basename(root) == ckpt.CHECKPOINTS and os.path.isfile(os.path.join(os.path.dirname(root), ckpt.RUN_FILE)):
        inputs.append(("its run directory", os.path.dirname(root)))
    with replace_when_complete(
        output, overwrite, is_export_dir, "distill-export output (it holds distill_provenance.json)", inputs
    ) as staging:
        ckpt.check_exportable(root, tag)
        hf_config = os.path.join(tag_dir, "hf_config")
        refuse_remote_code(hf_config, "checkpoint")
        refuse_remote_code(os.path.join(tag_dir, "tokenizer"), "checkpoint")
        try:
            config = AutoConfig.from_pretrained(hf_config, **LOCAL_ONLY)
        except Exception as exc:  # transformers raises many types for unreadable configs
            raise ExportError(
                f"checkpoint {hf_config}/config.json is unreadable ({first_line(exc)}); restore the checkpoint's own hf_config"
            ) from None
        try:
            family = family_of(config)
        except FamilyError as exc:
            raise ExportError(f"checkpoint {tag_dir}: {exc}") from None
        model = (AutoModelForCausalLM if family.causal else AutoModelForMaskedLM).from_config(config)
        state = consolidated_state_dict(root, tag)
        tensors = model.state_dict(keep_vars=True)
        missing = set(tensors) - set(state)
        names_of: dict[int, set] = {}
        for name, tensor in tensors.items():
            names_of.setdefault(id(tensor), set()).add(name)
        tied = {k for k in missing if names_of[id(tensors[k])] - missing}  # shares its tensor with a weight that is there
        if missing - tied:
            raise ExportError(f"checkpoint {tag_dir} lacks weights {sorted(missing - tied)[:5]}; it does not belong to this student config")
        check_shapes(tensors, state, hf_config)
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ExportError(f"checkpoint {tag_dir} has unexpected weights {result.unexpected_keys[:5]}")
        model.tie_weights()
        if os.path.isfile(os.path.join(hf_config, "generation_config.json")):  # the student's generation defaults, as trained
            model.generation_config = GenerationConfig.from_pretrained(hf_config, **LOCAL_ONLY)
        state_info = ckpt.read_trainer_state(root, tag)
        tokenizer = checkpoint_tokenizer(tag_dir, state_info)
        if config.model_type == "distilbert":
            tokenizer.model_input_names = ["input_ids", "attention_mask"]  # DistilBERT takes no token_type_ids
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        except Exception as exc:  # safetensors raises SafetensorError, not OSError, for a full disk
            if "No space left" not in str(exc) and getattr(exc, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ExportError(
                f"no space left writing the export beside {output!r} (nothing was published: {output!r} is as it was); free space "
                f"there and rerun"
            ) from None
        with open(os.path.join(staging, PROVENANCE), "w") as handle:  # written last: it marks a finished export
            json.dump(
                {
                    "checkpoint": tag_dir,
                    "step": state_info["step"],
                    "samples_consumed": state_info["samples_consumed"],
                    "config": state_info["config"],
                },
                handle,
                indent=2,
            )
        record_files(staging, COMMAND)  # what a later --overwrite may replace
    log.info("exported %s (step %d) to %s", tag_dir, state_info["step"], output)
    return output
