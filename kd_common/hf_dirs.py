"""Loading local Hugging Face directories without ever running code from them.

Every `from_pretrained` in this project passes `**LOCAL_ONLY` (no download, no remote code), after
`refuse_remote_code` has read the directory's config.json / tokenizer_config.json: a directory that asks for
its own Python (an `auto_map`, or a model_type transformers does not ship) is refused in one line before
transformers sees it, so no prompt ("Do you wish to run the custom code?") can ever appear."""

from __future__ import annotations

import json
import os

from kd_common.errors import UserError

LOCAL_ONLY = {"local_files_only": True, "trust_remote_code": False}
_FILES = ("config.json", "tokenizer_config.json")


class RemoteCodeError(UserError, ValueError):
    """A model, config or tokenizer directory that needs code of its own: refused, never run."""


def _read(path: str):
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None  # unreadable: the loader itself reports it
    return data if isinstance(data, dict) else None


def _first_entry(auto_map) -> str:
    """'AutoModelForCausalLM -> modeling_x.MyModel' from an auto_map (a dict; tokenizers map to [slow, fast])."""
    if isinstance(auto_map, dict) and auto_map:
        key, value = next(iter(auto_map.items()))
        if isinstance(value, (list, tuple)):
            value = next((v for v in value if v), None)
        return f"{key} -> {value}"
    return repr(auto_map)[:80]


def refuse_remote_code(path: str, label: str) -> None:
    """Raise RemoteCodeError when directory `path` (`label` names it: 'teacher.path', '--model' ...) needs remote code."""
    if not os.path.isdir(path):
        return
    for name in _FILES:
        file = os.path.join(path, name)
        data = _read(file) if os.path.isfile(file) else None
        if data is None:
            continue
        if data.get("auto_map"):
            raise RemoteCodeError(
                f"{label} {file} asks for remote code (auto_map {_first_entry(data['auto_map'])}); this job never runs code from a "
                f"model directory: use a model whose architecture transformers ships"
            )
        model_type = data.get("model_type") if name == "config.json" else None
        if isinstance(model_type, str) and model_type:
            from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # torch: not at start-up

            if model_type not in CONFIG_MAPPING:
                import transformers  # transformers: not at start-up

                raise RemoteCodeError(
                    f"{label} {file} has model_type {model_type!r}, which transformers {transformers.__version__} does not ship; "
                    f"this job never runs code from a model directory: use a model whose architecture transformers ships"
                )
