"""Pretraining objectives: masked LM (with optional NSP) for encoders, span corruption for encoder-decoders, and
the pretraining side of causal LM (models from scratch, the token cache, depth pruning and RoPE scaling).

Masking randomness: during training, collate draws from the global torch RNG, which the loop checkpoints, so a
resumed run masks exactly as the uninterrupted one. Under no_grad/inference (validation), it uses a generator
seeded from cfg.seed, so every evaluation scores the same masks and validation losses are comparable.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmtailor.config import RunConfig
from lmtailor.data.example import Example
from lmtailor.errors import ConfigError
from lmtailor.models import unwrap_peft
from lmtailor.objectives import OBJECTIVES, evaluate_causal, load_causal_lm, prepare_render, register_objective
from lmtailor.pretrain.corpus import _blocks, cached_corpus, doc_text, token_cache
from lmtailor.render import IGNORE, Tokenized


def _texts(examples: Sequence[Example]) -> list[str]:
    return [doc_text(ex) for ex in examples]


def _generator(cfg: RunConfig) -> torch.Generator | None:
    return None if torch.is_grad_enabled() else torch.Generator().manual_seed(cfg.seed)


def prepare_blocks(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool = True
                   ) -> tuple[Any, dict[str, Any]]:
    """The corpus as consecutive max_length-token blocks (documents joined by EOS): from the cache or in memory."""
    texts = _texts(examples)
    if not texts:
        return [], {"blocks": 0}
    if cfg.pretrain.cache:
        blocks = token_cache(lambda: texts, tok, cfg.max_length)
        return blocks, {"blocks": len(blocks), "tokens": blocks.n_tokens, "cache": str(blocks.path),
                        "cache_reused": blocks.reused}
    items = [Tokenized(ids, list(ids), f"block {i}") for i, ids in enumerate(_blocks(texts, tok, cfg.max_length))]
    return items, {"blocks": len(items), "tokens": sum(len(s.input_ids) for s in items)}


def prepare_cached(tok: Any, cfg: RunConfig, run_dir: str | Path | None = None
                   ) -> tuple[Any, Any, Any, dict[str, Any], dict[str, Any]]:
    """The streamed counterpart of `load_datasets` + `prepare` for a run with pretrain.cache (see `streams_corpus`).

    Returns:
        (train items, validation items, validation examples, data stats, privacy audit): the items and examples are
        sequences read from the memory-mapped cache (see `cached_corpus`); the audit is also written to
        `<run_dir>/privacy_audit.json` when the run scrubs and `run_dir` is given.
    """
    if cfg.objective == "mlm":
        _check_mask(tok)
    _check_context(cfg)
    corpus = cached_corpus(cfg, tok)
    if corpus.audit and run_dir is not None:
        from lmtailor.io import atomic_write_json

        atomic_write_json(Path(run_dir) / "privacy_audit.json", corpus.audit)
    return corpus.train, corpus.val, corpus.val_examples, corpus.stats, corpus.audit


def count_labels(batch: dict[str, torch.Tensor]) -> int:
    n = int((batch["labels"] != IGNORE).sum())
    return n + (batch["next_sentence_label"].numel() if "next_sentence_label" in batch else 0)


def _check_context(cfg: RunConfig) -> None:
    s = cfg.pretrain.scratch
    if s is not None and cfg.max_length > s.context:
        raise ConfigError(f"max_length ({cfg.max_length}) exceeds pretrain.scratch.context ({s.context})",
                          "lower max_length or raise the model's context")


# ---- causal LM: from scratch, cache, structure ----------------------------------------------------------------

def load_clm(cfg: RunConfig, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """A causal LM: built from `pretrain.scratch` or loaded from base_model, then pruned / RoPE-scaled if asked."""
    from lmtailor.pretrain.structure import keep_first_layers, scale_rope

    p = cfg.pretrain
    if p.scratch is not None:
        from lmtailor.pretrain.scratch import load_scratch

        if p.scratch.arch != "llama":
            raise ConfigError(f"objective clm needs a decoder, got pretrain.scratch.arch={p.scratch.arch!r}",
                              "use arch: llama, or objective mlm (bert) / span (t5)")
        _check_context(cfg)
        model, tok = load_scratch(p.scratch, dtype, seed=cfg.seed)
    else:
        model, tok = load_causal_lm(cfg, dtype)
    config: Any = model.config
    if p.keep_layers:
        before = config.num_hidden_layers
        keep_first_layers(model, p.keep_layers)
        print(f"depth pruning: kept the first {p.keep_layers} of {before} layers")
    if p.rope_factor:
        scale_rope(model, p.rope_factor)
        print(f"RoPE scaling: linear x{p.rope_factor:g}, max positions {config.max_position_embeddings}")
    return model, tok


def prepare_clm(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool
                ) -> tuple[Any, dict[str, Any]]:
    if cfg.pretrain.cache:
        return prepare_blocks(tok, examples, cfg)
    return prepare_render(tok, examples, cfg, train_on_prompt)


def evaluate_clm(model: nn.Module, tok: Any, items: list[Any], examples: list[Example], cfg: RunConfig,
                 label: str = "", progress: bool = True) -> dict[str, Any]:
    out = evaluate_causal(model, tok, items, examples, cfg, label=label, progress=progress)
    if cfg.pretrain.eval_context and examples:
        from lmtailor.pretrain.perplexity import sliding_window_perplexity

        context = cfg.pretrain.eval_context
        out["window_perplexity"] = sliding_window_perplexity(model, tok, _texts(examples), context,
                                                             cfg.pretrain.eval_stride or max(1, context // 2))
    return out


# ---- masked LM ------------------------------------------------------------------------------------------------

def word_start_table(tok: Any) -> torch.Tensor:
    """(V,) bool: the token begins a word (byte-level BPE 'Ġ', SentencePiece '▁', WordPiece not '##'), or is special."""
    vocab = tok.get_vocab()
    starts = torch.zeros(max(len(tok), max(vocab.values()) + 1), dtype=torch.bool)
    wordpiece = any(t.startswith("##") for t in list(vocab)[:5000])
    for text, i in vocab.items():
        starts[i] = (not text.startswith("##")) if wordpiece else text.startswith(("Ġ", "▁", "Ċ"))
    starts[list(tok.all_special_ids)] = True
    return starts


def mask_tokens(ids: torch.Tensor, special: torch.Tensor, mask_id: int, vocab_size: int, p: float = 0.15,
                generator: torch.Generator | None = None, word_start: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: select p of the non-special tokens (or whole words); of those 80% -> mask, 10% -> random, 10% kept.

    Args:
        ids: (B, T) token ids. special: (B, T) bool, never selected (padding, <cls>, <sep>, ...).
        word_start: (B, T) bool, where a word begins; when given, a word is selected or not as a whole.

    Returns:
        (inputs, labels): labels hold the original id where selected and -100 elsewhere.
    """
    draw = torch.rand(ids.shape, generator=generator)  # (B, T)
    if word_start is None:
        selected = draw < p
    else:
        word = word_start.long().cumsum(-1)  # (B, T) word number per position (0 for a row's leading partial word)
        chosen = ((draw < p) & word_start).long()  # the draw at a word's first token decides for the word
        by_word = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long)
        by_word.scatter_reduce_(1, word, chosen, reduce="amax")
        selected = by_word.gather(1, word).bool()
    selected &= ~special
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    how = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[selected & (how < 0.8)] = mask_id
    swap = selected & (how >= 0.8) & (how < 0.9)
    inputs[swap] = torch.randint(vocab_size, ids.shape, generator=generator)[swap]
    return inputs, labels


