"""Checkpoint layout, completeness and run identity.

    OUTPUT/run.json                       identity of the run that owns this directory
    OUTPUT/checkpoints/step_00000100/     DeepSpeed checkpoint (per-rank ZeRO shards) + ours:
        trainer_state.json                step, samples consumed, seed/RNG scheme, resolved config
        hf_config/config.json             the student's Hugging Face config (for export)
        tokenizer/                        the tokenizer the data was prepared with
        COMPLETE                          written last, after every rank finished writing
    OUTPUT/checkpoints/latest             tag of the newest complete checkpoint (write-to-temp + rename)

A checkpoint counts only with its COMPLETE marker; resume takes the newest complete one and warns
about any newer, unfinished one. Before DeepSpeed reads it, `latest_loadable` checks it (files present,
safe to unpickle, checksums, trainer_state.json) and falls back, loudly, past damaged ones.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

from data_prep.manifest import write_json_atomically
from distill.checkpoints import safe_load
from kd_common.errors import UserError
from kd_common.files import current_umask, write_atomically

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
RUN_FILE = "run.json"
# What launchers may put into a fresh output_dir before training claims it (launch/slurm.sbatch).
LAUNCHER_ENTRIES = {"logs", "STOP", ".lock"}  # .lock: the run lock of this very trainer (distill/train/run_lock.py)
_TAG = re.compile(r"^step_(\d{8})$")

# Keys that may change between restarts of the same run (they do not change what is learned).
RESTARTABLE_KEYS = {
    "output_dir",
    "data.path",
    "data.num_workers",
    "data.cache_dir",
    "data.verify_checksums",
    "train.micro_batch",
    "train.log_every",
    "train.halt_at_step",
    "checkpoint.every_steps",
    "checkpoint.keep_last",
    "deepspeed.config",
    "deepspeed.zero_stage",
    "teacher.attn_implementation",
    "student.attn_implementation",
    "teacher.path",
    "teacher.cache",
    "teacher.cache_verify",  # a cache is bound by its fingerprint
    # speed switches that do not change what is learned (bench/train_throughput.py measures each)
    "teacher.inference_mode",
    "train.logits_where_needed",
    "train.compile",
    "data.pin_memory",
    "data.prefetch_factor",
    "train.profile_phases",
    "data.pad_to_multiple_of",
    "loss.chunked_logits",
    "loss.chunk_positions",
    "deepspeed.lean_single_process",
    "train.lean_startup",
    "train.activation_checkpointing",  # memory against recomputation: the same losses and gradients (tests/e2e/test_activation_checkpointing.py)
    # what to do about non-finite steps is a guard, not part of what is learned
    "train.max_nonfinite_steps",
    "train.collective_timeout_s",  # how long a rank waits for the others, not what is learned
}


class CheckpointError(UserError, RuntimeError):
    """The output directory or a checkpoint cannot be used as asked."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoints_root(output_dir: str) -> str:
    return os.path.join(output_dir, CHECKPOINTS)


def is_complete(tag_dir: str) -> bool:
    return os.path.exists(os.path.join(tag_dir, COMPLETE))


def list_checkpoints(root: str) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) of every checkpoint directory under `root`, oldest first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = _TAG.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found.append((int(match.group(1)), name, is_complete(os.path.join(root, name))))
    return sorted(found)


def latest_complete(root: str) -> Optional[tuple[int, str]]:
    """Newest complete checkpoint; unfinished newer ones are reported and skipped."""
    best = None
    for step, tag, complete in list_checkpoints(root):
        if complete:
            best = (step, tag)
        else:
            log.warning("skipping checkpoint %s: it has no %s marker (a save was interrupted)", os.path.join(root, tag), COMPLETE)
    return best


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "weights":
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def run_identity(config: dict[str, Any], manifest_sha256: str) -> dict[str, Any]:
    """What makes two invocations 'the same run' (resumable into one another)."""
    ident = {k: v for k, v in flatten(config).items() if k not in RESTARTABLE_KEYS}
    ident["data.manifest_sha256"] = manifest_sha256
    return ident


def legacy_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """A recorded identity in today's spelling: `teacher.partition: true` (deprecated) is `teacher.source: partitioned`."""
    if identity.get("teacher.partition") and identity.get("teacher.source", "online") == "online":
        identity = dict(identity, **{"teacher.source": "partitioned", "teacher.partition": False})
    return identity


