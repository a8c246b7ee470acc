"""Instruments for the training loop users run (`distill-train` = `distill.cli.train_main`), without changing it:

- `StepClock`: the wall-clock time at the end of every optimizer step (global hooks on torch's optimizer step, which
  DeepSpeed's optimizers call too, and on torch.autograd.backward to tell steps apart), so throughput is an aggregate over steps, total tokens / total wall
  time, with everything between steps (metrics, logging, host syncs, the next batch) included, whatever the trainer's
  internal structure.
- `SyncCounter`: counts, per optimizer step, the points where the host reads a value that lives on the training
  device, i.e. the host-device synchronisations of a CUDA run:
    reads      `.item()`, `.tolist()`, `float()/int()/bool()/index()` of a tensor, `.cpu()`, `.numpy()`,
               `np.asarray(tensor)`, formatting/printing a tensor;
    implicit   operations whose output size depends on device values (`nonzero`, `masked_select`, boolean-mask
               indexing and assignment, `unique`, `bincount`, `repeat_interleave` without output_size, one-argument
               `where`), which wait for the device on CUDA;
    explicit   `torch.cuda.synchronize()` and DeepSpeed's `get_accelerator().synchronize()`.
  Each is counted by call site (the first frame outside torch, and the torch frame it went through). On CUDA a tensor is "on the device" when it is a
  CUDA tensor, and `torch.cuda.set_sync_debug_mode("warn")` additionally counts every synchronising CUDA call
  (including those made inside C++). On CPU, where device and host are the same memory, the counter keeps the
  distinction by provenance: what a DataLoader yields and what `torch.from_numpy` makes are host tensors (the loader's
  own work is not counted: it runs on the host on any machine), `.to(<training device>)` of a host tensor
  returns a device copy (on CPU a clone, standing in for the transfer), results computed only from host tensors
  stay host, and factory calls without a device (`torch.tensor(x)`, `torch.from_numpy`) make host tensors.
  torch optimizers' step counters are host tensors unless the optimizer is fused or capturable, as on CUDA.
  Reads of host tensors (e.g. counting a batch's tokens before it is moved) are not synchronisations on either.
  Known blind spot on CPU: `.to("cpu")` of a device tensor looks like `.to(device)` and is not counted (on CUDA
  it is, through the sync debug mode).

Run the trainer under them (every argument goes to distill-train; the probe is configured by environment):

    STEP_PROBE_OUT=probe.json [STEP_PROBE_STEPS=N] [STEP_PROBE_SYNCS=1] \\
        [STEP_PROBE_CPROFILE=prof.out STEP_PROBE_PROFILE_FROM=10 STEP_PROBE_PROFILE_STEPS=50] \\
        python bench/step_probe.py --config configs/demo.yaml ...
    deepspeed --num_gpus 2 bench/step_probe.py --config ...       # several ranks: rank 0 writes

`probe.json`: {"process_start", "step_times": [end of each optimizer step], "exit_time", and with STEP_PROBE_SYNCS
"syncs": {"per_step": [{kind: count} from one optimizer step to the next, from the end of step 2 on], "sites": {site: {kind, what,
count}}}}. STEP_PROBE_STEPS (the run's steps) stops counting after the last step (its bookkeeping and the final
checkpoint are no step).
"""

from __future__ import annotations

import time

PROCESS_START = time.time()  # noqa: E402

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Optional  # noqa: E402

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

HOST_TAG = "_step_probe_host"
READS = {
    "item",
    "tolist",
    "__float__",
    "__int__",
    "__bool__",
    "__index__",
    "cpu",
    "numpy",
    "__array__",
    "__format__",
    "__repr__",
    "__str__",
}
IMPLICIT = {"nonzero", "masked_select", "unique", "unique_consecutive", "bincount", "argwhere", "nonzero_static"}
# factories that make a host tensor when no device is given (on CPU the stand-in for "made on the host"; the collator's
# torch.from_numpy batches among them)
HOST_FACTORIES = {"tensor", "as_tensor", "from_numpy", "zeros", "ones", "full", "empty", "arange"}
# methods / functions whose output is on the device they name (a transfer when the input is elsewhere)
TRANSFERS = {"to", "cuda"}
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_FILES = (os.sep + "torch" + os.sep, os.sep + "step_probe.py", "<frozen", os.sep + "contextlib.py", os.sep + "functools.py")


