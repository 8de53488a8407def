"""Pretraining pieces on tiny models: tokenizers, vocabulary extension, masking, span corruption, token cache,
structure changes and perplexity."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from lmtailor.config import RunConfig, ScratchSettings
from lmtailor.objectives import mlm, span
from lmtailor.render import IGNORE


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import CORPUS

    root = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        (root / f"doc{i}.txt").write_text("\n".join(CORPUS[i * 4:(i + 1) * 4 + 8]))
    return root


@pytest.fixture(scope="module")
def tok_dir(corpus_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmtailor.tokenizers import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tokenizer"  # a new path: an existing --out is refused
    train_tokenizer(corpus_dir, 500, out, "bpe", min_frequency=1)
    return out


# ---- tokenizers ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_cli_trains_a_standard_folder_with_objective_specials(corpus_dir, tmp_path, kind, capsys):
    from transformers import AutoTokenizer

    from lmtailor.cli import main

    assert main(["tokenizer", "train", "--corpus", str(corpus_dir), "--vocab-size", "400", "--out",
                 str(tmp_path / "t"), "--type", kind]) == 0
    assert f"{kind} tokenizer" in capsys.readouterr().out
    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    assert tok.mask_token == "<mask>" and tok.eos_token == "<|im_end|>" and "<extra_id_0>" in tok.get_vocab()
    text = "To list files in a directory use ls -la"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]).strip() == text


def _untied_tiny(folder: Path, tok_folder: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("tied", [True, False])
def test_extension_keeps_old_outputs_and_inits_new_rows_as_subtoken_means(tiny_model, tok_dir, tmp_path, tied,
                                                                         corpus_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtailor.tokenizers import extend_tokenizer

    base = tiny_model if tied else _untied_tiny(tmp_path / "untied", tok_dir)
    old_tok = AutoTokenizer.from_pretrained(base)
    old = AutoModelForCausalLM.from_pretrained(base).eval()
    terms = tmp_path / "terms.txt"
    terms.write_text("directory\narchive.tar.gz\nworking\n")
    report = extend_tokenizer(str(base), terms, tmp_path / "ext", corpus=corpus_dir)
    assert "tokens before" in report
    before, after = (int(report.split("corpus")[-1].split()[k]) for k in (1, 4))
    assert after < before

    new_tok = AutoTokenizer.from_pretrained(tmp_path / "ext")
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "ext").eval()  # plain transformers reloads it
    v_old = old.get_input_embeddings().weight.shape[0]
    assert len(new_tok) > len(old_tok) and new.get_input_embeddings().weight.shape[0] >= len(new_tok)
    added = set(new_tok.get_added_vocab()) - set(old_tok.get_added_vocab())
    assert {"archive.tar.gz", " archive.tar.gz"} <= added
    for term in added:
        sub = old_tok(term, add_special_tokens=False)["input_ids"]
        row = new_tok.convert_tokens_to_ids(term)
        torch.testing.assert_close(new.get_input_embeddings().weight[row],
                                   old.get_input_embeddings().weight[sub].mean(0))
        torch.testing.assert_close(new.get_output_embeddings().weight[row],
                                   old.get_output_embeddings().weight[sub].mean(0))
    ids = torch.tensor([old_tok("To find files by name use find", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(new(ids).logits[..., :v_old], old(ids).logits)


# ---- scratch models ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_scratch_models_report_size_and_flops(tok_dir, arch):
    from lmtailor.pretrain.scratch import load_scratch, training_flops_per_token

    lines: list[str] = []
    s = ScratchSettings(arch=arch, tokenizer=str(tok_dir), layers=2, hidden=32, heads=4, context=64)
    model, tok = load_scratch(s, torch.float32, say=lines.append)
    n = sum(p.numel() for p in model.parameters())
    assert "M parameters" in lines[0] and "MFLOPs per training token" in lines[0]
    assert training_flops_per_token(model, 2, 64, 32, arch) >= 6 * (n - model.get_input_embeddings().weight.numel())
    again, _ = load_scratch(s, torch.float32, say=lines.append)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    if arch == "bert":
        assert tok.mask_token_id is not None


# ---- masking and span corruption ----------------------------------------------------------------------------------

def test_mlm_masking_statistics_match_15_and_80_10_10():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 5000, (64, 512), generator=gen)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = True
    inputs, labels = mlm.mask_tokens(ids, special, mask_id=3, vocab_size=5000, p=0.15, generator=gen)
    sel = labels != IGNORE
    assert not sel[:, 0].any() and torch.equal(labels[sel], ids[sel]) and torch.equal(inputs[~sel], ids[~sel])
    n = int(sel.sum())
    assert abs(n / (~special).sum().item() - 0.15) < 0.005
    masked = (inputs[sel] == 3).float().mean().item()
    kept = (inputs[sel] == ids[sel]).float().mean().item()
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(1 - masked - kept - 0.1) < 0.01


def test_whole_word_masking_selects_entire_words():
    gen = torch.Generator().manual_seed(1)
    starts = torch.rand(32, 256, generator=gen) < 0.4
    starts[:, 0] = True
    ids = torch.randint(10, 1000, starts.shape, generator=gen)
    _, labels = mlm.mask_tokens(ids, torch.zeros_like(starts), 3, 1000, 0.15, gen, word_start=starts)
    sel = labels != IGNORE
    word = starts.long().cumsum(-1)
    for r in range(4):
        for w in word[r].unique():
            in_word = sel[r][word[r] == w]
            assert in_word.all() or not in_word.any()
    assert 0.10 < sel.float().mean().item() < 0.20


def test_span_corruption_reconstructs_the_original():
    sentinels, eos = list(range(900, 964)), 2
    gen = torch.Generator().manual_seed(0)
    for length in (2, 5, 50, 257):
        ids = torch.randint(10, 800, (length,), generator=gen).tolist()
        inputs, targets = span.span_corrupt(ids, sentinels, eos, 0.15, 3.0, gen)
        assert inputs[-1] == eos and targets[-1] == eos and targets[0] == sentinels[0]
        assert span.reconstruct(inputs, targets, sentinels, eos) == ids
        noise = len(targets) - 1 - sum(t in sentinels for t in targets)
        assert noise == min(max(1, round(length * 0.15)), length - 1)


# ---- token cache ---------------------------------------------------------------------------------------------------

def test_token_cache_is_reused_and_invalidated(tok_dir, corpus_dir, tmp_path):
    from transformers import AutoTokenizer

    from lmtailor.pretrain.corpus import token_cache
    from lmtailor.tokenizers import corpus_texts

    tok = AutoTokenizer.from_pretrained(tok_dir)
    calls = []

    def texts():
        calls.append(1)
        return corpus_texts(corpus_dir)

    first = token_cache(texts, tok, 32, root=tmp_path)
    assert not first.reused and len(first) > 3 and all(len(first[i].input_ids) == 32 for i in range(len(first) - 1))
    all_ids = [t for i in range(len(first)) for t in first[i].input_ids]
    expect = [t for d in corpus_texts(corpus_dir)
              for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert all_ids == expect  # blocks are the corpus stream, cut every 32 tokens
    again = token_cache(texts, tok, 32, root=tmp_path)
    assert again.reused and again.path == first.path
    (corpus_dir / "doc0.txt").write_text((corpus_dir / "doc0.txt").read_text() + "\nnew line")
    assert not token_cache(texts, tok, 32, root=tmp_path).reused  # corpus changed
    tok.add_tokens(["directory"])
    assert not token_cache(texts, tok, 32, root=tmp_path).reused  # tokenizer changed
    assert not token_cache(texts, tok, 16, root=tmp_path).reused  # block length changed
    assert len(list(tmp_path.glob("blocks-*.arrow"))) == 4


# ---- structure ----------------------------------------------------------------------------------------------------

def test_depth_pruning_and_rope_scaling_reload_with_plain_transformers(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from lmtailor.pretrain.structure import keep_first_layers, scale_rope

    full = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    keep_first_layers(model, 1)
    scale_rope(model, 4.0)
    model.save_pretrained(tmp_path / "m")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert back.config.num_hidden_layers == 1 and len(back.model.layers) == 1
    assert back.config.rope_parameters["rope_type"] == "linear" and back.config.max_position_embeddings == 2048
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits)
        assert not torch.allclose(back(ids).logits, full(ids).logits)
        # linear scaling by 4: position p of the scaled model is position p/4 of the original
        torch.testing.assert_close(back.model.rotary_emb.inv_freq * 4, full.model.rotary_emb.inv_freq)


# ---- perplexity ----------------------------------------------------------------------------------------------------

def test_windows_score_every_token_once():
    from lmtailor.objectives.causal import windows

    for n, c, s in ((10, 4, 2), (10, 4, 4), (7, 8, 3), (100, 16, 5)):
        assert [t for _, e, f in windows(n, c, s) for t in range(f, e)] == list(range(1, n))


def test_sliding_window_with_full_context_equals_plain_loss(tiny_model):
    from transformers import AutoModelForCausalLM

    from lmtailor.objectives.causal import sliding_window_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    ids = torch.randint(5, 300, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    total, n = sliding_window_nll(model, ids, context=64, stride=32)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(model(torch.tensor([ids])).logits[0, :-1], torch.tensor(ids[1:]))
    assert n == 39 and math.isclose(total / n, float(ref), rel_tol=1e-4)
    short, n2 = sliding_window_nll(model, ids, context=8, stride=4)
    assert n2 == 39 and short != total  # less history, different loss


def test_pseudo_perplexity_of_a_bert(tok_dir):
    from lmtailor.objectives.mlm import pseudo_perplexity
    from lmtailor.pretrain.scratch import load_scratch

    model, tok = load_scratch(ScratchSettings(arch="bert", tokenizer=str(tok_dir), layers=1, hidden=32, heads=2,
                                              context=64), torch.float32, say=lambda *_: None)
    ppl = pseudo_perplexity(model, tok, [tok("To list files use ls")["input_ids"]], max_tokens=20)
    assert 1 < ppl < 10 * len(tok)


def test_recipe_pretrain_section_is_strict():
    from lmtailor.config import build_config
    from lmtailor.errors import ConfigError

    cfg = RunConfig(objective="mlm", pretrain={"scratch": {"arch": "bert", "tokenizer": "t/"}},
                    mlm={"whole_word_mask": True})
    assert cfg.pretrain.scratch.arch == "bert" and cfg.settings.whole_word_mask
    with pytest.raises(ConfigError, match="pretrain.scratch.layer"):
        build_config({"pretrain": {"scratch": {"tokenizer": "t", "layer": 2}}})
