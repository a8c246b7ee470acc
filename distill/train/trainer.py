"""The distillation loop over named components, each in its own module with one job:

    data          distill/data/reader.py         this rank's micro batches, masked and padded, on the device
    teacher       distill/teachers/online.py      the teacher's outputs for a micro batch (online today; other sources plug in)
    objective     distill/objective/objective.py   what each forward returns, and the weighted losses (distill/objective/losses.py)
    engine        distill/train/engine.py       the student in DeepSpeed: forward, backward, optimizer step
    checkpointer  distill/train/checkpointer.py claim the run directory, resume, save (guarded), prune
    metrics       distill/train/metrics.py      a step's sums by name, reduced once; jsonl, TensorBoard, console
    stopper       distill/train/stopper.py      stop on request after a checkpoint, or at a non-finite step before one
    watchdog      distill/train/heartbeat.py    a rank that stopped answering ends the run, named, instead of blocking the others

`build_run` makes the plan of the weight-free pass real (distill/train/preflight.py `RunPlan`: every setting checked and
decided before anything loads or the run directory is claimed), each component from its own section; `train` runs the loop.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from distill.checkpoints import layout as ckpt
from distill.config import Config
from distill.data.reader import DataSource
from distill.models.build import StudentForDistillation, compile_encoder, count_parameters, init_student_from_teacher, make_student
from distill.objective.objective import Objective
from distill.teachers.online import OnlineTeacher
from distill.teachers.sources import TEACHER_SOURCES
from distill.train.checkpointer import Checkpointer
from distill.train.distributed import DistContext, barrier, init_distributed, on_main_then_broadcast, setup_logging
from distill.train.engine import StudentEngine, peak_memory_mb
from distill.train.heartbeat import RankWatchdog
from distill.train.metrics import HOST_COUNTERS, MetricsLog, StepSums, count_batch, step_metrics
from distill.train.preemption import PREEMPTED_EXIT_CODE, StopRequest
from distill.train.preflight import preflight
from distill.train.profiling import PhaseTimer
from distill.train.run_lock import RunLock
from distill.train.stopper import Stopper

log = logging.getLogger("distill.train")


@dataclass
class Run:
    """The components of one run, wired by `build_run`."""

    cfg: Config
    ctx: DistContext
    data: DataSource
    teacher: Optional[OnlineTeacher]
    objective: Objective
    engine: StudentEngine
    checkpointer: Checkpointer
    stopper: Stopper
    watchdog: RankWatchdog
    metrics_log: Optional[MetricsLog]  # rank 0 only
    phases: PhaseTimer
    start_step: int
    end_step: int
    total_steps: int

    @property
    def term_names(self) -> list[str]:
        return [n for n, w in self.cfg.loss.weights.items() if w > 0]


def train(cfg: Config, local_rank: int | None = None) -> dict[str, Any]:
    """Run (or resume) the distillation described by `cfg`; returns the last step's metrics.

    Rank 0 holds the run directory's lock for the whole run: a second trainer on the same output_dir is refused."""
    ctx = init_distributed(local_rank, cfg.train.collective_timeout_s)
    setup_logging(ctx.rank, ctx.world_size)
    lock = RunLock(cfg.output_dir) if ctx.is_main else None
    on_main_then_broadcast(ctx, lambda: lock.acquire() and None)
    started = False
    watchdog = RankWatchdog(cfg.output_dir, ctx.rank, ctx.world_size, ctx.collective_timeout_s)  # started once the run dir is ours
    try:
        stop = StopRequest(cfg.output_dir)  # SIGTERM/SIGUSR1 from here on: finish the step, checkpoint, exit
        stop.watch_launcher()  # and if the launcher that started this worker dies: no orphaned worker trains on
        run = build_run(cfg, ctx, stop, watchdog)
        started = True
        return run_steps(run)
    finally:
        watchdog.stop()
        if lock is not None:
            lock.release(remove_dir_if_created=not started and not os.path.exists(os.path.join(cfg.output_dir, ckpt.RUN_FILE)))