def _tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            _tensors(item, out)
    elif isinstance(obj, dict):
        for item in obj.values():
            _tensors(item, out)
    return out


def _short(name: str) -> str:
    marker = os.sep + "site-packages" + os.sep
    if marker in name:  # a library: from its package on
        return name.split(marker, 1)[1]
    if name.startswith(_REPO + os.sep):  # this repository: relative to its root
        return name[len(_REPO) + 1 :]
    return name


def _call_site() -> str:
    """file:line (function) of the first frame outside torch and this module, and the torch frame it went through."""
    frame = sys._getframe(2)
    inner = None
    while frame is not None:
        name = frame.f_code.co_filename
        if not any(part in name for part in _SKIP_FILES):
            site = f"{_short(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
            return site + (f" via {inner}" if inner else "")
        if inner is None and os.sep + "torch" + os.sep in name:
            inner = f"{_short(name)}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in items)


class SyncCounter(TorchFunctionMode):
    """Counts host reads of device values while active (see the module docstring). While `paused` > 0 nothing is
    counted (host/device provenance is still followed); `mark_step()` closes one optimizer step's count."""

    def __init__(self, device: torch.device | str):
        super().__init__()
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.sites: dict[str, dict[str, Any]] = {}
        self.current: Counter = Counter()
        self.per_step: list[dict[str, int]] = []
        self.paused = 0
        self._patched: list[tuple[Any, str, Any]] = []

    # -- what is on the device
    def on_device(self, t: torch.Tensor) -> bool:
        if self.cuda:
            return t.is_cuda
        return not getattr(t, HOST_TAG, False)

    @staticmethod
    def mark_host(obj) -> None:
        for t in _tensors(obj, []):
            setattr(t, HOST_TAG, True)

    def _target_is_device(self, func_name: str, args, kwargs) -> Optional[bool]:
        """For .to()/.cuda(): does the call name the training device (True), the host (False), or no device (None)?"""
        if func_name == "cuda":
            return True
        for value in list(args[1:]) + [kwargs.get("device")]:
            if isinstance(value, (str, torch.device)):
                dev = torch.device(value)
                return dev.type == self.device.type
            if isinstance(value, torch.Tensor):
                return self.on_device(value)
        return None

    def record(self, kind: str, what: str) -> None:
        if self.paused:
            return
        site = _call_site()
        entry = self.sites.setdefault(site, {"kind": kind, "what": what, "count": 0})
        entry["count"] += 1
        self.current[kind] += 1

    def mark_step(self) -> None:
        if self.cuda:
            self.current["cuda_sync_debug"] += self.cuda_syncs_since_last()
        self.per_step.append(dict(self.current))
        self.current = Counter()

    # -- the hook
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        if inputs and name in READS and self.on_device(inputs[0]):
            self.record("read", name)
        elif (
            inputs
            and (name in IMPLICIT or (name == "where" and len(args) == 1) or (name == "repeat_interleave" and "output_size" not in kwargs))
            and self.on_device(inputs[0])
        ):
            self.record("implicit", name)
        elif (
            name in ("__getitem__", "__setitem__", "index_put_", "index_put")
            and len(args) > 1
            and inputs
            and self.on_device(inputs[0])
            and _bool_index(args[1])
        ):
            self.record("implicit", f"{name} with a boolean mask")
        result = func(*args, **kwargs)
        if self.cuda:
            return result
        # CPU: keep host/device provenance
        host_in = bool(inputs) and all(getattr(t, HOST_TAG, False) for t in inputs)
        if name in TRANSFERS and inputs:
            to_device = self._target_is_device(name, args, kwargs)
            if to_device and host_in and isinstance(result, torch.Tensor):
                if result is inputs[0]:
                    result = result.clone()  # the host -> device copy a GPU would make
                if hasattr(result, HOST_TAG):
                    delattr(result, HOST_TAG)
                return result
            if to_device is False:
                self.mark_host(result)
                return result
        if host_in or (not inputs and kwargs.get("device") is None and name in HOST_FACTORIES):
            for t in _tensors(result, []):
                if t is not None and not t.requires_grad:
                    try:
                        setattr(t, HOST_TAG, True)
                    except (AttributeError, RuntimeError):
                        pass
        return result

    # -- explicit synchronisations and the CUDA debug mode
    def __enter__(self):
        super().__enter__()
        self._patch_synchronize()
        self._patch_host_sources()
        if self.cuda:
            import warnings

            torch.cuda.set_sync_debug_mode("warn")
            self._warnings = warnings.catch_warnings(record=True)
            self._caught = self._warnings.__enter__()
            warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("default")
            self._warnings.__exit__(*exc)
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return super().__exit__(*exc)

    def cuda_syncs_since_last(self) -> int:
        """CUDA only: synchronising calls reported by torch.cuda's sync debug mode since the last call."""
        if not self.cuda:
            return 0
        n = sum(1 for w in self._caught if "synchroniz" in str(w.message).lower())
        self._caught.clear()
        return n

    def _patch_host_sources(self) -> None:
        """What comes out of a torch DataLoader (in any worker setup) and `torch.from_numpy` (which torch-function modes
        do not see) is host data; the loader's own work runs on the host on any machine, so it is not counted."""
        from torch.utils.data import dataloader

        counter = self
        next_batch = dataloader._BaseDataLoaderIter.__next__

        def loader_next(iterator):
            counter.paused += 1
            try:
                batch = next_batch(iterator)
            finally:
                counter.paused -= 1
            SyncCounter.mark_host(batch)
            return batch

        from_numpy = torch.from_numpy

        def host_from_numpy(array):
            tensor = from_numpy(array)
            setattr(tensor, HOST_TAG, True)
            return tensor

        self._patched += [(dataloader._BaseDataLoaderIter, "__next__", next_batch), (torch, "from_numpy", from_numpy)]
        dataloader._BaseDataLoaderIter.__next__ = loader_next
        if not self.cuda:
            torch.from_numpy = host_from_numpy
        else:
            self._patched.pop()

    def _patch_synchronize(self) -> None:
        counter = self

        def wrap(owner, attr):
            original = getattr(owner, attr, None)
            if original is None:
                return

            def synchronize(*args, **kwargs):
                counter.record("explicit", f"{attr}()")
                return original(*args, **kwargs)

            self._patched.append((owner, attr, original))
            setattr(owner, attr, synchronize)

        if torch.cuda.is_available():
            wrap(torch.cuda, "synchronize")
        try:
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
            original = accelerator.synchronize

            def accel_synchronize(*args, **kwargs):
                counter.record("explicit", "get_accelerator().synchronize()")
                return original(*args, **kwargs)

            self._patched.append((accelerator, "synchronize", original))
            accelerator.synchronize = accel_synchronize
        except ImportError:
            pass


