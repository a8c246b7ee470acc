"""The distillation loop: frozen teacher + student in a DeepSpeed engine, losses from the config."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from data_prep.manifest import MANIFEST_FILE, TOKENIZER_DIR, DatasetError, check_tokenizer_matches, load_manifest, sha256_file, tokenizer_identity, write_json_atomically
from distill import checkpoint as ckpt
from distill.config import Config, ConfigError
from distill.data import MicroBatches, StepPlan, TokenSequences, make_loader
from distill.distributed import DistContext, all_reduce_sum, barrier, init_distributed, on_main_then_broadcast, setup_logging
from distill.guards import (BYTES_PER_PARAMETER, NonFiniteGuard, TrainingStopped, check_free_space, directory_bytes, is_disk_full,
                            local_weights_finite, no_space_message)
from distill.losses import Batch, select_logit_positions
from distill.masking import CausalLMCollator, MaskingCollator, MaskingPolicy
from distill.models import (StudentForDistillation, build_student, check_data_fits, compile_encoder, count_parameters, init_layers_for,
                            init_student_from_teacher, load_teacher, resolve_dtype)
from distill.objectives import Objective
from distill.preemption import PREEMPTED_EXIT_CODE, StopRequest
from distill.run_lock import RunLock
from distill.profiling import COMMS_LOGGER, PhaseTimer

log = logging.getLogger("distill.train")
_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler", "gradient_clipping", "bf16", "fp16")


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


def deepspeed_config(cfg: Config, world_size: int, precision: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON plus what this recipe owns (batch sizes, clipping, precision)."""
    base: dict[str, Any] = {}
    if cfg.deepspeed.config:
        try:
            with open(cfg.deepspeed.config) as handle:
                base = json.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"deepspeed.config {cfg.deepspeed.config!r} does not exist (relative paths are resolved from the current directory)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"deepspeed.config {cfg.deepspeed.config!r} is not valid JSON ({exc})") from None
    clashes = [k for k in _OWNED_DS_KEYS if k in base and base[k] != "auto"]
    if clashes:
        raise ConfigError(f"deepspeed.config sets {clashes}; these come from the recipe (train.*, optim.*): remove them or set them to \"auto\"")
    per_step = cfg.train.micro_batch * world_size
    if cfg.train.global_batch % per_step:
        raise ConfigError(
            f"train.global_batch={cfg.train.global_batch} is not divisible by train.micro_batch={cfg.train.micro_batch} x {world_size} ranks = {per_step}; "
            f"use a global batch that is a multiple of {per_step}, or another micro batch"
        )
    ds = {k: v for k, v in base.items() if k not in _OWNED_DS_KEYS}
    ds.update(
        train_batch_size=cfg.train.global_batch,
        train_micro_batch_size_per_gpu=cfg.train.micro_batch,
        gradient_accumulation_steps=cfg.train.global_batch // per_step,
        gradient_clipping=cfg.optim.grad_clip,
    )
    ds.setdefault("steps_per_print", 10**9)
    if cfg.train.profile_phases:
        ds["comms_logger"] = dict(COMMS_LOGGER)  # collectives timed (and made blocking) for the phase breakdown
    zero = dict(ds.get("zero_optimization", {}))
    if cfg.deepspeed.zero_stage is not None:
        zero["stage"] = cfg.deepspeed.zero_stage
    zero.setdefault("stage", 2)
    ds["zero_optimization"] = zero
    if precision == torch.bfloat16:
        # skipping a non-finite step needs DeepSpeed's overflow check, which bf16 leaves off by default
        ds["bf16"] = {"enabled": True, "check_grad_overflow": cfg.train.max_nonfinite_steps > 0}
    elif precision == torch.float16:
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return ds


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by this rank, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def warmup_linear_decay(total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and LayerNorm weights (1-d parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps, **extra)


def _teacher_fingerprint(path: str) -> str:
    """Config hash plus weight file names and sizes: cheap, and stable when the directory moves."""
    digest = hashlib.sha256(open(os.path.join(path, "config.json"), "rb").read())
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".bin")):
            digest.update(f"{name}:{os.path.getsize(os.path.join(path, name))}".encode())
    return digest.hexdigest()


