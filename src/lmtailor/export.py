"""Export a run: LoRA merged into its base as a plain HF safetensors folder, or one GGUF file for llama.cpp.

    lmtailor export runs/my-run --format merged --out my-model/
    lmtailor export runs/my-run --format gguf --out my-model.gguf [--gguf-type q8_0|q4_k_m] [--ollama]

Both are written atomically (a reader sees the old output or the complete new one). A GGUF file is checked
by loading it back and comparing its logits with the source model on a fixed text: with llama.cpp itself when
llama-cpp-python is installed, else with transformers' GGUF reader. `GGUF_TOLERANCE` is the largest allowed
rms logit difference relative to the source logits' spread. q4_k_m is made by llama.cpp's own quantizer from
an f16 file (llama-cpp-python required). `--ollama` writes an Ollama Modelfile beside the GGUF file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lmtailor import llamacpp
from lmtailor.errors import ConfigError, ModelError
from lmtailor.ggufwrite import WRITTEN_HERE, write_gguf_file
from lmtailor.outputs import check_output, replacing

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")
GGUF_TYPES = ("f16", "q8_0", "q4_k_m")
# rms(logit(gguf) - logit(source)) / std(logit(source)) over every position and vocabulary entry of CHECK_TEXT.
# Measured (transformers reader): bundled 135M model f16 0.0007, q8_0 0.031 (top-1 agreement 100%).
GGUF_TOLERANCE = {"f16": 0.01, "q8_0": 0.08, "q4_k_m": 0.35}
CHECK_TEXT = ("To list the files in a folder, run ls -la. To count the lines of a file, run wc -l file.txt. "
              "The quick brown fox jumps over the lazy dog.")


def export_run(run: str | Path, fmt: Literal["merged", "gguf"], out: str | Path, gguf_type: str = "f16",
               verify: bool = True, force: bool = False, ollama: bool = False) -> dict[str, Any]:
    """Export a run folder (adapter or full model), a model folder or a model name.

    Args:
        run: what to export; an adapter is merged into its base first.
        fmt: "merged" (HF folder: config.json, model.safetensors, tokenizer files) or "gguf" (one file).
        out: the folder (merged) or file (gguf) to write; an existing one is an error unless `force`.
        gguf_type: "f16", "q8_0" or "q4_k_m" (GGUF only; 1-D tensors stay f32, as llama.cpp expects).
        verify: GGUF only: reload the file and compare logits with the source (raises if off tolerance).
        force: replace an existing output, keeping it as `NAME.bak-<time>` (lmtailor.outputs).
        ollama: GGUF only: also write an Ollama Modelfile beside the file (`lmtailor.ollama`).

    Returns:
        A summary: path, format, size in bytes and, for GGUF, the logit check.

    Raises:
        ConfigError: unknown format or GGUF type, an output that exists (without force) or cannot be written.
        ModelError: the architecture cannot be written as GGUF,
        or the GGUF file read back does not match the source.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format '{fmt}'", f"choose one of: {', '.join(FORMATS)}")
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"unknown GGUF type '{gguf_type}'", f"choose one of: {', '.join(GGUF_TYPES)}")
    if fmt == "gguf" and gguf_type not in WRITTEN_HERE:
        llamacpp.llama_cpp()  # k-quants need llama.cpp's quantizer: fail before loading the model
    out = Path(out)
    if fmt == "gguf" and out.suffix != ".gguf":
        out = out / f"{Path(run).name}-{gguf_type}.gguf" if out.is_dir() else out.with_suffix(".gguf")
    inputs = (run,) if Path(run).expanduser().exists() else ()
    check_output(out, force, folder=fmt == "merged", inputs=inputs)  # before the minutes of loading and merging
    model, tok, info = load_merged(run)
    if fmt == "merged":
        from lmtailor.models import save_model

        with replacing(out, force):
            save_model(model, tok, out)
        size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
        return {"format": "merged", "path": str(out), "bytes": size, "base_model": info["base_model"],
                "merged_adapter": info.get("adapter")}
    with replacing(out, force):
        write_gguf_file(model, tok, out, gguf_type, name=Path(run).name)
    summary: dict[str, Any] = {"format": "gguf", "gguf_type": gguf_type, "path": str(out),
                               "bytes": out.stat().st_size, "base_model": info["base_model"]}
    if verify:
        check = compare_gguf(out, model, tok)
        summary["check"] = check
        if check["rms_rel_diff"] > GGUF_TOLERANCE[gguf_type]:
            raise ModelError(f"the GGUF file read back differs from the source: rms(dlogit)/std(logit) = "
                             f"{check['rms_rel_diff']:.4f} > {GGUF_TOLERANCE[gguf_type]} ({out})")
    if ollama:
        from lmtailor.ollama import write_modelfile

        positions = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        summary["modelfile"] = str(write_modelfile(out, tok, info.get("system_prompt"), min(positions, 8192)))
    return summary


def load_merged(target: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """fp32 model with any LoRA adapter merged in, its tokenizer and info (`Run.info`)."""
    from lmtailor.models import unwrap_peft
    from lmtailor.runs import Run

    run = Run.open(target)
    model, tok = run.load(merge=True)
    model = unwrap_peft(model)
    assert not hasattr(model, "peft_config") or not getattr(model, "peft_config", None), "adapter left unmerged"
    return model.eval(), tok, run.info


@torch.inference_mode()
def compare_gguf(path: str | Path, source: nn.Module, tok: Any, text: str = CHECK_TEXT,
                 reader: str = "auto") -> dict[str, Any]:
    """Load `path` and compare its logits with `source` on `text` (tokenized by the HF tokenizer).

    Args:
        reader: "llama.cpp" (llama-cpp-python), "transformers" (its GGUF reader) or "auto" (llama.cpp if
            installed).

    Returns max |Δlogit|, rms(Δlogit) / std(source logits) (the checked figure), max |Δlogit| / std, the
    top-1 agreement over positions, the perplexity of `text` under both and which reader was used.
    """
    path = Path(path)
    if reader == "auto":
        reader = "llama.cpp" if llamacpp.available() else "transformers"
    ids = list(tok(text, add_special_tokens=True)["input_ids"])
    ref = source.float()(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
    if reader == "llama.cpp":
        llm = llamacpp.load(path, n_ctx=max(64, len(ids) + 8), logits_all=True)
        try:
            got = torch.from_numpy(llamacpp.logits(llm, ids))[:, : ref.shape[-1]]  # (T, V)
        finally:
            llm.close()
    else:
        got = _transformers_logits(path, ids)
    delta = got - ref
    std = ref.std().item()
    return {"reader": reader, "max_abs_diff": delta.abs().max().item(),
            "rms_rel_diff": delta.pow(2).mean().sqrt().item() / std, "max_rel_diff": delta.abs().max().item() / std,
            "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(), "tokens": len(ids),
            "perplexity": llamacpp.perplexity(got.numpy(), ids), "source_perplexity": llamacpp.perplexity(
                ref.numpy(), ids)}


def _transformers_logits(path: Path, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    try:
        # Not through models.load_pretrained on purpose: this reads back the GGUF file just written, with
        # transformers' GGUF reader, which parses GGUF tensors (no pickle, no model code).
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    except Exception as e:  # the GGUF reader raises many kinds of errors
        raise ModelError(f"transformers cannot read back {path}: {e}") from e
    return loaded(input_ids=torch.tensor([ids])).logits[0]  # (T, V)
