"""The FastAPI app: OpenAI-compatible routes, API key, validation and errors, the playground page."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmtailor.config import check_speedup
from lmtailor.errors import LmtailorError
from lmtailor.generate import as_messages
from lmtailor.render import longest_token, prompt_ids
from lmtailor.serve.engine import AsyncJob, Engine, Job, Limits, QueueFull, Sampling
from lmtailor.serve.guard import Guard, check_prompt_chars
from lmtailor.serve.llamacpp_engine import DEFAULT_GGUF_TYPE, check_engine, engine_class, load_llamacpp_slots
from lmtailor.serve.models import Slot, load_models
from lmtailor.serve.schemas import APIError, ChatRequest, CompletionRequest, _Sampling
from lmtailor.serve.toolserve import answer, message_calls, request_tools

STATIC = Path(__file__).parent / "static"


@dataclass
class Prepared:
    slot: Slot
    prompts: list[list[int]]  # one per prompt (before n copies)
    sampling: Sampling
    max_tokens: int
    stop: list[str]


def create_app(targets: list[str] | dict[str, Slot], api_key: str | None = None, limits: Limits | None = None,
               speedup: str = "none", kb: str | None = None, hosts: list[str] | None = None, engine: str = "torch",
               gguf_type: str = DEFAULT_GGUF_TYPE) -> FastAPI:
    """Build the server app.

    Args:
        targets: run folders, model folders or model names to load, or slots already loaded (`load_models`).
        api_key: when set, every /v1 request must carry `Authorization: Bearer <api_key>`.
        limits: caps on prompt length, max_tokens, batching, queue and time (defaults: `Limits()`).
        speedup: "none", "fp16" or "bf16" (see `lmtailor.fastdecode.speed_up`); torch engine only (int8
            weights: the llama.cpp engine with gguf_type q8_0).
        kb: a knowledge base every model retrieves passages from; chat responses then carry `sources`.
        hosts: host names requests may be addressed to besides IP addresses and localhost, checked only without
            an API key (DNS rebinding; see serve/guard.py).
        engine: "torch", "llama.cpp" or "vllm" (`lmtailor.serve.llamacpp_engine`); slots given as a dict must
            have been loaded for that engine.
        gguf_type: llama.cpp engine: the GGUF type each target is exported to (once, cached).

    Returns:
        The FastAPI app; its engine starts and stops with the app's lifespan.
    """
    check_engine(engine)
    check_speedup(speedup)
    lim = limits or Limits()
    if isinstance(targets, dict):
        slots = targets
    elif engine == "llama.cpp":
        slots = load_llamacpp_slots(list(targets), gguf_type, threads=lim.torch_threads,
                                    seqs=lim.max_batch_size)
    else:
        slots = load_models(list(targets), speedup, kb)
    server = _Server(slots, lim, created=int(time.time()))
    app = FastAPI(title="lmtailor", lifespan=_lifespan(server.lim, engine_class(engine)), docs_url=None,
                  redoc_url=None)
    app.state.slots = server.slots
    app.state.limits = server.lim
    _add_error_handlers(app)
    if api_key is not None:
        app.add_middleware(_BearerKey, key=api_key)
    # outermost: Host check, body limit and lone surrogates come before the key check and the routes
    app.add_middleware(Guard, max_body_bytes=server.lim.max_body_bytes, check_host=api_key is None,
                       allowed_hosts=set(hosts or []))
    _add_info_routes(app, server)
    _add_openai_routes(app, server)
    _add_playground_routes(app)
    return app


def _lifespan(lim: Limits, kind: type[Engine] = Engine
              ) -> Callable[[FastAPI], contextlib.AbstractAsyncContextManager[None]]:
    """The app's lifespan: one batching engine (kept on `app.state.engine`), closed when the app stops."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = kind(lim)
        try:
            yield
        finally:
            app.state.engine.close()

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Answer API errors and request validation errors with OpenAI-shaped error bodies."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        # unknown routes, wrong methods: the OpenAI shape, as for every other error
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        message = "the request body is not valid JSON (or not UTF-8)" if code == "invalid_json" else str(e.detail)
        return JSONResponse(APIError(e.status_code, message, code).body(), status_code=e.status_code,
                            headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        err = e.errors()[0] if e.errors() else {}
        if err.get("type") == "json_invalid":  # loc is ("body", offset)
            where = err.get("loc", ("body", "?"))[-1]
            why = (err.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(APIError(400, f"the request body is not valid JSON ({why} at position {where})",
                                         "invalid_json").body(), status_code=400)
        param = ".".join(str(x) for x in err.get("loc", ())[1:]) or None
        return JSONResponse(APIError(400, f"{param or 'body'}: {err.get('msg', 'invalid request')}",
                                     "invalid_request", param).body(), status_code=400)


@dataclass
class _Server:
    """What the routes share, built once per app: the served models, the limits and the start time.

    The batching engine lives on `app.state.engine` (made by the lifespan), so it is looked up per request.
    """

    slots: dict[str, Slot]
    lim: Limits
    created: int

    def pick(self, name: str) -> Slot:
        if name not in self.slots:
            raise APIError(404, f"model '{name}' is not served here; available: {', '.join(self.slots)}",
                           "model_not_found", "model")
        return self.slots[name]

    def prepare(self, req: _Sampling, slot: Slot, prompts: list[list[int]]) -> Prepared:
        """Check the request against the limits and the model's positions; settle max_tokens and sampling."""
        lim = self.lim
        if req.logprobs:
            raise APIError(400, "logprobs are not supported", "unsupported_parameter", "logprobs")
        if req.frequency_penalty or req.presence_penalty:
            raise APIError(400, "frequency_penalty and presence_penalty are not supported; use repetition_penalty",
                           "unsupported_parameter", "frequency_penalty")
        if req.n > lim.max_n:
            raise APIError(400, f"n={req.n} is above this server's limit of {lim.max_n}", "invalid_value", "n")
        if req.n * len(prompts) > lim.max_batch_size:
            raise APIError(400, f"n x prompts = {req.n * len(prompts)} rows is above max_batch_size "
                           f"{lim.max_batch_size}", "invalid_value", "n")
        asked = req.requested_max_tokens()
        if asked is not None and asked > lim.max_tokens:
            raise APIError(400, f"max_tokens={asked} is above this server's limit of {lim.max_tokens}",
                           "invalid_value", "max_tokens")
        max_tokens = asked or lim.default_max_tokens
        limit = min(lim.max_prompt_tokens, slot.max_positions - 1)
        for p in prompts:
            if len(p) > limit:
                raise APIError(400, f"the prompt has {len(p)} tokens; this server accepts at most {limit}",
                               "context_length_exceeded", "messages")
            # Keep the answer inside the model's positions: shorten it rather than fail.
            max_tokens = min(max_tokens, slot.max_positions - len(p))
        sampling = Sampling(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                            repetition_penalty=req.repetition_penalty, seed=req.seed, ignore_eos=req.ignore_eos)
        return Prepared(slot, prompts, sampling, max_tokens, req.stops())

    async def run(self, request: Request, prep: Prepared, n: int) -> tuple[AsyncJob, Job]:
        """Queue the job (n rows per prompt) on the engine; 429 when the queue is full."""
        engine: Engine = request.app.state.engine
        bridge = AsyncJob(asyncio.get_running_loop())
        rows = [p for p in prep.prompts for _ in range(n)]
        job = Job(prep.slot, rows, prep.sampling, prep.max_tokens, prep.stop, bridge.emit,
                  deadline=time.monotonic() + self.lim.timeout_s)
        try:
            engine.submit(job)
        except QueueFull:
            raise APIError(429, f"the server is busy ({self.lim.max_queue} requests waiting); retry shortly",
                           "rate_limit_exceeded", kind="rate_limit_error") from None
        return bridge, job

    async def collect(self, request: Request, bridge: AsyncJob, job: Job) -> tuple[list[str], list[str], int]:
        """Wait for every row; cancel the job if the client goes away. Returns texts, finish reasons, tokens."""
        texts = [""] * len(job.prompts)
        reasons: list[str | None] = [None] * len(job.prompts)
        used = 0
        checked = time.monotonic()
        try:
            while any(r is None for r in reasons):
                try:
                    ev = await asyncio.wait_for(bridge.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    ev = None
                # Check for a departed client at least every 0.5 s, also while deltas keep arriving.
                if time.monotonic() - checked >= 0.5 or ev is None:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        job.cancelled.set()
                        raise APIError(499, "client closed the request", "client_closed") from None
                if ev is None:
                    continue
                if ev[0] == "delta":
                    texts[ev[1]] += ev[2]
                elif ev[0] == "done":
                    reasons[ev[1]], used = ev[2], used + ev[3]
                else:
                    raise APIError(ev[1], ev[2], "timeout" if ev[1] == 504 else "server_error",
                                   kind="server_error")
        finally:
            if any(r is None for r in reasons):
                job.cancelled.set()
        if "timeout" in reasons:
            raise APIError(504, f"the request took longer than {self.lim.timeout_s:g} s", "timeout",
                           kind="server_error")
        return texts, [r or "stop" for r in reasons], used

    def stream(self, bridge: AsyncJob, job: Job, head: dict[str, Any], chat: bool, prompt_tokens: int,
               with_usage: bool, extra: dict[str, Any] | None = None) -> StreamingResponse:
        """The job's rows as server-sent events, OpenAI chunk format, ending with `data: [DONE]`; `extra` fields
        (the sources of retrieved passages) ride on the first chunk."""
        events = _events(bridge, job, head, chat, prompt_tokens, with_usage, self.lim.timeout_s, extra or {})
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(bridge: AsyncJob, job: Job, head: dict[str, Any], chat: bool, prompt_tokens: int,
                  with_usage: bool, timeout_s: float, extra: dict[str, Any]) -> AsyncIterator[str]:
    open_rows = set(range(len(job.prompts)))
    used = 0
    try:
        if chat:
            for i in open_rows:
                yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "finish_reason": None}], **extra})
        while open_rows:
            ev = await bridge.events.get()
            if ev[0] == "error":
                yield _sse({"error": {"message": ev[2], "type": "server_error", "code": ev[1]}})
                return
            i = ev[1]
            if ev[0] == "delta":
                choice = {"index": i, "delta": {"content": ev[2]}} if chat else {"index": i, "text": ev[2]}
                yield _sse({**head, "choices": [{**choice, "finish_reason": None}]})
            elif ev[2] == "timeout":
                yield _sse({"error": {"message": f"the request took longer than {timeout_s:g} s",
                                      "type": "server_error", "code": "timeout"}})
                return
            else:
                open_rows.discard(i)
                used += ev[3]
                reason = ev[2] if ev[2] in ("stop", "length") else "stop"
                choice = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
                yield _sse({**head, "choices": [{**choice, "finish_reason": reason}]})
        if with_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, used)})
        yield "data: [DONE]\n\n"
    finally:
        if open_rows:  # the client left (the response task was cancelled) or an error ended it
            job.cancelled.set()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _add_info_routes(app: FastAPI, server: _Server) -> None:
    """GET /health and GET /v1/models."""

    @app.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        engine: Engine = request.app.state.engine
        return {"status": "ok", "models": list(server.slots), "waiting": engine.waiting, **engine.stats}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": s.name, "object": "model", "created": server.created, "owned_by": "lmtailor", "parent": s.parent}
            for s in server.slots.values()]}