@dataclass
class RunSetup:
    """Everything built before the first step."""

    ctx: DistContext
    sequences: TokenSequences
    plan: StepPlan
    collator: MaskingCollator
    teacher: Optional[torch.nn.Module]
    engine: Any
    start_step: int
    total_steps: int
    logits_at: Optional[str]
    teacher_logits: bool
    manifest_sha: str
    objective: Any = None  # distill.objectives.Objective: losses, what they need, the teacher's forward
    nonfinite_skipped: int = 0  # non-finite steps skipped so far in this run (train.max_nonfinite_steps)


def _load_tokenizer(cfg: Config, manifest):
    """The dataset's tokenizer; the teacher's own tokenizer (if it has one) must be the same."""
    from transformers import AutoTokenizer

    from data_prep.tokenization import has_tokenizer_files

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(cfg.data.path, TOKENIZER_DIR), local_files_only=True)
    if cfg.teacher.path:
        if has_tokenizer_files(cfg.teacher.path):
            teacher_tok = AutoTokenizer.from_pretrained(cfg.teacher.path, local_files_only=True)
            check_tokenizer_matches(manifest, tokenizer_identity(teacher_tok, cfg.teacher.path), f"teacher {cfg.teacher.path}")
        else:
            log.warning("teacher %s has no tokenizer files; checking only the vocabulary size against the dataset", cfg.teacher.path)
    return tokenizer


