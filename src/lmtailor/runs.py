"""One way to open what lmtailor loads for inference: a run folder, a model folder, or a model name.

    run = Run.open("runs/my-run")   # reads config.yaml, adapter_config.json and config.json once
    model, tok = run.load()         # weights through models.load_pretrained / load_adapter (safetensors only)

A run trained with `encrypt_outputs` holds encrypted files under their usual names; `Run` reads them with the key
its config's `privacy` section names (lmtailor.crypto), and `load` decrypts the model folder into RAM for the moment
transformers reads it.

What the model is (causal LM, sequence classifier, seq2seq, masked LM) is read from the files a run or model
folder holds, never from the objective that trained it, so this module sits just above `models` and imports
nothing from the stages above it (objectives, tasks, train, evaluate, generate, serve, export, cli).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmtailor import crypto
from lmtailor.errors import CheckpointError
from lmtailor.models import (
    AUTO_CLASSES,
    BUNDLED,
    check_safe_weights,
    load_adapter,
    load_model_config,
    load_pretrained,
    load_tokenizer,
    resolve_model,
)

__all__ = ["AUTO_CLASSES", "Run", "read_config"]

# PEFT's task_type of an adapter -> model kind. CAUSAL_LM (or none) is decided by the base model instead, because
# models.add_lora tags a masked LM's adapter CAUSAL_LM (PEFT has no masked-LM task type).
ADAPTER_KINDS = {"SEQ_CLS": "seq-cls", "SEQ_2_SEQ_LM": "seq2seq"}

OPEN_HINT = ("give a run folder written by `lmtailor train` (model/ and config.yaml), a model folder (config.json "
             f"or adapter_config.json), a .gguf file, a hub id, or a bundled name: {', '.join(BUNDLED)}")


SECTIONS = ("data", "privacy", "lora", "soft_prompt", "pretrain", "eval", "generation", "classify", "seq2seq", "mlm",
            "span", "clm")


def read_config(folder: Path) -> dict[str, Any]:
    """The resolved config.yaml a run wrote in `folder`, or {} when there is none."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    from lmtailor.config import load_yaml

    try:
        loaded = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text", "restore the config.yaml `lmtailor train` wrote") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not valid YAML: {str(e).splitlines()[0]}",
                              "restore the config.yaml `lmtailor train` wrote") from e
    if loaded is None:
        return {}
    fix = "restore the config.yaml `lmtailor train` wrote"
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path} is not a recipe: a {type(loaded).__name__}, not a mapping of keys", fix)
    for key, value in loaded.items():  # a section (data:, privacy:, lora: ...) that is not a mapping
        if key in SECTIONS and value is not None and not isinstance(value, dict):
            raise CheckpointError(f"{path}: key '{key}' is a {type(value).__name__}, not a section of keys", fix)
    for key in ("base_model", "objective"):
        if loaded.get(key) is not None and not isinstance(loaded[key], str):
            raise CheckpointError(f"{path}: key '{key}' is a {type(loaded[key]).__name__}, not a name", fix)
    return loaded


def _read_json(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(crypto.read_bytes(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}", "restore the file, or retrain the run") from e
    return loaded if isinstance(loaded, dict) else {}


def keys_of(config: dict[str, Any]) -> crypto.KeySource:
    """The key source a run's config.yaml names (privacy.key_env / key_file / passphrase_env), else the default."""
    privacy = config.get("privacy") or {}
    return crypto.KeySource(key_env=privacy.get("key_env") or crypto.DEFAULT_KEY_ENV,
                            key_file=privacy.get("key_file"), passphrase_env=privacy.get("passphrase_env"))


def config_kind(cfg: dict[str, Any]) -> str:
    """Model kind (a key of AUTO_CLASSES) from a config.json's architectures and is_encoder_decoder."""
    archs = [str(a) for a in cfg.get("architectures") or []]
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "seq-cls"
    # Multimodal decoders are also called ...ForConditionalGeneration; they nest their text model in text_config.
    if cfg.get("is_encoder_decoder") or ("text_config" not in cfg and any(
            a.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) for a in archs)):
        return "seq2seq"
    if any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in archs):
        return "masked-lm"
    return "causal-lm"