def _default_identity() -> dict[str, Any]:
    from distill.config import Config  # distill.config: not at start-up of distill-export

    return {k: v for k, v in flatten(Config().to_dict()).items() if k not in RESTARTABLE_KEYS}


CONTENT_KEY = "teacher.content_sha256"  # the teacher by its weights (distill/models/fingerprint.py); runs before it lack the key


def read_run_record(output_dir: str) -> dict[str, Any]:
    """OUTPUT/run.json as written ({"identity": ..., "teacher_files": ...}); {} when there is none."""
    run_file = os.path.join(output_dir, RUN_FILE)
    if not os.path.exists(run_file):
        return {}
    try:
        with open(run_file) as handle:
            record = json.load(handle)
        if not isinstance(record, dict) or not isinstance(record["identity"], dict):
            raise TypeError("identity is not a mapping")
    except (ValueError, KeyError, TypeError) as exc:  # empty, cut or edited (it is written atomically, so not by us)
        raise CheckpointError(
            f"{run_file} is unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'empty'}); it records "
            f"which run output_dir holds: restore it from a copy, or use a new output_dir (nothing there was changed)"
        ) from None
    return record


def claim_output_dir(output_dir: str, identity: dict[str, Any], teacher_path: Optional[str] = None) -> bool:
    """Make `output_dir` this run's: returns True if it already was (resume), refuses foreign data.

    With `teacher_path`, the identity also holds the teacher's content fingerprint (`CONTENT_KEY`), hashed with the
    per-file record run.json keeps (`teacher_files`: a file unchanged since is not read again). A run.json written
    before that key existed is matched by the old fingerprint (config + file sizes) alone, with a warning, and then
    records the content, so the next resume checks it."""
    # distill.models.fingerprint: not at start-up of distill-export
    from distill.models.fingerprint import content_identity, differing_files

    run_file = os.path.join(output_dir, RUN_FILE)
    record = read_run_record(output_dir)
    files = None
    if teacher_path:
        content = content_identity(teacher_path, record.get("teacher_files"))
        identity = dict(identity, **{CONTENT_KEY: content["sha256"]})
        files = content["files"]
    written = {"identity": identity, **({"teacher_files": files} if files is not None else {})}
    if record:
        previous = legacy_identity(record["identity"])
        defaults = _default_identity()  # a key added in a later version counts as its default in older runs
        legacy = CONTENT_KEY in identity and CONTENT_KEY not in previous
        if legacy:
            defaults[CONTENT_KEY] = identity[CONTENT_KEY]
        diffs = [
            f"{k}: {previous.get(k, defaults.get(k))!r} -> {identity.get(k, defaults.get(k))!r}"
            for k in sorted(set(previous) | set(identity))
            if previous.get(k, defaults.get(k)) != identity.get(k, defaults.get(k))
        ]
        if diffs and not list_checkpoints(checkpoints_root(output_dir)):
            # the earlier attempt never wrote a checkpoint (it stopped at a bad setting or a non-finite step):
            # nothing to resume, so these settings take the directory over; its logs are kept aside
            aside = _set_aside_logs(output_dir)
            log.warning(
                "output_dir %s held a run with other settings (%s) that never wrote a checkpoint; starting this run there "
                "(its logs moved to %s)",
                output_dir,
                "; ".join(diffs),
                aside,
            )
            write_json_atomically(run_file, written)
            return False
        if diffs and any(d.startswith(CONTENT_KEY + ":") for d in diffs):
            changed = differing_files(record.get("teacher_files"), files or {})
            raise CheckpointError(
                f"output_dir {output_dir!r} holds a run of another teacher (differs in {'; '.join(diffs)}): teacher.path "
                f"{teacher_path} holds other weights than the run was started with (changed: {', '.join(changed) or 'unknown'}); "
                f"put the run's teacher back at teacher.path to resume, or use a new output_dir"
            )
        if diffs:
            raise CheckpointError(
                f"output_dir {output_dir!r} holds another run (differs in {'; '.join(diffs)}); "
                f"use a new output_dir, or restore the old settings to resume it"
            )
        if legacy:
            log.warning(
                "run.json of %s predates content fingerprints: its teacher was matched by config.json and weight-file sizes only "
                "(not its weights); recording the content of %s now, later resumes check it",
                output_dir,
                teacher_path,
            )
        if files is not None and (legacy or files != record.get("teacher_files")):  # an older run, or teacher files touched since
            write_json_atomically(
                run_file, dict(record, identity=dict(previous, **{CONTENT_KEY: identity[CONTENT_KEY]}), teacher_files=files)
            )
        return True
    if os.path.isdir(output_dir) and {
        n for n in os.listdir(output_dir) if n not in LAUNCHER_ENTRIES or os.path.islink(os.path.join(output_dir, n))
    }:
        raise CheckpointError(
            f"output_dir {output_dir!r} already holds data that is not a run of this tool; choose an empty or new directory"
        )
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomically(run_file, written)
    return False


