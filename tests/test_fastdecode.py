"""The fast CPU decoding path: packed linears, logits and greedy tokens against transformers, and the server on it."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest
import torch
import torch.nn.functional as F

from lmtailor.errors import ConfigError
from lmtailor.fastdecode import FastCausalLM, PackedLinear, speed_up
from lmtailor.render import prompt_ids
from lmtailor.runs import Run
from test_export import tiny_run  # noqa: F401  (session fixture: a LoRA run made by the real CLI)
from test_generate import looper  # noqa: F401  (session fixture: a tiny model rigged to loop)

PROMPTS = ["list files", "count lines in a big file please", "pwd", "show processes"]
# ||y - y_fp32|| / ||y_fp32|| of one linear: fp16 weights round each weight to 2^-11 relative.
REL_TOL = 1e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _tiny(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 64-wide decoder of the given family with random weights (qwen2 has q/k/v biases)."""
    import transformers

    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "mistral": ("MistralConfig", "MistralForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=arch != "mistral", sliding_window=None,
                                         initializer_range=0.2)
    model = getattr(transformers, model_cls)(cfg).eval()
    if arch == "qwen2":
        with torch.no_grad():
            for block in model.model.layers:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(block.self_attn, name).bias.normal_(0, 0.2)
    return model


def _padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


