"""OpenAI-compatible server and web playground for runs and models.

    lmtailor serve runs/my-run --port 8000 --api-key-env LMTAILOR_API_KEY

Any OpenAI client then works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=...)`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from lmtailor.errors import ConfigError
from lmtailor.serve.app import create_app
from lmtailor.serve.engine import Limits
from lmtailor.serve.guard import install_log_redaction, timed_protocol
from lmtailor.serve.llamacpp_engine import default_engine
from lmtailor.serve.models import SPEEDUPS, Slot, load_models

__all__ = ["SPEEDUPS", "Limits", "Slot", "create_app", "load_models", "running", "serve"]

log = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def api_key_from_env(name: str | None) -> str | None:
    """The API key held by environment variable `name` (None when no name is given)."""
    if not name:
        return None
    key = os.environ.get(name)
    if not key:
        raise ConfigError(f"--api-key-env {name}: that environment variable is not set or empty",
                          f"export {name}=<a long random string>, or leave out --api-key-env")
    return key


def serve(targets: list[str], host: str = "127.0.0.1", port: int = 8000, api_key_env: str | None = None,
          limits: Limits | None = None, speedup: str = "none", log_level: str = "info", kb: str | None = None,
          engine: str | None = None, gguf_type: str = "q8_0") -> None:
    """Load `targets` and serve them until interrupted (blocks).

    Args:
        targets: run folders, model folders or model names; each becomes a model id (see /v1/models).
        host: interface to bind; 127.0.0.1 by default so nothing outside this machine can connect.
        port: TCP port.
        api_key_env: name of an environment variable holding the bearer key clients must send.
        limits: server caps (prompt length, max_tokens, batch, queue, timeout).
        speedup: CPU decoding speed-up, one of lmtailor.config.SPEEDUPS (see `lmtailor.fastdecode.speed_up`;
            benchmarks/serve_load.py reports speed and quality cost).
        log_level: uvicorn log level.
        kb: knowledge base to retrieve passages from (see `create_app`).
        engine: torch, llama.cpp or vllm (`lmtailor.serve.llamacpp_engine`); None: `default_engine` (on CPU
            the engine the serving benchmark measured faster at equal quality, `CPU_DEFAULT_ENGINE`).
        gguf_type: llama.cpp engine: the GGUF type each target is exported to (once, cached).

    Raises:
        ConfigError: the key variable is missing, or a public host is bound without a key.
    """
    import uvicorn

    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: must be 1 to 65535", "8000 is the default; ports below 1024 need root")
    key = api_key_from_env(api_key_env)
    engine = engine or default_engine(speedup)
    if host not in LOOPBACK and key is None:
        log.warning("serving on %s without an API key: anyone who can reach this port can use the models", host)
    app = create_app(targets, api_key=key, limits=limits, speedup=speedup, kb=kb, hosts=[host], engine=engine,
                     gguf_type=gguf_type)
    print(f"models: {', '.join(app.state.slots)}")
    print(f"playground: http://{host}:{port}/   API: http://{host}:{port}/v1")
    install_log_redaction(key)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                http=timed_protocol(app.state.limits.read_timeout_s))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running(app: Any, host: str = "127.0.0.1", port: int | None = None) -> Iterator[str]:
    """Run `app` with uvicorn in a background thread; yields its base URL (tests, benchmarks, notebooks)."""
    import uvicorn

    port = port or free_port(host)
    limits = getattr(getattr(app, "state", None), "limits", None)
    read_timeout = limits.read_timeout_s if isinstance(limits, Limits) else Limits().read_timeout_s
    install_log_redaction(None)
    # log_config=None: uvicorn's own logging.config.dictConfig would close every logging handler of the hosting
    # process (a test runner's capture files among them); its loggers keep the level set here
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                           timeout_graceful_shutdown=2, http=timed_protocol(read_timeout)))
    thread = threading.Thread(target=server.run, name="lmtailor-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
