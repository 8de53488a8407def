"""GGUF files proven in llama.cpp itself (llama-cpp-python): every architecture x type loads, tokenizes like the
HF tokenizer, decodes greedily like transformers (f16) and keeps its perplexity within a stated tolerance."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import CORPUS

pytest.importorskip("llama_cpp", reason="llama-cpp-python is built by `make venv` (Makefile); not installed here")

# A fixed multilingual text set: punctuation and dashes, digits, accents, CJK, Cyrillic, Arabic, emoji, code,
# runs of spaces and newlines, and the chat markers (parsed as special tokens by both tokenizers).
TEXTS = [
    "Hello, world! It's 2026-11-29: \u2014 three   spaces and a\ttab.",
    "Gr\u00fc\u00dfe aus M\u00fcnchen: 12345 Stra\u00dfen, 3.14159 und 1,000,000 \u20ac.",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3001\u6771\u4eac\u306f\u6674\u308c\u3002",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043a\u0430\u043a \u0434\u0435\u043b\u0430? \u0412\u0441\u0451 "
    "\u0445\u043e\u0440\u043e\u0448\u043e.",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "emoji \U0001f999\U0001f525 and code: def f(x): return x**2  # ok",
    "  leading spaces\n\n\nnew lines\r\nand trailing   ",
    "<|im_start|>user\nlist files<|im_end|>\n<|im_start|>assistant\nls -la<|im_end|>\n",
    "I'm sure they'll say we've done it, don't you think?",
]

# Largest allowed perplexity(gguf) / perplexity(source) on CHECK_TEXT, per type (tiny models; the bundled model's
# figures are in test_bundled_model_in_llamacpp).
PPL_TOLERANCE = {"f16": 1.01, "q8_0": 1.05, "q4_k_m": 1.5}
TYPES = ["f16", "q8_0", "q4_k_m"]
ARCHS = ["llama", "mistral", "qwen2", "phi3"]


def build_arch(folder: Path, arch: str, tok: Any) -> Any:
    """A 2-layer, 64-wide model of `arch`, weights scaled up so greedy choices have clear margins."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Phi3Config,
        Phi3ForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
             "qwen2": (Qwen2Config, Qwen2ForCausalLM), "phi3": (Phi3Config, Phi3ForCausalLM)}
    config_cls, model_cls = kinds[arch]
    extra: dict[str, Any] = {"sliding_window": None} if arch in ("mistral", "qwen2", "phi3") else {}
    cfg = config_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     tie_word_embeddings=arch != "phi3", eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                     bos_token_id=None, initializer_range=0.1, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from lmtailor.tokenizers import train_bpe

    return train_bpe(CORPUS + TEXTS, vocab_size=600, min_frequency=1)


@pytest.fixture(scope="module")
def exported(tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, Any]]:
    """Every architecture x type written once: (arch, type) -> (GGUF path, source model)."""
    from lmtailor.export import export_run

    out: dict[tuple[str, str], tuple[Path, Any]] = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(arch)
        model = build_arch(folder, arch, tokenizer)
        for kind in TYPES:
            path = folder / f"{arch}-{kind}.gguf"
            summary = export_run(folder, "gguf", path, gguf_type=kind, verify=False)
            out[arch, kind] = (Path(summary["path"]), model)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_llamacpp_loads_every_type_and_tokenizes_like_hf(exported: dict, tokenizer: Any, arch: str) -> None:
    import gguf
    from transformers import AutoTokenizer

    from lmtailor import llamacpp
    from lmtailor.ggufwrite import pre_tokenizer_tag

    # The tokenizer a run of this model uses is the one transformers reads back from its folder: for a qwen2
    # folder that is Qwen2's split (tag "qwen2"); else GPT-2's, and the vocabulary trained on TEXTS has
    # multi-digit tokens, so "gpt-2" rather than "smollm" (digits split apart).
    tokenizer = AutoTokenizer.from_pretrained(exported[arch, "f16"][0].parent)
    assert pre_tokenizer_tag(tokenizer) == ("qwen2" if arch == "qwen2" else "gpt-2")
    for kind in TYPES:
        path, _ = exported[arch, kind]
        reader = gguf.GGUFReader(path)
        assert reader.fields["tokenizer.ggml.pre"].contents() == pre_tokenizer_tag(tokenizer)
        llm = llamacpp.load(path, n_ctx=256)
        try:
            for text in TEXTS:
                want = tokenizer(text, add_special_tokens=False)["input_ids"]
                assert llamacpp.tokenize(llm, text) == want, (kind, text)
        finally:
            llm.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_greedy_matches_transformers_over_64_tokens(exported: dict, tokenizer: Any, arch: str) -> None:
    import torch

    from lmtailor import llamacpp
    from lmtailor.render import prompt_ids

    path, model = exported[arch, "f16"]
    ids = prompt_ids(tokenizer, [{"role": "user", "content": "list files"}])
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    want = out[0, len(ids):].tolist()
    llm = llamacpp.load(path, n_ctx=256)
    try:
        got = llamacpp.greedy(llm, ids, 64)
    finally:
        llm.close()
    assert got == want


