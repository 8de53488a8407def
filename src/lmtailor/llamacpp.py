"""llama.cpp through llama-cpp-python: load a GGUF file, tokenize, score, decode greedily, quantize.

llama-cpp-python is optional (built from source by `make venv`, cached as a wheel); every function here imports it
lazily and raises a ModelError naming the install command when it is missing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from lmtailor.errors import ConfigError, ModelError

INSTALL_HINT = "install it: pip install llama-cpp-python (builds llama.cpp with your C compiler; `make venv` does it)"

# llama.cpp's own quantizer: name -> llama_ftype (llama.h). q8_0 and f16 are also written by lmtailor itself.
QUANT_FTYPES = {"f16": 1, "q8_0": 7, "q4_0": 2, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def llama_cpp() -> Any:
    """The llama_cpp module, or a ModelError saying how to install it."""
    try:
        import llama_cpp as module
    except ImportError as e:
        raise ModelError(f"llama-cpp-python is not installed ({e})", INSTALL_HINT) from None
    return module


def available() -> bool:
    try:
        llama_cpp()
    except ModelError:
        return False
    return True


def version() -> str:
    return str(llama_cpp().__version__)


def load(path: str | Path, n_ctx: int = 2048, logits_all: bool = False, threads: int = 0,
         vocab_only: bool = False) -> Any:
    """Open a GGUF file with llama.cpp (a `llama_cpp.Llama`); threads=0: one per core.

    Raises:
        ModelError: llama-cpp-python missing, or llama.cpp refuses the file.
    """
    module = llama_cpp()
    threads = threads or max(1, os.cpu_count() or 1)
    try:
        return module.Llama(model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, n_threads=threads,
                            n_threads_batch=threads, vocab_only=vocab_only, verbose=False, n_batch=512, seed=0)
    except (ValueError, RuntimeError) as e:
        raise ModelError(f"llama.cpp cannot load {path}: {e}") from e


def tokenize(llm: Any, text: str) -> list[int]:
    """Token ids as llama.cpp splits `text`: special tokens written in the text are parsed, no BOS is added."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def detokenize(llm: Any, ids: list[int]) -> str:
    return str(llm.detokenize(ids).decode("utf-8", errors="replace"))


def logits(llm: Any, ids: list[int]) -> np.ndarray:
    """Logits after every position of `ids`: (T, V) float32. `llm` must be loaded with logits_all=True."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def perplexity(scores: np.ndarray, ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of ids[1:] under scores[:-1] (T, V)."""
    s = scores[:-1].astype(np.float64)
    m = s.max(-1, keepdims=True)
    logp = s - m - np.log(np.exp(s - m).sum(-1, keepdims=True))
    nll = -logp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    """`n` greedy tokens after `ids` (EOS does not stop it: the count is fixed, for comparisons)."""
    out: list[int] = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) >= n:
            break
    return out


def quantize(src: str | Path, dst: str | Path, kind: str, threads: int = 0) -> Path:
    """Quantize GGUF `src` into `dst` with llama.cpp's own quantizer (k-quants keep sensitive tensors wider).

    Raises:
        ConfigError: unknown kind. ModelError: llama-cpp-python missing or the quantizer failed.
    """
    if kind not in QUANT_FTYPES:
        raise ConfigError(f"unknown llama.cpp quantization '{kind}'", f"choose one of: {', '.join(QUANT_FTYPES)}")
    module = llama_cpp()
    params = module.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[kind]
    params.nthread = threads or max(1, os.cpu_count() or 1)
    with _quiet():
        rc = module.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise ModelError(f"llama.cpp's quantizer failed ({kind}, return code {rc}) on {src}")
    return Path(dst)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence llama.cpp's C-level log lines on stderr (model loading prints hundreds)."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)
        os.close(null)
