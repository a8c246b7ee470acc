"""Config loading: YAML + overrides, unknown keys, types, values, all problems reported at once."""

import pytest

from distill.config import ConfigError, describe_fields, load_config, parse_overrides


def _write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_and_overrides(tmp_path):
    path = _write(tmp_path, "output_dir: out\nteacher: {path: t}\ndata: {path: d}\ntrain: {global_batch: 64, micro_batch: 8}\n")
    cfg = load_config(path, ["train.max_steps=10", "optim.lr=1e-4", "loss.weights={mlm: 1.0}", "student.init_layers=[0, 3]"])
    assert cfg.train.max_steps == 10 and cfg.optim.lr == 1e-4 and cfg.train.global_batch == 64
    assert cfg.loss.weights == {"mlm": 1.0}, "a weights override replaces the mapping"
    assert cfg.student.init_layers == [0, 3]
    assert cfg.loss.temperature == 2.0 and cfg.data.token_frequency_smoothing == 0.7  # DistilBERT defaults


def test_shipped_recipes_load():
    import glob
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipes = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    assert recipes
    for recipe in recipes:
        load_config(
            recipe, ["output_dir=x", "data.path=y", "teacher.path=t"] if "teacher" not in recipe else ["output_dir=x", "data.path=y"]
        )


def test_unknown_key_wrong_type_and_bad_values_reported_together(tmp_path):
    path = _write(
        tmp_path,
        "output_dir: out\ndata: {path: d}\nteacher: {path: t}\ntrain: {global_bach: 8, micro_batch: two}\nloss: {weights: {kd: 1}}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "unknown config key train.global_bach (did you mean train.global_batch?)" in message
    assert "train.micro_batch must be int, got 'two'" in message
    clean = _write(tmp_path, "output_dir: out\ndata: {path: d}\nteacher: {path: t}\nloss: {weights: {kd: 1}}\n")
    with pytest.raises(ConfigError, match=r"unknown losses \['kd'\]"):
        load_config(clean)


def test_value_checks(tmp_path):
    path = _write(tmp_path, "output_dir: out\ndata: {path: d}\nteacher: {path: t}\n")
    with pytest.raises(ConfigError, match="not a multiple of train.micro_batch"):
        load_config(path, ["train.global_batch=100", "train.micro_batch=16"])
    with pytest.raises(ConfigError, match="need a teacher"):
        load_config(path, ["teacher.path=null", "student.init=random"])
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(path, ["loss.ce_positions=everywhere"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.max_steps"])


def test_every_field_is_documented():
    lines = describe_fields()
    assert len(lines) > 40
    assert all("#" in line and line.split("#", 1)[1].strip() for line in lines)


def test_teacher_source_and_the_deprecated_partition_alias(tmp_path, caplog):
    """teacher.source: online | partitioned | cache; teacher.partition=true (deprecated) is read as source=partitioned
    with one warning, and beside source=cache it is refused by one rule with one message."""
    from distill.checkpoints.layout import legacy_identity, run_identity

    path = _write(tmp_path, "output_dir: out\ndata: {path: d}\nteacher: {path: t}\n")
    assert load_config(path, ["teacher.source=partitioned"]).teacher.source == "partitioned"
    with caplog.at_level("WARNING", logger="distill.config"):
        cfg = load_config(path, ["teacher.partition=true"])
    assert (cfg.teacher.source, cfg.teacher.partition) == ("partitioned", False)
    assert [r.getMessage() for r in caplog.records] == ["teacher.partition is deprecated: use teacher.source=partitioned"]
    # a run recorded with the alias resumes under the new spelling (same identity)
    old = dict(run_identity(load_config(path).to_dict(), "sha"), **{"teacher.partition": True})
    assert legacy_identity(old) == run_identity(cfg.to_dict(), "sha")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["teacher.partition=true", "teacher.source=cache", "teacher.cache=c", "loss.weights={ce: 1.0}"])
    assert err.value.problems == [
        "teacher.partition is deprecated: use teacher.source=partitioned; it excludes teacher.source=cache: drop teacher.partition"
    ]
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(path, ["teacher.source=online_partitioned"])


def test_where_a_partitioned_teacher_cannot_load_each_rank_its_partition(tmp_path):
    """teacher.source=partitioned reads safetensors a partition at a time: a teacher with only pickled weights, an index
    naming a file outside its folder, and parameters offloaded to nvme (written in place) are refused, one line each."""
    import json

    from distill.config import TeacherConfig
    from distill.teachers.partitioned import partition_problems, safetensors_files

    teacher = tmp_path / "t"
    teacher.mkdir()
    (teacher / "config.json").write_text("{}")
    (teacher / "pytorch_model.bin").write_bytes(b"")
    section = TeacherConfig(path=str(teacher), source="partitioned")
    assert partition_problems(TeacherConfig(path=str(teacher)), 1, {}) == []  # online: not its business
    (only,) = partition_problems(section, 2, {})
    assert "has no safetensors weights" in only and "convert it once" in only
    (teacher / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    assert partition_problems(section, 2, {}) == [
        f"{teacher / 'model.safetensors.index.json'} names weight files outside its directory ('../elsewhere.safetensors'); "
        f"re-save the teacher with save_pretrained"
    ]
    (teacher / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "m-2.safetensors", "b": "m-1.safetensors"}}))
    (teacher / "m-1.safetensors").write_bytes(b"")
    (missing,) = partition_problems(section, 2, {})
    assert "lists m-2.safetensors, which is not in" in missing and "incomplete" in missing
    (teacher / "m-2.safetensors").write_bytes(b"")
    assert safetensors_files(str(teacher)) == [str(teacher / "m-1.safetensors"), str(teacher / "m-2.safetensors")]
    (nvme,) = partition_problems(section, 2, {"offload_param": {"device": "nvme"}})
    assert "offload_param device nvme" in nvme
