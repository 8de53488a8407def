"""Export: LoRA merged into a plain HF folder that generates like the adapter run; GGUF round trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PAIRS


def train_tiny_run(base: Path, root: Path) -> Path:
    """A 3-step LoRA run on the tiny model, made by the real CLI (once per session: cached under `root`)."""
    run = root / "lora-run"
    if (run / "model" / "adapter_config.json").is_file():
        return run
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    # A large learning rate, so that the adapter visibly changes the answers (the tests compare them). float32 on
    # every CPU: at this rate bf16 steps (dtype auto where the CPU has AMX) wander, and with them the q8_0 error of
    # the export check (0.022 to 0.098 of the logits' spread between two bf16 runs, 0.035 in float32).
    cmd = [sys.executable, "-m", "lmtailor", "train", f"base_model={base}", f"data.path={data}",
           f"output_dir={run}", "max_steps=3", "batch_size=4", "micro_batch_size=4", "lr=0.05",
           "eval.before_after=false", "mixed_precision=no", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.fixture(scope="session")
def tiny_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_run(tiny_model, tmp_path_factory.getbasetemp())


PROMPTS = ["list files", "count lines", "show processes"]


def _greedy(model, tok, prompts=PROMPTS):  # type: ignore[no-untyped-def]
    from lmtailor.config import GenerationSettings
    from lmtailor.generate import generate

    return generate(model, tok, prompts, GenerationSettings(max_new_tokens=16, batch_size=1))


def test_merged_export_generates_like_the_adapter(tiny_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmtailor.export import export_run
    from lmtailor.models import prepare_tokenizer
    from lmtailor.runs import Run

    out = tmp_path / "merged"
    summary = export_run(tiny_run, "merged", out)
    assert summary["merged_adapter"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no peft
    tok = prepare_tokenizer(AutoTokenizer.from_pretrained(out))

    run = Run.open(tiny_run)
    adapter, atok = run.load()
    assert run.adapter
    want = _greedy(adapter, atok)
    assert _greedy(merged, tok) == want
    with adapter.disable_adapter():
        assert _greedy(adapter, atok) != want, "the adapter should change the answers (else this test is vacuous)"


@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_gguf_round_trip(tiny_run: Path, tiny_model: Path, tmp_path: Path, gguf_type: str) -> None:
    import gguf

    from lmtailor.export import GGUF_TOLERANCE, compare_gguf, export_run, load_merged

    out = tmp_path / "model.gguf"
    summary = export_run(tiny_run, "gguf", out, gguf_type=gguf_type)
    assert out.is_file() and summary["bytes"] == out.stat().st_size
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was not renamed away"
    check = summary["check"]
    assert check["rms_rel_diff"] <= GGUF_TOLERANCE[gguf_type]
    assert check["top1_agreement"] >= 0.95  # near-ties in a tiny random model may flip

    reader = gguf.GGUFReader(out)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.attn_q.weight" in names
    kinds = {t.tensor_type.name for t in reader.tensors if t.name.endswith("attn_q.weight")}
    assert kinds == {"Q8_0" if gguf_type == "q8_0" else "F16"}

    # The comparison itself must notice a different model: against the base (adapter off) it fails.
    base, tok, _ = load_merged(tiny_model)
    assert compare_gguf(out, base, tok)["rms_rel_diff"] > GGUF_TOLERANCE["q8_0"]


def test_gguf_rejects_other_architectures(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtailor.errors import ModelError
    from lmtailor.ggufwrite import write_gguf

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ModelError, match="llama-architecture"):
        write_gguf(model, None, tmp_path / "x.gguf")
    assert not list(tmp_path.iterdir())


def test_export_rejects_unknown_format(tiny_model: Path, tmp_path: Path) -> None:
    from lmtailor.errors import ConfigError
    from lmtailor.export import export_run

    with pytest.raises(ConfigError, match="format"):
        export_run(tiny_model, "onnx", tmp_path / "x")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="GGUF type"):
        export_run(tiny_model, "gguf", tmp_path / "x.gguf", gguf_type="q4_k")
