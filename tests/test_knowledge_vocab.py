"""Domain vocabulary that trains under LoRA: after `tokenizer extend`, the new embedding rows change in training while
the old rows stay as they were, and a merged model keeps the trained rows."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture
def extended(tiny_model: Path, tmp_path: Path) -> tuple[Path, list[int]]:
    from lmtailor.models import added_token_ids
    from lmtailor.tokenizers import extend_tokenizer

    terms = tmp_path / "terms.txt"
    terms.write_text("kubectl\nsystemctl\n")
    out = tmp_path / "extended"
    extend_tokenizer(str(tiny_model), terms, out)
    from transformers import AutoTokenizer

    ids = added_token_ids(AutoTokenizer.from_pretrained(out))
    assert ids  # "kubectl", " kubectl", ... were split into many tokens before
    return out, ids


def test_lora_trains_new_rows_only_and_merge_keeps_them(extended: tuple[Path, list[int]]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtailor.models import add_lora

    folder, new = extended
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    before = model.get_input_embeddings().weight.detach().clone()  # (V, H)
    peft_model = add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"], new_tokens=new)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([tok("run kubectl and systemctl now", add_special_tokens=False)["input_ids"]])
    assert any(i in new for i in ids[0].tolist())
    for _ in range(3):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = peft_model.merge_and_unload()
    after = merged.get_input_embeddings().weight.detach()
    old = [i for i in range(before.shape[0]) if i not in new]
    assert torch.equal(after[old], before[old])  # old rows frozen
    assert not torch.allclose(after[new], before[new])  # new rows trained, and the merge carried them
    out = merged.get_output_embeddings().weight.detach()
    assert torch.equal(out[new], after[new])  # tied output rows follow


def test_a_trained_run_saves_the_new_rows_and_export_keeps_them(extended: tuple[Path, list[int]], tmp_path: Path,
                                                                  pairs_file: Path) -> None:
    import json

    from transformers import AutoModelForCausalLM

    from lmtailor.cli import main
    from lmtailor.export import export_run
    from lmtailor.runs import Run

    folder, new = extended
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    data = tmp_path / "d.jsonl"  # answers that use the new terms
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "output": f"kubectl {r['output']}"}) + "\n"
                            for r in rows))
    run = tmp_path / "run"
    assert main(["train", f"base_model={folder}", f"data.path={data}", "data.val_size=2", "max_steps=3",
                 "batch_size=4", "lr=1e-2", "eval.generate_examples=0", "eval.before_after=false",
                 f"output_dir={run}", "--no-progress"]) == 0
    base = AutoModelForCausalLM.from_pretrained(folder).get_input_embeddings().weight.detach()
    merged, _ = Run.open(str(run)).load(merge=True)
    rows_after = merged.get_input_embeddings().weight.detach()
    old = [i for i in range(base.shape[0]) if i not in new]
    assert torch.equal(rows_after[old], base[old]) and not torch.allclose(rows_after[new], base[new])
    export_run(str(run), "merged", tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").get_input_embeddings().weight.detach()
    assert torch.equal(exported, rows_after)


def test_terms_report_gives_tokens_per_term_and_domain_perplexity_before_and_after(
        extended: tuple[Path, list[int]], tiny_model: Path, tmp_path: Path, pairs_file: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from lmtailor.cli import main

    folder, _ = extended
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    data = tmp_path / "d.jsonl"  # domain text: answers that use the new terms
    data.write_text("".join(json.dumps({"instruction": r["instruction"], "output": f"kubectl {r['output']} then "
                                        f"systemctl restart"}) + "\n" for r in rows))
    held = tmp_path / "held.txt"
    held.write_text("".join(f"{r['instruction']}: kubectl {r['output']} then systemctl restart\n" for r in rows[:4]))
    run = tmp_path / "run"
    assert main(["train", f"base_model={folder}", f"data.path={data}", "data.val_size=2", "max_steps=8",
                 "batch_size=4", "lr=1e-2", "eval.generate_examples=0", "eval.before_after=false",
                 f"output_dir={run}", "--no-progress"]) == 0
    capsys.readouterr()
    out = tmp_path / "report.json"
    assert main(["terms", "report", "--terms", str(tmp_path / "terms.txt"), "--base", str(tiny_model), "--run",
                 str(run), "--text", str(held), "--context", "64", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tokens per term" in printed and "perplexity per word" in printed
    report = json.loads(out.read_text())
    before, after = report["before"], report["after"]
    assert report["terms"] == 2 and after["vocabulary"] > before["vocabulary"]
    assert after["tokens_per_term"] == 1.0 < before["tokens_per_term"]  # each term is one token now
    assert after["tokens"] < before["tokens"]  # the held-out text is shorter in tokens
    # the extended, trained model predicts held-out domain text better, in units both tokenizers share
    assert after["perplexity_per_word"] < before["perplexity_per_word"]
    assert after["bits_per_byte"] < before["bits_per_byte"]
