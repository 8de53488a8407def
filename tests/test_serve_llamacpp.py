"""`serve --engine llama.cpp`: the same API through the real `openai` client, llama.cpp decoding the exact prompt
token ids the torch engine (and training) use; vLLM refused with a clear error where there is no GPU."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest

from lmtailor import llamacpp
from lmtailor.serve import Limits, create_app, running

needs_llama = pytest.mark.skipif(not llamacpp.available(),
                                 reason="llama-cpp-python is built by `make venv` (Makefile); not installed here")

LIMITS = Limits(max_prompt_tokens=200, max_tokens=64, default_max_tokens=16, timeout_s=600)


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
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)


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
        assert slot.model.last[: len(want)] == want  # what llama.cpp evaluated for the request
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


@needs_llama
def test_llamacpp_rows_decode_alike_alone_and_batched(servers: dict[str, Any]) -> None:
    """The same tokens fed to one sequence alone and to four sequences in one llama_decode give the same logits
    (up to TOL: llama.cpp's matrix kernels may round differently with more rows) and the same greedy pick
    wherever the top two logits are further apart than TOL."""
    from lmtailor.serve.llamabatch import BatchedLlama

    tol = 1e-3
    (slot,) = servers["llama"][1].state.slots.values()
    llm = BatchedLlama(slot.model.path, seqs=4, positions=128, threads=1)
    try:
        prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26], [30, 31]]
        alone = []
        for p in prompts:  # greedy, each prompt alone; its tokens then fed to the batch (teacher forcing)
            seq = llm.reserve(len(p) + 8)
            (x,) = llm.decode([(seq, p, True)])
            rows = [x]
            for _ in range(7):
                (x,) = llm.decode([(seq, [int(rows[-1].argmax())], True)])
                rows.append(x)
            llm.release(seq, len(p) + 8)
            alone.append(rows)
        seqs = [llm.reserve(len(p) + 8) for p in prompts]
        together = [llm.decode([(s, p, True) for s, p in zip(seqs, prompts, strict=True)])]
        for t in range(7):
            together.append(llm.decode([(s, [int(alone[r][t].argmax())], True) for r, s in enumerate(seqs)]))
        assert sorted(seqs) == [0, 1, 2, 3] and llm.reserve(1) is None  # every sequence in use
        clear = 0
        for r in range(len(prompts)):
            for t in range(8):
                a, b = alone[r][t], together[t][r]
                assert a is not None and b is not None and np.abs(a - b).max() < tol
                top2 = np.sort(a)[-2:]
                if top2[1] - top2[0] > tol:
                    clear += 1
                    assert int(a.argmax()) == int(b.argmax())
        assert clear >= 16  # most picks have a clear margin on this model
    finally:
        llm.close()


@needs_llama
def test_llamacpp_prefix_cache_decodes_like_a_full_prefill(servers: dict[str, Any]) -> None:
    """A prompt that starts like the last one prefilled shares its cached KV cells and feeds only the rest, with the
    logits of a full prefill (up to TOL); the cache gives its cells way to rows."""
    from lmtailor.serve.llamabatch import BatchedLlama

    tol = 1e-3
    (slot,) = servers["llama"][1].state.slots.values()
    llm = BatchedLlama(slot.model.path, seqs=2, positions=64, threads=1)
    try:
        first, second = list(range(5, 25)), [*range(5, 17), 40, 41, 42]
        a = llm.reserve(30)
        assert a is not None and llm.reuse(a, first) == 0  # nothing cached yet
        llm.decode([(a, first, True)])
        llm.remember(a)
        llm.release(a, 30)
        assert llm.cached == first
        b = llm.reserve(30)
        assert b is not None and llm.reuse(b, second) == 12 and llm.fed[b] == second[:12]
        (x,) = llm.decode([(b, second[12:], True)])
        llm.forget()  # b keeps the cells it shares
        c = llm.reserve(30)
        assert c is not None and llm.reuse(c, second) == 0
        (y,) = llm.decode([(c, second, True)])
        assert x is not None and y is not None and np.abs(x - y).max() < tol
        assert llm.reuse(c, first[:1]) == 0  # a prompt's last token is always fed (its logits are needed)
        llm.release(b, 30)
        llm.release(c, 30)
        assert llm.reserved == 0
        d = llm.reserve(llm.positions)
        assert d is not None
        llm.decode([(d, first, True)])
        llm.remember(d)
        assert llm.cached == first
        assert llm.reserve(llm.positions) is not None and llm.reserved <= llm.cells  # the cache gave way if short
    finally:
        llm.close()


@needs_llama
def test_llamacpp_engine_prefills_only_what_the_cache_lacks(servers: dict[str, Any]) -> None:
    """Through the server: a repeated request feeds llama.cpp one prompt token, one sharing the system turn feeds
    the rest; answers equal those after a full prefill."""
    from lmtailor.render import prompt_ids

    url, app = servers["llama"]
    (slot,) = app.state.slots.values()
    llm, client = slot.model, _client(url)
    system = {"role": "system", "content": "Answer with one command."}
    first, second = [system, {"role": "user", "content": "list files"}], [system, {"role": "user", "content": "du"}]

    def ask(messages: list[dict[str, str]]) -> tuple[str, int]:
        before = llm.decoded_tokens
        r = client.chat.completions.create(model=slot.name, messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
        return r.choices[0].message.content, llm.decoded_tokens - before

    llm.forget()
    text, fed = ask(first)
    assert fed == len(prompt_ids(slot.tok, first)) + 6 - 1  # full prompt, then 5 of the 6 answer tokens
    again, fed = ask(first)
    assert again == text and fed == 1 + 6 - 1
    shared = next(i for i, (p, q) in enumerate(zip(prompt_ids(slot.tok, first), prompt_ids(slot.tok, second),
                                                    strict=False)) if p != q)
    other, fed = ask(second)
    assert fed == len(prompt_ids(slot.tok, second)) - shared + 6 - 1 and shared > 5
    llm.forget()
    assert ask(second)[0] == other


@needs_llama
def test_llamacpp_server_batches_eight_concurrent_requests(servers: dict[str, Any]) -> None:
    """Eight requests at once through the real openai client are decoded together (one llama_decode per step)
    and answer exactly as the same requests one at a time: greedy, and seeded sampling (one generator per row)."""
    from concurrent.futures import ThreadPoolExecutor

    url, app = servers["llama"]
    model_id = next(iter(app.state.slots))
    client = _client(url)
    questions = ["list files", "count lines in f.txt", "show processes", "find by name", "disk usage",
                 "make a folder", "copy a folder", "what is grep"]

    def ask(k: int) -> tuple[str, int]:
        extra = {"ignore_eos": True} | ({"seed": 7} if k % 2 else {})
        r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": questions[k]}],
                                           max_tokens=6 + k, temperature=0.8 if k % 2 else 0, extra_body=extra)
        return r.choices[0].message.content, r.usage.completion_tokens

    one_by_one = [ask(k) for k in range(8)]
    engine = app.state.engine
    before = dict(engine.stats)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == one_by_one
    assert [n for _, n in together] == [6 + k for k in range(8)]
    assert engine.stats["max_rows"] >= 4  # rows decoded together, not one after another
    assert engine.stats["batches"] - before["batches"] < 8  # later requests joined a running batch
    assert all(s == [] for s in app.state.slots[model_id].model.fed.values())  # every sequence freed


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
