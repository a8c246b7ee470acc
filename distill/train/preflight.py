"""Every check of a run that needs no weights, in one pass: `distill-train --check`, and the first thing a run does.

Reads only configs — the dataset's manifest (and its shards' footers), the teacher's config.json and
tokenizer files, the DeepSpeed JSON, a teacher cache's manifest (and the teacher's content identity it records)
— decides the student's config, the layers it copies, the objective (built from the two configs' shapes), the
DeepSpeed config, the teacher source with its dtype (and its stage-3 config when partitioned) and the step
counts, and runs every rule of the model, data, objective and teacher cache that a real start would hit,
collecting all problems instead of stopping at the first. The result is the run's `RunPlan`: the run makes it
real (loads the teacher, builds the student from `student_config`, each component from its own config section
and the plan) and decides none of it again.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from data_prep.manifest import (
    MANIFEST_FILE,
    check_tokenizer_matches,
    load_dataset_tokenizer,
    load_manifest,
    sha256_file,
    tokenizer_identity,
    verify_shards,
)
from data_prep.tokenization import has_tokenizer_files
from distill.config import Config, ConfigError
from distill.models.build import (
    check_data_fits,
    check_init,
    check_positions,
    check_teacher_fits,
    cpu_has_native_bf16,
    init_layers_for,
    load_teacher_config,
    resolve_dtype,
    student_config,
)
from distill.models.fingerprint import content_identity
from distill.models.provenance import Provenance, read_provenance
from distill.objective.objective import Objective
from distill.teachers.cache import cache_teacher_config, check_cache
from distill.teachers.partitioned import partition_problems, zero3_inference_config
from distill.train.engine import deepspeed_config
from kd_common.errors import UserError
from kd_common.hf_dirs import LOCAL_ONLY, refuse_remote_code

log = logging.getLogger("distill.train.preflight")
USER_ERRORS = (UserError, OSError)  # every error a user can act on (kd_common.errors), and unreadable files


@dataclass
class RunPlan:
    """What the weight-free pass read and decided (the run makes it real, deciding nothing again), and every problem found."""

    world_size: int = 1
    seed: int = 0
    precision: Optional[torch.dtype] = None
    manifest: Any = None
    manifest_sha: Optional[str] = None  # of the dataset's manifest.json: the run's identity
    tokenizer: Any = None
    teacher_source: str = "online"  # a key of distill.teachers.sources.TEACHER_SOURCES; None without teacher.path
    teacher_config: Any = None
    teacher_dtype: Optional[torch.dtype] = None  # teacher.dtype resolved for the device
    teacher_ds_config: Optional[dict] = None  # teacher.source=partitioned: its stage-3 inference engine's DeepSpeed config
    cache_manifest: Any = None  # teacher.source=cache: the cache's manifest, checked against the run
    arrow_cache_dir: Optional[str] = None  # data.cache_dir: where the Arrow files of the shards (and of a cache's parts) go
    full_logits: bool = False  # train.logits_where_needed=false: vocabulary logits at every position (the baseline path)
    ds_config: Optional[dict] = None  # the DeepSpeed config: the JSON plus what the recipe owns (batch sizes, precision, clipping)
    vocab_size: Optional[int] = None  # rows of the embedding (the teacher's, else the tokenizer's)
    student_config: Any = None  # the student's Hugging Face config (distill.models.build.student_config)
    init_layers: Optional[list[int]] = None  # teacher layers student.init=teacher copies
    objective: Any = None  # distill.objective.objective.Objective, built from the two configs
    global_batch: int = 0
    micro_batch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    problems: list[str] = field(default_factory=list)

    def attempt(self, check: Callable[[], Any]) -> Any:
        try:
            return check()
        except USER_ERRORS as exc:
            for problem in getattr(exc, "problems", None) or [str(exc)]:
                message = " ".join(problem.split())
                if message not in self.problems:
                    self.problems.append(message)
            return None

    def raise_if_any(self) -> None:
        if self.problems:
            raise ConfigError(self.problems)


def load_tokenizer(cfg: Config, manifest):
    """The dataset's tokenizer (its folder checked against the manifest); the teacher's own tokenizer (if it has one) must be the same."""
    from transformers import AutoTokenizer  # transformers: not at start-up

    tokenizer = load_dataset_tokenizer(cfg.data.path, manifest)
    for key, path in (("teacher.path", cfg.teacher.path), ("student.path", cfg.student.path)):
        if path and os.path.isdir(path):
            if has_tokenizer_files(path):
                refuse_remote_code(path, key)
                model_tok = AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
                check_tokenizer_matches(manifest, tokenizer_identity(model_tok, path), f"{key.split('.')[0]} {path}")
            else:
                log.warning("%s %s has no tokenizer files; checking only the vocabulary size against the dataset", key, path)
    return tokenizer


Preflight = RunPlan  # the name before the plan was the run's


def log_vocabulary(student, teacher, tokens: int) -> None:
    """Say once how heads padded to different sizes line up: the logit losses read the tokenizer's rows only."""
    rows = {"student": student.vocab_size, "teacher": teacher.vocab_size if teacher is not None else None}
    padded = {name: n for name, n in rows.items() if n is not None and n != tokens}
    if padded:
        log.info(
            "vocabulary: the tokenizer has %d tokens; %s: logits over the first %d rows (padded rows never count)",
            tokens,
            ", ".join(f"the {name} head {n} rows" for name, n in padded.items()),
            tokens,
        )


