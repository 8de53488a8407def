"""The OpenAI-compatible server, driven by the real `openai` client against uvicorn on 127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from lmtailor.generate import cut_at_stop
from lmtailor.serve import Limits, create_app, load_models, running
from test_export import tiny_run  # noqa: F401  (session fixture: a LoRA run made by the real CLI)

KEY = "test-key-123"
LIMITS = Limits(max_prompt_tokens=120, max_tokens=300, default_max_tokens=16, max_n=4, max_batch_size=8,
                batch_window_ms=30, timeout_s=60)


@pytest.fixture(scope="module")
def slots(tiny_model: Path, tiny_run: Path):  # type: ignore[no-untyped-def]  # noqa: F811
    return load_models([str(tiny_run), str(tiny_model)])


@pytest.fixture(scope="module")
def server(slots) -> Iterator[tuple[str, object]]:  # type: ignore[no-untyped-def]
    app = create_app(slots, api_key=KEY, limits=LIMITS)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:  # type: ignore[no-untyped-def]
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _names(slots) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    tuned = next(s for s in slots.values() if s.parent)
    return tuned.name, tuned.parent


def ask(client: openai.OpenAI, model: str, text: str, **kw):  # type: ignore[no-untyped-def]
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


def test_models_lists_the_run_and_its_base(client: openai.OpenAI, slots) -> None:  # type: ignore[no-untyped-def]
    tuned, base = _names(slots)
    ids = {m.id: m for m in client.models.list().data}
    assert set(ids) == {tuned, base}
    assert ids[tuned].model_extra["parent"] == base
    assert len(slots) == 2, "the base named explicitly shares the adapter run's model, it is not loaded twice"


def test_chat_uses_the_training_renderer(client: openai.OpenAI, slots, tiny_run: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate
    from lmtailor.render import prompt_ids
    from lmtailor.runs import Run

    tuned, base = _names(slots)
    model, tok = Run.open(tiny_run).load()
    settings = GenerationSettings(max_new_tokens=12)
    for prompt in ("list files", "count lines"):
        r = ask(client, tuned, prompt, max_tokens=12)
        assert r.choices[0].message.content.strip() == generate(model, tok, [prompt], settings)[0]
        assert r.usage.prompt_tokens == len(prompt_ids(tok, [{"role": "user", "content": prompt}]))
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert r.choices[0].finish_reason in ("stop", "length")
        with model.disable_adapter():
            want = generate(model, tok, [prompt], settings)[0]
        assert ask(client, base, prompt, max_tokens=12).choices[0].message.content.strip() == want


def test_streaming_matches_non_streaming(client: openai.OpenAI, slots) -> None:  # type: ignore[no-untyped-def]
    tuned, _ = _names(slots)
    full = ask(client, tuned, "find by name", max_tokens=20, extra_body={"ignore_eos": True})
    chunks = list(ask(client, tuned, "find by name", max_tokens=20, stream=True,
                      stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert sum(1 for d in deltas if d) > 1, "the answer should arrive in several pieces"
    assert "".join(deltas) == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 == full.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings(client: openai.OpenAI, slots, stream: bool) -> None:  # type: ignore[no-untyped-def]
    tuned, _ = _names(slots)
    full = ask(client, tuned, "copy folder", max_tokens=24, extra_body={"ignore_eos": True}).choices[0].message.content
    visible = full.strip()
    assert len(visible) > 6
    stop = visible[len(visible) // 2: len(visible) // 2 + 2]
    want = cut_at_stop(full, [stop])
    r = ask(client, tuned, "copy folder", max_tokens=24, stop=[stop, "never-seen"], stream=stream,
            extra_body={"ignore_eos": True})
    if stream:
        pieces = list(r)
        got = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        reason = [c.choices[0].finish_reason for c in pieces if c.choices][-1]
    else:
        got, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert got == want and stop not in got
    assert reason == "stop"


def test_n_and_usage(client: openai.OpenAI, slots) -> None:  # type: ignore[no-untyped-def]
    tuned, _ = _names(slots)
    r = ask(client, tuned, "list files", n=3, temperature=1.0, max_tokens=10, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1, "sampled choices should differ"
    assert r.usage.completion_tokens <= 30


def test_completions_several_prompts(client: openai.OpenAI, slots) -> None:  # type: ignore[no-untyped-def]
    _, base = _names(slots)
    r = client.completions.create(model=base, prompt=["To list", "The quick"], n=2, max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy copies
    assert r.usage.completion_tokens == 20


def test_dynamic_batching_gives_the_same_answers(server, client: openai.OpenAI, slots) -> None:  # type: ignore[no-untyped-def]
    _, base = _names(slots)
    prompts = ["list files", "extract the archive please", "disk usage", "search text in all files here"]
    alone = [ask(client, base, p, max_tokens=12).choices[0].message.content for p in prompts]
    before = httpx.get(server[0] + "/health").json()
    together: list[str] = [""] * len(prompts)

    def one(i: int) -> None:
        together[i] = ask(client, base, prompts[i], max_tokens=12).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = httpx.get(server[0] + "/health").json()
    assert together == alone  # left padding + attention mask: batching does not change greedy answers
    assert after["batches"] - before["batches"] < len(prompts), "concurrent requests should share a batch"


def test_bad_key_is_401(server) -> None:  # type: ignore[no-untyped-def]
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server[0] + "/v1", api_key=key or "x", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    assert httpx.post(server[0] + "/v1/chat/completions", json={}).status_code == 401
    assert httpx.get(server[0] + "/health").status_code == 200  # no key needed


def test_errors_are_openai_json(client: openai.OpenAI, slots) -> None:  # type: ignore[no-untyped-def]
    tuned, _ = _names(slots)
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tuned, "word " * 400)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tuned, "hi", max_tokens=10_000)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, tuned, "hi", temperature=7)
    assert "temperature" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        ask(client, tuned, "hi", n=50)
    with pytest.raises(openai.NotFoundError) as e:
        ask(client, "no-such-model", "hi")
    assert e.value.body["code"] == "model_not_found"


def test_client_disconnect_stops_generation(server, slots) -> None:  # type: ignore[no-untyped-def]
    url, app = server
    tuned, _ = _names(slots)
    body = {"model": tuned, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 300,
            "stream": True, "ignore_eos": True, "temperature": 0}
    before = httpx.get(url + "/health").json()["cancelled"]
    with httpx.stream("POST", url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # leave after a few events
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned generation was not stopped"
        time.sleep(0.05)


def test_full_queue_is_429_and_timeout_is_504(slots) -> None:  # type: ignore[no-untyped-def]
    tuned, _ = _names(slots)
    app = create_app(slots, limits=Limits(max_queue=1, max_batch_size=1, batch_window_ms=0, timeout_s=60))
    results: list[object] = []
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def one() -> None:
            try:
                results.append(ask(c, tuned, "hi", max_tokens=200, extra_body={"ignore_eos": True}))
            except openai.APIStatusError as e:
                results.append(e)

        threads = [threading.Thread(target=one) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    served = [r for r in results if not isinstance(r, Exception)]
    assert refused and served and len(refused) + len(served) == 6
    assert refused[0].body["code"] == "rate_limit_exceeded"

    app = create_app(slots, limits=Limits(timeout_s=0.3, max_tokens=5000))
    with running(app) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.APIStatusError) as e:
            ask(c, tuned, "hi", max_tokens=4000, extra_body={"ignore_eos": True})
        assert e.value.status_code == 504


def test_serve_needs_the_key_variable_it_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from lmtailor.errors import ConfigError
    from lmtailor.serve import api_key_from_env, serve

    monkeypatch.delenv("LMTAILOR_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="LMTAILOR_TEST_KEY"):
        serve(["unused"], api_key_env="LMTAILOR_TEST_KEY")
    monkeypatch.setenv("LMTAILOR_TEST_KEY", "s3cret")
    assert api_key_from_env("LMTAILOR_TEST_KEY") == "s3cret"
    assert api_key_from_env(None) is None
