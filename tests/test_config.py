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
    ("method=adapter", "allowed values are 'lora', 'qlora', 'full', 'freeze', 'prompt_tuning' or 'prefix_tuning'"),
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


# ---- objective-owned settings ---------------------------------------------------------------------------------

def test_objective_settings_live_under_the_objective_name():
    cfg = load_config(None, ["objective=classify", "classify.class_weights=balanced", "classify.threshold=0.3"])
    assert cfg.settings.class_weights == "balanced" and cfg.settings.threshold == 0.3
    assert load_config(None, ["objective=mlm"]).settings.probability == 0.15  # defaults without a section
    assert load_config(None, []).settings is None  # sft owns no settings
    assert {"classify.labels", "seq2seq.num_beams", "mlm.nsp", "span.density", "clm.eval_context"} <= set(
        allowed_keys())


@pytest.mark.parametrize("overrides, expect", [
    (["classify.class_weights=balanced"],  # objective sft (default)
     "config key 'classify.class_weights' belongs to objective classify, but the objective is sft"),
    (["objective=seq2seq", "mlm.nsp=true"], "objective seq2seq takes: seq2seq.max_target_length"),
    (["objective=classify", "classify.treshold=0.3"], "did you mean classify.threshold?"),
    (["objective=classify", "classify.threshold=2"], "config key 'classify.threshold': Input should be less than 1"),
    (["objective=mlm", "clasify.labels=[a]"], "did you mean classify?"),
    (["task.class_weights=balanced"], "config key 'task.class_weights' moved to 'classify.class_weights'"),
    (["objective=seq2seq", "task.label_smoothing=0.1"], "moved to 'seq2seq.label_smoothing'"),
    (["pretrain.nsp=true"], "config key 'pretrain.nsp' moved to 'mlm.nsp'"),
])
def test_a_key_of_another_objective_names_its_owner(overrides, expect):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_a_registered_objective_brings_its_own_settings():
    from pydantic import Field

    from lmtailor.config import OBJECTIVE_SETTINGS, Strict
    from lmtailor.objectives import OBJECTIVES, get_objective, register_objective
    from lmtailor.objectives.causal import HOOKS, prepare_chats

    class ToySettings(Strict):
        temperature: float = Field(1.0, gt=0)

    try:
        register_objective("toy", "a test objective", settings=ToySettings, prepare=prepare_chats, **HOOKS)
        cfg = load_config(None, ["objective=toy", "toy.temperature=2"])
        assert get_objective(cfg).name == "toy" and cfg.settings.temperature == 2.0
        with pytest.raises(ConfigError, match="allowed keys: toy.temperature"):
            load_config(None, ["objective=toy", "toy.temp=2"])
        with pytest.raises(ValueError, match="already registered"):
            register_objective("toy", "again", settings=ToySettings, prepare=prepare_chats, **HOOKS)
        with pytest.raises(ValueError, match="missing hook"):
            register_objective("toy2", "no hooks")
        with pytest.raises(ValueError, match="lowercase"):
            register_objective("Toy", "bad name", prepare=prepare_chats, **HOOKS)
    finally:
        OBJECTIVES.pop("toy", None)
        OBJECTIVE_SETTINGS.pop("toy", None)
    with pytest.raises(ConfigError, match="unknown config key 'toy'"):
        load_config(None, ["objective=sft", "toy.temperature=2"])


def test_unknown_objective_lists_the_registered_ones():
    from lmtailor.objectives import get_objective

    with pytest.raises(ConfigError, match="allowed values are classify, clm, dpo, grpo, ipo, kto, mlm, orpo, "
                       "reward, seq2seq"):
        get_objective(load_config(None, ["objective=ppo"]))
