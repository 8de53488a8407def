"""Recipes: unknown keys list the allowed ones, overrides parse, every shipped recipe validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmtailor.config import allowed_keys, load_config, parse_override
from lmtailor.errors import ConfigError

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def test_overrides_set_nested_keys_and_parse_numbers():
    cfg = load_config(None, ["lr=1e-4", "lora.r=16", "data.path=x.jsonl", "packing=false", "name=demo"])
    assert cfg.lr == 1e-4 and cfg.lora.r == 16 and cfg.data.path == "x.jsonl" and cfg.packing is False
    assert cfg.run_dir == Path("runs/demo")
    assert parse_override("lora.target_modules=[q_proj,v_proj]") == (["lora", "target_modules"], ["q_proj", "v_proj"])


@pytest.mark.parametrize("override, expect", [
    ("epoch=2", "did you mean epochs?"),
    ("lora.rank=4", "allowed keys: lora.r, lora.alpha"),
    ("method=adapter", "allowed values are 'lora', 'full', 'freeze', 'prompt_tuning' or 'prefix_tuning'"),
    ("lr=-1", "greater than 0"),
    ("batch_size=two", "config key 'batch_size'"),
    ("nokey", "is not key=value"),
])
def test_bad_overrides_say_what_is_wrong(override, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expect in str(e.value)


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: 1.0e-4\nlora:\n  r: 8\n  alfa: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(recipe)
    assert str(recipe) in str(e.value) and "lora.alfa" in str(e.value) and "lora.alpha" in str(e.value)


def test_yaml_float_spelling_and_name_from_file(tmp_path):
    recipe = tmp_path / "my-run.yaml"
    recipe.write_text("lr: 1e-4\n")
    cfg = load_config(recipe)
    assert cfg.lr == 1e-4 and cfg.name == "my-run"


def test_broken_yaml_names_the_line(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lr: 1\nlora: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(recipe)


def test_allowed_keys_cover_nested_sections():
    keys = allowed_keys()
    assert {"lr", "lora.r", "data.path", "generation.stop", "eval.generate_examples"} <= set(keys)


@pytest.mark.parametrize("recipe", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_recipes_validate(recipe):
    cfg = load_config(recipe)
    assert cfg.data.path, f"{recipe} names no data"
