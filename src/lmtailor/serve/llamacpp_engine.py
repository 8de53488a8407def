"""Serving engines beside torch: llama.cpp (each target exported to GGUF once, cached) and vLLM (GPU only).

One API for every engine: the routes, limits, stop strings, repetition stop, streaming and usage are the ones of
`lmtailor.serve.app`; only the decoding of a batch differs. The llama.cpp engine is given the token ids that
`lmtailor.render.prompt_ids` makes (the ids training put before each assistant turn), never text that llama.cpp
would re-tokenize, and decodes the rows of a batch one after another (llama.cpp keeps one sequence's KV cache
and reuses the longest common prefix between requests).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtailor import llamacpp
from lmtailor.errors import ConfigError
from lmtailor.io import cache_dir
from lmtailor.serve.engine import Engine, Job, _Rows
from lmtailor.serve.models import Slot

log = logging.getLogger(__name__)

ENGINES = ("torch", "llama.cpp", "vllm")
ENGINE_HELP = ("decoding engine: torch (transformers, batched), llama.cpp (the run exported to GGUF, "
               "see --gguf-type), vllm (NVIDIA GPU only)")
DEFAULT_GGUF_TYPE = "q8_0"
# The engine `lmtailor serve` uses on a CPU machine when --engine is not given: whichever of "torch" and
# "llama.cpp" benchmarks/serve_load.py (--only engines) measures faster at equal quality; its "decisions" section
# names it. This one constant flips the default (README, "Serving engines", states it).
CPU_DEFAULT_ENGINE = "torch"


def default_engine(speedup: str = "none") -> str:
    """The engine when none is named: CPU_DEFAULT_ENGINE on a CPU machine, torch with a CUDA GPU.

    A torch speed-up (--speedup other than none) asks for the torch engine; llama.cpp falls back to torch where
    llama-cpp-python is not installed (said in the log).
    """
    if speedup != "none" or torch.cuda.is_available():
        return "torch"
    if CPU_DEFAULT_ENGINE == "llama.cpp" and not llamacpp.available():
        log.warning("llama-cpp-python is not installed: serving with the torch engine (%s)", llamacpp.INSTALL_HINT)
        return "torch"
    return CPU_DEFAULT_ENGINE



def check_engine(engine: str) -> None:
    """Refuse an unknown engine, and vLLM where it cannot run.

    Raises:
        ConfigError: the engine is unknown, or vllm without a CUDA GPU or without the vllm package.
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown serving engine '{engine}'", f"choose one of: {', '.join(ENGINES)}")
    if engine == "vllm":
        if not torch.cuda.is_available():
            raise ConfigError("--engine vllm needs an NVIDIA GPU with CUDA, and this machine has none",
                              "use --engine torch or --engine llama.cpp on CPU")
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ConfigError("--engine vllm: the vllm package is not installed",
                              "pip install vllm on the GPU machine, or use --engine torch") from None
        raise ConfigError("--engine vllm is not wired in this version of lmtailor",
                          "export the run with `lmtailor export RUN --format merged` and start `vllm serve` on "
                          "that folder")


def gguf_for(target: str, gguf_type: str = DEFAULT_GGUF_TYPE) -> tuple[Path, Any, Any]:
    """The cached GGUF export of a run or model (made on first use) and its HF tokenizer and Run."""
    from transformers import AutoTokenizer

    from lmtailor.ggufwrite import write_gguf_file
    from lmtailor.models import prepare_tokenizer, unwrap_peft
    from lmtailor.runs import Run

    run = Run.open(target)
    folder = cache_dir("gguf", f"{run.name}-{_digest(run)}")
    path = folder / f"model-{gguf_type}.gguf"
    if not path.is_file() or not (folder / "tokenizer_config.json").is_file():
        log.warning("exporting %s to %s for llama.cpp (once)", target, path)
        model, tok = run.load(merge=True)
        write_gguf_file(unwrap_peft(model).eval(), tok, path, gguf_type, name=run.name)
        tok.save_pretrained(folder)
        del model
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(folder))
    return path, tok, run


