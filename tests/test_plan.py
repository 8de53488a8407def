"""`lmtailor plan`: parameter counts match real models, built-in families work offline, what fits is sensible."""

from __future__ import annotations

import json

import pytest

from lmtailor.cli import main
from lmtailor.plan import estimate, model_shape, plan


def test_parameter_count_of_a_local_config_matches_the_model(tiny_model):
    from transformers import AutoModelForCausalLM

    shape, source = model_shape(str(tiny_model))
    assert source.endswith("config.json")
    assert shape.params() == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())


@pytest.mark.parametrize(("name", "billions"), [("Qwen/Qwen2.5-7B-Instruct", 7.62), ("smollm2-135m-instruct", 0.135),
                                                ("meta-llama/Llama-3.1-8B-Instruct", 8.03)])
def test_built_in_families_work_offline(name, billions):
    assert model_shape(name)[0].params() / 1e9 == pytest.approx(billions, rel=0.01)


def test_a_7b_model_on_one_24gb_gpu_fits_only_with_qlora_and_checkpointing():
    rows = {(r["method"], r["checkpointing"]): r for r in plan("Qwen/Qwen2.5-7B-Instruct", "1x24GB")["rows"]}
    assert rows[("full", False)]["max_micro_batch"] == 0
    assert rows[("qlora", True)]["max_micro_batch"] >= 1
    assert rows[("qlora", True)]["tokens_per_s"] > 0
    # 8 GPUs shard full fine-tuning (FSDP) until it fits
    sharded = {(r["method"], r["checkpointing"]): r for r in plan("Qwen/Qwen2.5-7B-Instruct", "8xH100")["rows"]}
    assert sharded[("full", True)]["max_micro_batch"] >= 1


def test_checkpointing_and_lora_cut_memory():
    shape, _ = model_shape("meta-llama/Llama-3.1-8B-Instruct")  # (a 150k vocabulary's logits would dominate)
    full, ckpt = estimate(shape, "full", False, 2048), estimate(shape, "full", True, 2048)
    lora = estimate(shape, "lora", False, 2048)
    assert ckpt.activations_per_seq < full.activations_per_seq / 2
    assert lora.fixed < full.fixed / 3 and lora.gradients < full.gradients / 100


def test_cli_prints_the_table_and_json(capsys):
    assert main(["plan", "Qwen/Qwen2.5-1.5B-Instruct", "--gpus", "1xA100-80GB"]) == 0
    text = capsys.readouterr().out
    assert "qlora" in text and "max micro-batch" in text
    assert main(["plan", "Qwen/Qwen2.5-1.5B-Instruct", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["rows"]) == 8
    assert main(["plan", "Qwen/Qwen2.5-1.5B-Instruct", "--gpus", "lots"]) == 2
    assert "COUNTxGPU" in capsys.readouterr().err
