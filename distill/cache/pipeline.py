"""distill-cache on Apache Beam: run the frozen teacher once over a prepared dataset and keep a sparse view of its
distribution (CPU workers, the local runner's worker processes, other Beam runners).

The Beam graph is small: `Create(parts still to write) | Reshuffle | ParDo(CacheTeacherLogits)`; the DoFn loads the
teacher once per worker (`setup`, on the worker's own GPU when it has one: distill/cache/devices.py) and writes each
part with `write_cache_part` (distill/cache/parts.py), the function the launcher's ranks call too
(distill/cache/ranks.py): one code path for a part, two orchestrators, the same bytes. The launcher then re-opens
every part (rows, sha256) and writes manifest.json last (distill/cache/job.py, data_prep/cache_manifest.py). An
interrupted run leaves its finished parts in the work directory beside --output; the same command resumes them.

Masked-LM data needs static masks (`--static-masks D`, BERT's dupe factor; the run trains with data.static_masks=D):
distill/cache/scoring.py builds every row's D masked inputs exactly as the trainer's collator does.
"""

from __future__ import annotations

import shutil
import sys
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from data_prep.cache_manifest import CacheManifest
from distill.cache.devices import beam_worker_index, device_for
from distill.cache.job import CacheJob
from distill.cache.parts import verify_part, write_cache_part
from distill.cache.scoring import StaticMasker, load_replicated
from distill.cache.settings import CacheConfig

__all__ = ["CacheConfig", "CacheTeacherLogits", "run_cache"]


class CacheTeacherLogits(beam.DoFn):
    """Element (shard index, shard path, first row, end row) -> that part's file written; yields its name."""

    def __init__(self, cfg: CacheConfig, vocab_size: int, work_dir: str, identity: str, masker: Optional[StaticMasker] = None):
        self.cfg, self.vocab, self.work_dir, self.identity, self.masker = cfg, vocab_size, work_dir, identity, masker
        self.scorer = None

    def setup(self):
        import torch  # torch: not at start-up

        gpus = torch.cuda.device_count() if self.cfg.device != "cpu" else 0
        self.scorer = load_replicated(self.cfg, self.vocab, device_for(beam_worker_index(), gpus, self.cfg.device))  # once per worker

    def process(self, element):
        name, tokens, seconds = write_cache_part(self.scorer, self.cfg, element, self.work_dir, self.identity, self.masker)
        print(
            f"distill-cache: {name}: {tokens} tokens, {tokens / max(seconds, 1e-9):,.0f} tokens/s ({self.scorer.device})",
            file=sys.stderr,
            flush=True,
        )
        yield name


def run_cache(cfg: CacheConfig, beam_args: Optional[list[str]] = None) -> CacheManifest:
    """Check inputs and output, run the pipeline over the parts not yet written into the work directory beside `output`,
    verify every part, write the manifest, publish."""
    from data_prep.runner import local_runner  # data_prep.runner: not at start-up of distill-cache

    options = _options(beam_args or [], cfg.workers)
    runner = local_runner(options)
    writers = f"{cfg.workers} Beam worker process(es)" if runner is not None else "the Beam runner of the options"
    job = CacheJob.start(cfg, writers)
    if job.finished is not None:
        return job.finished
    if job.pending:
        pipeline = beam.Pipeline(runner=runner, options=options)
        try:
            with pipeline:
                (
                    pipeline
                    | "Parts" >> beam.Create(job.pending)
                    | "Spread" >> beam.Reshuffle()
                    | "Teacher" >> beam.ParDo(CacheTeacherLogits(cfg, job.vocab, job.work, job.identity, job.masker))
                )
        finally:  # Beam removes its temp dir only after a run that was not interrupted
            shutil.rmtree(pipeline.local_tempdir, ignore_errors=True)
    parts = [verify_part(job.work, cfg, unit, job.variants) for unit in job.units]
    return job.finish(parts, cfg.workers)


def _options(beam_args: list[str], workers: int):
    args = list(beam_args) + ["--no_pipeline_type_check", "--default_sdk_harness_log_level=WARNING"]
    if not any(a.startswith("--runner") for a in beam_args):
        args += (
            ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
            if workers > 1
            else ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
        )
    return PipelineOptions(args)