RUN_LOGS = ("metrics.jsonl", "tensorboard", "config.yaml")


def _set_aside_logs(output_dir: str) -> str:
    """Move an abandoned attempt's logs to OUTPUT/abandoned/<n>/ (so the new run's metrics start clean)."""
    parent = os.path.join(output_dir, "abandoned")
    os.makedirs(parent, exist_ok=True)
    target = tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=parent)
    os.chmod(target, 0o777 & ~current_umask())  # mkdtemp makes it 0700
    for name in RUN_LOGS:
        if os.path.exists(os.path.join(output_dir, name)):
            os.rename(os.path.join(output_dir, name), os.path.join(target, name))
    return target


def write_latest(root: str, tag: str) -> None:
    write_atomically(os.path.join(root, LATEST), tag, prefix=".latest-")


def mark_complete(tag_dir: str) -> None:
    write_atomically(os.path.join(tag_dir, COMPLETE), "ok\n")  # never through a symlink planted at that name


def prune(root: str, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (0 keeps everything)."""
    if keep_last <= 0:
        return
    complete = [(s, t) for s, t, ok in list_checkpoints(root) if ok]
    for _, tag in complete[:-keep_last]:
        shutil.rmtree(os.path.join(root, tag), ignore_errors=True)


def resolve_checkpoint(path: str) -> tuple[str, str]:
    """Accept a run dir, its `checkpoints/` dir or one checkpoint dir; return (root, tag) of a complete one."""
    path = os.path.abspath(path)
    if _TAG.match(os.path.basename(path)):
        if not is_complete(path):
            raise CheckpointError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): its save was interrupted; use an earlier one")
        return os.path.dirname(path), os.path.basename(path)
    root = path if os.path.basename(path) == CHECKPOINTS else checkpoints_root(path)
    found = latest_complete(root)
    if found is None:
        raise CheckpointError(
            f"no complete checkpoint under {path}; pass a run directory written by distill-train or a checkpoint directory"
        )
    return root, found[1]


def read_trainer_state(root: str, tag: str) -> dict[str, Any]:
    with open(os.path.join(root, tag, TRAINER_STATE)) as handle:
        return json.load(handle)


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file asks the unpickler for code (a crafted or foreign file): never loaded, never skipped silently."""


_STATE_KEYS = {"step": int, "samples_consumed": int, "world_size": int, "zero_stage": int, "config": dict}


def deepspeed_files(tag_dir: str, world_size: int, zero_stage: int) -> list[str]:
    """The files DeepSpeed reads to resume or export a checkpoint written by `world_size` ranks at `zero_stage`."""
    if zero_stage == 3:
        files = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world_size)]
    else:
        files = ["mp_rank_00_model_states.pt"]
    if zero_stage > 0:  # bf16 runs name their optimizer shards bf16_zero_pp_rank_...
        for r in range(world_size):
            name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
            files.append(f"bf16_{name}" if os.path.exists(os.path.join(tag_dir, f"bf16_{name}")) else name)
    return [os.path.join(tag_dir, f) for f in files]


