"""Train tokenizers from a corpus (`tokenizers` library) and extend pretrained ones with domain terms.

Outputs are standard HF tokenizer (and model) folders.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmtailor import crypto
from lmtailor.models import CHATML_TEMPLATE
from lmtailor.outputs import check_output, replacing

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
# Pretraining objectives' markers: <mask> for mlm, <cls>/<sep> for sentence pairs, sentinels for span corruption.
SENTINELS = [f"<extra_id_{i}>" for i in range(64)]
PRETRAIN_SPECIALS = [*CHAT_SPECIALS, "<unk>", "<mask>", "<cls>", "<sep>", *SENTINELS]
# `tokenizer train --vocab-size` range: room for the special tokens (and BPE's 256 byte tokens) plus a few merges.
MIN_VOCAB = {"bpe": 256 + len(PRETRAIN_SPECIALS) + 16, "unigram": len(PRETRAIN_SPECIALS) + 16}
MAX_VOCAB = 1_000_000


def train_bpe(texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2,
              special_tokens: list[str] | None = None, eos: str = "<|im_end|>", pad: str = "<pad>") -> Any:
    """Byte-level BPE trained on `texts`; returns a transformers fast tokenizer with a ChatML template.

    Args:
        texts: the corpus, one document per item (any iterable; it is streamed once).
        vocab_size: target vocabulary size including the 256 byte tokens and the special tokens.
        special_tokens: extra special tokens (default: chat markers, end of text, pad).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = special_tokens or CHAT_SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_strings(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad,
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _strings(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


def corpus_files(root: str | Path, suffixes: tuple[str, ...] = (".txt", ".md", ".rst", ".text")) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    # an encrypted `notes.txt.enc` counts by its inner name
    return sorted(p for p in root.rglob("*") if p.is_file() and Path(crypto.inner_name(p)).suffix in suffixes)


def train_unigram(texts: Iterable[str], vocab_size: int = 8000, special_tokens: list[str] | None = None,
                  eos: str = "<|im_end|>", pad: str = "<pad>", unk: str = "<unk>") -> Any:
    """Unigram LM tokenizer (SentencePiece-style, Metaspace pre-tokenizer) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(special_tokens or CHAT_SPECIALS)
    if unk not in specials:
        specials.append(unk)
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                      show_progress=False)
    tok.train_from_iterator(_strings(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, unk_token=unk, bos_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def corpus_texts(corpus: str | Path) -> Iterator[str]:
    """Documents of a corpus: a text file, a folder of .txt/.md/.rst files, or any data path (catalog:NAME, .jsonl)."""
    path = Path(corpus)
    files = corpus_files(path) if path.exists() else []
    if files:
        for f in files:
            yield crypto.read_bytes(f).decode("utf-8", errors="replace")  # decrypted in memory if encrypted
        return
    from lmtailor.data.validate import load_examples

    for ex in load_examples(str(corpus)):
        if ex.text is not None:
            yield ex.text
        else:
            yield "\n".join(m["content"] for m in ex.messages or [])


def train_tokenizer(corpus: str | Path, vocab_size: int, out: str | Path, kind: str = "bpe",
                    min_frequency: int = 2, force: bool = False) -> str:
    """Train a BPE or Unigram tokenizer on a corpus with the pretraining special tokens; save it to `out`.

    Returns:
        A one-line summary (vocabulary size, special tokens, folder).

    Raises:
        ConfigError: unknown kind or an empty corpus; `out` exists (without `force`, which keeps it as a backup).
    """
    from lmtailor.errors import ConfigError

    low = MIN_VOCAB.get(kind, 1)
    if not low <= vocab_size <= MAX_VOCAB:
        raise ConfigError(f"--vocab-size {vocab_size}: must be {low} to {MAX_VOCAB} for a {kind} tokenizer",
                          f"the {len(PRETRAIN_SPECIALS)} special tokens"
                          + (" and the 256 byte tokens" if kind == "bpe" else "") + " count; 8000 is a common size")
    out = check_output(out, force, folder=True, inputs=(corpus,) if Path(corpus).exists() else ())
    texts = list(corpus_texts(corpus))
    if not any(texts):
        raise ConfigError(f"corpus {corpus} holds no text", "give a folder of .txt/.md/.rst files or a data file")
    if kind == "bpe":
        tok = train_bpe(texts, vocab_size, min_frequency, special_tokens=PRETRAIN_SPECIALS)
    elif kind == "unigram":
        tok = train_unigram(texts, vocab_size, special_tokens=PRETRAIN_SPECIALS)
    else:
        raise ConfigError(f"unknown tokenizer type {kind!r}", "use bpe or unigram")
    tok.add_special_tokens({"mask_token": "<mask>", "cls_token": "<cls>", "sep_token": "<sep>", "unk_token": "<unk>"})
    with replacing(out, force):
        tok.save_pretrained(out)
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return (f"{kind} tokenizer: {len(tok)} tokens ({len(PRETRAIN_SPECIALS)} special) from {len(texts)} documents "
            f"({sum(map(len, texts))} characters -> {n_tokens} tokens, {sum(map(len, texts)) / max(n_tokens, 1):.2f} "
            f"chars/token), saved to {out}")


def extend_vocabulary(model: Any, tok: Any, terms: list[str]) -> dict[str, list[int]]:
    """Add `terms` as tokens; each new embedding row is the mean of the rows of the sub-tokens it replaces.

    The output row is set the same way when the output head is not tied to the input embeddings. Rows of the
    old vocabulary are untouched, so the model's outputs on old-token inputs do not change (apart from the new
    logit columns).

    Returns:
        {added token: sub-token ids of the old tokenizer}, for each form added ("term" and " term").
    """
    import torch
    from tokenizers import AddedToken

    vocab = tok.get_vocab()
    pieces: dict[str, list[int]] = {}
    for term in dict.fromkeys(t.strip() for t in terms):
        if not term or term in vocab:
            continue
        # Byte-level BPE spells a word after a space differently ("Ġword"): an added token "word" alone would cut
        # " word" into " " + "word". So the space-prefixed form is added too, and a term whose spaced form is
        # already one token is left alone.
        spaced = tok(" " + term, add_special_tokens=False)["input_ids"]
        if len(spaced) == 1:
            continue
        for form in (term, " " + term):
            ids = tok(form, add_special_tokens=False)["input_ids"]
            if len(ids) > 1:
                pieces[form] = list(ids)
    if not pieces:
        return {}
    old_size = model.get_input_embeddings().weight.shape[0]
    tok.add_tokens([AddedToken(form, normalized=False) for form in pieces])
    model.resize_token_embeddings(max(len(tok), old_size), mean_resizing=False)
    emb = model.get_input_embeddings().weight  # (V', H)
    out = model.get_output_embeddings()
    untied = out is not None and out.weight.data_ptr() != emb.data_ptr()
    with torch.no_grad():
        for term, ids in pieces.items():
            new = tok.convert_tokens_to_ids(term)
            emb[new] = emb[ids].mean(0)
            if untied:
                out.weight[new] = out.weight[ids].mean(0)
                if getattr(out, "bias", None) is not None:
                    out.bias[new] = out.bias[ids].mean(0)
    return pieces


def extend_tokenizer(base: str, terms_file: str | Path, out: str | Path, corpus: str | Path | None = None,
                     force: bool = False) -> str:
    """`lmtailor tokenizer extend`: add the terms of a file (one per line) to a model's tokenizer and embeddings.

    Returns:
        A report: terms added, new vocabulary size, and the corpus token count before/after when `corpus` is given.
    """
    from lmtailor.errors import ConfigError
    from lmtailor.models import load_pretrained, load_tokenizer, save_model

    inputs = tuple(p for p in (base, terms_file, corpus) if p and Path(p).exists())
    checked = check_output(out, force, folder=True, inputs=inputs)  # `out` exists: an error unless force
    path = Path(terms_file)
    if not path.is_file():
        raise ConfigError(f"terms file not found: {path}", "give a text file with one term per line")
    terms = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok = load_tokenizer(base)
    model = load_pretrained(base)
    texts = list(corpus_texts(corpus)) if corpus else []
    before = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
    old = len(tok)
    added = extend_vocabulary(model, tok, terms)
    with replacing(checked, force):  # an existing `out` is kept as NAME.bak-<time>
        save_model(model, tok, checked)
    n_terms = len({form.strip() for form in added})
    lines = [f"added {n_terms} of {len(terms)} terms ({len(added)} tokens, with and without a leading space); "
             f"vocabulary {old} -> {len(tok)}; saved to {out}"]
    lines += [f"  {t!r}: was {len(ids)} tokens" for t, ids in list(added.items())[:10]]
    if texts:
        after = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts)
        change = (after - before) / max(before, 1)
        lines.append(f"corpus {corpus}: {before} tokens before, {after} after ({change:+.1%})")
    return "\n".join(lines)
