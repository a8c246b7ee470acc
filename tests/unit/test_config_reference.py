"""docs/configuration.md is generated from the config fields' docs and must not go stale."""

from __future__ import annotations

import dataclasses

from distill.tools import config_reference
from kd_common.config import leaves, reference_markdown, section, setting


def test_configuration_page_is_current():
    """The committed page equals what the generator writes now (rerun `python -m distill.tools.config_reference` if not)."""
    with open(config_reference.PAGE, encoding="utf-8") as handle:
        assert handle.read() == config_reference.render(), "docs/configuration.md is stale: run `python -m distill.tools.config_reference`"
    assert config_reference.main(["--check"]) == 0


def test_every_key_of_every_command_is_on_the_page():
    page = config_reference.render()
    for name, cls in config_reference.COMMANDS:
        assert f"## `{name}`" in page
        for key, _, _ in leaves(cls):
            assert f"| `{key}` |" in page, (name, key)


@section
@dataclasses.dataclass
class _Inner:
    size: int = setting(4, "rows | per part", ge=1)


@section
@dataclasses.dataclass
class _Outer:
    name: str = setting("x", "what it is called")
    inner: _Inner = setting(_Inner)


def test_reference_rows_hold_flag_default_doc_and_range():
    text = reference_markdown(_Outer, "tool")
    assert "| `name` | `--name` | `'x'` | what it is called |  |" in text
    assert "| `inner.size` | `--inner.size` | `4` | rows \\| per part | >= 1 |" in text