def preflight(cfg: Config, world_size: int, device: torch.device) -> RunPlan:
    """Run every weight-free check of `cfg` for `world_size` ranks on `device` and decide the run's plan; nothing is written."""
    pf = RunPlan(world_size=world_size, seed=cfg.seed, global_batch=cfg.train.global_batch, micro_batch=cfg.train.micro_batch)
    pf.teacher_source = cfg.teacher.source if cfg.teacher.path or cfg.teacher_from_cache else None
    pf.teacher_dtype = resolve_dtype(cfg.teacher.dtype, device)
    pf.full_logits, pf.arrow_cache_dir = not cfg.train.logits_where_needed, cfg.data.cache_dir
    pf.precision = precision = resolve_dtype(cfg.train.precision, device)
    if device.type == "cpu" and precision != torch.float32 and not (precision == torch.bfloat16 and cpu_has_native_bf16()):
        pf.problems.append(
            f"train.precision={cfg.train.precision} needs a GPU (or, for bf16, a CPU with AVX512-BF16 or AMX); use fp32 (or auto) on this CPU"
        )
    pf.ds_config = pf.attempt(lambda: deepspeed_config(cfg, world_size, precision))
    zero = pf.ds_config["zero_optimization"] if pf.ds_config else {}
    pf.problems += partition_problems(cfg.teacher, world_size, zero)
    if pf.teacher_source == "partitioned":
        pf.teacher_ds_config = zero3_inference_config(zero, cfg.train.micro_batch, pf.teacher_dtype)
    pf.manifest = pf.attempt(lambda: load_manifest(cfg.data.path))
    if pf.manifest is not None:
        pf.manifest_sha = sha256_file(os.path.join(cfg.data.path, MANIFEST_FILE))
        if pf.teacher_source == "cache":
            pf.cache_manifest = pf.attempt(lambda: check_cache(cfg, pf.manifest, pf.manifest_sha))
        if pf.attempt(lambda: verify_shards(cfg.data.path, pf.manifest, cfg.data.split, checksums=False) or True):
            rows = pf.manifest.splits[cfg.data.split].rows
            pf.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * rows / cfg.train.global_batch))
            pf.warmup_steps = int(cfg.optim.warmup_fraction * pf.total_steps)
    if cfg.teacher.path:
        pf.teacher_config = pf.attempt(lambda: load_teacher_config(cfg.teacher.path))
    elif cfg.teacher_from_cache:  # no teacher files: the config the cache recorded
        pf.teacher_config = pf.attempt(lambda: cache_teacher_config(cfg.teacher.cache))
    if pf.manifest is not None:
        pf.tokenizer = pf.attempt(lambda: load_tokenizer(cfg, pf.manifest))
        pf.vocab_size = pf.manifest.tokenizer.vocab_size
        if pf.teacher_config is not None:
            teacher_vocab = pf.teacher_config.vocab_size
            if teacher_vocab < pf.manifest.tokenizer.vocab_size:
                pf.problems.append(
                    f"teacher vocabulary ({teacher_vocab}) is smaller than the dataset's tokenizer ({pf.manifest.tokenizer.vocab_size}); "
                    f"re-run distill-prep with the teacher's tokenizer"
                )
            pf.vocab_size = teacher_vocab
    teacher_label = cfg.teacher.path or f"{cfg.teacher.cache} (the teacher.cache's teacher)"
    where = f"teacher.path {cfg.teacher.path}" if cfg.teacher.path else f"the teacher of teacher.cache {cfg.teacher.cache}"
    if pf.manifest is None or pf.tokenizer is None or (pf.teacher_source and pf.teacher_config is None):
        return pf  # the model checks need the dataset and the teacher's config
    if pf.teacher_config is not None and not pf.attempt(lambda: check_teacher_fits(teacher_label, pf.teacher_config, pf.manifest.packing)):
        return pf  # a teacher of the wrong kind for the data: said once, not again for the student built from it
    if pf.teacher_config is not None and not pf.attempt(
        lambda: check_positions(pf.teacher_config, pf.manifest.max_seq_len, where, f"data.path {cfg.data.path}")
    ):
        return pf  # the student (shaped like the teacher) would be refused too, with advice that cannot help
    student = pf.student_config = pf.attempt(  # shapes only: no weights, no memory
        lambda: student_config(
            cfg.student,
            pf.teacher_config,
            pf.vocab_size,
            pf.tokenizer.pad_token_id,
            pf.manifest.max_seq_len,
            tokenizer_vocab=pf.manifest.tokenizer.vocab_size,
        )
    )
    if student is None:
        return pf
    log_vocabulary(student, pf.teacher_config, pf.manifest.tokenizer.vocab_size)
    if cfg.student_init() == "teacher" and pf.teacher_config is not None:
        layers = pf.attempt(lambda: init_layers_for(cfg.student, pf.teacher_config, student.num_hidden_layers))
        if layers is not None and pf.attempt(lambda: check_init(student, pf.teacher_config, layers) or True):
            pf.init_layers = layers
    pf.attempt(lambda: check_data_fits(student, pf.manifest.packing))
    provenance = pf.attempt(lambda: pruned_student(cfg))
    pf.objective = pf.attempt(
        lambda: Objective(
            cfg.loss,
            pf.teacher_config,
            student,
            vocab_size=pf.manifest.tokenizer.vocab_size,
            chunked=cfg.loss.chunked_logits and cfg.train.logits_where_needed,
            provenance=provenance,
        )
    )
    return pf


def pruned_student(cfg: Config) -> Optional[Provenance]:
    """The provenance of a student.path written by distill-prune (None for any other student): the layer-wise losses pair
    its layers with the teacher layers they were cut from. A teacher other than the one it was cut from (by content) is
    said once: the recorded layers and channels are used as they are (a fine-tuned teacher of the same shape is a fair use)."""
    provenance = read_provenance(cfg.student.path) if cfg.student.path else None
    if provenance is None:
        return None
    if cfg.teacher.path and provenance.teacher_sha256:
        now = content_identity(cfg.teacher.path, provenance.teacher_files)["sha256"]
        if now != provenance.teacher_sha256:
            log.warning(
                "student.path %s was pruned from another teacher (%s, content sha256 %s; teacher.path has %s): its prune.json's layer "
                "map and kept channels are used as recorded",
                cfg.student.path,
                provenance.teacher_path,
                provenance.teacher_sha256[:12],
                now[:12],
            )
    log.info("student.path %s: pruned from %s, teacher layers %s", cfg.student.path, provenance.teacher_path, list(provenance.layers))
    return provenance