@dataclass
class PairItem:
    """A sentence pair for next-sentence prediction: <cls> A <sep> B <sep>; next_label 1 if B is a random segment."""

    input_ids: list[int]
    token_type_ids: list[int]
    next_label: int


def prepare_pairs(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool = True
                  ) -> tuple[list[PairItem], dict[str, Any]]:
    """NSP pairs: consecutive segments of a document (label 0) or a segment and one from elsewhere (label 1)."""
    half = (cfg.max_length - 3) // 2
    docs = [[ids[i:i + half] for i in range(0, len(ids), half)]
            for ids in tok(_texts(examples), add_special_tokens=False)["input_ids"]]
    segments = [s for d in docs for s in d]
    rng = random.Random(cfg.seed)
    items: list[PairItem] = []
    for doc in docs:
        for a, b in zip(doc, doc[1:], strict=False):
            label = int(rng.random() < 0.5 and len(segments) > len(doc))
            while label:
                b = rng.choice(segments)
                if not any(b is s for s in doc):
                    break
            ids = [tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id]
            items.append(PairItem(ids, [0] * (len(a) + 2) + [1] * (len(b) + 1), label))
    return items, {"pairs": len(items), "random_pairs": sum(i.next_label for i in items),
                   "tokens": sum(len(i.input_ids) for i in items)}


