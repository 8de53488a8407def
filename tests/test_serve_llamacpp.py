"""`serve --engine llama.cpp`: the same API through the real `openai` client, llama.cpp decoding the exact prompt
token ids the torch engine (and training) use; vLLM refused with a clear error where there is no GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from lmtailor import llamacpp
from lmtailor.serve import Limits, create_app, running

needs_llama = pytest.mark.skipif(not llamacpp.available(),
                                 reason="llama-cpp-python is built by `make venv` (Makefile); not installed here")

LIMITS = Limits(max_prompt_tokens=200, max_tokens=64, default_max_tokens=16, timeout_s=120)


@pytest.fixture(scope="module")
def servers(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    old = os.environ.get("LMTAILOR_CACHE")
    os.environ["LMTAILOR_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # the GGUF export is cached there
    try:
        llama_app = create_app([str(tiny_model)], limits=LIMITS, engine="llama.cpp", gguf_type="f16")
        torch_app = create_app([str(tiny_model)], limits=LIMITS)
        with running(llama_app) as llama_url, running(torch_app) as torch_url:
            yield {"llama": (llama_url, llama_app), "torch": (torch_url, torch_app)}
    finally:
        if old is None:
            os.environ.pop("LMTAILOR_CACHE", None)
        else:
            os.environ["LMTAILOR_CACHE"] = old


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)


@needs_llama
def test_llamacpp_engine_gets_the_training_prompt_ids(servers: dict[str, Any]) -> None:
    from lmtailor.render import prompt_ids

    url, app = servers["llama"]
    (slot,) = app.state.slots.values()
    model_id = slot.name
    tclient, lclient = _client(servers["torch"][0]), _client(url)
    for messages in ([{"role": "user", "content": "list files"}],
                     [{"role": "system", "content": "Answer with one command."},
                      {"role": "user", "content": "count lines"}, {"role": "assistant", "content": "wc -l f.txt"},
                      {"role": "user", "content": "show processes"}]):
        want = prompt_ids(slot.tok, messages)
        r = lclient.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
        t = tclient.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
        assert r.usage.prompt_tokens == t.usage.prompt_tokens == len(want)
        assert list(slot.model.input_ids[: len(want)]) == want  # what llama.cpp evaluated
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8


@needs_llama
def test_llamacpp_engine_streams_stops_and_completes(servers: dict[str, Any]) -> None:
    url, app = servers["llama"]
    model_id = next(iter(app.state.slots))
    client = _client(url)
    full = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "find by name"}],
                                          max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 20 and full.choices[0].finish_reason == "length"
    chunks = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "find by name"}],
                                            max_tokens=20, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    text = full.choices[0].message.content
    if len(text) > 4:
        stop = text[2:4]
        cut = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "find by name"}],
                                             max_tokens=20, temperature=0, stop=[stop],
                                             extra_body={"ignore_eos": True})
        assert cut.choices[0].message.content == text[: text.find(stop)]
    done = client.completions.create(model=model_id, prompt="To list files", max_tokens=5, temperature=0)
    assert done.usage.completion_tokens <= 5 and isinstance(done.choices[0].text, str)


def test_vllm_is_refused_without_a_gpu(tiny_model: Path) -> None:
    import torch

    from lmtailor.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="GPU"):
        create_app([str(tiny_model)], engine="vllm")
    with pytest.raises(ConfigError, match="torch, llama.cpp, vllm"):
        create_app([str(tiny_model)], engine="onnx")


def test_default_engine_is_one_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` without --engine: CPU_DEFAULT_ENGINE on CPU (the benchmark's pick); a torch speed-up asks for torch;
    llama.cpp falls back to torch without llama-cpp-python."""
    import torch

    from lmtailor import llamacpp
    from lmtailor.cli import build_parser
    from lmtailor.serve import llamacpp_engine as le

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert build_parser().parse_args(["serve", "m"]).engine is None  # resolved by default_engine
    assert le.CPU_DEFAULT_ENGINE in ("torch", "llama.cpp")
    for value in ("torch", "llama.cpp"):
        monkeypatch.setattr(le, "CPU_DEFAULT_ENGINE", value)
        assert le.default_engine() == value
        assert le.default_engine("fp16") == "torch"
    monkeypatch.setattr(llamacpp, "available", lambda: False)
    assert le.default_engine() == "torch"
