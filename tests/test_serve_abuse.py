"""The server under hostile requests (issue 17): every one a 4xx in the OpenAI error shape, never a 500, and the
server keeps answering /health. Real uvicorn on 127.0.0.1, a tiny model built in the test."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmtailor.serve import Limits, create_app, load_models, running
from lmtailor.serve.guard import RedactQuery, host_allowed, redact_path

LIMITS = Limits(max_prompt_tokens=120, max_tokens=400, default_max_tokens=8, max_batch_size=4, batch_window_ms=5,
                timeout_s=60, max_body_bytes=64 * 1024, read_timeout_s=1.0)


@pytest.fixture(scope="module")
def slots(tiny_model: Path):  # type: ignore[no-untyped-def]
    return load_models([str(tiny_model)])


@pytest.fixture(scope="module")
def server(slots) -> Iterator[tuple[str, str, object]]:  # type: ignore[no-untyped-def]
    app = create_app(slots, limits=LIMITS)  # no API key: the Host check is on
    with running(app) as url:
        yield url, next(iter(slots)), app


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict:  # type: ignore[type-arg]
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _post(c: httpx.Client, raw: str | bytes, path: str = "/v1/chat/completions") -> httpx.Response:
    return c.post(path, content=raw, headers={"content-type": "application/json"})


def test_hostile_bodies_are_400_in_the_openai_shape_and_keep_the_connection(server) -> None:  # type: ignore[no-untyped-def]
    url, model, _ = server
    with httpx.Client(base_url=url, timeout=30) as c:
        cases = [
            ('{"model": "MODEL", "messages": [{"role": "user", "content": "a\\ud800"}]}'.replace("MODEL", model),
             "invalid_text", "messages[0].content"),
            ('{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}', "invalid_text", "model"),
            ('{"model": "MODEL", "prompt": ["ok", "\\uD800"]}'.replace("MODEL", model), "invalid_text", "prompt[1]"),
            (json.dumps({"model": model, "messages": [{"role": "assistant", "content": "hi"},
                                                      {"role": "user", "content": "x"}]}), "invalid_messages",
             "messages"),
            (json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "seed": 2**70}),
             "invalid_request", "seed"),
            ('{"model": ', "invalid_json", None),
            (b"\xff\xfe{", "invalid_json", None),
            ("[1, 2]", "invalid_request", None),
            (json.dumps({"model": model, "messages": [{"role": "user", "content": "word " * 5000}]}),
             "context_length_exceeded", "messages"),
        ]
        for raw, code, param in cases:
            path = "/v1/completions" if '"prompt"' in str(raw) else "/v1/chat/completions"
            err = _error(_post(c, raw, path), 400, code)
            assert err["param"] == param, (raw, err)
        _error(c.get("/no/such/route"), 404, "not_found")
        # the same keep-alive connection still answers
        ok = c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["choices"]


def test_body_limit_declared_and_chunked(server) -> None:  # type: ignore[no-untyped-def]
    url, model, _ = server
    big = json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * 100_000}]})
    with httpx.Client(base_url=url, timeout=30) as c:
        _error(_post(c, big), 413, "request_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
            for _ in range(40):
                yield b" " * 4096

        r = c.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        _error(r, 413, "request_too_large")
        assert c.get("/health").status_code == 200


def test_host_header_is_checked_without_a_key(server, slots) -> None:  # type: ignore[no-untyped-def]
    url, _, _ = server
    port = url.rsplit(":", 1)[1]
    with httpx.Client(base_url=url, timeout=30) as c:
        for host in ("evil.example.com", f"rebind.attacker.test:{port}", ""):
            _error(c.get("/v1/models", headers={"host": host}), 403, "host_not_allowed")
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "10.1.2.3"):
            assert c.get("/v1/models", headers={"host": host}).status_code == 200, host
    keyed = create_app(slots, api_key="k", limits=LIMITS)  # with a key, names are the key's business
    with running(keyed) as url2, httpx.Client(base_url=url2, timeout=30) as c:
        r = c.get("/v1/models", headers={"host": "my-server.lan", "authorization": "Bearer k"})
        assert r.status_code == 200
    assert host_allowed("MyBox.local:8000", {"mybox.local"}) and not host_allowed("mybox.local.evil", {"mybox.local"})


def test_slow_senders_are_disconnected(server) -> None:  # type: ignore[no-untyped-def]
    url, _, _ = server
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else b"GE")
        socks.append(s)
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=30) as c:  # meanwhile the server answers others
        assert c.get("/health").status_code == 200
    time.sleep(max(0.0, LIMITS.read_timeout_s * 2.5 - (time.monotonic() - start)))
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            closed += s.recv(1024) == b""
        except (ConnectionResetError, TimeoutError):
            closed += isinstance(s, socket.socket)  # reset counts as closed; a timeout would mean still open
        finally:
            s.close()
    assert closed == len(socks)


def test_non_streaming_client_that_leaves_stops_decoding(server) -> None:  # type: ignore[no-untyped-def]
    url, model, app = server
    engine = app.state.engine
    before = engine.stats["cancelled"]
    body = {"model": model, "messages": [{"role": "user", "content": "go"}], "max_tokens": 400, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=0.5) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/chat/completions", json=body)
    deadline = time.monotonic() + 20
    while engine.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert engine.stats["cancelled"] == before + 1


def test_api_keys_never_reach_the_access_log() -> None:
    assert redact_path("/v1/models?api_key=s3cret&x=1") == "/v1/models?api_key=***&x=1"
    assert redact_path("/v1/models?token=abc&access_token=d") == "/v1/models?token=***&access_token=***"
    assert redact_path("/v1/s3cret/models", "s3cret") == "/v1/***/models"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", "/v1/models?key=TOPSECRET", "1.1", 200), None)
    assert RedactQuery().filter(record) and "TOPSECRET" not in record.getMessage()
