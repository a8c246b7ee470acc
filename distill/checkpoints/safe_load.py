"""Checkpoint files never run code: every `torch.load` of a checkpoint unpickles with `weights_only=True`.

DeepSpeed's own loaders (`engine.load_checkpoint`, `zero_to_fp32`, `ds_to_universal`) call
`torch.load(..., weights_only=False)`; inside `guard()` torch forces them to `weights_only=True`
(torch's `TORCH_FORCE_WEIGHTS_ONLY_LOAD`), with only the few DeepSpeed types below allowed besides
torch's own safe set (tensors, dtypes, OrderedDict, plain containers and numbers). A file that names
any other global (`os.system`, `builtins.exec`, ...) is refused before anything runs.

`file_problem` also reads every record once to check the CRC-32 torch wrote (torch.load does not).

`ALLOWED` is exactly what DeepSpeed 0.19 writes into ZeRO-1/2/3 checkpoints and universal conversions
(found with `torch.serialization.get_unsafe_globals_in_checkpoint` on real ones, see docs/clusters-and-faults.md).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Iterator, Optional

FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # ZeRO-1/2/3 optimizer states (bf16, fp32)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # the same with fp16 dynamic loss scaling
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # ZeRO-1/2/3 optimizer states
    "deepspeed.utils.tensor_fragment.fragment_address",  # ZeRO-1/2 param_slice_mappings
)


def allowed_globals() -> list:
    """The classes named in ALLOWED."""
    out = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


@contextlib.contextmanager
def guard() -> Iterator[None]:
    """Every `torch.load` inside (ours and DeepSpeed's, whatever they pass) is `weights_only=True` + ALLOWED."""
    import torch  # torch: not at start-up

    saved = {k: os.environ.get(k) for k in (FORCE, FORCE_NOT)}
    os.environ[FORCE] = "1"
    os.environ.pop(FORCE_NOT, None)  # torch refuses to run with both set
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load(path: str, mmap: bool = False) -> Any:
    """A checkpoint file's contents on CPU, unpickled safely (`mmap`: tensors mapped, not read, when the file allows it)."""
    import torch  # torch: not at start-up

    with guard():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def is_untrusted(exc: BaseException) -> bool:
    """True when the safe unpickler refused a file for what it asks to run (not for being cut short)."""
    text = str(exc)
    return "GLOBAL" in text or "not an allowed global" in text or "is blocked" in text or "TorchScript" in text


def describe(path: str, exc: BaseException) -> str:
    """One phrase: why `path` cannot be loaded safely."""
    text = " ".join(str(exc).split())
    if is_untrusted(exc):
        match = re.search(r"GLOBAL (\S+)", text)
        what = f"its pickle asks for {match.group(1)}" if match else "it is not a pickle of tensors"
        return f"{path} is not a plain tensor checkpoint ({what}): it is damaged or untrusted; it was not loaded and nothing in it ran"
    if "WeightsUnpickler error:" in text:  # torch's advice around it is for other situations
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0].strip()
    return f"{path} is damaged ({type(exc).__name__}: {text.split('. ')[0][:160] or 'unreadable'})"


def verify_checksums(path: str) -> None:
    """Read every record of a torch zip archive; zipfile raises BadZipFile where the bytes do not match the CRC-32
    torch wrote (torch.load does not check them: a flipped bit in a tensor would load as a wrong number)."""
    if not zipfile.is_zipfile(path):
        return  # a legacy (non-zip) torch file has no checksums
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.CRC == 0:  # written without checksums (torch.serialization.set_crc32_options(False))
                continue
            with archive.open(info) as handle:
                while handle.read(1 << 24):
                    pass


def file_problem(path: str) -> Optional[tuple[str, str]]:
    """None if `path` loads with the safe loader and its checksums match, else ('untrusted' | 'damaged', why)."""
    if not os.path.isfile(path):
        return "damaged", f"{path} is missing"
    if os.path.getsize(path) == 0:
        return "damaged", f"{path} is empty"
    try:
        load(path, mmap=True)
        verify_checksums(path)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
        KeyError,
        AttributeError,
        TypeError,
        IndexError,
        zipfile.BadZipFile,
    ) as exc:
        return ("untrusted" if is_untrusted(exc) else "damaged"), describe(path, exc)
    return None


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m distill.checkpoints.safe_load ARGS`: DeepSpeed's ds_to_universal (same ARGS) with every load guarded.

    Every `.pt` file of `--input_folder` is checked first, so a refusal names the file."""
    from deepspeed.checkpoint import ds_to_universal  # torch: not at start-up

    sys.argv = ["ds_to_universal"] + list(sys.argv[1:] if argv is None else argv)
    args = ds_to_universal.parse_arguments()
    for name in sorted(os.listdir(args.input_folder)):
        if name.endswith(".pt"):
            problem = file_problem(os.path.join(args.input_folder, name))
            if problem:
                print(f"ds_to_universal: error: {problem[1]}", file=sys.stderr)
                return 2
    try:
        with guard():
            ds_to_universal.main(args)
    except pickle.UnpicklingError as exc:
        print(f"ds_to_universal: error: {describe(args.input_folder, exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
