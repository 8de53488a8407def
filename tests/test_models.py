"""Model loading: hub ids fail clearly offline, pickles are refused, bundled model loads and answers."""

from __future__ import annotations

import pytest
import torch

from lmtailor.errors import CheckpointError, ModelError, OfflineError
from lmtailor.models import BUNDLED, freeze_all_but_last, load_pretrained, load_tokenizer, resolve_model


def test_unreachable_hub_id_says_offline_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError) as e:
        load_pretrained("some-org/some-model-that-is-not-cached")
    assert "offline" in str(e.value) and "local folder" in str(e.value)


def test_missing_local_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "x.gguf"))


def test_pickle_only_folder_is_refused(tiny_model, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_model / "config.json").read_text())
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_pretrained(str(folder))


def test_freeze_all_but_last(tiny_model):
    model = load_pretrained(str(tiny_model))
    freeze_all_but_last(model, 1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.layers.1.", "model.norm")) for n in trainable)


@pytest.mark.slow
def test_bundled_model_loads_and_answers():
    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate

    name = next(iter(BUNDLED))
    tok = load_tokenizer(name)
    model = load_pretrained(name).eval()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == tok.eos_token_id
    assert model.config.num_hidden_layers == 30
    (answer,) = generate(model, tok, ["What is the capital of France? Answer in one word."],
                         GenerationSettings(max_new_tokens=12))
    assert "Paris" in answer