def build_run(cfg: Config, ctx: DistContext) -> RunSetup:
    import deepspeed

    manifest = load_manifest(cfg.data.path)
    manifest_sha = sha256_file(os.path.join(cfg.data.path, MANIFEST_FILE))
    precision = resolve_dtype(cfg.train.precision, ctx.device)
    if ctx.device.type == "cpu" and precision != torch.float32:
        raise ConfigError(f"train.precision={cfg.train.precision} needs a GPU; use fp32 (or auto) on CPU")
    ds_config = deepspeed_config(cfg, ctx.world_size, precision)  # its problems surface before anything is written

    teacher = None
    if cfg.teacher.path:
        teacher = load_teacher(cfg.teacher.path, resolve_dtype(cfg.teacher.dtype, ctx.device), cfg.teacher.attn_implementation, ctx.device)
    tokenizer = _load_tokenizer(cfg, manifest)
    if teacher is not None:
        if teacher.config.vocab_size < manifest.tokenizer.vocab_size:
            raise DatasetError(
                f"teacher vocabulary ({teacher.config.vocab_size}) is smaller than the dataset's tokenizer ({manifest.tokenizer.vocab_size}); "
                f"re-run distill-prep with the teacher's tokenizer"
            )
    vocab_size = teacher.config.vocab_size if teacher is not None else manifest.tokenizer.vocab_size

    torch.manual_seed(cfg.seed)
    student = build_student(cfg.student, teacher, vocab_size, tokenizer.pad_token_id, manifest.max_seq_len)
    if cfg.student.init == "teacher":
        layers = init_layers_for(cfg.student, teacher, student.config.num_hidden_layers)
        init_student_from_teacher(student, teacher, layers, cfg.student.fold_token_type_embeddings)
        log.info("student initialised from teacher layers %s", layers)
    check_data_fits(student, manifest.packing)
    objective = Objective(cfg.loss, teacher, student)  # checks the active losses against the models' shapes
    log.info("objective: %s", objective.describe())
    log.info("student: %s, %.2fM parameters; teacher: %s", type(student).__name__, count_parameters(student) / 1e6,
             f"{type(teacher).__name__}, {count_parameters(teacher) / 1e6:.2f}M parameters, frozen" if teacher is not None else "none")

    sequences = TokenSequences(cfg.data.path, cfg.data.split, manifest, cfg.data.cache_dir, cfg.data.verify_checksums)
    plan = StepPlan(len(sequences), cfg.train.global_batch, cfg.train.micro_batch, ctx.world_size, ctx.rank, cfg.seed,
                    sequences.lengths if cfg.data.group_by_length else None, cfg.data.length_group_steps)
    total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * len(sequences) / cfg.train.global_batch))
    counts = np.load(os.path.join(cfg.data.path, manifest.token_counts["path"])) if cfg.data.token_frequency_smoothing > 0 else np.zeros(0)
    policy = MaskingPolicy.with_smoothing(
        counts, cfg.data.token_frequency_smoothing, mask_id=tokenizer.mask_token_id, pad_id=tokenizer.pad_token_id,
        vocab_size=vocab_size, special_ids=manifest.tokenizer.all_special_ids, mlm_probability=cfg.data.mlm_probability,
        mask_token_fraction=cfg.data.mask_token_fraction, random_token_fraction=cfg.data.random_token_fraction,
        whole_word=cfg.data.whole_word_masking,
    )
    collator = MaskingCollator(policy, cfg.seed, cfg.data.pad_to_multiple_of)
    if manifest.packing == "causal":  # no masking: labels are the next tokens
        collator = CausalLMCollator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id, cfg.data.pad_to_multiple_of)

    wrapper = StudentForDistillation(student, objective.student_needs, cfg.loss.projection, objective.teacher_width,
                                     full_logits=not cfg.train.logits_where_needed)
    if cfg.train.compile:
        for model in (teacher, student):
            if model is not None:
                compile_encoder(model)
    optimizer = make_optimizer(wrapper, cfg, ctx.device)
    warmup = int(cfg.optim.warmup_fraction * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear_decay(total_steps, warmup))

    # Everything above only read: the run directory is claimed (run.json written) once every setting has been checked.
    identity = ckpt.run_identity(cfg.to_dict(), manifest_sha)
    if teacher is not None:
        identity["teacher.fingerprint"] = _teacher_fingerprint(cfg.teacher.path)
    resuming = on_main_then_broadcast(ctx, lambda: ckpt.claim_output_dir(cfg.output_dir, identity))
    root = ckpt.checkpoints_root(cfg.output_dir)
    # newest complete checkpoint that loads safely; a damaged newer one is reported loudly and set aside (rank 0 decides)
    found = on_main_then_broadcast(ctx, lambda: ckpt.latest_loadable(root)) if resuming else None
    load_root = root
    if found is not None:
        state = ckpt.read_trainer_state(root, found[1])
        if state["world_size"] != ctx.world_size or state["zero_stage"] != ds_config["zero_optimization"]["stage"]:
            # Elastic resume: DeepSpeed's universal checkpoint re-partitions parameters and optimizer state.
            log.info("checkpoint %s was written by %d ranks at ZeRO-%d; resuming on %d ranks at ZeRO-%d through a universal checkpoint",
                     found[1], state["world_size"], state["zero_stage"], ctx.world_size, ds_config["zero_optimization"]["stage"])
            load_root = on_main_then_broadcast(ctx, lambda: ckpt.universal_checkpoint(root, found[1]))
            ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine, _, _, _ = deepspeed.initialize(model=wrapper, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False)
    log.info("DeepSpeed ZeRO-%d, %d ranks x micro batch %d x accumulation %d = global batch %d, precision %s, %d steps (%d warmup)",
             ds_config["zero_optimization"]["stage"], ctx.world_size, cfg.train.micro_batch, plan.accumulation, cfg.train.global_batch,
             str(precision).replace("torch.", ""), total_steps, warmup)

    start_step = 0
    if found is not None:
        step, tag = found
        state = ckpt.read_trainer_state(root, tag)
        hyper = [{k: g[k] for k in ("weight_decay", "betas", "eps") if k in g} for g in engine.optimizer.param_groups]
        import pickle

        from distill import safe_load

        try:
            with safe_load.guard():  # DeepSpeed's torch.load calls unpickle tensors only, never code
                path, _ = engine.load_checkpoint(load_root, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True)
        except pickle.UnpicklingError as exc:
            raise ckpt.CheckpointError(safe_load.describe(os.path.join(load_root, tag), exc)) from None
        for group, saved in zip(engine.optimizer.param_groups, hyper):
            group.update(saved)  # recipe hyperparameters per group (a universal ZeRO-3 load copies group 0's to all)
        if load_root != root:
            _unshare_adam_steps(engine.optimizer)
        if path is None:
            raise ckpt.CheckpointError(f"DeepSpeed could not load checkpoint {os.path.join(root, tag)}; it is damaged: move it away to resume from an earlier one")
        start_step = state["step"]
        log.info("resumed from %s: step %d, %d samples consumed", os.path.join(root, tag), start_step, state["samples_consumed"])
    elif resuming:
        log.info("output_dir belongs to this run but holds no complete checkpoint: starting from step 0")

    return RunSetup(ctx, sequences, plan, collator, teacher, engine, start_step, total_steps,
                    objective.logits_at, objective.teacher_logits, manifest_sha, objective=objective)


