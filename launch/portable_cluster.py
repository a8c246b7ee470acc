"""A Beam portable job service on loopback for distill-prep: Beam's Prism job server plus an EXTERNAL SDK worker
pool, each a separate process, started and torn down here (tests, bench/prep_throughput.py --runner portable).

    with PortableCluster() as cluster:
        run distill-prep ... + cluster.beam_args()   # --runner=PortableRunner --job_endpoint=... --environment_type=EXTERNAL ...

Prism is a Go binary (github.com/apache/beam/sdks/v2/go/cmd/prism at the installed Beam version), built by
launch/install.sh with `go install` into ~/.cache/distill-kd/prism-VERSION/ (`prism_binary(build=True)` builds it
when absent). Beam's Flink job server jar is not used: Maven Central as reached here serves no
beam-runners-flink-*-job-server jar (nor the runner modules it is built from).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

CACHE = os.path.join(os.path.expanduser("~"), ".cache", "distill-kd")
PRISM_MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"


def beam_version() -> str:
    import apache_beam  # apache_beam: not at start-up

    return apache_beam.__version__


def prism_binary(build: bool = False, timeout: float = 900) -> str | None:
    """Path of the cached Prism binary for the installed Beam; with `build`, `go install` it first when absent.
    None when it is absent and cannot be built (no Go toolchain)."""
    directory = os.path.join(CACHE, f"prism-{beam_version()}")
    path = os.path.join(directory, "prism")
    if os.access(path, os.X_OK) or not build:
        return path if os.access(path, os.X_OK) else None
    go = shutil.which("go")
    if go is None:
        return None
    os.makedirs(directory, exist_ok=True)
    env = dict(os.environ, GOBIN=directory, CGO_ENABLED="0")
    subprocess.run([go, "install", f"{PRISM_MODULE}@v{beam_version()}"], env=env, check=True, timeout=timeout)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 60) -> None:
    """Return once 127.0.0.1:`port` accepts a connection; raise if `proc` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within {timeout:.0f}s")


class PortableCluster:
    """Prism job server + one EXTERNAL worker pool (`python -m apache_beam.runners.worker.worker_pool_main`),
    on free loopback ports, each in its own process group; everything is killed on exit, also on failure."""

    def __init__(self, prism: str | None = None, log_dir: str | None = None, python: str = sys.executable):
        self.prism = prism or prism_binary()
        if self.prism is None:
            raise RuntimeError("no Prism binary: run launch/install.sh (needs Go) or prism_binary(build=True)")
        self.python = python
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="distill-kd-portable-")
        self.procs: dict[str, subprocess.Popen] = {}
        self.job_port = self.pool_port = 0

    def _start(self, name: str, cmd: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "ab")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def start_pool(self) -> None:
        """The SDK worker pool: it starts one SDK harness process per job environment, with this interpreter
        first on PATH (the pool runs `python -c ...`)."""
        self.pool_port = self.pool_port or free_port()
        env = dict(os.environ, PATH=os.path.dirname(self.python) + os.pathsep + os.environ.get("PATH", ""))
        cmd = [self.python, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={self.pool_port}"]
        wait_for_port(self.pool_port, self._start("worker_pool", cmd, env), "the SDK worker pool")

    def __enter__(self) -> "PortableCluster":
        try:
            self.job_port = free_port()
            prism = self._start("prism", [self.prism, f"--job_port={self.job_port}", "--serve_http=false", "--log_level=warn"])
            wait_for_port(self.job_port, prism, "the Prism job server")
            self.start_pool()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def beam_args(self) -> list[str]:
        """Beam's own options that send a pipeline here."""
        return [
            "--runner=PortableRunner",
            f"--job_endpoint=localhost:{self.job_port}",
            "--environment_type=EXTERNAL",
            f"--environment_config=localhost:{self.pool_port}",
        ]

    def pool_pids(self) -> list[int]:
        """The worker pool and the SDK harness processes it started."""
        import psutil  # psutil: not at start-up

        pool = self.procs.get("worker_pool")
        if pool is None or pool.poll() is not None:
            return []
        return [pool.pid] + [child.pid for child in psutil.Process(pool.pid).children(recursive=True)]

    def kill(self, name: str) -> None:
        """SIGKILL a process and everything in its process group (a crashed machine), and wait for it."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
