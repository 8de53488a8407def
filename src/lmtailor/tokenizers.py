"""Train tokenizers from a corpus with the `tokenizers` library, saved as standard HF tokenizer folders."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from lmtailor.models import CHATML_TEMPLATE

CHAT_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]


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
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes)