def _unshare_adam_steps(optimizer) -> None:
    """A universal ZeRO-3 load gives every parameter group the *same* `step` tensor; torch's Adam increments
    it in place once per group, so later groups would use a step count too high (wrong bias correction)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def _newest_complete_dir(root: str) -> Optional[str]:
    found = ckpt.latest_complete(root)
    return os.path.join(root, found[1]) if found else None


def _clear_tag_dir(tag_dir: str) -> None:
    """Make room for a new save of this step: an unfinished one is deleted, a complete one is kept aside."""
    if not os.path.isdir(tag_dir):
        return
    if ckpt.is_complete(tag_dir):
        aside = f"{tag_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
        log.warning("checkpoint %s already exists (complete); moving it to %s before saving this step again", tag_dir, aside)
        os.rename(tag_dir, aside)
    else:
        shutil.rmtree(tag_dir)  # an unfinished save of the same step from an earlier attempt


def save_checkpoint(cfg: Config, run: RunSetup, step: int) -> None:
    """DeepSpeed shards on every rank, then (rank 0) our state, the COMPLETE marker and `latest`.

    Nothing is written when any rank's weights are not finite or the disk cannot hold the checkpoint; a save
    that fails half-way (disk full) is removed, and `latest` keeps pointing to the previous complete one.
    """
    root = ckpt.checkpoints_root(cfg.output_dir)
    tag = ckpt.tag_for(step)
    tag_dir = os.path.join(root, tag)
    previous = _newest_complete_dir(root)
    if all_reduce_sum([0.0 if local_weights_finite(run.engine.module) else 1.0], run.ctx.device)[0]:
        raise TrainingStopped(f"step {step}: the weights are not finite numbers; stopped before saving: "
                              f"{'the newest complete checkpoint is ' + previous if previous else 'no checkpoint was written yet'}. "
                              f"Lower optim.lr, then rerun the same command to resume from it")
    parameters = count_parameters(run.engine.module)

    def prepare() -> None:
        check_free_space(root, previous, parameters)
        _clear_tag_dir(tag_dir)

    on_main_then_broadcast(run.ctx, prepare)
    t0 = time.time()
    state = {
        "step": step,
        "samples_consumed": step * cfg.train.global_batch,
        "total_steps": run.total_steps,
        "world_size": run.ctx.world_size,
        "zero_stage": run.engine.zero_optimization_stage(),
        "rng": {"scheme": "dropout: torch seeded per (seed, step, micro step, rank); masks: per (seed, stream index)", "seed": cfg.seed},
        "data_manifest_sha256": run.manifest_sha,
        "nonfinite_skipped": run.nonfinite_skipped,
        "config": cfg.to_dict(),
    }
    try:
        run.engine.save_checkpoint(root, tag=tag, client_state={"trainer_state": state}, save_latest=False)
        barrier()
        if run.ctx.is_main:
            _finish_checkpoint(cfg, run, root, tag, state)
            log.info("checkpoint %s written in %.1fs", tag_dir, time.time() - t0)
    except (OSError, RuntimeError) as exc:
        if not is_disk_full(exc, root):
            raise
        # this rank stops (the launcher then stops the others); the partial save is worthless and takes space
        shutil.rmtree(tag_dir, ignore_errors=True)
        need = directory_bytes(previous) if previous else parameters * BYTES_PER_PARAMETER
        raise TrainingStopped(no_space_message(root, need, shutil.disk_usage(root).free, previous), rank_local=True) from None
    barrier()


def _finish_checkpoint(cfg: Config, run: RunSetup, root: str, tag: str, state: dict) -> None:
    """Rank 0, after every rank wrote its shards: HF config, tokenizer, trainer state, COMPLETE, `latest`, pruning."""
    from transformers import AutoTokenizer

    tag_dir = os.path.join(root, tag)
    student = run.engine.module.model
    student.config.architectures = [type(student).__name__]
    student.config.save_pretrained(os.path.join(tag_dir, "hf_config"))
    AutoTokenizer.from_pretrained(os.path.join(cfg.data.path, TOKENIZER_DIR), local_files_only=True).save_pretrained(os.path.join(tag_dir, "tokenizer"))
    write_json_atomically(os.path.join(tag_dir, ckpt.TRAINER_STATE), state)
    ckpt.mark_complete(tag_dir)
    ckpt.write_latest(root, tag)
    ckpt.prune(root, cfg.checkpoint.keep_last)  # only now: the older ones are deleted after the new one is complete


def train(cfg: Config, local_rank: int | None = None) -> dict[str, Any]:
    """Run (or resume) the distillation described by `cfg`; returns the last step's metrics.

    Rank 0 holds the run directory's lock for the whole run: a second trainer on the same output_dir is refused."""
    ctx = init_distributed(local_rank)
    setup_logging(ctx.rank, ctx.world_size)
    lock = RunLock(cfg.output_dir) if ctx.is_main else None
    on_main_then_broadcast(ctx, lambda: lock.acquire() and None)
    started = False
    try:
        result = _train_locked(cfg, ctx)
        started = True
        return result
    finally:
        if lock is not None:
            lock.release(remove_dir_if_created=not started and not os.path.exists(os.path.join(cfg.output_dir, ckpt.RUN_FILE)))


