"""The server under abuse (issue 17), on 127.0.0.1 with bounded counts and time.

1. Abuse cases, each with the status it must get: a 10 MB body (413), a chunked body past the limit (413), lone
   surrogates in content and model name (400), a conversation starting with an assistant turn (400),
   seed 2**70 (400), malformed JSON and non-UTF-8 bodies (400), a DNS-rebinding Host header (403), an API key in
   the query string (200, and absent from the access log), 50 slowloris connections (all closed by the read
   timeout), a non-streaming client that leaves (decoding cancelled), /health latency while a 4 MB body uploads.
2. Load: 8 x N concurrent clients (chat requests, a few tokens each) against a small queue, with /health polled
   all along: status counts (0 5xx required; 429 when the queue is full), /health latency p50/p95/max.
3. Process memory (RSS) before and after.

    python benchmarks/serve_abuse.py [--model NAME|FOLDER] [--clients 8] [--requests 6] [--queue 4]

Default model: a tiny llama built here in seconds (the checks are about the server, not the model). Writes
benchmarks/results/serve_abuse.json and prints a summary; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = Path(__file__).parent / "results" / "serve_abuse.json"
CORPUS = ["To list files use ls -la", "To find files use find . -name x", "To count lines use wc -l file",
          "To search text use grep -r word .", "The quick brown fox jumps over the lazy dog."] * 40


def tiny_model(folder: Path) -> Path:
    """A 2-layer, 64-wide llama with a BPE tokenizer trained here."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtailor.tokenizers import train_bpe

    tok = train_bpe(CORPUS, vocab_size=400, min_frequency=1)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