def _digest(run: Any) -> str:
    """Names the export after what it was made from: the model folder's files (name, size, mtime)."""
    h = hashlib.sha256(str(run.model_dir or run.target).encode())
    folder = Path(run.model_dir) if run.model_dir else None
    if folder is not None and folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(str(run.base_model).encode())
    return h.hexdigest()[:16]


def load_llamacpp_slots(targets: list[str], gguf_type: str = DEFAULT_GGUF_TYPE, threads: int = 0,
                        n_ctx: int = 4096) -> dict[str, Slot]:
    """One slot per target, its model a llama.cpp `Llama` on the target's GGUF export."""
    from lmtailor.generate import retrieval_for

    if not targets:
        raise ConfigError("no model to serve", "give at least one run folder, model folder or model name")
    slots: dict[str, Slot] = {}
    for target in targets:
        path, tok, run = gguf_for(target, gguf_type)
        llm = llamacpp.load(path, n_ctx=n_ctx, threads=threads)
        positions = min(n_ctx, int(llm.n_ctx()))
        name, i = run.name, 2
        while name in slots:
            name, i = f"{run.name}-{i}", i + 1
        slots[name] = Slot(name, llm, tok, run.system_prompt, max_positions=positions,
                           retrieval=retrieval_for(run.config))
    return slots


class LlamaCppEngine(Engine):
    """The batching engine of `lmtailor.serve.engine` with llama.cpp decoding each row of a batch in turn."""

    def _run(self, batch: list[Job]) -> None:
        slot = batch[0].slot
        tok = slot.tok
        rows = [(job, i) for job in batch for i in range(len(job.prompts))]
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        sampling = batch[0].sampling
        for r, (job, i) in enumerate(rows):
            prompt = job.prompts[i]
            stopper = _Rows([(job, i)], len(prompt), tok, tok.eos_token_id, self.stats)
            ids = list(prompt)
            llm: Any
            with slot.active() as llm:
                if sampling.seed is not None:
                    llm.set_seed(sampling.seed + r)
                # ignore_eos: EOS is masked out of the logits, so the row runs to its max_tokens (benchmarks)
                # (llama-cpp-python iterates over logits_processor: a list of processors, never one alone)
                mask = [_NoEos(tok.eos_token_id)] if sampling.ignore_eos and tok.eos_token_id is not None else None
                for token in llm.generate(prompt, **_sampling_kwargs(sampling), reset=True, logits_processor=mask):
                    ids.append(int(token))
                    done = stopper(torch.tensor([ids]), torch.empty(0))
                    if bool(done[0]):
                        break
                    if len(ids) - len(prompt) >= job.max_tokens or len(ids) >= slot.max_positions:
                        break
            stopper.finish_rest([ids[len(prompt):]])


class _NoEos:
    """A llama-cpp-python logits processor: EOS can never be chosen."""

    def __init__(self, eos: int) -> None:
        self.eos = eos

    def __call__(self, input_ids: Any, scores: np.ndarray) -> np.ndarray:
        scores[self.eos] = -np.inf
        return scores


def _sampling_kwargs(sampling: Any) -> dict[str, Any]:
    """The torch engine's sampling (HF semantics) in llama-cpp-python's terms; min_p off, as in HF."""
    if sampling.temperature > 0:
        return {"temp": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k or 0,
                "min_p": 0.0, "repeat_penalty": sampling.repetition_penalty}
    # greedy: llama.cpp's sampler with temperature 0 takes the argmax
    return {"temp": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": sampling.repetition_penalty}


def engine_class(engine: str) -> type[Engine]:
    return LlamaCppEngine if engine == "llama.cpp" else Engine


__all__ = ["CPU_DEFAULT_ENGINE", "ENGINES", "LlamaCppEngine", "check_engine", "default_engine", "engine_class",
           "gguf_for", "load_llamacpp_slots"]