def run_steps(run: Run) -> dict[str, Any]:
    """The loop: each optimizer step runs its micro batches, reduces its metrics once, then logs, checks, saves."""
    cfg, ctx, phases, last = run.cfg, run.ctx, run.phases, {}
    progress = tqdm(
        total=run.total_steps,
        initial=run.start_step,
        disable=not ctx.is_main,
        desc="distill",
        unit="step",
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    run.engine.train()
    try:
        for step in range(run.start_step + 1, run.end_step + 1):
            t0, skipped_before = time.time(), run.engine.skipped_steps
            sums = StepSums(ctx.device, ["loss"] + [f"loss_{n}" for n in run.term_names], list(HOST_COUNTERS))
            for micro in range(run.data.accumulation):
                t_data = time.time()
                with phases("data"):
                    batch, raw = run.data.next()
                data_wait = time.time() - t_data  # the wait for this micro batch (not the whole micro step)
                seed_dropout(seed_for(cfg.seed, step - 1, micro, ctx.rank), ctx.device)  # dropout: a pure function of the position
                batch = run.objective.prepare(batch)
                with phases("teacher_forward"):
                    teacher_out = run.teacher.outputs(batch) if run.teacher is not None and run.objective.uses_teacher else None
                with phases("student_forward"):
                    student_out = run.engine.forward(batch)
                with phases("loss"):
                    loss, terms = run.objective.losses(teacher_out, student_out, batch)
                with phases("backward"):
                    run.engine.backward(loss)
                if not (run.engine.defers_update and micro == run.data.accumulation - 1):
                    with phases("optimizer"):
                        run.engine.step()
                sums.add_device([loss] + [terms[n] for n in run.term_names])
                count_batch(sums, raw["attention_mask"], batch.logit_positions, data_wait)
            sums.add("stop_flag", run.stopper.local_flag())
            # the same on every rank: rank 0 adds it, read back with the sums (the update's norm, before a deferred update)
            grad_norm = run.engine.boundary_grad_norm() if run.engine.defers_update else run.engine.grad_norm_tensor()
            if grad_norm is not None:
                sums.add_device_value("grad_norm", grad_norm if ctx.is_main else torch.zeros_like(grad_norm))
            reduced = sums.reduce()  # the step's one all-reduce and host read
            if run.engine.defers_update:
                with phases("optimizer"):
                    run.engine.update(norm_is_finite=math.isfinite(reduced["grad_norm"]))
            metrics = step_metrics(
                step,
                reduced,
                run.term_names,
                run.data.accumulation,
                ctx.world_size,
                time.time() - t0,
                cfg.train.global_batch,
                lr=run.engine.lr(),
                grad_norm=reduced.get("grad_norm"),
                peak_memory_mb=peak_memory_mb(ctx.device),
                data=run.data.step_fingerprint(step - 1),
            )
            if phases.enabled:  # this rank's seconds per phase (train.profile_phases)
                metrics["phase_seconds"] = phases.take()
            verdict = run.stopper.after_step(
                step, metrics | {"stop_flag": reduced["stop_flag"]}, run.engine.skipped_steps > skipped_before, run.checkpointer.newest
            )
            if verdict.skipped_update:
                metrics["skipped_update"] = True
            metrics["skipped_steps"] = run.stopper.skipped
            progress.update(1)
            if run.metrics_log is not None:
                run.metrics_log.write(metrics, step == run.end_step, progress.write)
            if verdict.error is not None:
                raise verdict.error  # after the step is logged, before anything is saved
            if run.checkpointer.due(step, run.end_step, verdict.stop_requested):
                run.checkpointer.save(run.engine, step, {"nonfinite_skipped": run.stopper.skipped})
            last = metrics
            run.watchdog.progress()
            if verdict.stop_requested:
                last["stopped_by"] = run.stopper.reason()
                break
    finally:
        progress.close()  # also when the run stops with an error: its one line then starts on a line of its own
    _finish(run, last)
    return last


def _finish(run: Run, last: dict[str, Any]) -> None:
    step = last.get("step", run.start_step)
    if run.metrics_log is not None:
        run.metrics_log.close()
        if "stopped_by" in last:
            log.warning(
                "stopped at step %d of %d on request (%s) after a complete checkpoint; rerun the same command to resume (exit code %d)",
                step,
                run.total_steps,
                last["stopped_by"],
                PREEMPTED_EXIT_CODE,
            )
        elif step < run.total_steps:
            log.info("halted at step %d of %d (train.halt_at_step); rerun the same command to continue", step, run.total_steps)
        else:
            log.info("training finished at step %d; export with: distill-export --checkpoint %s --output DIR", step, run.cfg.output_dir)
    barrier()


def seed_dropout(seed: int, device: torch.device) -> None:
    """What `torch.manual_seed` does for this rank's generators (the CPU one, and the training GPU's), without queueing a
    lazy seed call with a formatted stack trace for every other accelerator type each micro step (~0.3 ms on a CPU)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] % (2**63))


# ------------------------------------------------------------------------------------------------
# Wiring


def build_run(cfg: Config, ctx: DistContext, stop: StopRequest, watchdog: RankWatchdog) -> Run:
    """Make the checked plan real (teacher, student, data), then claim the run directory, set up the engine and resume if there is a checkpoint."""
    plan = preflight(cfg, ctx.world_size, ctx.device)  # every weight-free check and decision, all problems at once, before anything loads
    plan.raise_if_any()
    teacher = TEACHER_SOURCES[plan.teacher_source].load(cfg, ctx.device) if plan.teacher_source else None

    torch.manual_seed(cfg.seed)
    student = make_student(plan.student_config, cfg.student.attn_implementation)
    if plan.init_layers is not None:
        init_student_from_teacher(student, teacher.init_model(), plan.init_layers, cfg.student.fold_token_type_embeddings)
        log.info("student initialised from teacher layers %s", plan.init_layers)
    objective = plan.objective
    if teacher is not None:
        objective.attach_teacher(teacher.model)
        teacher.bind(objective)
    log.info("objective: %s", objective.describe())
    log.info(
        "student: %s, %.2fM parameters; teacher: %s",
        type(student).__name__,
        count_parameters(student) / 1e6,
        teacher.describe() if teacher is not None else "none",
    )
    data = DataSource.build(cfg.data, plan, ctx)
    total_steps = plan.total_steps

    wrapper = StudentForDistillation(
        student,
        objective.student_needs,
        cfg.loss.projection,
        objective.teacher_width,
        full_logits=not cfg.train.logits_where_needed,
        logit_loss=objective.student_logit_loss(student),
    )
    if cfg.train.compile:
        compile_encoder(student)
        if teacher is not None:
            teacher.compile()

    # Everything above only read: the run directory is claimed (run.json written) once every setting has been checked.
    checkpointer = Checkpointer(cfg, ctx, plan.manifest_sha, total_steps, plan.tokenizer, asdict(plan.manifest.tokenizer))
    identity = ckpt.run_identity(cfg.to_dict(), plan.manifest_sha)
    if teacher is not None:
        identity["teacher.fingerprint"] = teacher.fingerprint()
    resuming = checkpointer.claim(identity, cfg.teacher.path)  # + the teacher's content fingerprint (distill/models/fingerprint.py)
    watchdog.start()  # from here on a rank that stops answering is named by the others (OUTPUT/heartbeat/)
    resume = checkpointer.resume_point(plan.ds_config["zero_optimization"]["stage"]) if resuming else None
    if resume is not None and resume.universal:
        plan.ds_config.setdefault("checkpoint", {})["load_universal"] = True
    engine = StudentEngine.build(
        cfg.optim, cfg.deepspeed, plan, ctx, wrapper, cfg.train.lean_startup, activation_checkpointing=cfg.train.activation_checkpointing
    )
    log.info(
        "DeepSpeed ZeRO-%d, %d ranks x micro batch %d x accumulation %d = global batch %d, precision %s, %d steps (%d warmup)",
        engine.zero_stage,
        ctx.world_size,
        plan.micro_batch,
        data.accumulation,
        plan.global_batch,
        str(plan.precision).replace("torch.", ""),
        total_steps,
        plan.warmup_steps,
    )
    start_step = 0
    if resume is not None:
        engine.load(resume.load_root, resume.tag, resume.universal)
        start_step = resume.state["step"]
        log.info(
            "resumed from %s: step %d, %d samples consumed",
            os.path.join(checkpointer.root, resume.tag),
            start_step,
            resume.state["samples_consumed"],
        )
    elif resuming:
        log.info("output_dir belongs to this run but holds no complete checkpoint: starting from step 0")

    stopper = Stopper(stop, cfg.train.max_nonfinite_steps, int(resume.state.get("nonfinite_skipped", 0)) if resume is not None else 0)
    on_main_then_broadcast(ctx, stop.clear_stop_file)  # an error there (STOP is a directory) reaches every rank
    data.start(start_step, total_steps)
    end_step = total_steps if cfg.train.halt_at_step is None else min(total_steps, cfg.train.halt_at_step)
    term_names = [n for n, w in cfg.loss.weights.items() if w > 0]
    metrics_log = (
        MetricsLog(cfg.output_dir, start_step, cfg.to_yaml(), cfg.train.log_every, term_names, ctx.world_size, total_steps)
        if ctx.is_main
        else None
    )
    return Run(
        cfg,
        ctx,
        data,
        teacher,
        objective,
        engine,
        checkpointer,
        stopper,
        watchdog,
        metrics_log,
        PhaseTimer(ctx.device, cfg.train.profile_phases),
        start_step,
        end_step,
        total_steps,
    )