@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("arch", ARCHS)
def test_perplexity_within_tolerance(exported: dict, tokenizer: Any, arch: str, kind: str) -> None:
    from lmtailor.export import GGUF_TOLERANCE, compare_gguf

    path, model = exported[arch, kind]
    check = compare_gguf(path, model, tokenizer, reader="llama.cpp")
    ratio = check["perplexity"] / check["source_perplexity"]
    assert ratio <= PPL_TOLERANCE[kind], check
    assert check["rms_rel_diff"] <= GGUF_TOLERANCE[kind], check
    if arch in ("llama", "mistral", "qwen2", "phi3") and kind != "q4_k_m":
        # transformers reads these back as well: both readers see the same model
        again = compare_gguf(path, model, tokenizer, reader="transformers")
        assert again["rms_rel_diff"] <= GGUF_TOLERANCE[kind], again


def _tokenizer_with(pre: Any) -> Any:
    from tokenizers import Tokenizer, decoders, models, trainers
    from transformers import PreTrainedTokenizerFast

    from lmtailor.tokenizers import CHAT_SPECIALS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    from tokenizers import pre_tokenizers

    trainer = trainers.BpeTrainer(vocab_size=700, min_frequency=1, special_tokens=CHAT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS + TEXTS + ["1234 5678 90 2026 11 29 3.14159"] * 5, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")


# Qwen2's split: letters with one leading non-letter, single digits, punctuation runs, newline runs, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("family", ["gpt2-digits", "smollm", "qwen2"])
def test_pre_tokenizer_tag_matches_llamacpp_split(family: str, tmp_path: Path) -> None:
    """Tokenizers of each supported split: the tag chosen makes llama.cpp tokenize as HF does, digits included."""
    from tokenizers import Regex, pre_tokenizers

    from lmtailor import llamacpp
    from lmtailor.ggufwrite import pre_tokenizer_tag

    if family == "gpt2-digits":  # GPT-2's regex and a vocabulary with multi-digit tokens
        pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
        want_tag = "gpt-2"
    elif family == "smollm":
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
        want_tag = "smollm"
    else:
        pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        want_tag = "qwen2"
    tok = _tokenizer_with(pre)
    assert pre_tokenizer_tag(tok) == want_tag
    model = build_arch(tmp_path, "llama", tok)
    from lmtailor.ggufwrite import write_gguf

    path = write_gguf(model, tok, tmp_path / "m.gguf")
    llm = llamacpp.load(path, vocab_only=True)
    try:
        for text in TEXTS + ["room 101, year 2026, pi 3.14159, 1234567"]:
            assert llamacpp.tokenize(llm, text) == tok(text, add_special_tokens=False)["input_ids"], text
    finally:
        llm.close()


def test_gguf_tokenizer_fields(exported: dict, tokenizer: Any) -> None:
    import gguf

    path, _ = exported["llama", "f16"]
    f = gguf.GGUFReader(path).fields
    assert f["tokenizer.ggml.model"].contents() == "gpt2"
    assert f["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    assert f["tokenizer.ggml.add_bos_token"].contents() is False
    assert f["tokenizer.chat_template"].contents() == tokenizer.chat_template
    assert json.dumps(f["tokenizer.ggml.tokens"].contents()[:3])


# The bundled model (SmolLM2-135M-Instruct): perplexity(gguf) / perplexity(fp32 source) on CHECK_TEXT, at most.
BUNDLED_PPL_TOLERANCE = {"f16": 1.005, "q8_0": 1.02, "q4_k_m": 1.25}


GREEDY_TIE = 0.5  # float32 logits closer than this are a near-tie that f16 rounding may flip


@pytest.mark.slow
def test_bundled_model_in_llamacpp(tmp_path: Path) -> None:
    """The 135M model exported at every type: llama.cpp loads it, tokenizes as HF does, decodes the f16 file
    greedily like transformers over 64 tokens, and keeps perplexity within BUNDLED_PPL_TOLERANCE."""
    import gguf
    import torch

    from lmtailor import llamacpp
    from lmtailor.export import compare_gguf, load_merged
    from lmtailor.ggufwrite import write_gguf_file
    from lmtailor.render import prompt_ids

    model, tok, _ = load_merged("smollm2-135m-instruct")
    ids = prompt_ids(tok, [{"role": "user", "content": "How do I list the files in a folder?"}])
    with torch.inference_mode():
        want = model.generate(torch.tensor([ids]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    for kind in TYPES:
        path = write_gguf_file(model, tok, tmp_path / f"smollm2-{kind}.gguf", kind)
        assert gguf.GGUFReader(path).fields["tokenizer.ggml.pre"].contents() == "smollm"
        llm = llamacpp.load(path, n_ctx=512)
        try:
            if kind == "f16":
                for text in TEXTS:
                    assert llamacpp.tokenize(llm, text) == tok(text, add_special_tokens=False)["input_ids"], text
                got = llamacpp.greedy(llm, ids, 64)
                # f16 weights against float32: greedy decoding may part at a near-tie (measured: token 10, where the
                # two candidates' float32 logits differ by 0.0003); where it parts, they must be that close
                n = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want))
                if n < len(want):
                    with torch.inference_mode():
                        logits = model(torch.tensor([ids + want[:n]])).logits[0, -1]
                    gap = float(logits[want[n]] - logits[got[n]])
                    print(f"f16 greedy parts from float32 at token {n}: logit gap {gap:.3f}")
                    assert gap < GREEDY_TIE, (n, gap)
            else:
                assert len(llamacpp.greedy(llm, ids, 8)) == 8  # decodes (the q8_0 file used to crash here)
        finally:
            llm.close()
        check = compare_gguf(path, model, tok, reader="llama.cpp")
        assert check["perplexity"] / check["source_perplexity"] <= BUNDLED_PPL_TOLERANCE[kind], (kind, check)