class StepClock:
    """The wall-clock time at the end of every optimizer step, from global hooks on torch's optimizer step (DeepSpeed's
    ZeRO optimizers step a torch optimizer too, once per parameter group) and on `torch.autograd.backward`, so nothing
    of the trainer's structure is assumed: the optimizer-step calls between two backward passes form one step, which
    ends with the last of them. Optionally counts syncs per optimizer step (from one step's first optimizer call to the
    next step's) and cProfiles the steps `profile_from + 1 .. profile_from + profile_steps`."""

    def __init__(
        self,
        count_syncs: bool = False,
        cprofile: Optional[str] = None,
        profile_from: int = 0,
        profile_steps: int = 0,
        total_steps: Optional[int] = None,
    ):
        self.step_times: list[float] = []
        self.count_syncs = count_syncs
        self.counter: Optional[SyncCounter] = None
        self.cprofile_path = cprofile
        self.profile_from, self.profile_steps = profile_from, profile_steps
        self.total_steps = total_steps
        self.profiler = None
        self.profiled_steps = 0
        self._handles: list = []
        self._backward = None
        self._new_step = True  # a backward pass ran since the last optimizer-step call

    def install(self) -> "StepClock":
        import torch.autograd
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handles = [register_optimizer_step_post_hook(self._after_step)]
        original = self._backward = torch.autograd.backward
        clock = self

        def backward(*args, **kwargs):
            clock._new_step = True
            return original(*args, **kwargs)

        torch.autograd.backward = backward  # Tensor.backward() calls torch.autograd.backward
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._backward is not None:
            import torch.autograd

            torch.autograd.backward, self._backward = self._backward, None
        if self.profiler is not None:
            self._stop_profile()
        if self.counter is not None:
            self.counter.__exit__(None, None, None)

    @staticmethod
    def _host_step_counters(optimizer) -> None:
        """torch's optimizers keep their step counts on the host unless fused or capturable (reading them is no sync)."""
        for group in optimizer.param_groups:
            if group.get("fused") or group.get("capturable"):
                continue
            for param in group["params"]:
                step = optimizer.state.get(param, {}).get("step")
                if isinstance(step, torch.Tensor) and step.device.type == "cpu":
                    setattr(step, HOST_TAG, True)

    def _after_step(self, optimizer, args, kwargs) -> None:
        if self.count_syncs:
            self._host_step_counters(optimizer)
        now = time.time()
        if not self._new_step and self.step_times:
            self.step_times[-1] = now  # another parameter group (or wrapped optimizer) of the same step
            return
        self._new_step = False
        self.step_times.append(now)
        n = len(self.step_times)
        if self.count_syncs:
            if self.counter is None:
                # hooked in after the first step, counting from the end of the second: by then every batch in flight
                # came out of the hooked loader (host data is told apart from device data only from then on)
                device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
                self.counter = SyncCounter(device)
                self.counter.__enter__()
                self.counter.paused += 1
            elif n == 2:
                self.counter.paused -= 1
            elif not self.counter.paused:
                self.counter.mark_step()
            if self.total_steps is not None and n >= self.total_steps:
                self.counter.paused += 1  # what follows the last step (its bookkeeping, the final checkpoint) is not a step
        if self.cprofile_path:
            if n == self.profile_from:
                import cProfile

                self.profiler = cProfile.Profile()
                self.profiler.enable()
            elif self.profiler is not None and n == self.profile_from + self.profile_steps:
                self._stop_profile()

    def _stop_profile(self) -> None:
        self.profiler.disable()
        self.profiled_steps = len(self.step_times) - self.profile_from
        self.profiler.dump_stats(self.cprofile_path)
        self.profiler = None

    def result(self) -> dict:
        out = {"process_start": PROCESS_START, "step_times": self.step_times, "exit_time": time.time()}
        if self.counter is not None:
            out["syncs"] = {"device": str(self.counter.device), "per_step": self.counter.per_step, "sites": self.counter.sites}
        if self.cprofile_path:
            out["profiled_steps"] = self.profiled_steps
        return out


def main(argv: Optional[list[str]] = None) -> int:
    out = os.environ.get("STEP_PROBE_OUT")
    env = os.environ.get
    clock = StepClock(
        count_syncs=env("STEP_PROBE_SYNCS") == "1",
        cprofile=env("STEP_PROBE_CPROFILE"),
        profile_from=int(env("STEP_PROBE_PROFILE_FROM", "0")),
        profile_steps=int(env("STEP_PROBE_PROFILE_STEPS", "0")),
        total_steps=int(env("STEP_PROBE_STEPS")) if env("STEP_PROBE_STEPS") else None,
    ).install()
    from distill.cli import train_main

    code = 1
    try:
        code = train_main(argv)
    finally:
        clock.remove()
        if out and os.environ.get("RANK", "0") == "0":
            with open(out, "w") as handle:
                json.dump(clock.result(), handle)
    return code


if __name__ == "__main__":
    sys.exit(main())
