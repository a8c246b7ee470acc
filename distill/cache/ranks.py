"""distill-cache on the training launchers' ranks: many GPUs on many nodes, a teacher bigger than one device.

    deepspeed --num_gpus 8 --module distill.cache --data D --teacher T --output C [settings]     # one node
    torchrun --nproc_per_node 8 -m distill.cache ...                                              # or torchrun
    DISTILL_MODULE=distill.cache sbatch --nodes 4 --gpus-per-node 8 launch/slurm.sbatch --data D ...  # Slurm

Rank 0 checks the inputs and opens the work directory (distill/cache/job.py: a rerun resumes it); every rank then takes
its share of the parts still to write (`shares`: a pure function of that list and the world size) and writes each with
`write_cache_part`, the function the Beam DoFn calls; at the end every rank re-opens and hashes its share of all the
parts, and rank 0 writes the manifest last and moves the cache into place.

The teacher is replicated (whole on each rank's device: GPU LOCAL_RANK, one rank per GPU) or partitioned across
the ranks ZeRO-3 style (distill/teachers/partitioned.py; `--placement auto` picks by the teacher's size against the
device memory). Partitioned, every forward gathers each layer from every rank, so all ranks run the same number of
forwards: a rank with fewer rows runs one-token forwards whose results are dropped until it has run as many as the
busiest rank.
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from types import SimpleNamespace
from typing import Optional

from data_prep.cache_manifest import CacheError, CacheManifest
from distill.cache.devices import choose_placement, device_for, device_memory, teacher_bytes
from distill.cache.job import CacheJob
from distill.cache.parts import forwards_of, part_name, shares, verify_part, write_cache_part
from distill.cache.scoring import TeacherScorer, load_replicated
from distill.cache.settings import CacheConfig

log = logging.getLogger("distill-cache")
DEFAULT_TIMEOUT_S = 7200.0  # a rank done with its parts waits for the slowest one (about one part's time at most)


def partition_teacher(path: str, dtype, ds_config: dict):
    """The partitioned teacher's one call site: (DeepSpeed engine, its wrapper) of distill/teachers/partitioned.py. Each
    rank reads only its own partition of the teacher from the safetensors checkpoint (`load_partitioned`): the teacher is
    never whole in any rank's memory, host or device."""
    from distill.teachers.partitioned import load_partitioned, partition  # deepspeed (via distill.teachers.partitioned): not at start-up

    return partition(load_partitioned(path, dtype, "sdpa", ds_config), ds_config)


class _CacheForward:
    """What the partitioned teacher's wrapper calls for one forward (in training: the objective): the input of the
    vocabulary projection at the batch's positions, and the projection (gathered by the wrapper)."""

    def teacher_forward(self, model, batch, inference_mode: bool = True, full_logits: bool = False):
        import torch  # torch: not at start-up

        from distill.models.build import model_forward  # torch (via distill.models.build): not at start-up

        with torch.inference_mode():
            return model_forward(
                model, batch.input_ids, batch.attention_mask, batch.logit_positions, head_input=True, documents=batch.documents
            )


def load_partitioned(cfg: CacheConfig, vocab_size: int, device) -> TeacherScorer:
    """A scorer whose teacher is partitioned across the ranks (every rank calls this, collectively)."""
    import torch  # torch: not at start-up

    from distill.models.build import resolve_dtype  # torch (via distill.models.build): not at start-up
    from distill.teachers.partitioned import local_parameter_bytes, zero3_inference_config  # deepspeed: not at start-up

    dtype = resolve_dtype(cfg.dtype, torch.device(device))
    engine, wrapper = partition_teacher(cfg.teacher, dtype, zero3_inference_config(None, cfg.batch_size, dtype))
    wrapper.objective = _CacheForward()
    log.info(
        "teacher partitioned across the ranks: this rank holds %.1f MB of its parameters", local_parameter_bytes(wrapper.model) / 2**20
    )

    def forward(ids, mask, positions, documents=None):
        out = engine(
            SimpleNamespace(
                input_ids=ids.to(device), attention_mask=mask.to(device), logit_positions=positions.to(device), documents=documents
            )
        )
        weight, bias = out["head"]
        return out["head_input"], weight, bias, out["head_transform"]

    return TeacherScorer(cfg, vocab_size, device, forward, wrapper.model.config.hidden_size)


