"""Which Beam runner a prep run uses and with what options: the local FnApiRunner (in-process or N worker
processes) unless the user names a runner (Dataflow, Flink, Spark) in the Beam options."""

from __future__ import annotations

import os

from apache_beam.options.pipeline_options import PipelineOptions, PortableOptions, StandardOptions
from apache_beam.portability.api import beam_provision_api_pb2

from data_prep.config import PrepConfig
from data_prep.errors import PrepInputError
from data_prep.output_dir import is_remote
from data_prep.sources import is_packed

IN_PROCESS_MAX_BYTES = 16 << 20  # auto mode: smaller inputs run in the launcher process


def choose_workers(workers: int, files: list[tuple[str, int]]) -> int:
    """`workers` if given; else 1 (in-process) for inputs under IN_PROCESS_MAX_BYTES, above that one process
    per CPU, at most one per input file (files are the unit of parallelism, data_prep/documents.py).

    On a small corpus, starting worker processes costs more than the work (bench/prep_throughput.py: ~1.5 s
    and ~400 MiB more at 1.1 and 11 MB of WikiText); in-process, the fast tokenizer still encodes on all cores.
    Compressed inputs count as 4x their size.
    """
    if workers:
        return workers
    text_bytes = sum(size * (4 if is_packed(path) else 1) for path, size in files)
    return 1 if text_bytes <= IN_PROCESS_MAX_BYTES else max(1, min(os.cpu_count() or 1, len(files)))


def beam_options(cfg: PrepConfig, beam_args: list[str], workers: int) -> PipelineOptions:
    """The local runner's settings (`workers` processes) unless the user chose a runner."""
    args = list(beam_args)
    if not any(a.startswith("--default_sdk_harness_log_level") for a in args):
        args.append("--default_sdk_harness_log_level=WARNING")
    if not any("pipeline_type_check" in a for a in args):
        args.append("--no_pipeline_type_check")  # our transforms are untyped; checking them costs ~0.1 s per run
    if not any(a.startswith("--runner") for a in args):
        if workers > 1:
            args += ["--direct_running_mode=multi_processing", f"--direct_num_workers={workers}"]
        else:
            args += ["--direct_running_mode=in_memory", "--direct_num_workers=1"]
    return PipelineOptions(args)


def local_runner(options: PipelineOptions):
    """The runner for a run without `--runner`: the FnApiRunner, built as Beam's DirectRunner builds it.

    Beam's DirectRunner first tries the Prism runner, a Go binary it downloads from GitHub: offline, that
    fails and falls back to the FnApiRunner, leaking an empty `beam-temp*` directory in the temp dir on
    every run; online, the job runs on Prism, another runner than the one tested and measured here.
    Going to the FnApiRunner directly gives the same execution on every machine, with the pipeline options handed to
    its worker processes as the DirectRunner does. Returns None when the user named a runner.
    """
    if options.view_as(StandardOptions).runner is not None:
        return None
    from apache_beam.runners.portability.fn_api_runner import fn_runner  # apache_beam: not at start-up
    from apache_beam.runners.portability.portable_runner import JobServiceHandle  # apache_beam: not at start-up

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    return fn_runner.FnApiRunner(
        provision_info=fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
    )


PORTABLE_RUNNERS = {"flinkrunner", "sparkrunner", "portablerunner", "prismrunner", "sparkjobserverrunner"}
LOCAL_ENVIRONMENTS = {"EXTERNAL", "PROCESS", "LOOPBACK"}


def check_runner(options: PipelineOptions, paths: list[str]) -> None:
    """Refuse a named runner whose workers cannot reach the local paths (`paths`: inputs, output) of this run.

    Dataflow's workers see only object stores; a portable runner's default environment (DOCKER) runs the SDK
    workers in containers that see no host path. EXTERNAL, PROCESS and LOOPBACK workers run on the cluster's
    hosts, which must then share the filesystem holding the paths (not checkable from here).
    """
    runner = options.view_as(StandardOptions).runner
    local = [p for p in paths if not is_remote(p)]
    if runner is None or not local:
        return
    name = (runner if isinstance(runner, str) else type(runner).__name__).lower().rsplit(".", 1)[-1]
    if name in ("dataflowrunner", "dataflow"):
        raise PrepInputError(
            f"--runner={runner}: Dataflow workers cannot read the local path {local[0]}; put --input and --output on gs:// "
            "(and set --temp_location=gs://...)"
        )
    environment = (options.view_as(PortableOptions).environment_type or "DOCKER").upper()
    if name in PORTABLE_RUNNERS and environment not in LOCAL_ENVIRONMENTS:
        raise PrepInputError(
            f"--runner={runner} runs the SDK workers in Docker (--environment_type={environment}), where the local path "
            f"{local[0]} does not exist; set --environment_type=EXTERNAL --environment_config=HOST:PORT (a Beam worker pool "
            "beside each worker, on a filesystem that holds the paths) or PROCESS, or put --input/--output on an object store"
        )