def _folder_kind(folder: Path) -> str | None:
    cfg = folder / "config.json"
    return config_kind(_read_json(cfg)) if cfg.is_file() else None


def _looks_like_path(target: str) -> bool:
    """A target that can only mean a local path (so a missing one is an error, not a hub id)."""
    path = Path(target).expanduser()
    if target.startswith((".", "/", "~")) or target.count("/") > 1 or path.exists():
        return True
    # "runs/my-run" while runs/ exists here: a mistyped run folder, not a hub id of an organization called "runs"
    return path.parent != Path(".") and path.parent.is_dir()


@dataclass(frozen=True)
class Run:
    """What one run folder, model folder or model name holds, read once by `Run.open`.

    Attributes:
        target: what was opened, as given.
        path: the run or model folder (None for a model name).
        model_dir: the folder holding the weights or the adapter (None for a hub id).
        config: the run's resolved config.yaml ({} when there is none).
        objective: the objective the run trained with (None for plain models).
        base_model: the model the run started from (the model itself for a plain model).
        adapter: whether model_dir holds a PEFT adapter to put on base_model.
        system_prompt: the system prompt the run trained with (data.system_prompt).
        name: a short name (the folder's name, or the model name).
        kind: causal-lm, seq-cls, seq2seq or masked-lm (a key of AUTO_CLASSES), read from the files.
    """

    target: str
    path: Path | None
    model_dir: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    base_model: str = ""
    adapter: bool = False
    system_prompt: str | None = None
    name: str = ""
    kind: str = "causal-lm"

    @classmethod
    def open(cls, target: str | Path) -> Run:
        """Open a run folder, a model folder or a model name (bundled name, .gguf file, hub id).

        Raises:
            CheckpointError: a missing folder, or a folder that is neither a run nor a model.
            ModelError: a bundled model that is not installed, a missing .gguf file.
        """
        text = str(target)
        path = Path(text).expanduser()
        if text in BUNDLED or path.suffix == ".gguf" or not _looks_like_path(text):
            return cls._open_name(text)
        if not path.exists():
            raise CheckpointError(f"no such run or model folder: {text}", OPEN_HINT)
        if not path.is_dir():
            raise CheckpointError(f"{text} is a file, not a run or model folder", OPEN_HINT)
        if (path / "model").is_dir():
            folder = path / "model"
            if not ((folder / "config.json").is_file() or (folder / "adapter_config.json").is_file()):
                raise CheckpointError(f"no model in {folder} (config.json and adapter_config.json missing)",
                                      "the run may not have finished: train it again, or give another run folder")
        elif (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
            folder = path
        else:
            raise CheckpointError(f"{text} is neither a run folder nor a model folder", OPEN_HINT)
        config = read_config(path)
        with crypto.use_keys(keys_of(config)):
            return cls._open_folder(text, path, folder, config)

    @classmethod
    def _open_folder(cls, text: str, path: Path, folder: Path, config: dict[str, Any]) -> Run:
        adapter_file = folder / "adapter_config.json"
        adapter = adapter_file.is_file()
        if adapter:
            adapter_cfg = _read_json(adapter_file)
            base = str(config.get("base_model") or adapter_cfg.get("base_model_name_or_path") or "")
            if not base:
                raise CheckpointError(f"{adapter_file} does not name its base model (base_model_name_or_path)",
                                      "set it to the model the adapter was trained on")
            base_kind = _folder_kind(Path(base)) if Path(base).is_dir() else None
            kind = ADAPTER_KINDS.get(str(adapter_cfg.get("task_type"))) or (
                base_kind if base_kind in ("masked-lm", "seq2seq") else "causal-lm")
        else:
            base = str(config.get("base_model") or folder)
            kind = _folder_kind(folder) or "causal-lm"
        return cls(target=text, path=path, model_dir=folder, config=config, objective=config.get("objective"),
                   base_model=base, adapter=adapter, system_prompt=(config.get("data") or {}).get("system_prompt"),
                   name=path.resolve().name, kind=kind)

    @classmethod
    def _open_name(cls, name: str) -> Run:
        folder = resolve_model(name)  # a bundled name or .gguf becomes a converted folder; a hub id stays a name
        model_dir = Path(folder) if Path(folder).is_dir() else None
        kind = (_folder_kind(model_dir) if model_dir else None) or "causal-lm"
        return cls(target=name, path=None, model_dir=model_dir, base_model=name, name=name, kind=kind)

    @property
    def auto_class(self) -> str:
        """The transformers Auto class that loads this kind of model."""
        return AUTO_CLASSES[self.kind]

    @property
    def info(self) -> dict[str, Any]:
        """The dict the old loaders returned: base_model, adapter (its folder or None), system_prompt, name."""
        return {"base_model": self.base_model, "adapter": str(self.model_dir) if self.adapter else None,
                "system_prompt": self.system_prompt, "name": self.name, "objective": self.objective,
                "kind": self.kind}

    def load(self, dtype: torch.dtype = torch.float32, merge: bool = False, *, trust_remote_code: bool = False,
             allow_pickle: bool = False) -> tuple[nn.Module, Any]:
        """Load (model in eval mode, tokenizer) through the guarded loaders.

        Args:
            dtype: parameter dtype.
            merge: merge an adapter into its base weights (the result is a plain transformers model).
            trust_remote_code: let the base model run its own code (never read from the run's files).
            allow_pickle: also read .bin/.pt weights (model or adapter).

        Raises:
            CheckpointError: pickle-only weights, or an adapter that does not fit its base.
            ModelError / OfflineError: the base model cannot be loaded.
        """
        if self.model_dir is not None and crypto.has_encrypted_files(self.model_dir):
            # transformers reads only files: decrypt into RAM, load, and let the plaintext go at once.
            with self._plain_model_dir() as plain:
                return replace(self, model_dir=plain).load(dtype, merge, trust_remote_code=trust_remote_code,
                                                          allow_pickle=allow_pickle)
        guard = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        if self.adapter:
            assert self.model_dir is not None
            check_safe_weights(str(self.model_dir), allow_pickle)  # before the base model loads, not after
            extra: dict[str, Any] = {}
            if self.kind == "seq-cls" and (self.model_dir / "config.json").is_file():
                # A classification adapter keeps its base's config with id2label/label2id: build the head from it.
                extra["config"] = load_model_config(str(self.model_dir), trust_remote_code)
            base = load_pretrained(self.base_model, self.auto_class, dtype=dtype, **guard, **extra)
            model = load_adapter(base, self.model_dir, allow_pickle=allow_pickle)
            if merge:
                model = model.merge_and_unload()  # type: ignore[operator]
        else:
            model = load_pretrained(str(self.model_dir or self.target), self.auto_class, dtype=dtype, **guard)
        model.eval()
        return model, self.load_tokenizer(trust_remote_code)

    def add_adapter_to(self, model: nn.Module, adapter_name: str, allow_pickle: bool = False) -> None:
        """Put this run's adapter on an already loaded PeftModel under `adapter_name` (several runs, one base)."""
        assert self.model_dir is not None and self.adapter
        if crypto.has_encrypted_files(self.model_dir):
            with self._plain_model_dir() as plain:
                load_adapter(model, plain, adapter_name=adapter_name, allow_pickle=allow_pickle)
        else:
            load_adapter(model, self.model_dir, adapter_name=adapter_name, allow_pickle=allow_pickle)

    @property
    def keys(self) -> crypto.KeySource:
        """Where the key of this run's encrypted files comes from (its config's privacy section)."""
        return keys_of(self.config)

    @contextlib.contextmanager
    def _plain_model_dir(self) -> Iterator[Path]:
        assert self.model_dir is not None
        with crypto.plain_staging() as tmp:
            yield crypto.decrypt_tree(self.model_dir, tmp / "model", self.keys)

    def load_tokenizer(self, trust_remote_code: bool = False) -> Any:
        """The run's own tokenizer when its folder holds one, else its base model's."""
        if self.model_dir is not None and crypto.has_encrypted_files(self.model_dir):
            with self._plain_model_dir() as plain:
                return replace(self, model_dir=plain).load_tokenizer(trust_remote_code)
        own = self.model_dir is not None and any(
            (self.model_dir / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))
        source = str(self.model_dir) if own else self.base_model
        # A masked LM's tokenizer has no chat template or EOS to prepare; every other kind renders chats.
        return load_tokenizer(source, trust_remote_code, chat=self.kind != "masked-lm")