def _add_openai_routes(app: FastAPI, server: _Server) -> None:
    """POST /v1/chat/completions and POST /v1/completions, streaming or not."""

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(request: Request, body: ChatRequest) -> Any:
        slot = server.pick(body.model)
        tools = request_tools(body.tools, body.tool_choice, body.stream)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        for i, m in enumerate(body.messages):
            calls = message_calls(m.tool_calls, f"messages[{i}].tool_calls")
            if calls:
                messages[i]["tool_calls"] = calls
        messages = as_messages(messages, slot.system_prompt)
        cited = None
        if slot.retrieval is not None:  # retrieved examples or knowledge-base passages, as in training
            messages, cited = slot.retrieval.with_sources(messages)
        extra = {} if cited is None else {"sources": cited}  # an extra field: OpenAI clients ignore it
        check_prompt_chars([str(m.get("content") or "") for m in messages], longest_token(slot.tok),
                           server.lim.max_prompt_tokens)
        try:  # off the event loop: /health and other requests stay responsive
            ids = await asyncio.to_thread(prompt_ids, slot.tok, messages, tools)
        except LmtailorError as e:
            raise APIError(400, str(e), "invalid_messages", "messages") from None
        prep = server.prepare(body, slot, [ids])
        bridge, job = await server.run(request, prep, body.n)
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if body.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": now, "model": slot.name}
            return server.stream(bridge, job, head, True, len(ids), body.include_usage(), extra)
        texts, reasons, used = await server.collect(request, bridge, job)
        return {"id": rid, "object": "chat.completion", "created": now, "model": slot.name,
                "choices": [{"index": i, "message": msg, "finish_reason": why} for i, (msg, why) in enumerate(
                    answer(t, _r(r), tools) for t, r in zip(texts, reasons, strict=False))],
                "usage": _usage(len(ids), used), **extra}

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        slot = server.pick(body.model)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", "unsupported_parameter", "echo")
        texts_in = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts_in:
            raise APIError(400, "prompt is empty", "invalid_value", "prompt")
        # Raw text is tokenized the way training tokenizes raw text: with the tokenizer's own special tokens.
        for text in texts_in:
            check_prompt_chars([text], longest_token(slot.tok), server.lim.max_prompt_tokens)
        prompts = await asyncio.to_thread(lambda: [list(slot.tok(t, add_special_tokens=True)["input_ids"])
                                                   for t in texts_in])
        if any(not p for p in prompts):
            raise APIError(400, "prompt is empty", "invalid_value", "prompt")
        prep = server.prepare(body, slot, prompts)
        bridge, job = await server.run(request, prep, body.n)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        n_prompt = sum(len(p) for p in prompts)
        if body.stream:
            head = {"id": rid, "object": "text_completion", "created": now, "model": slot.name}
            return server.stream(bridge, job, head, False, n_prompt, body.include_usage())
        texts, reasons, used = await server.collect(request, bridge, job)
        return {"id": rid, "object": "text_completion", "created": now, "model": slot.name,
                "choices": [{"index": i, "text": t, "finish_reason": _r(r), "logprobs": None}
                            for i, (t, r) in enumerate(zip(texts, reasons, strict=False))],
                "usage": _usage(n_prompt, used)}


def _add_playground_routes(app: FastAPI) -> None:
    """The playground page at / and its static files."""

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _r(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


class _BearerKey:
    """ASGI middleware: /v1 requires `Authorization: Bearer <key>`, checked in constant time before the body is read.

    Plain ASGI rather than BaseHTTPMiddleware, so streaming and client-disconnect detection pass through untouched.
    """

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            header = dict(scope["headers"]).get(b"authorization", b"")
            given = header[7:] if header[:7].lower() == b"bearer " else b""
            if not hmac.compare_digest(given, self.key):
                err = APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)",
                               "invalid_api_key", kind="authentication_error")
                await JSONResponse(err.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)