def checkpoint_problem(root: str, tag: str, for_export: bool = False) -> Optional[str]:
    """Why checkpoint `tag` cannot be resumed (or exported) from, or None; one read of each file (its CRC-32 checksums).

    Raises UntrustedCheckpointError when a file asks the unpickler for anything but tensors and DeepSpeed's plain types."""
    tag_dir = os.path.join(root, tag)
    try:
        state = read_trainer_state(root, tag)
    except FileNotFoundError:
        return f"{os.path.join(tag_dir, TRAINER_STATE)} is missing"
    except (OSError, ValueError) as exc:
        return f"{os.path.join(tag_dir, TRAINER_STATE)} is not valid JSON ({' '.join(str(exc).split())[:120]})"
    bad = [k for k, kind in _STATE_KEYS.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if bad:
        return f"{os.path.join(tag_dir, TRAINER_STATE)} lacks {', '.join(bad)} (or has the wrong type)"
    needed = deepspeed_files(tag_dir, state["world_size"], state["zero_stage"])
    if for_export:
        needed.append(os.path.join(tag_dir, "hf_config", "config.json"))
    for path in needed:
        if not path.endswith(".pt"):
            if not os.path.isfile(path) or os.path.getsize(path) == 0:
                return f"{path} is missing or empty"
            continue
        problem = safe_load.file_problem(path)
        if problem and problem[0] == "untrusted":
            raise UntrustedCheckpointError(f"checkpoint file {problem[1]}; move {tag_dir} away (keep it for inspection), then rerun")
        if problem:
            return problem[1]
    return None


def latest_loadable(root: str) -> Optional[tuple[int, str]]:
    """Newest complete checkpoint that passes `checkpoint_problem`; None when there is no complete one.

    A damaged newer one is reported loudly and moved aside (`step_X.damaged-TIME`, kept, never pruned) once an older
    loadable one is found; when none is loadable, nothing is moved and CheckpointError says what is wrong with each."""
    complete = [(step, tag) for step, tag, ok in list_checkpoints(root) if ok]
    if not complete:
        latest_complete(root)  # warns about unfinished ones
        return None
    damaged = []
    for step, tag in reversed(complete):
        problem = checkpoint_problem(root, tag)
        if problem is None:
            for bad_tag, why in damaged:
                aside = os.path.join(root, f"{bad_tag}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(os.path.join(root, bad_tag), aside)
                log.warning(
                    "CHECKPOINT DAMAGED: %s (%s); resuming from the previous complete checkpoint %s instead; the damaged one is kept as %s",
                    os.path.join(root, bad_tag),
                    why,
                    tag,
                    aside,
                )
            if damaged:
                write_latest(root, tag)
            latest_complete(root)  # warns about unfinished newer ones
            return step, tag
        damaged.append((tag, problem))
    raise CheckpointError(
        f"no loadable checkpoint under {root}: "
        + "; ".join(f"{t}: {why}" for t, why in damaged)
        + "; restore the damaged files from a copy, or move the checkpoints directory away to start afresh"
    )


def check_exportable(root: str, tag: str) -> None:
    """Refuse (one line) a checkpoint that cannot be exported safely; suggest the newest older one that can."""
    problem = checkpoint_problem(root, tag, for_export=True)
    if problem is None:
        return
    older = [t for s, t, ok in list_checkpoints(root) if ok and t < tag]
    usable = next((t for t in reversed(older) if checkpoint_problem(root, t, for_export=True) is None), None)
    hint = (
        f"export the previous one with --checkpoint {os.path.join(root, usable)}"
        if usable
        else "no older complete checkpoint can be exported either"
    )
    raise CheckpointError(f"checkpoint {os.path.join(root, tag)} is damaged: {problem}; {hint}")


UNIVERSAL = "universal"


def universal_checkpoint(root: str, tag: str) -> str:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once) and return the root to load it from.

    The universal copy lives in `root/universal/<tag>` and, like every checkpoint here, counts only
    with its COMPLETE marker: the conversion writes to a temporary directory that is renamed when done.
    """
    universal_root = os.path.join(root, UNIVERSAL)
    target = os.path.join(universal_root, tag)
    if is_complete(target):
        problem = _universal_problem(target)
        if problem is None:
            return universal_root
        log.warning("universal checkpoint %s is damaged (%s); converting %s again", target, problem, os.path.join(root, tag))
    os.makedirs(universal_root, exist_ok=True)
    staging = os.path.join(universal_root, f".{tag}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    # DeepSpeed's converter, run by our wrapper: every torch.load in it is weights_only=True (distill/checkpoints/safe_load.py)
    cmd = [
        sys.executable,
        "-m",
        "distill.checkpoints.safe_load",
        "--input_folder",
        os.path.join(root, tag),
        "--output_folder",
        staging,
        "--inject_missing_state",
        "--num_extract_workers",
        "1",
        "--num_merge_workers",
        "1",
    ]
    log.info("converting %s to a universal checkpoint: %s", os.path.join(root, tag), " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, safe_load.FORCE: "1"})
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        if "not a plain tensor checkpoint" in tail:
            raise UntrustedCheckpointError(
                f"refused to convert {os.path.join(root, tag)} to a universal checkpoint ({tail}); "
                f"move it away (keep it for inspection), then rerun"
            )
        raise CheckpointError(
            f"could not convert {os.path.join(root, tag)} to a universal checkpoint ({tail}); resume with the "
            f"world size and ZeRO stage that wrote it"
        )
    shutil.copy2(os.path.join(root, tag, TRAINER_STATE), os.path.join(staging, TRAINER_STATE))
    _name_model_states_for_every_stage(staging)
    _optimizer_state_for_every_stage(staging)
    os.replace(staging, target)
    mark_complete(target)
    with open(os.path.join(universal_root, "latest_universal"), "w") as handle:  # ds_to_universal named the staging dir
        handle.write(tag)
    return universal_root


def _universal_problem(folder: str) -> Optional[str]:
    """Why a converted universal checkpoint cannot be loaded safely, or None (UntrustedCheckpointError for a crafted file)."""
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
        problem = safe_load.file_problem(path)
        if problem and problem[0] == "untrusted":
            raise UntrustedCheckpointError(f"checkpoint file {problem[1]}; move {folder} away (keep it for inspection), then rerun")
        if problem:
            return problem[1]
    return None


def _name_model_states_for_every_stage(folder: str) -> None:
    """Let any ZeRO stage find the model-states file: stage 3 looks for `zero_pp_rank_0_mp_rank_XX_model_states.pt`,
    stages 1-2 for `mp_rank_XX_model_states.pt` (the universal loader takes weights from `zero/`, only metadata from these)."""
    names = os.listdir(folder)
    for name in names:
        plain = re.fullmatch(r"mp_rank_(\d+)_model_states\.pt", name)
        zero3 = re.fullmatch(r"zero_pp_rank_0_mp_rank_(\d+)_model_states\.pt", name)
        alias = (
            f"zero_pp_rank_0_mp_rank_{plain.group(1)}_model_states.pt"
            if plain
            else (f"mp_rank_{zero3.group(1)}_model_states.pt" if zero3 else None)
        )
        if alias and alias not in names:
            os.link(os.path.join(folder, name), os.path.join(folder, alias))


def _optimizer_state_for_every_stage(folder: str) -> None:
    """ds_to_universal writes `zero/optimizer_state.pt` in the layout of the stage that saved it; ZeRO-1/2 read
    top-level `param_groups`/`ds_version`, ZeRO-3 reads `optimizer_state_dict` (step, param groups). Give it both."""
    import torch  # torch: not at start-up

    path = os.path.join(folder, "zero", "optimizer_state.pt")
    state = safe_load.load(path)
    inner = state.get("optimizer_state_dict")
    if not isinstance(inner, dict) or "param_groups" not in inner:
        step_files = sorted(glob.glob(os.path.join(folder, "zero", "*", "step.pt")))
        step = safe_load.load(step_files[0]) if step_files else torch.tensor(0.0)
        state["optimizer_state_dict"] = {
            "state": {0: {"step": torch.as_tensor(step, dtype=torch.float32)}},
            "param_groups": state["param_groups"],
        }
    state.setdefault("param_groups", state["optimizer_state_dict"]["param_groups"])
    for key, default in (("ds_version", _deepspeed_version()), ("clip_grad", 0.0), ("dynamic_loss_scale", False), ("overflow", False)):
        state.setdefault(
            key, state["optimizer_state_dict"].get(key, default) if isinstance(state["optimizer_state_dict"], dict) else default
        )
    torch.save(state, path)


def _deepspeed_version() -> str:
    import deepspeed  # torch: not at start-up

    return deepspeed.__version__