def prepare_mlm(tok: Any, examples: list[Example], cfg: RunConfig, train_on_prompt: bool = True
                ) -> tuple[Any, dict[str, Any]]:
    _check_mask(tok)
    _check_context(cfg)
    return prepare_pairs(tok, examples, cfg) if cfg.pretrain.nsp else prepare_blocks(tok, examples, cfg)


def _check_mask(tok: Any) -> None:
    if tok.mask_token_id is None:
        raise ConfigError("objective mlm needs a tokenizer with a mask token",
                          "train the tokenizer with `lmtailor tokenizer train` (it adds <mask>)")


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


_WORD_STARTS: dict[int, torch.Tensor] = {}


def collate_mlm(items: list[Any], tok: Any, cfg: RunConfig) -> dict[str, torch.Tensor]:
    ids = _pad([list(i.input_ids) for i in items], tok.pad_token_id)  # (B, T)
    attention = _pad([[1] * len(i.input_ids) for i in items], 0)
    special = (attention == 0) | torch.isin(ids, torch.tensor(tok.all_special_ids))
    starts = None
    if cfg.pretrain.whole_word_mask:
        table = _WORD_STARTS.setdefault(id(tok), word_start_table(tok))
        starts = table[ids]
    inputs, labels = mask_tokens(ids, special, tok.mask_token_id, len(tok), cfg.pretrain.mlm_probability,
                                 _generator(cfg), starts)
    batch = {"input_ids": inputs, "attention_mask": attention, "labels": labels}
    if isinstance(items[0], PairItem):
        batch["token_type_ids"] = _pad([i.token_type_ids for i in items], 0)
        batch["next_sentence_label"] = torch.tensor([i.next_label for i in items])
    return batch