def _train_locked(cfg: Config, ctx: DistContext) -> dict[str, Any]:
    stop = StopRequest(cfg.output_dir)  # SIGTERM/SIGUSR1 from here on: finish the step, checkpoint, exit
    stop.watch_launcher()  # and if the launcher that started this worker dies: no orphaned worker trains on
    run = build_run(cfg, ctx)
    if run.start_step:
        state = ckpt.read_trainer_state(ckpt.checkpoints_root(cfg.output_dir), ckpt.tag_for(run.start_step))
        run.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))
    guard = NonFiniteGuard(cfg.train.max_nonfinite_steps, run.nonfinite_skipped)
    if ctx.is_main:
        stop.clear_stop_file()
    barrier()
    engine, plan = run.engine, run.plan
    end_step = run.total_steps if cfg.train.halt_at_step is None else min(run.total_steps, cfg.train.halt_at_step)
    writer = None
    metrics_file = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"), purge_step=run.start_step or None)
        writer.add_text("config", "```yaml\n" + cfg.to_yaml() + "\n```", run.start_step)
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as handle:
            handle.write(cfg.to_yaml())
        metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a")

    num_workers = cfg.data.num_workers if cfg.data.num_workers is not None else (2 if ctx.device.type == "cuda" else 0)
    pin_memory = cfg.data.pin_memory if cfg.data.pin_memory is not None else ctx.device.type == "cuda"
    loader = make_loader(MicroBatches(run.sequences, plan, run.collator, run.start_step, run.total_steps), num_workers, pin_memory,
                         cfg.data.prefetch_factor)
    batches = iter(loader)
    from tqdm.auto import tqdm

    progress = tqdm(total=run.total_steps, initial=run.start_step, disable=not ctx.is_main, desc="distill", unit="step",
                    dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0)
    last: dict[str, Any] = {}
    step = run.start_step
    phases = PhaseTimer(ctx.device, cfg.train.profile_phases)
    loss_names = [n for n, w in cfg.loss.weights.items() if w > 0]
    engine.train()
    try:
        while step < end_step:
            t0 = time.time()
            skipped_before = engine.skipped_steps
            # loss sums stay on the device (float64: the same sums as Python floats) and are read once per step,
            # so the host never waits for the device inside the accumulation loop
            sums = torch.zeros(1 + len(loss_names), dtype=torch.float64, device=ctx.device)
            tokens = padded = positions = pairs = padded_pairs = 0  # pairs: sum of length^2 (attention FLOPs)
            data_wait = 0.0
            for micro in range(plan.accumulation):
                t_data = time.time()
                with phases("data"):
                    raw = next(batches)
                data_wait += time.time() - t_data
                torch.manual_seed(_seed_for(cfg.seed, step, micro, ctx.rank))  # dropout: a pure function of the position
                batch = Batch(
                    input_ids=raw["input_ids"].to(ctx.device, non_blocking=True),
                    attention_mask=raw["attention_mask"].to(ctx.device, non_blocking=True),
                    labels=raw["labels"].to(ctx.device, non_blocking=True),
                )
                select_logit_positions(batch, run.logits_at)
                with phases("teacher_forward"):
                    teacher_out = (run.objective.teacher_forward(run.teacher, batch, cfg.teacher.inference_mode, not cfg.train.logits_where_needed)
                                   if run.teacher is not None and run.objective.uses_teacher else None)
                with phases("student_forward"):
                    student_out = engine.module.outputs(engine(batch.input_ids, batch.attention_mask, batch.logit_positions))
                with phases("loss"):
                    loss, terms = run.objective.losses(teacher_out, student_out, batch)
                with phases("backward"):
                    engine.backward(loss)
                with phases("optimizer"):
                    engine.step()
                sums += torch.stack([loss.detach()] + [terms[n] for n in loss_names]).double()
                lengths = raw["attention_mask"].sum(1)
                tokens += int(lengths.sum())
                pairs += int((lengths * lengths).sum())
                padded += raw["attention_mask"].numel()
                padded_pairs += raw["attention_mask"].numel() * raw["attention_mask"].shape[1]
                positions += 0 if batch.logit_positions is None else int(batch.logit_positions.numel())
            step += 1
            host_sums = sums.tolist()
            reduced = all_reduce_sum([host_sums[0], tokens, float(stop.requested_here)] + host_sums[1:] + [padded, positions, data_wait, pairs, padded_pairs], ctx.device)
            stop_now = reduced[2] > 0  # any rank asked: all stop after this same step
            denom = plan.accumulation * ctx.world_size
            elapsed = time.time() - t0
            grad_norm = engine.get_global_grad_norm()
            last = {
                "step": step,
                "loss": reduced[0] / denom,
                **{f"loss_{n}": reduced[3 + i] / denom for i, n in enumerate(loss_names)},
                "lr": engine.get_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens_per_s": reduced[1] / elapsed,
                "samples_per_s": cfg.train.global_batch / elapsed,
                "samples_seen": step * cfg.train.global_batch,
                "peak_memory_mb": peak_memory_mb(ctx.device),
                # for the throughput benchmark (bench/train_throughput.py): sums over ranks
                "tokens": reduced[1],
                "padded_tokens": reduced[3 + len(loss_names)],
                "logit_positions": reduced[4 + len(loss_names)],
                "data_wait_share": reduced[5 + len(loss_names)] / ctx.world_size / elapsed,
                "token_pairs": reduced[6 + len(loss_names)],
                "padded_token_pairs": reduced[7 + len(loss_names)],
                "data": plan.step_fingerprint(step - 1),
            }
            if phases.enabled:  # this rank's seconds per phase (train.profile_phases)
                last["phase_seconds"] = phases.take()
            checked = {**{f"loss term {n!r}": last[f"loss_{n}"] for n in loss_names}, "the total loss": last["loss"], "the gradient norm": last["grad_norm"]}
            stopped = None  # all ranks decide alike: from the same all-reduced values
            try:
                if guard.check(step, checked, engine.skipped_steps > skipped_before, lambda: _newest_complete_dir(ckpt.checkpoints_root(cfg.output_dir))):
                    last["skipped_update"] = True
            except TrainingStopped as exc:
                stopped = exc  # raised once this step's metrics are logged, before any save
            run.nonfinite_skipped = last["skipped_steps"] = guard.skipped
            progress.update(1)
            if ctx.is_main:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
                if step % cfg.train.log_every == 0 or step == end_step:
                    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "samples_seen", "peak_memory_mb", "skipped_steps") + tuple(f"loss_{n}" for n in loss_names):
                        if last.get(key) is not None:
                            tag = key.replace("loss_", "loss/") if key.startswith("loss_") else ("loss/total" if key == "loss" else f"train/{key}")
                            writer.add_scalar(tag, last[key], step)
                    terms_text = " ".join(f"{n} {last[f'loss_{n}']:.4f}" for n in loss_names)
                    progress.write(
                        f"[rank 0/{ctx.world_size}] step {step}/{run.total_steps} loss {last['loss']:.4f} ({terms_text}) lr {last['lr']:.2e} "
                        f"grad {last['grad_norm'] if last['grad_norm'] is None else round(last['grad_norm'], 3)} {last['tokens_per_s']:.0f} tok/s"
                    )
            if stopped is not None:
                raise stopped
            if step % cfg.checkpoint.every_steps == 0 or step == end_step or stop_now:
                save_checkpoint(cfg, run, step)
            if stop_now:
                last["stopped_by"] = stop.reason() if stop.requested_here else "another rank"
                break
    finally:
        progress.close()  # also when the run stops with an error: its one line then starts on a line of its own
    if ctx.is_main:
        writer.flush()
        writer.close()
        metrics_file.close()
        if "stopped_by" in last:
            log.warning("stopped at step %d of %d on request (%s) after a complete checkpoint; rerun the same command to resume "
                        "(exit code %d)", step, run.total_steps, last["stopped_by"], PREEMPTED_EXIT_CODE)
        elif step < run.total_steps:
            log.info("halted at step %d of %d (train.halt_at_step); rerun the same command to continue", step, run.total_steps)
        else:
            log.info("training finished at step %d; export with: distill-export --checkpoint %s --output DIR", step, cfg.output_dir)
    barrier()
    return last