class Health:
    """Polls /health every 50 ms on its own connection and keeps the latencies."""

    def __init__(self, url: str) -> None:
        self.url, self.lat, self.failed = url, [], 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:
                    ok = c.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.lat.append(time.perf_counter() - t)
                self.failed += not ok
                time.sleep(0.05)

    def __enter__(self) -> Health:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, Any]:
        ms = sorted(x * 1000 for x in self.lat) or [0.0]
        return {"polls": len(ms), "failed": self.failed, "p50_ms": round(statistics.median(ms), 1),
                "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1)}


def abuse_cases(url: str, model: str, app: Any, read_timeout: float) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def check(name: str, want: int, fn: Any) -> None:
        t = time.perf_counter()
        try:
            got = fn()
        except httpx.HTTPError as e:
            got = f"{type(e).__name__}"
        results.append({"case": name, "want": want, "got": got, "ok": got == want,
                        "seconds": round(time.perf_counter() - t, 3)})

    c = httpx.Client(base_url=url, timeout=60)
    hdr = {"content-type": "application/json"}
    chat = "/v1/chat/completions"

    def post(raw: str | bytes, **kw: Any) -> int:
        return c.post(chat, content=raw, headers={**hdr, **kw.pop("headers", {})}, **kw).status_code

    def body(content: str, **extra: Any) -> str:
        return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 4,
                           **extra})

    check("10 MB body", 413, lambda: post(body("x" * 10_000_000)))
    check("chunked body past the limit", 413, lambda: c.post(chat, content=(b" " * 65536 for _ in range(40)),
                                                             headers=hdr).status_code)
    check("lone surrogate in content", 400, lambda: post(body("a").replace('"a"', '"a\\ud800"')))
    check("lone surrogate in model name", 400,
          lambda: post('{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}'))
    check("assistant turn first", 400, lambda: post(json.dumps(
        {"model": model, "messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]})))
    check("seed 2**70", 400, lambda: post(body("hi", seed=2**70)))
    check("malformed JSON", 400, lambda: post('{"model": '))
    check("not UTF-8", 400, lambda: post(b"\xff\xfe{"))
    check("DNS-rebinding Host header", 403, lambda: c.get("/v1/models", headers={"host": "evil.example"})
          .status_code)
    check("prompt too long (before tokenizing)", 400, lambda: post(body("word " * 200_000)))

    # API key in the query string: answered, and never written to the access log.
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    access = logging.getLogger("uvicorn.access")
    level = access.level
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        check("api key in query string", 200, lambda: c.get("/v1/models?api_key=SECRET-KEY-123").status_code)
        time.sleep(0.2)
    finally:
        access.removeHandler(handler)
        access.setLevel(level)
    results.append({"case": "api key absent from the access log", "want": True,
                    "got": bool(records) and not any("SECRET-KEY-123" in r for r in records),
                    "ok": bool(records) and not any("SECRET-KEY-123" in r for r in records), "seconds": 0})

    # Slowloris: 50 connections that never finish their request head.
    port = int(url.rsplit(":", 1)[1])
    socks = []
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        socks.append(s)
    time.sleep(read_timeout * 2.5)
    closed = 0
    for s in socks:
        s.settimeout(2)
        try:
            closed += s.recv(64) == b""
        except ConnectionResetError:
            closed += 1
        except TimeoutError:
            pass
        s.close()
    results.append({"case": "50 slowloris connections closed", "want": 50, "got": closed, "ok": closed == 50,
                    "seconds": read_timeout * 2.5})

    # A non-streaming client that leaves: its decoding is cancelled.
    engine = app.state.engine
    before = engine.stats["cancelled"]
    with httpx.Client(base_url=url, timeout=0.5) as quick, contextlib.suppress(httpx.ReadTimeout):
        quick.post(chat, json={"model": model, "messages": [{"role": "user", "content": "go"}],
                               "max_tokens": 400, "ignore_eos": True})
    deadline = time.monotonic() + 20
    while engine.stats["cancelled"] == before and time.monotonic() < deadline:
        time.sleep(0.05)
    results.append({"case": "client left: decoding cancelled", "want": 1, "got": engine.stats["cancelled"] - before,
                    "ok": engine.stats["cancelled"] - before == 1, "seconds": 0})

    # /health while a 4 MB body (under the default limit of the big-body server) uploads and is refused.
    with Health(url) as h:
        for _ in range(5):
            post(body("y" * 4_000_000))
        time.sleep(1.0)
    s = h.summary()
    results.append({"case": "/health during 5 bodies of 4 MB", "want": "< 1000 ms", "got": s["max_ms"],
                    "ok": s["polls"] > 0 and s["max_ms"] < 1000 and not s["failed"], "seconds": 0})
    c.close()
    return results


def load(url: str, model: str, clients: int, requests: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    lock = threading.Lock()
    lat: list[float] = []

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            for j in range(requests):
                t = time.perf_counter()
                try:
                    code = str(c.post("/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": f"question {i}-{j}"}],
                        "max_tokens": 16, "temperature": 0}).status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                with lock:
                    statuses[code] = statuses.get(code, 0) + 1
                    lat.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    with Health(url) as h:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    ms = sorted(x * 1000 for x in lat)
    return {"clients": clients, "requests_each": requests, "statuses": statuses,
            "five_xx": sum(v for k, v in statuses.items() if k.startswith("5")),
            "rate_limited_429": statuses.get("429", 0), "seconds": round(time.perf_counter() - t0, 2),
            "request_p50_ms": round(statistics.median(ms), 1), "health": h.summary()}


def main() -> int:
    from lmtailor.serve import Limits, create_app, load_models, running

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model name or folder (default: a tiny model built here)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=6, help="requests per client")
    p.add_argument("--queue", type=int, default=4, help="max_queue of the server (small, so 429 shows)")
    a = p.parse_args()

    mem0 = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        target = a.model or str(tiny_model(Path(tmp) / "tiny"))
        slots = load_models([target])
        model = next(iter(slots))
        mem_loaded = rss_mb()
        lim = Limits(max_queue=a.queue, max_batch_size=4, batch_window_ms=10, timeout_s=120, read_timeout_s=1.0,
                     max_body_bytes=1 * 2**20, default_max_tokens=16)
        app = create_app(slots, limits=lim)
        with running(app) as url:
            cases = abuse_cases(url, model, app, lim.read_timeout_s)
            mem_abuse = rss_mb()
            loaded = load(url, model, a.clients, a.requests)
        mem_after = rss_mb()
    failed = [c for c in cases if not c["ok"]]
    if loaded["five_xx"]:
        failed.append({"case": "load: 5xx answers", "got": loaded["five_xx"]})
    if a.clients * a.requests > a.queue * 2 and not loaded["rate_limited_429"]:
        failed.append({"case": "load: no 429 although the queue was full", "got": loaded["statuses"]})
    result = {
        "note": "shared machine (several engineers' jobs running): latencies are indicative; counts are exact",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": a.model or "tiny llama (2x64)",
        "abuse_cases": cases, "load": loaded,
        "memory_mb": {"start": round(mem0), "model_loaded": round(mem_loaded), "after_abuse": round(mem_abuse),
                      "after_load": round(mem_after)},
        "failed": failed,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for c in cases:
        print(f"{'ok ' if c['ok'] else 'BAD'} {c['case']:42} want {c['want']!s:10} got {c['got']}")
    print(f"load: {loaded['clients']}x{loaded['requests_each']} -> {loaded['statuses']} in {loaded['seconds']} s; "
          f"/health {loaded['health']}")
    print(f"memory MB: {result['memory_mb']}")
    print(f"{len(failed)} failed check(s); results in {RESULTS}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