class MaskedLMLoss(nn.Module):
    """Cross-entropy on the selected tokens (plus NSP on each pair for a BertForPreTraining model).

    For BERT-style models the prediction head runs on the selected positions only (15% of the tokens).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, next_sentence_label: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        hf = unwrap_peft(self.model)
        keep = labels != IGNORE  # (B, T)
        heads = getattr(hf, "cls", None)
        predictions = getattr(heads, "predictions", heads)
        if predictions is not None:
            out = hf.base_model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            logits = predictions(out.last_hidden_state[keep])  # (N, V)
        else:  # other encoders: full logits
            out = None
            logits = hf(input_ids=input_ids, attention_mask=attention_mask).logits[keep]
        loss = F.cross_entropy(logits.float(), labels[keep], reduction="sum")
        n = keep.sum()
        if next_sentence_label is not None:
            if out is None or heads is None or getattr(heads, "seq_relationship", None) is None:
                raise ConfigError("pretrain.nsp needs a BERT pretraining model (built with pretrain.scratch arch bert)")
            nsp = heads.seq_relationship(out.pooler_output)  # (B, 2)
            loss = loss + F.cross_entropy(nsp.float(), next_sentence_label, reduction="sum")
            n = n + next_sentence_label.numel()
        return loss, n


def load_mlm(cfg: RunConfig, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    p = cfg.pretrain
    if p.scratch is not None:
        from lmtailor.pretrain.scratch import load_scratch

        if p.scratch.arch != "bert":
            raise ConfigError(f"objective mlm needs an encoder, got pretrain.scratch.arch={p.scratch.arch!r}",
                              "use arch: bert")
        return load_scratch(p.scratch, dtype, nsp=p.nsp, seed=cfg.seed)
    return _load_auto(cfg, dtype, "AutoModelForMaskedLM")


def _load_auto(cfg: RunConfig, dtype: torch.dtype, cls_name: str) -> tuple[nn.Module, Any]:
    import transformers

    from lmtailor.models import load_tokenizer, resolve_model

    folder = resolve_model(cfg.base_model)
    model = getattr(transformers, cls_name).from_pretrained(folder, dtype=dtype,
                                                            trust_remote_code=cfg.trust_remote_code)
    return model, load_tokenizer(cfg.base_model, cfg.trust_remote_code)


@torch.inference_mode()
def _loss_over(loss_module: nn.Module, items: list[Any], tok: Any, cfg: RunConfig, collate_fn: Any,
               batch: int = 8) -> tuple[float, int]:
    total, count = 0.0, 0
    for i in range(0, len(items), batch):
        b = collate_fn(items[i:i + batch], tok, cfg)
        loss, n = loss_module(**b)
        total, count = total + float(loss), count + int(n)
    return total, count


@torch.inference_mode()
def evaluate_mlm(model: nn.Module, tok: Any, items: list[Any], examples: list[Example], cfg: RunConfig,
                 label: str = "", progress: bool = True) -> dict[str, Any]:
    """Masked-token loss and accuracy on fixed masks, and pseudo-perplexity on the first held-out tokens."""
    from lmtailor.evaluate import perplexity
    from lmtailor.pretrain.perplexity import pseudo_perplexity

    model.eval()
    if not items:
        return {}
    hf = unwrap_peft(model)
    total, count, correct = 0.0, 0, 0
    for i in range(0, len(items), 8):
        b = collate_mlm(items[i:i + 8], tok, cfg)
        keep = b["labels"] != IGNORE
        kwargs = {k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        out = hf(**kwargs)
        logits = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits  # (B, T, V)
        sel = logits[keep]  # (N, V)
        total += float(F.cross_entropy(sel.float(), b["labels"][keep], reduction="sum"))
        correct += int((sel.argmax(-1) == b["labels"][keep]).sum())
        count += int(keep.sum())
    loss = total / max(count, 1)
    seqs = [list(i.input_ids) for i in items]
    return {"loss": loss, "perplexity": perplexity(loss), "masked_accuracy": correct / max(count, 1),
            "masked_tokens": count, "pseudo_perplexity": pseudo_perplexity(model, tok, seqs, max_tokens=256)}


# ---- span corruption ------------------------------------------------------------------------------------------

def random_spans_mask(length: int, density: float, mean_length: float, generator: torch.Generator | None = None
                      ) -> torch.Tensor:
    """(length,) bool noise mask of about density·length tokens in spans of mean `mean_length` (T5's recipe).

    Noise and non-noise stretches alternate, starting with non-noise; both are random partitions.
    """
    n_noise = min(max(1, round(length * density)), length - 1)
    n_spans = max(1, min(round(n_noise / mean_length), length - n_noise))

    def partition(total: int, parts: int) -> list[int]:
        cuts = (torch.randperm(total - 1, generator=generator)[:parts - 1] + 1).sort().values.tolist()
        return [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]

    noise, keep = partition(n_noise, n_spans), partition(length - n_noise, n_spans)
    mask: list[bool] = []
    for k, z in zip(keep, noise, strict=True):
        mask += [False] * k + [True] * z
    return torch.tensor(mask)


def span_corrupt(ids: list[int], sentinels: list[int], eos: int, density: float = 0.15, mean_length: float = 3.0,
                 generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """T5 span corruption: each noise span becomes one sentinel in the input; the target lists sentinel + span.

    Returns:
        (inputs, targets), both ending with EOS; `reconstruct(inputs, targets)` gives `ids` back.
    """
    ids = [t for t in ids if t != eos] or ids  # the separator inside a block stays text; EOS ends the sequences
    mask = random_spans_mask(len(ids), density, mean_length, generator).tolist() if len(ids) > 1 else [False]
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, (t, noisy) in enumerate(zip(ids, mask, strict=True)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                if span >= len(sentinels):
                    raise ConfigError(f"span corruption needs more than {len(sentinels)} sentinel tokens",
                                      "lower max_length or span_density, or raise span_mean_length")
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(t)
        else:
            inputs.append(t)
    return inputs + [eos], targets + [eos]


def reconstruct(inputs: list[int], targets: list[int], sentinels: list[int], eos: int) -> list[int]:
    """Undo span_corrupt: put each sentinel's span from the targets back into the inputs."""
    spans: dict[int, list[int]] = {}
    current: list[int] | None = None
    for t in targets:
        if t in sentinels:
            current = spans.setdefault(t, [])
        elif t != eos and current is not None:
            current.append(t)
    out: list[int] = []
    for t in inputs:
        if t in spans:
            out += spans[t]
        elif t != eos:
            out.append(t)
    return out


def _sentinels(tok: Any) -> list[int]:
    from lmtailor.tokenizers import SENTINELS

    vocab = tok.get_vocab()
    ids = [vocab[s] for s in SENTINELS if s in vocab]
    if not ids:
        raise ConfigError("objective span needs sentinel tokens <extra_id_N> in the tokenizer",
                          "train it with `lmtailor tokenizer train` or use pretrain.scratch with arch t5")
    return ids


def collate_span(items: list[Any], tok: Any, cfg: RunConfig) -> dict[str, torch.Tensor]:
    sentinels, gen = _sentinels(tok), _generator(cfg)
    pairs = [span_corrupt(list(i.input_ids), sentinels, tok.eos_token_id, cfg.pretrain.span_density,
                          cfg.pretrain.span_mean_length, gen) for i in items]
    start = tok.pad_token_id  # T5 starts decoding from pad (decoder_start_token_id in scratch.build_model)
    return {
        "input_ids": _pad([p[0] for p in pairs], tok.pad_token_id),  # (B, Te)
        "attention_mask": _pad([[1] * len(p[0]) for p in pairs], 0),
        "decoder_input_ids": _pad([[start, *p[1][:-1]] for p in pairs], tok.pad_token_id),  # (B, Td)
        "labels": _pad([p[1] for p in pairs], IGNORE),
    }


class Seq2SeqLoss(nn.Module):
    """Cross-entropy summed over the decoder targets of an encoder-decoder."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, decoder_input_ids: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                            use_cache=False).logits  # (B, Td, V)
        keep = labels != IGNORE
        return F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"), keep.sum()


def load_span(cfg: RunConfig, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    p = cfg.pretrain
    if p.scratch is not None:
        from lmtailor.pretrain.scratch import load_scratch

        if p.scratch.arch != "t5":
            raise ConfigError(f"objective span needs an encoder-decoder, got pretrain.scratch.arch={p.scratch.arch!r}",
                              "use arch: t5")
        return load_scratch(p.scratch, dtype, seed=cfg.seed)
    return _load_auto(cfg, dtype, "AutoModelForSeq2SeqLM")


def evaluate_span(model: nn.Module, tok: Any, items: list[Any], examples: list[Example], cfg: RunConfig,
                  label: str = "", progress: bool = True) -> dict[str, Any]:
    from lmtailor.evaluate import perplexity

    model.eval()
    total, count = _loss_over(Seq2SeqLoss(model), items, tok, cfg, collate_span)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "target_tokens": count} if count else {}


# ---- registration ---------------------------------------------------------------------------------------------

# clm gains the pretraining hooks; without pretrain.* settings each behaves exactly as before.
OBJECTIVES["clm"] = dataclasses.replace(OBJECTIVES["clm"], load=load_clm, prepare=prepare_clm, evaluate=evaluate_clm)
if "mlm" not in OBJECTIVES:
    register_objective("mlm", "masked LM for encoders (15%, 80/10/10, optional whole words and NSP)", MaskedLMLoss,
                       train_on_prompt=True, load=load_mlm, prepare=prepare_mlm, collate=collate_mlm,
                       count=count_labels, evaluate=evaluate_mlm)
    register_objective("span", "T5 span corruption for encoder-decoders", Seq2SeqLoss, train_on_prompt=True,
                       load=load_span, prepare=prepare_blocks, collate=collate_span, count=count_labels,
                       evaluate=evaluate_span)
