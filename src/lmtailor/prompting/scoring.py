"""Batched scoring of prompts with a cache: label log-likelihoods (verbalizers) and free-text answers.

Label scoring runs each prompt once and reads the first answer token from its last position; the remaining
tokens of each verbalizer word run as short continuations on the prompt's KV cache. Prompts that share a prefix
(the system turn, the instruction, fixed few-shot examples) have that prefix computed once and reused for the
whole batch. Results are cached by (model, prompt token ids, answers), on disk in SQLite, so a repeated search
or comparison does not recompute them; `calls` counts the prompts the model really ran. While outputs are sealed
(`crypto.seal_outputs`: a prompt verb on encrypted data or a sealed run), the cache is a separate SQLite database
held in memory and written sealed (`scores.sqlite.enc`) after each update: generated answers may recite the data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from lmtailor import crypto
from lmtailor.errors import EncryptionError, ModelError
from lmtailor.io import cache_dir
from lmtailor.models import unwrap_peft
from lmtailor.render import IGNORE, tokenize_example

_log = logging.getLogger(__name__)


class ScoreCache:
    """(key -> JSON value) in SQLite; `path=None` keeps it in memory for this process only.

    With `key`, the database lives in memory and `path` is its sealed copy: read at the start, rewritten (sealed,
    atomically) after each `put_many`. A copy sealed with another key is left alone and this cache stays in memory.
    """

    def __init__(self, path: str | Path | None = None, key: crypto.Key | None = None) -> None:
        self.path = str(path) if path else ":memory:"
        self.key = key
        self.sealed: Path | None = None
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path if key is None else ":memory:", check_same_thread=False)
        if path and key is not None:
            self.sealed = Path(path)
            if self.sealed.is_file():
                try:
                    self._db.deserialize(crypto.read_bytes(self.sealed, key))
                except EncryptionError:
                    _log.warning("%s is sealed with another key (or damaged): scores are kept in memory only",
                                 self.sealed)
                    self.sealed = None
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = list(keys[start:start + 500])
                rows = self._db.execute(f"SELECT key, value FROM scores WHERE key IN ({','.join('?' * len(chunk))})",
                                        chunk).fetchall()
                out.update({k: json.loads(v) for k, v in rows})
        return out

    def put_many(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in values.items()])
            self._db.commit()
            if self.sealed is not None:
                crypto.write_bytes(self.sealed, self._db.serialize(), self.key)

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM scores").fetchone()[0])


def default_cache() -> ScoreCache:
    """The on-disk cache: plain, or while outputs are sealed, its sealed counterpart."""
    key = crypto.sealing_key()
    if key is None:
        return ScoreCache(cache_dir("prompt-scores") / "scores.sqlite")
    return ScoreCache(cache_dir("prompt-scores") / "scores.sqlite.enc", key)


def model_key(target: str, info: dict[str, Any] | None = None) -> str:
    """A cache key for a model: its folder(s) and the size and modification time of their weight files."""
    parts = [target]
    folders = [Path(target)]
    if info and info.get("adapter"):
        folders.append(Path(info["adapter"]))
    if info and info.get("base_model"):
        parts.append(str(info["base_model"]))
    for folder in folders:
        if folder.is_dir():
            for f in sorted(folder.rglob("*.safetensors")):
                st = f.stat()
                parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def answer_ids(tok: Any, text: str) -> list[int]:
    """Token ids of `text` written as an assistant answer, end-of-turn included: exactly what training supervises."""
    from lmtailor.data.example import Example

    seq = tokenize_example(tok, Example(messages=[{"role": "user", "content": "x"},
                                                  {"role": "assistant", "content": text}]), max_length=10**6)[0]
    return [t for t, lab in zip(seq.input_ids, seq.labels, strict=True) if lab != IGNORE]


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


class Scorer:
    """Scores prompts with one causal LM (a base model, a LoRA run or a soft-prompt run).

    Args:
        model: a transformers causal LM, possibly a PEFT model.
        tok: its tokenizer.
        key: identifies the model in the cache (see model_key).
        cache: where scores are kept (default: an in-memory cache).
        batch_size: prompts per forward pass.
    """

    def __init__(self, model: Any, tok: Any, key: str, cache: ScoreCache | None = None, batch_size: int = 16,
                 progress: bool = False) -> None:
        hf = unwrap_peft(model)
        if getattr(hf.config, "is_encoder_decoder", False):
            raise ModelError("prompting scores causal (decoder-only) language models",
                             "give a decoder model such as smollm2-135m-instruct")
        self.model, self.tok, self.key = model, tok, key
        self.cache = cache if cache is not None else ScoreCache()  # an empty cache is falsy
        self.batch_size = batch_size
        self.progress = progress
        self.calls = 0  # prompts the model actually ran (cache misses)
        # Soft prompts (PEFT prompt learning) only work through the PEFT model's own forward.
        peft_cfg = getattr(model, "active_peft_config", None)
        self.prompt_learning = bool(getattr(peft_cfg, "is_prompt_learning", False))
        self.device = next(model.parameters()).device

    # ---- labels -------------------------------------------------------------------------------------------------

    def label_scores(self, prompts: Sequence[list[int]], words: Sequence[Sequence[str]]) -> list[list[float]]:
        """Log-likelihood of each label's answer after each prompt.

        Args:
            prompts: prompt token ids (from render.prompt_ids).
            words: per label, its verbalizer words; a label's score is the log of the summed probability of its
                words, each written as a whole assistant answer (end-of-turn included).

        Returns:
            (len(prompts), len(words)) log-likelihoods.
        """
        answers = [[answer_ids(self.tok, w) for w in ws] for ws in words]
        tag = json.dumps(answers)
        keys = [self._key("labels", p, tag) for p in prompts]
        found = self.cache.get_many(sorted(set(keys)))
        todo = {k: p for k, p in zip(keys, prompts, strict=True) if k not in found}
        if todo:
            flat = [a for ans in answers for a in ans]
            todo_keys = list(todo)
            logps = self._answer_logprobs([todo[k] for k in todo_keys], flat)
            new: dict[str, Any] = {}
            for k, row in zip(todo_keys, logps, strict=True):
                out, j = [], 0
                for ans in answers:
                    out.append(float(torch.logsumexp(torch.tensor(row[j:j + len(ans)]), 0)))
                    j += len(ans)
                new[k] = out
            self.cache.put_many(new)
            found.update(new)
        return [found[k] for k in keys]

    def _key(self, kind: str, prompt: Sequence[int], extra: str) -> str:
        h = hashlib.sha256(f"{self.key}\0{kind}\0{extra}\0".encode())
        h.update(json.dumps(list(prompt)).encode())
        return h.hexdigest()

    @torch.inference_mode()
    def _answer_logprobs(self, prompts: list[list[int]], answers: list[list[int]]) -> list[list[float]]:
        """(P, A) sum of log-probabilities of each answer's tokens after each prompt."""
        self.calls += len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
        out: list[list[float]] = [[] for _ in prompts]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        prefix, share = None, 0
        if not self.prompt_learning:
            share = _common_prefix(prompts) if len(prompts) > 1 else 0
            share = min(share, min(len(p) for p in prompts) - 1)
            prefix = self._prefix_cache(prompts[0][:share]) if share >= 8 else None
        for batch in tqdm(batches, desc="scoring", unit="batch", disable=not self.progress, leave=False):
            rows = [prompts[i] for i in batch]
            scores = (self._batch_full(rows, answers) if self.prompt_learning else
                      self._batch_cached(rows, answers, prefix, share if prefix else 0))
            for i, row in zip(batch, scores, strict=True):
                out[i] = row
        return out

    def _backbone_head(self) -> tuple[Any, Any]:
        hf = unwrap_peft(self.model)
        return hf.base_model, hf.get_output_embeddings()

    def _prefix_cache(self, prefix: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        backbone, _ = self._backbone_head()
        ids = torch.tensor([prefix], device=self.device)
        cache = backbone(input_ids=ids, use_cache=True).past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _batch_cached(self, rows: list[list[int]], answers: list[list[int]],
                      prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, share: int) -> list[list[float]]:
        from transformers import DynamicCache

        backbone, head = self._backbone_head()
        config = unwrap_peft(self.model).config
        b = len(rows)
        suffixes = [r[share:] for r in rows]
        width = max(len(s) for s in suffixes)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        # Left padding: every prompt ends in the last column, where the first answer token is read.
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in suffixes], device=self.device)  # (B, W)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=self.device)
        pos = torch.stack([torch.cat([torch.zeros(width - len(s), dtype=torch.long),
                                      torch.arange(share, share + len(s))]) for s in suffixes]).to(self.device)
        full_mask = torch.cat([torch.ones(b, share, dtype=mask.dtype, device=self.device), mask], dim=1)
        cache = DynamicCache(config=config)
        if prefix is not None:
            cache = DynamicCache([(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in prefix],
                                 config=config)
        hidden = backbone(input_ids=ids, attention_mask=full_mask, position_ids=pos, past_key_values=cache,
                          use_cache=True).last_hidden_state  # (B, W, H)
        first = torch.log_softmax(head(hidden[:, -1]).float(), dim=-1)  # (B, V)
        ends = torch.tensor([share + len(s) for s in suffixes], device=self.device)  # next position per row
        scores = torch.zeros(b, len(answers))
        for j, ans in enumerate(answers):
            total = first[:, ans[0]].cpu()
            if len(ans) > 1:
                cont = torch.tensor([ans[:-1]] * b, device=self.device)  # (B, n-1)
                cpos = ends[:, None] + torch.arange(len(ans) - 1, device=self.device)[None]
                cmask = torch.cat([full_mask, torch.ones_like(cont)], dim=1)
                h = backbone(input_ids=cont, attention_mask=cmask, position_ids=cpos, past_key_values=cache,
                             use_cache=True).last_hidden_state  # (B, n-1, H)
                logp = torch.log_softmax(head(h).float(), dim=-1)  # (B, n-1, V)
                target = torch.tensor(ans[1:], device=self.device)
                total = total + logp.gather(2, target[None, :, None].expand(b, -1, 1)).squeeze(-1).sum(1).cpu()
                cache.crop(-(len(ans) - 1))  # back to the prompt for the next answer
            scores[:, j] = total
        return scores.tolist()

    def _batch_full(self, rows: list[list[int]], answers: list[list[int]]) -> list[list[float]]:
        """Through the (PEFT) model's own forward: one padded sequence per (prompt, answer)."""
        seqs = [(i, j, r + a) for i, r in enumerate(rows) for j, a in enumerate(answers)]
        width = max(len(s) for _, _, s in seqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for _, _, s in seqs], device=self.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for _, _, s in seqs], device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -width:]  # virtual tokens come first
        logp = torch.log_softmax(logits.float(), dim=-1)
        scores = torch.zeros(len(rows), len(answers))
        for n, (i, j, _) in enumerate(seqs):
            start = len(rows[i])
            ans = torch.tensor(answers[j], device=self.device)
            pos = torch.arange(start - 1, start - 1 + len(answers[j]), device=self.device)
            scores[i, j] = float(logp[n, pos, ans].sum())
        return scores.tolist()

    # ---- free text ----------------------------------------------------------------------------------------------

    def generate(self, messages: Sequence[list[dict[str, str]]], max_new_tokens: int,
                 stop: Sequence[str] = ()) -> list[str]:
        """Greedy answers to conversations, cached by prompt ids and decoding settings."""
        from lmtailor.config import GenerationSettings
        from lmtailor.generate import generate
        from lmtailor.render import prompt_ids

        ids = [prompt_ids(self.tok, m) for m in messages]
        tag = json.dumps({"max_new_tokens": max_new_tokens, "stop": list(stop)})
        keys = [self._key("generate", p, tag) for p in ids]
        found = self.cache.get_many(sorted(set(keys)))
        todo = [i for i, k in enumerate(keys) if k not in found]
        if todo:
            self.calls += len(todo)
            settings = GenerationSettings(max_new_tokens=max_new_tokens, stop=list(stop), batch_size=self.batch_size)
            texts = generate(self.model, self.tok, [messages[i] for i in todo], settings, progress=self.progress)
            new = {keys[i]: t for i, t in zip(todo, texts, strict=True)}
            self.cache.put_many(new)
            found.update(new)
        return [found[k] for k in keys]


def normalize_label_scores(scores: list[float]) -> list[float]:
    """Log-probabilities renormalized over the labels (log-softmax)."""
    m = max(scores)
    z = m + math.log(sum(math.exp(s - m) for s in scores))
    return [s - z for s in scores]
