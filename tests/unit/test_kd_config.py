"""kd_common/config.py: the one config mechanism every command uses (YAML, key=value, generated flags, checks)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Annotated, Literal, Optional

import pytest
from pydantic import Field

from kd_common.config import Bool, ConfigError, Float, Int, Str, add_arguments, build, describe, from_arguments, load, section, setting


@section
class Optim:
    lr: Float = setting(5e-4, "peak learning rate", gt=0, le=1)
    betas: list[Annotated[Float, Field(ge=0, lt=1)]] = setting([0.9, 0.98], "AdamW betas")


@section
class Job:
    inputs: list[Str] = setting(["a.txt"], "input files", flag="--input")
    steps: Optional[Int] = setting(None, "optimizer steps", ge=1)
    mode: Literal["fast", "slow"] = setting("fast", "how")
    dedup: Bool = setting(True, "drop duplicates")
    name: Optional[Str] = setting(None, "a name")
    weights: dict[str, Annotated[Float, Field(ge=0)]] = setting({"ce": 5.0}, "loss weights")
    optim: Optim = setting(Optim, "optimizer")

    def problems(self) -> list[str]:
        return ["steps must be even with mode=slow"] if self.mode == "slow" and (self.steps or 0) % 2 else []


def test_yaml_then_overrides_then_flags(tmp_path):
    recipe = tmp_path / "job.yaml"
    recipe.write_text("steps: 4\noptim: {lr: 1e-3}\nweights: {ce: 1, mlm: 2}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser, Job)
    args = parser.parse_args(
        ["--config", str(recipe), "optim.lr=2e-3", "--steps", "6", "--input", "x.txt", "y 1.txt", "--no-dedup", "--name", "007"]
    )
    job = from_arguments(Job, args)
    assert job.steps == 6 and job.optim.lr == 2e-3 and job.inputs == ["x.txt", "y 1.txt"] and job.dedup is False
    assert job.name == "007", "a text setting keeps its text (not read as the number 7)"
    assert job.weights == {"ce": 1.0, "mlm": 2.0} and job.optim.betas == [0.9, 0.98]
    assert dataclasses.replace(job, steps=8).steps == 8  # still a dataclass


def test_every_problem_is_reported_at_once_with_its_key():
    with pytest.raises(ConfigError) as err:
        build(
            Job,
            {
                "stpes": 3,
                "mode": "slow",
                "steps": 3,
                "dedup": "yes",
                "optim": {"lr": float("nan"), "betas": [0.9, 1.5], "lrr": 1},
                "weights": {"ce": -1},
            },
        )
    message = str(err.value)
    for part in (
        "unknown config key stpes (did you mean steps?)",
        "unknown config key optim.lrr (did you mean optim.lr?)",
        "dedup must be bool, got 'yes'",
        "optim.lr=nan is not a finite number",
        "optim.betas[1]=1.5 is out of range: it must be < 1",
        "weights.ce=-1 is out of range: it must be >= 0",
        "steps must be even with mode=slow",
    ):
        assert part in message, (part, message)


def test_types_are_not_coerced_silently():
    with pytest.raises(ConfigError, match="steps must be int, got True"):
        build(Job, {"steps": True})
    with pytest.raises(ConfigError, match="steps must be int, got 3.5"):
        build(Job, {"steps": 3.5})
    with pytest.raises(ConfigError, match="optim.lr must be float, got True"):
        build(Job, {"optim": {"lr": True}})
    with pytest.raises(ConfigError, match=r"mode='medium' is not one of 'fast', 'slow'"):
        build(Job, {"mode": "medium"})
    assert build(Job, {"optim": {"lr": "5e-4"}}).optim.lr == 5e-4  # YAML 1.1 reads 5e-4 as text


def test_constructing_in_code_is_checked_too():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        Optim(lr=-1.0)


def test_help_and_describe_come_from_the_fields(capsys):
    parser = argparse.ArgumentParser(prog="job")
    add_arguments(parser, Job)
    text = parser.format_help()
    for part in ("--input", "input files", "--optim.lr", "peak learning rate", "> 0", "--dedup, --no-dedup", "(default: 'fast')"):
        assert part in text, part
    lines = describe(Job)
    assert "optim.lr = 0.0005  # peak learning rate [> 0, <= 1]" in lines
    assert len(lines) == 8


def test_bad_yaml_and_overrides(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Job, str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load(Job, str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        load(Job, None, ["steps"])
