"""Preference tuning (dpo, ipo, orpo, simpo, kto): data formats, losses against independent references, packed
pairs equal to unpacked ones, learning a planted preference, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lmtailor.cli import main
from lmtailor.config import build_config
from lmtailor.data.validate import load_examples
from lmtailor.errors import DataError
from lmtailor.objectives import get_objective
from lmtailor.objectives.preference import (
    collate_pairs,
    collate_unpaired,
    dpo_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    sequence_logps,
    simpo_loss,
)

WORDS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar", "papa",
         "romeo", "sierra", "tango", "victor", "whiskey", "yankee", "zulu", "quebec"]
FAST = ["batch_size=4", "lr=5e-3", "data.val_size=4", "eval.generate_examples=0", "--no-progress"]


def _pairs(n: int = 20) -> list[dict]:
    """A planted preference: the chosen answer lists files, the rejected one deletes them."""
    return [{"prompt": f"what to do with {WORDS[i % 20]} {i // 20}", "chosen": f"ls -la {WORDS[i % 20]}",
             "rejected": f"rm -rf {WORDS[i % 20]}"} for i in range(n)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def prefs(tmp_path):
    return _write(tmp_path / "prefs.jsonl", _pairs())


def _history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


# ---- data ---------------------------------------------------------------------------------------------------

def test_preference_and_unpaired_formats_are_detected_and_rendered(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q2"}],
         "chosen": [{"role": "assistant", "content": "a2"}], "rejected": [{"role": "assistant", "content": "b2"}]}])
    a, b = load_examples(str(path))
    assert a.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert a.meta["rejected"] == [{"role": "assistant", "content": "b"}]
    assert b.messages[0]["role"] == "system" and b.messages[-1]["content"] == "a2"
    kto = _write(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": True},
                                        {"prompt": "q", "completion": "b", "label": False}])
    good, bad = load_examples(str(kto))
    assert good.meta["desirable"] is True and bad.meta["desirable"] is False


def test_bad_preference_records_name_file_line_and_field(tmp_path):
    path = _write(tmp_path / "bad.jsonl", [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": ""},
        {"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a",
         "rejected": "b"}])
    with pytest.raises(DataError) as e:
        load_examples(str(path), "preference")
    assert e.value.count == 3
    assert f"{path}:2: rejected: is empty" in e.value.problems
    assert any(p.startswith(f"{path}:3: chosen[0].role:") for p in e.value.problems)
    assert any(p.startswith(f"{path}:4: messages[1].role: the last turn before the answer must be user")
               for p in e.value.problems)
    kto = _write(tmp_path / "k.jsonl", [{"prompt": "q", "completion": "a", "label": "yes"}])
    with pytest.raises(DataError) as e:
        load_examples(str(kto), "unpaired")
    assert e.value.problems[0].startswith(f"{kto}:1: label: must be true")


# ---- losses against independent references ---------------------------------------------------------------

def _logps(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (-torch.rand(n, generator=g, dtype=torch.float64) * 20 - 0.5 for _ in range(4))
    nc, nr = (torch.randint(1, 12, (n,), generator=g).double() for _ in range(2))
    return pc, pr, rc, rr, nc, nr


def test_dpo_and_ipo_equal_their_formulas():
    pc, pr, rc, rr, nc, nr = _logps()
    beta, ls = 0.3, 0.1
    z = beta * ((pc - rc) - (pr - rr))
    expected = -(1 - ls) * torch.log(torch.sigmoid(z)) - ls * torch.log(torch.sigmoid(-z))
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, beta, ls), expected, atol=1e-5, rtol=0)
    # IPO (Azar et al. eq. 17) on per-token log-ratios, as TRL normalizes them
    h = (pc - rc) / nc - (pr - rr) / nr
    torch.testing.assert_close(ipo_loss(pc, pr, rc, rr, nc, nr, beta), (h - 1 / (2 * beta)) ** 2, atol=1e-5, rtol=0)


def test_kto_equals_its_formula():
    p, _, r, _, _, _ = _logps()
    desirable = torch.tensor([1, 0, 1, 1, 0, 0.0])
    kl, beta = torch.tensor(0.7, dtype=torch.float64), 0.2
    ratio = p - r
    expected = torch.where(desirable.bool(), 1.5 * (1 - torch.sigmoid(beta * (ratio - kl))),
                           0.5 * (1 - torch.sigmoid(beta * (kl - ratio))))
    torch.testing.assert_close(kto_loss(p, r, desirable, kl, beta, 1.5, 0.5), expected, atol=1e-5, rtol=0)


def test_orpo_and_simpo_equal_trl():
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    pc, pr, _, _, nc, nr = _logps(seed=1)
    pc, pr = pc / 10, pr / 10  # mean log-probs near 0 exercise log(1 - p) where p is large
    acc = SimpleNamespace(device="cpu")
    orpo = SimpleNamespace(beta=0.25, accelerator=acc)
    trl_or, *_ = ORPOTrainer.odds_ratio_loss(orpo, (pc / nc).float(), (pr / nr).float())
    # ORPO's loss = the chosen answer's mean-token NLL - the odds-ratio term TRL returns
    torch.testing.assert_close(orpo_loss(pc.float(), pr.float(), nc.float(), nr.float(), 0.25),
                               -(pc / nc).float() - trl_or, atol=1e-5, rtol=0)
    simpo = SimpleNamespace(beta=2.0, simpo_gamma=0.7, label_smoothing=0.1, loss_type="simpo", alpha=0.0,
                            accelerator=acc)
    trl_simpo, *_ = CPOTrainer.cpo_loss(simpo, pc / nc, pr / nr)
    torch.testing.assert_close(simpo_loss(pc, pr, nc, nr, 2.0, 0.7, 0.1), trl_simpo, atol=1e-5, rtol=0)


# ---- packed pairs ----------------------------------------------------------------------------------------------

def _context(tiny_model: Path, prefs: Path, objective: str = "dpo", **extra: object):
    cfg = build_config({"base_model": str(tiny_model), "objective": objective, "data": {"path": str(prefs)},
                        **extra})
    obj = get_objective(cfg)
    ctx = obj.context(cfg)
    ctx.tokenizer = obj.tokenizer(ctx)
    return obj, ctx


def test_packed_pairs_equal_unpacked_and_trl_log_probs(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = _pairs(6)
    rows[0]["messages"] = [{"role": "system", "content": "You answer with one shell command only."},
                           {"role": "user", "content": rows[0].pop("prompt")}]
    data = _write(tmp_path / "p.jsonl", rows)
    obj, ctx = _context(tiny_model, data)
    items, _ = obj.prepare(ctx, load_examples(str(data)))
    model = AutoModelForCausalLM.from_pretrained(tiny_model).double().eval()  # float64: 1e-5 on sums of ~60
    packed = collate_pairs(ctx, items)
    assert (packed["segment_ids"] == 0).any(), "the prompt is held once per pair"
    assert packed["input_ids"].shape[0] == len(items)
    ctx.cfg = ctx.cfg.model_copy(update={"packing": False})
    padded = collate_pairs(ctx, items)
    with torch.no_grad():
        a, na = sequence_logps(model, packed)
        b, nb = sequence_logps(model, padded)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
        assert torch.equal(na, nb)
        # TRL's log-probs of the same padded rows from the model's full logits
        pytest.importorskip("trl")
        from trl.experimental.orpo.orpo_trainer import ORPOTrainer

        logits = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits
        labels = torch.where(padded["attention_mask"].bool(), padded["input_ids"], -100)
        sup = torch.cat([torch.full_like(padded["targets"][:, :1], -100), padded["targets"][:, :-1]], 1)
        labels = torch.where(sup != -100, labels, -100)
        trl = ORPOTrainer.get_batch_logps(logits, labels)
    torch.testing.assert_close(a, trl, atol=1e-5, rtol=0)


def test_kto_batches_pack_the_mismatched_completion_with_its_prompt(tiny_model, tmp_path):
    rows = [{"prompt": f"what to do with {w}", "completion": f"ls {w}" if i % 2 else f"rm {w}", "label": bool(i % 2)}
            for i, w in enumerate(WORDS[:6])]
    data = _write(tmp_path / "k.jsonl", rows)
    obj, ctx = _context(tiny_model, data, "kto")
    items, stats = obj.prepare(ctx, load_examples(str(data)))
    assert stats["desirable"] == 3
    batch = collate_unpaired(ctx, items)
    assert batch["input_ids"].shape[0] == 6 and int(batch["seq_index"].max()) == 11
    assert obj.count(batch) == 6


# ---- training ----------------------------------------------------------------------------------------------

def _train(tiny_model: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={out}", *FAST, *extra])


def test_dpo_learns_a_planted_preference(tiny_model, tmp_path):
    data = _write(tmp_path / "prefs.jsonl", _pairs(40))
    run = tmp_path / "dpo"
    assert _train(tiny_model, data, run, "objective=dpo", "max_steps=30", "lr=2e-2", "dpo.beta=0.5",
                  "lora.target_modules=all-linear") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["before"]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["after"]["reward_accuracy"] >= 0.9, metrics["after"]
    assert metrics["after"]["loss"] < metrics["before"]["loss"]


@pytest.mark.parametrize("objective", ["ipo", "orpo", "simpo"])
def test_other_pair_objectives_train(tiny_model, prefs, tmp_path, objective):
    run = tmp_path / objective
    assert _train(tiny_model, prefs, run, f"objective={objective}", "max_steps=6", "eval.before_after=false") == 0
    after = json.loads((run / "metrics.json").read_text())["after"]
    assert {"loss", "reward_accuracy", "reward_margin", "logp_accuracy"} <= set(after)


def test_kto_trains_on_unpaired_completions(tiny_model, tmp_path):
    rows = [{"prompt": f"what to do with {w} {i}", "completion": f"ls -la {w}" if i % 2 else f"rm -rf {w}",
             "label": bool(i % 2)} for i in range(2) for w in WORDS]
    data = _write(tmp_path / "k.jsonl", rows)
    run = tmp_path / "kto"
    assert _train(tiny_model, data, run, "objective=kto", "max_steps=20", "lr=2e-2") == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["after"]["loss"] < metrics["before"]["loss"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_resume_equals_an_uninterrupted_run(tiny_model, prefs, tmp_path, method):
    """With full fine-tuning the reference log-probs come from the run folder, stored by the first start."""
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ["objective=dpo", f"method={method}", "max_steps=8", "save_every=4", "keep_checkpoints=5",
             "eval.before_after=false", "micro_batch_size=2"]
    assert _train(tiny_model, prefs, full, *extra) == 0
    assert _train(tiny_model, prefs, part, *extra) == 0
    if method == "full":
        assert (part / "reference_logps.safetensors").is_file()
    shutil.rmtree(part / "model")
    shutil.rmtree(part / "checkpoints" / "step-000008", ignore_errors=True)
    (part / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in _history(part)[:4]))
    assert _train(tiny_model, prefs, part, *extra, "resume=true") == 0
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    a, b = load_file(full / "model" / name), load_file(part / "model" / name)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in _history(full)] == [h["loss"] for h in _history(part)]
    # `lmtailor eval` of the run: the reference is the base model (adapter off, or loaded for a full model)
    out = tmp_path / "eval.json"
    assert main(["eval", str(full), "--data", str(prefs), "--generate", "0", "--out", str(out)]) == 0
    assert abs(json.loads(out.read_text())["reward_margin"]) > 1e-4


def test_soft_prompts_are_refused(tiny_model, prefs, tmp_path):
    assert _train(tiny_model, prefs, tmp_path / "sp", "objective=dpo", "method=prompt_tuning", "max_steps=1") != 0


def test_loss_is_per_pair_and_independent_of_micro_batching():
    pc, pr, rc, rr, _, _ = _logps(8)
    whole = dpo_loss(pc, pr, rc, rr, 0.1).sum() / 8
    halves = (dpo_loss(pc[:4], pr[:4], rc[:4], rr[:4], 0.1).sum() + dpo_loss(pc[4:], pr[4:], rc[4:], rr[4:],
                                                                             0.1).sum()) / 8
    torch.testing.assert_close(whole, halves)
    assert F.logsigmoid(torch.tensor(0.0)) == pytest.approx(-0.6931, abs=1e-4)