def decide_placement(cfg: CacheConfig, job: CacheJob, device: str, local_ranks: int, world_size: int) -> str:
    """replicated or partitioned (`cfg.placement`, or auto: by the teacher's size against the device memory)."""
    import torch  # torch: not at start-up

    from distill.models.build import resolve_dtype  # torch (via distill.models.build): not at start-up

    size = teacher_bytes(job.teacher_config, resolve_dtype(cfg.dtype, torch.device(device)))
    memory, copies = device_memory(device, local_ranks)
    placement = choose_placement(cfg.placement, size, memory, copies)
    if placement == "partitioned" and world_size < 2:
        raise CacheError(
            f"the teacher ({size / 2**30:.1f} GiB) is to be partitioned across the ranks, but there is 1 rank: launch 2 or more "
            f"(deepspeed --num_gpus N --module distill.cache ...), or set --placement replicated"
        )
    log.info(
        "teacher %s: %.2f GiB of weights, %s memory %.1f GiB%s -> %s%s",
        cfg.teacher,
        size / 2**30,
        device,
        memory / 2**30,
        f" for {copies} ranks" if copies > 1 else "",
        placement,
        " (--placement)" if cfg.placement != "auto" else "",
    )
    return placement


def run_ranks(cfg: CacheConfig) -> CacheManifest:
    """This rank's side of a multi-rank cache run (every rank of the launcher's process group calls it)."""
    import torch  # torch: not at start-up
    import torch.distributed as dist  # torch: not at start-up

    from distill.train.distributed import init_distributed, on_main_then_broadcast, setup_logging  # torch: not at start-up

    gpus = torch.cuda.device_count() if cfg.device != "cpu" else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if gpus and local_rank >= gpus:  # NCCL takes one rank per GPU
        raise CacheError(
            f"rank with LOCAL_RANK {local_rank} but {gpus} GPU(s) on this node: launch one rank per GPU (deepspeed --num_gpus "
            f"{gpus}, torchrun --nproc_per_node {gpus})"
        )
    ctx = init_distributed(collective_timeout_s=cfg.collective_timeout_s or DEFAULT_TIMEOUT_S)
    setup_logging(ctx.rank, ctx.world_size, logging.INFO)  # every rank reports its own parts
    writers = f"{ctx.world_size} rank{'s' if ctx.world_size > 1 else ''}"
    job = on_main_then_broadcast(ctx, lambda: CacheJob.start(cfg, writers))
    if job.finished is not None:
        return job.finished
    device = device_for(ctx.local_rank, gpus, cfg.device)
    placement = on_main_then_broadcast(ctx, lambda: decide_placement(cfg, job, device, ctx.local_world_size, ctx.world_size))
    mine = shares(job.pending, ctx.world_size)
    work = mine[ctx.rank]
    scorer: Optional[TeacherScorer] = None
    if placement == "partitioned" and job.pending:  # all ranks alike (the same pending list)
        scorer = load_partitioned(cfg, job.vocab, device)
    elif work:
        scorer = load_replicated(cfg, job.vocab, device)
    log.info("%d parts to write here (%s, teacher %s)", len(work), device, placement)
    t0 = time.time()
    for i, unit in enumerate(work):
        name, tokens, seconds = write_cache_part(scorer, cfg, unit, job.work, job.identity, job.masker)
        rows_left = sum(u[3] - u[2] for u in work[i + 1 :])
        rows_done = sum(u[3] - u[2] for u in work[: i + 1])
        eta = (time.time() - t0) / rows_done * rows_left
        log.info(
            "part %d/%d %s: %d tokens, %s tokens/s; ETA of this rank %s",
            i + 1,
            len(work),
            name,
            tokens,
            f"{tokens / max(seconds, 1e-9):,.0f}",
            datetime.timedelta(seconds=round(eta)),
        )
    if scorer is not None and placement == "partitioned":  # as many forwards as the busiest rank: each gathers from every rank
        busiest = max(sum(forwards_of(u, cfg.batch_size, job.variants) for u in share) for share in mine)
        idle = busiest - scorer.forwards
        while scorer.forwards < busiest:
            scorer.idle_forward()
        if idle:
            log.info("ran %d one-token forwards to match the busiest rank's %d", idle, busiest)
    # every rank re-opens and hashes its share of all the parts; rank 0 writes the manifest from them
    checked: list = []
    order = {unit: i for i, unit in enumerate(job.units)}
    for unit in shares(job.units, ctx.world_size)[ctx.rank]:
        try:
            checked.append((order[unit], verify_part(job.work, cfg, unit, job.variants)))
        except Exception as exc:  # named by rank 0, in one line, instead of leaving the others waiting
            checked.append((order[unit], f"{part_name(cfg.split, unit[0], unit[2])}: {exc}"))
    gathered: list = [None] * ctx.world_size
    if ctx.world_size > 1:
        dist.all_gather_object(gathered, checked)
    else:
        gathered = [checked]
    found = sorted((item for share in gathered for item in share), key=lambda item: item[0])

    def finish() -> CacheManifest:
        bad = [p for _, p in found if isinstance(p, str)]
        if bad:
            raise RuntimeError(f"{len(bad)} part(s) failed their check after writing, e.g. {bad[0]}")
        return job.finish([p for _, p in found], ctx.world_size)

    return on_main_then_broadcast(ctx, finish)