@pytest.mark.parametrize(("width", "bias"), [(64, False), (96, True)])
def test_packed_linear_matches_fp32_linear(width: int, bias: bool) -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(width, 80, bias=bias)
    packed = PackedLinear(lin.weight, lin.bias)
    x = torch.randn(3, 5, width)  # (B, T, K): any leading shape
    with torch.no_grad():
        want = lin(x)
    got = packed(x)
    assert got.shape == want.shape == (3, 5, 80) and got.dtype == torch.float32
    assert _rel(packed(x[0, :1]), got[0, :1]) < 1e-5, "a row alone: the same up to summation order"
    assert _rel(got, want) < REL_TOL
    # and the error is the weight rounding only: dequantize() is what is applied
    exact = F.linear(x, packed.dequantize(), None if lin.bias is None else lin.bias.detach())
    assert _rel(got, exact) < 1e-6


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_logits_match_transformers_with_left_padding(arch: str) -> None:
    model = _tiny(arch)
    fast = FastCausalLM(model, "fp16")
    ids, mask = _padded([[5, 9, 3, 7, 1, 4, 8], [11, 2, 6]], pad=0)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
    got = fast(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded positions are garbage in both
    assert _rel(got[real], want[real]) < REL_TOL * 2
    single = fast(input_ids=ids[1:, 4:]).logits  # the short row alone, unpadded
    assert _rel(single[0], got[1, 4:]) < 1e-5


# Greedy criterion: the fast path picks the fp32 tokens, except where fp32's own two best candidates are this
# close (a near tie that weights rounded to fp16 may flip); after such a split the rows are not compared.
TIE = 1e-2


def _same_or_tie(got: torch.Tensor, want: torch.Tensor, scores: tuple[torch.Tensor, ...], start: int) -> None:
    for r in range(want.shape[0]):
        diff = (got[r, :want.shape[1]] != want[r]).nonzero()
        if not len(diff):
            assert got.shape == want.shape
            continue
        col = int(diff[0])
        step = scores[col - start][r]  # fp32 scores (after penalties) at the split
        gap = float(step[want[r, col]] - step[got[r, col]])
        assert 0 <= gap < TIE, f"row {r} split at new token {col - start} with an fp32 logit gap of {gap}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_equals_transformers_generate_batched(arch: str) -> None:
    """fp16 picks fp32 HF generate's tokens (see TIE), rows left-padded, EOS mid-way in one row."""
    model = _tiny(arch)
    fast = speed_up(model, "fp16")
    ids, mask = _padded([[5, 9, 3, 7, 1, 4, 8], [11, 2, 6], [40, 41]], pad=0)
    kw = {"max_new_tokens": 20, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        free = model.generate(input_ids=ids, attention_mask=mask, min_new_tokens=20, **kw)
    eos = int(free[1, ids.shape[1] + 4])  # a token row 1 emits: rows stop there and are padded after
    for extra in ({}, {"eos_token_id": eos}, {"eos_token_id": eos, "min_new_tokens": 8},
                  {"repetition_penalty": 1.5}):
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, output_scores=True,
                                  return_dict_in_generate=True, **kw, **extra)
        got = fast.generate(input_ids=ids, attention_mask=mask, **kw, **extra)
        _same_or_tie(got, want.sequences, want.scores, ids.shape[1])
    ended = fast.generate(input_ids=ids, attention_mask=mask, **kw, eos_token_id=eos)[1, ids.shape[1]:]
    assert ended[4] == eos and (ended[5:] == 0).all(), "row 1 ends at its EOS and is padded after it"


@pytest.fixture(scope="module")
def lively(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with larger random weights, so that greedy answers are varied words, not one repeated token."""
    import shutil

    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("lively")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_greedy_on_models_and_runs_equals_fp32(lively: Path, tiny_run: Path) -> None:  # noqa: F811
    """Through lmtailor's generate(): fp16 answers equal fp32 ones; a LoRA run is merged first."""
    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate

    settings = GenerationSettings(max_new_tokens=16, batch_size=2)
    for target in (lively, tiny_run):
        model, tok = Run.open(target).load()
        want = generate(model, tok, PROMPTS, settings)
        assert target == tiny_run or len(set(want)) == len(PROMPTS), "varied answers, a meaningful comparison"
        rows = [prompt_ids(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
        ids, mask = _padded(rows, tok.pad_token_id)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        fast = speed_up(Run.open(target).load()[0], "fp16")
        assert generate(fast, tok, PROMPTS, settings) == want
        assert _rel(fast(input_ids=ids, attention_mask=mask).logits[mask.bool()], ref) < 2e-3


def test_sampling_streaming_and_stop_strings(lively: Path) -> None:
    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate, stream

    model, tok = Run.open(lively).load()
    fast = speed_up(model, "fp16")
    hot = GenerationSettings(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    a = generate(fast, tok, PROMPTS, hot)
    torch.manual_seed(3)
    assert generate(fast, tok, PROMPTS, hot) == a
    greedy = GenerationSettings(max_new_tokens=12)
    full = generate(fast, tok, ["list files"], greedy)[0]
    assert "".join(stream(fast, tok, [{"role": "user", "content": "list files"}], greedy)).strip() == full
    stop = full[1:3]
    cut = generate(fast, tok, ["list files"], GenerationSettings(max_new_tokens=12, stop=[stop]))[0]
    assert stop not in cut and full.startswith(cut)


def test_unsupported_models_are_refused_with_a_hint() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ConfigError, match="gpt2"):
        speed_up(gpt2, "fp16")
    with pytest.raises(ConfigError, match="allowed values: none, fp16, bf16"):
        speed_up(_tiny("llama"), "int4")
    assert speed_up(gpt2, "none") is gpt2


def test_int8_is_refused_and_points_to_llama_cpp() -> None:
    """The int8 kernel lost to llama.cpp q8_0 and was removed: asking for it says where int8 is served now."""
    from lmtailor.serve import load_models

    for ask in (lambda: speed_up(_tiny("llama"), "int8"), lambda: FastCausalLM(_tiny("llama"), "int8"),
                lambda: load_models(["nowhere"], speedup="int8")):
        with pytest.raises(ConfigError) as err:
            ask()
        text = str(err.value)
        assert "\n" not in text and "allowed values: none, fp16, bf16" in text
        assert "--gguf-type q8_0" in text and "--engine llama.cpp" in text


def test_server_on_the_fast_path(lively: Path, tiny_run: Path) -> None:  # noqa: F811
    """Batched and single requests through the engine on fp16 give the fp32 model's greedy answers."""
    import concurrent.futures

    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate
    from lmtailor.serve import Limits, create_app, load_models, running

    slots = load_models([str(tiny_run), str(lively)], speedup="fp16")
    assert all(isinstance(s.model, FastCausalLM) for s in slots.values())
    assert tiny_run.name in slots, "an adapter run is served merged, under its own name"
    name = next(n for n in slots if n != tiny_run.name)  # the lively model: varied answers
    model, tok = Run.open(lively).load()
    want = generate(model, tok, PROMPTS, GenerationSettings(max_new_tokens=10))
    app = create_app(slots, limits=Limits(max_batch_size=4, batch_window_ms=200, timeout_s=60))
    with running(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)

        def ask(p: str) -> str:
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": p}],
                                               max_tokens=10, temperature=0)
            return r.choices[0].message.content.strip()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, PROMPTS))
        assert got == want
        parts = client.chat.completions.create(model=name, messages=[{"role": "user", "content": PROMPTS[0]}],
                                               max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in parts).strip() == want[0]
        assert app.state.engine.stats["max_rows"] > 1, "the four concurrent requests shared a batch"


def test_cli_generate_with_speedup(lively: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmtailor.cli import main

    answers = []
    for extra in ([], ["--speedup", "fp16"]):
        assert main(["generate", str(lively), "list files", "pwd", "--max-new-tokens", "8", *extra]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].count("> ") == 2


def test_repetition_stop_on_the_fast_path(looper: Path) -> None:  # noqa: F811
    """The rigged looping model (test_generate) on FastCausalLM: generate, stream and the server's engine stop
    the looping row alone, keeping one copy."""
    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate, stream
    from test_generate import CHAIN, CHAIN_PROMPT, LOOP_PROMPT, Steps, engine_rows, loop_texts

    model, tok = Run.open(looper).load()
    fast = speed_up(model, "fp16")
    one_copy, unstopped, chain = loop_texts(tok)
    prompts = [LOOP_PROMPT, CHAIN_PROMPT]
    off = Steps(fast)
    assert generate(off, tok, prompts, GenerationSettings(max_new_tokens=40, stop_repeats=0), raw=True) == \
        [unstopped(40), chain] and off.steps == [40]
    on = Steps(fast)
    assert generate(on, tok, prompts, GenerationSettings(max_new_tokens=40), raw=True) == [one_copy, chain]
    alone = Steps(fast)
    assert generate(alone, tok, [LOOP_PROMPT], GenerationSettings(max_new_tokens=40), raw=True) == [one_copy]
    assert on.steps == [len(CHAIN) + 1] and alone.steps == [13]
    msgs = [{"role": "user", "content": "anything"}]
    assert "".join(stream(fast, tok, msgs, GenerationSettings(max_new_tokens=40))).strip() == one_copy
    texts, ends, _ = engine_rows(fast, tok, 3)  # the server's engine on the fast path
    assert texts == [one_copy, chain] and ends == {0: ("stop", 13), 1: ("stop", len(CHAIN) + 1)}
