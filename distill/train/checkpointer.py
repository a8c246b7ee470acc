"""Writing and finding this run's checkpoints (the layout and its checks live in distill/checkpoints/layout.py).

`Checkpointer.claim` makes the output directory this run's (or refuses another run's); `resume_point`
finds the newest checkpoint that loads safely, converting it to DeepSpeed's universal format when the
world size or ZeRO stage changed; `save` writes one: nothing when a weight is not finite or the disk
cannot hold it, the COMPLETE marker and `latest` only after every rank wrote its shards, older ones
pruned only after that.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from data_prep.manifest import write_json_atomically
from distill.checkpoints import layout as ckpt
from distill.models.build import count_parameters
from distill.train.distributed import DistContext, all_reduce_sum, barrier, on_main_then_broadcast
from distill.train.save_guards import (
    BYTES_PER_PARAMETER,
    TrainingStopped,
    check_free_space,
    directory_bytes,
    is_disk_full,
    local_weights_finite,
    no_space_message,
)

log = logging.getLogger("distill.checkpoints.layout")


@dataclass
class ResumePoint:
    step: int
    tag: str
    state: dict  # trainer_state.json
    load_root: str  # checkpoints/ or checkpoints/universal/
    universal: bool


class Checkpointer:
    """This run's checkpoints under `output_dir`/checkpoints: claim, resume, save, prune (`build` makes one)."""

    def __init__(self, output_dir: str, section, ctx: DistContext, tokenizer, run_state: dict, samples_per_step: int):
        """`section`: the run's `checkpoint` settings (cadence, keep_last); `tokenizer`: the dataset's, as loaded and checked
        against its manifest at start (each checkpoint saves that one, not the folder as it is at save time); `run_state`:
        what every checkpoint's trainer_state.json records of the run (steps, seed, dataset and tokenizer identity, config)."""
        self.output_dir = output_dir
        self.every_steps, self.keep_last = section.every_steps, section.keep_last
        self.ctx = ctx
        self.tokenizer = tokenizer
        self.run_state = run_state
        self.samples_per_step = samples_per_step
        self.root = ckpt.checkpoints_root(output_dir)

    @classmethod
    def build(cls, section, plan, ctx: DistContext, output_dir: str, run_config: dict) -> "Checkpointer":
        """From section `checkpoint`, the run's plan (steps, global batch, seed, the dataset's manifest and tokenizer), the run
        directory and the resolved run config (`Config.to_dict()`, saved with every checkpoint)."""
        run_state = {
            "total_steps": plan.total_steps,
            "world_size": ctx.world_size,
            "rng": {
                "scheme": "dropout: torch seeded per (seed, step, micro step, rank); masks: per (seed, stream index)",
                "seed": plan.seed,
            },
            "data_manifest_sha256": plan.manifest_sha,
            "tokenizer": asdict(plan.manifest.tokenizer),  # the manifest's record of the tokenizer (distill-export checks it)
            "config": run_config,
        }
        return cls(output_dir, section, ctx, plan.tokenizer, run_state, plan.global_batch)

    def claim(self, identity: dict, teacher_path: Optional[str] = None) -> bool:
        """Make output_dir this run's (rank 0 decides, and only rank 0 hashes the teacher): True when it already was (resume)."""
        return on_main_then_broadcast(self.ctx, lambda: ckpt.claim_output_dir(self.output_dir, identity, teacher_path))

    def resume_point(self, zero_stage: int) -> Optional[ResumePoint]:
        """The newest checkpoint that loads safely (a damaged newer one is reported loudly and set aside), or None."""
        found = on_main_then_broadcast(self.ctx, lambda: ckpt.latest_loadable(self.root))
        if found is None:
            return None
        step, tag = found
        state = ckpt.read_trainer_state(self.root, tag)
        load_root, universal = self.root, False
        if state["world_size"] != self.ctx.world_size or state["zero_stage"] != zero_stage:
            # Elastic resume: DeepSpeed's universal checkpoint re-partitions parameters and optimizer state.
            log.info(
                "checkpoint %s was written by %d ranks at ZeRO-%d; resuming on %d ranks at ZeRO-%d through a universal checkpoint",
                tag,
                state["world_size"],
                state["zero_stage"],
                self.ctx.world_size,
                zero_stage,
            )
            load_root = on_main_then_broadcast(self.ctx, lambda: ckpt.universal_checkpoint(self.root, tag))
            universal = True
        return ResumePoint(step, tag, state, load_root, universal)

    def newest(self) -> Optional[str]:
        """Path of the newest complete checkpoint, or None."""
        found = ckpt.latest_complete(self.root)
        return os.path.join(self.root, found[1]) if found else None

    def due(self, step: int, end_step: int, stopping: bool) -> bool:
        return step % self.every_steps == 0 or step == end_step or stopping

    def save(self, engine, step: int, extra_state: dict[str, Any]) -> None:
        """DeepSpeed shards on every rank, then (rank 0) our state, the COMPLETE marker and `latest`.

        Nothing is written when any rank's weights are not finite or the disk cannot hold the checkpoint; a save
        that fails half-way (disk full) is removed, and `latest` keeps pointing to the previous complete one.
        """
        tag = ckpt.tag_for(step)
        tag_dir = os.path.join(self.root, tag)
        previous = self.newest()
        if all_reduce_sum([0.0 if local_weights_finite(engine.module) else 1.0], self.ctx.device)[0]:
            raise TrainingStopped(
                f"step {step}: the weights are not finite numbers; stopped before saving: "
                f"{'the newest complete checkpoint is ' + previous if previous else 'no checkpoint was written yet'}. "
                f"Lower optim.lr, then rerun the same command to resume from it"
            )
        parameters = count_parameters(engine.module)

        def prepare() -> None:
            check_free_space(self.root, previous, parameters)
            _clear_tag_dir(tag_dir)

        on_main_then_broadcast(self.ctx, prepare)
        t0 = time.time()
        state = {
            "step": step,
            "samples_consumed": step * self.samples_per_step,
            "zero_stage": engine.zero_stage,
            **self.run_state,
            **extra_state,
        }
        try:
            engine.save(self.root, tag, {"trainer_state": state})
            barrier()
            if self.ctx.is_main:
                self._finish(engine, tag, state)
                log.info("checkpoint %s written in %.1fs", tag_dir, time.time() - t0)
        except (OSError, RuntimeError) as exc:
            if not is_disk_full(exc, self.root):
                raise
            # this rank stops (the launcher then stops the others); the partial save is worthless and takes space
            shutil.rmtree(tag_dir, ignore_errors=True)
            need = directory_bytes(previous) if previous else parameters * BYTES_PER_PARAMETER
            raise TrainingStopped(no_space_message(self.root, need, shutil.disk_usage(self.root).free, previous), rank_local=True) from None
        barrier()

    def _finish(self, engine, tag: str, state: dict) -> None:
        """Rank 0, after every rank wrote its shards: HF config, tokenizer, trainer state, COMPLETE, `latest`, pruning."""
        tag_dir = os.path.join(self.root, tag)
        student = engine.module.model
        student.config.architectures = [type(student).__name__]
        student.config.save_pretrained(os.path.join(tag_dir, "hf_config"))
        if getattr(student, "generation_config", None) is not None:  # a causal LM's generation defaults (student.path: its own)
            student.generation_config.save_pretrained(os.path.join(tag_dir, "hf_config"))
        self.tokenizer.save_pretrained(os.path.join(tag_dir, "tokenizer"))
        write_json_atomically(os.path.join(tag_dir, ckpt.TRAINER_STATE), state)
        ckpt.mark_complete(tag_dir)
        ckpt.write_latest(self.root, tag)
        ckpt.prune(self.root, self.keep_last)  # only now: the older ones go after the new one is complete


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
