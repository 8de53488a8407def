"""What stands between the network and the routes: the Host check, the body limit, text that is not Unicode, read
timeouts, a redacted access log, and OpenAI-shaped errors for whatever the routes never see.

- Host: without an API key, a browser page on another site could reach a loopback server through DNS rebinding (its
  own name resolving to 127.0.0.1), so the Host header must be an IP address, `localhost` or the bound host name.
- Body: larger than `Limits.max_body_bytes` is answered 413 before it is read (Content-Length) or as soon as the
  count passes the limit (chunked), so one request cannot hold the memory or the event loop.
- Text: a JSON escape of a lone UTF-16 surrogate ("\\ud800") decodes to a str that is not Unicode and fails deep in
  the tokenizer or the JSON encoder; it is a 400 naming the field.
- Read timeout: a client must send its whole request within `Limits.read_timeout_s` of connecting (or of its last
  response), so slow senders (slowloris) cannot hold connections open.
- The access log never shows query-string values of parameters that look like keys or tokens.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from lmtailor.serve.schemas import APIError

LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SECRET_PARAM = re.compile(r"(?i)(key|token|secret|passw|auth|sig|cred)")


def host_allowed(header: str, allowed: set[str]) -> bool:
    """Whether a Host header names this server: an IP address, localhost, or one of `allowed` (port ignored)."""
    host = header.strip().lower()
    if host.startswith("["):  # [::1]:8000
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if not host:
        return False
    if host in allowed or host in LOCAL_NAMES:
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The field path of the first string (or key) of `value` holding a lone surrogate, or None."""
    stack: list[tuple[Any, str]] = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return where or "body"
        elif isinstance(item, dict):
            for k, v in item.items():
                name = f"{where}.{k}" if where else str(k)
                if _SURROGATE.search(str(k)):
                    return name
                stack.append((v, name))
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


async def _answer(send: Any, err: APIError, close: bool = True) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """ASGI middleware: Host check (when no key is set), body size limit and lone-surrogate check of JSON bodies.

    Plain ASGI (no BaseHTTPMiddleware), so streaming responses and disconnect detection pass through untouched.
    """

    def __init__(self, app: Any, max_body_bytes: int, check_host: bool, allowed_hosts: set[str]) -> None:
        self.app, self.max_body, self.check_host = app, max_body_bytes, check_host
        self.allowed = {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.check_host and not host_allowed(headers.get(b"host", b"").decode("latin-1"), self.allowed):
            await _answer(send, APIError(403, "this server answers only requests addressed to it by IP address, "
                                         "localhost or its bound host name (set an API key to serve other names)",
                                         "host_not_allowed", "Host"))
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await _answer(send, self._too_large())
            return
        body, more, extra = bytearray(), True, []
        while more:  # bounded by max_body: read whole, check, then replay to the app
            message = await receive()
            if message["type"] != "http.request":
                extra.append(message)  # a disconnect: the app sees it after the body
                break
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_body:
                await _answer(send, self._too_large())
                return
        if _SURROGATE_ESCAPE.search(body):
            try:
                where = lone_surrogate(json.loads(body))
            except (ValueError, RecursionError):
                where = None  # not JSON: the route's validation answers that
            if where is not None:
                await _answer(send, APIError(400, f"{where}: holds a lone UTF-16 surrogate escape (like \\ud800), "
                                             "which is not text", "invalid_text", where), close=False)
                return
        await self.app(scope, _replay(bytes(body), extra, receive), send)

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.max_body} bytes",
                        "request_too_large", "body")


def _replay(body: bytes, extra: list[dict[str, Any]], receive: Any) -> Any:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if extra:
            return extra.pop(0)
        return await receive()

    return replay


def check_prompt_chars(texts: list[str], longest_token: int, limit: int) -> None:
    """Refuse text that cannot fit `limit` tokens before tokenizing it: a token covers at most `longest_token`
    characters, so more than limit x longest_token characters are more than `limit` tokens.

    Raises:
        APIError: 400 context_length_exceeded.
    """
    chars = sum(len(t) for t in texts)
    if chars > limit * max(longest_token, 1):
        raise APIError(400, f"the prompt has {chars} characters, more than the {limit} tokens this server accepts "
                       "can hold", "context_length_exceeded", "messages")


# ---- uvicorn: read timeout and access log --------------------------------------------------------------------------

def timed_protocol(read_timeout_s: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request has not fully arrived `read_timeout_s` after the
    connection opened or its previous response ended (uvicorn alone waits for slow request heads forever)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class TimedH11(H11Protocol):  # type: ignore[misc]
        _read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._read_timer is not None:
                self._read_timer.cancel()
            self._read_timer = self.loop.call_later(read_timeout_s, self._expire)

        def _expire(self) -> None:
            self._read_timer = None
            # Waiting for a request, or inside one (head or body): too slow. A request fully received is being
            # answered; its own time limit (Limits.timeout_s) applies and the timer restarts after the response.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                if self.cycle is not None and not self.cycle.response_complete:
                    self.cycle.disconnected = True
                    self.cycle.message_event.set()
                self.transport.close()

    return TimedH11


class RedactQuery(logging.Filter):
    """Blank the values of query parameters that look like secrets (api_key=..., token=...) in uvicorn's access log,
    and any occurrence of the server's own key."""

    def __init__(self, key: str | None = None) -> None:
        super().__init__()
        self.key = key

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) >= 3 and isinstance(record.args[2], str):
            args = list(record.args)
            args[2] = redact_path(str(args[2]), self.key)
            record.args = tuple(args)
        return True


def redact_path(path: str, key: str | None = None) -> str:
    """`/v1/models?api_key=s3cret&x=1` -> `/v1/models?api_key=***&x=1` (and the server key wherever it appears)."""
    base, sep, query = path.partition("?")
    if sep:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*/")
        path = f"{base}?{query}"
    return path.replace(key, "***") if key else path


def install_log_redaction(key: str | None) -> None:
    """Add RedactQuery to uvicorn's access logger once."""
    logger = logging.getLogger("uvicorn.access")
    for old in [f for f in logger.filters if isinstance(f, RedactQuery)]:
        logger.removeFilter(old)
    logger.addFilter(RedactQuery(key))

