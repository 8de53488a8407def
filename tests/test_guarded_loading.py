"""One guarded loader: pickle weights are refused by every entry point, remote code stays off, runs open one way."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS
from lmtailor.cli import main
from lmtailor.errors import CheckpointError, ModelError
from lmtailor.models import (
    add_lora,
    load_adapter,
    load_model_config,
    load_pretrained,
    load_tokenizer,
    save_model,
)
from lmtailor.runs import Run, config_kind
from test_export import tiny_run  # noqa: F401  (session fixture: a LoRA run made by the real CLI)

REFUSED = "holds only pickle weights"


def _to_pickle(folder: Path) -> None:
    """Replace a folder's safetensors weights by the same tensors in a pickle (.bin) file."""
    for st in list(folder.glob("*.safetensors")):
        name = "adapter_model.bin" if st.name.startswith("adapter") else "pytorch_model.bin"
        torch.save(load_file(st), folder / name)
        st.unlink()


@pytest.fixture(scope="module")
def pickled_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model folder with its weights only in pytorch_model.bin."""
    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(tiny_model, folder)
    _to_pickle(folder)
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    return folder


@pytest.fixture(scope="module")
def full_run(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real full fine-tuning run folder, written by `lmtailor train` (2 steps)."""
    root = tmp_path_factory.mktemp("fullrun")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PAIRS))
    assert main(["train", f"base_model={tiny_model}", f"data.path={data}", f"output_dir={root / 'run'}",
                 "method=full", "max_steps=2", "batch_size=4", "data.val_size=0", "eval.before_after=false",
                 "eval.generate_examples=0", "data.system_prompt=Answer with a shell command.",
                 "--no-progress"]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def pickled_run(full_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the full run whose model/ holds only pytorch_model.bin."""
    run = tmp_path_factory.mktemp("pickledrun") / "run"
    shutil.copytree(full_run, run)
    _to_pickle(run / "model")
    return run


@pytest.fixture(scope="module")
def pickled_adapter_run(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A copy of the LoRA run whose model/ holds only adapter_model.bin."""
    run = tmp_path_factory.mktemp("pickledlora") / "lora-run"
    shutil.copytree(tiny_run, run)
    _to_pickle(run / "model")
    assert (run / "model" / "adapter_model.bin").is_file()
    return run


@pytest.fixture
def toy_task(tmp_path: Path) -> Path:
    import yaml

    rows = [{"text": f"{q} {i}", "label": "pos" if i % 2 else "neg"} for i, (q, _) in enumerate(PAIRS)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = {"name": "toy", "inputs": ["text"], "output": {"field": "label", "labels": {"neg": ["no"], "pos": ["yes"]}},
            "templates": ["Is this good? {{ text }}"], "metric": "accuracy", "few_shot": {"k": 0},
            "data": {"path": str(data), "format": "labeled", "val_fraction": 0.3}}
    path = tmp_path / "toy-task.yaml"
    path.write_text(yaml.safe_dump(task))
    return path


# ---- every entry point refuses pickle weights, through the real CLI --------------------------------------------

def _labeled(folder: Path) -> Path:
    path = folder / "labeled.jsonl"
    path.write_text("".join(json.dumps({"text": f"{q} {i}", "label": "a" if i % 2 else "b"}) + "\n"
                            for i in range(6) for q, _ in PAIRS))
    return path


def _cli_cases() -> list[tuple[str, str]]:
    verbs = ["generate", "generate-compare", "chat", "serve", "export-merged", "export-gguf", "prompt-run",
             "privacy-canary", "eval", "eval-perplexity"]
    cases = [(verb, target) for verb in verbs for target in ("model", "run", "adapter-run")]
    return [*cases, ("compare", "run"), ("compare", "adapter-run"), ("tokenizer-extend", "model"),
            ("tokenizer-extend", "run-model"), ("train", "model"), ("train-classify", "model"),
            ("train-seq2seq", "model")]


@pytest.mark.parametrize(("verb", "which"), _cli_cases(), ids=lambda x: x)
def test_cli_refuses_pickle_weights(verb: str, which: str, pickled_model: Path, pickled_run: Path,
                                    pickled_adapter_run: Path, toy_task: Path, pairs_file: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import uvicorn

    from lmtailor.privacy.canary import make_canaries, plant_canaries

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "stdin", io.StringIO("list files\n\n"))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("serve got past loading the models"))
    target = str({"model": pickled_model, "run": pickled_run, "adapter-run": pickled_adapter_run,
                  "run-model": pickled_run / "model"}[which])
    out = tmp_path / "out"
    if verb == "privacy-canary":
        listing = plant_canaries(pairs_file, tmp_path / "planted.jsonl", make_canaries([1], seed=1))
    terms = tmp_path / "terms.txt"
    terms.write_text("tar\ngrep\n")
    argv = {
        "generate": ["generate", target, "list files"],
        "generate-compare": ["generate", target, "list files", "--compare"],
        "chat": ["chat", target],
        "serve": ["serve", target],
        "export-merged": ["export", target, "--format", "merged", "--out", str(out)],
        "export-gguf": ["export", target, "--format", "gguf", "--out", str(out.with_suffix(".gguf"))],
        "prompt-run": ["prompt", "run", str(toy_task), "--model", target],
        "compare": ["compare", str(toy_task), target],
        "privacy-canary": ["privacy", "canary", target, "--canaries", str(listing) if verb == "privacy-canary" else ""],
        "tokenizer-extend": ["tokenizer", "extend", target, "--terms", str(terms), "--out", str(out)],
        "eval": ["eval", target, "--data", str(pairs_file), "--generate", "0"],
        "eval-perplexity": ["eval", target, "--data", str(pairs_file), "--metric", "perplexity"],
        "train": ["train", f"base_model={target}", f"data.path={pairs_file}", f"output_dir={out}", "max_steps=1"],
        "train-classify": ["train", f"base_model={target}", f"data.path={_labeled(tmp_path)}", "objective=classify",
                           f"output_dir={out}", "max_steps=1"],
        "train-seq2seq": ["train", f"base_model={target}", f"data.path={pairs_file}", "objective=seq2seq",
                          f"output_dir={out}", "max_steps=1"],
    }[verb]
    capsys.readouterr()
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and REFUSED in err[0], err
    assert "allow_pickle=True" in err[0] and "safetensors" in err[0]  # the fix is on the same line
    assert not (out / "model").exists() and not out.with_suffix(".gguf").exists()
    assert verb.startswith("train") or not out.exists()


def test_serve_library_refuses_a_pickled_adapter_on_a_shared_base(tiny_run: Path,  # noqa: F811
                                                                 pickled_adapter_run: Path) -> None:
    from lmtailor.serve import create_app, load_models

    # the second adapter run is put on the first one's base (PeftModel.load_adapter): the guard is there too
    with pytest.raises(CheckpointError, match=REFUSED):
        load_models([str(tiny_run), str(pickled_adapter_run)])
    with pytest.raises(CheckpointError, match=REFUSED):
        create_app([str(pickled_adapter_run)])


# ---- the guarded loaders --------------------------------------------------------------------------------------

def test_load_pretrained_refuses_pickle_unless_allowed(tiny_model: Path, pickled_model: Path) -> None:
    with pytest.raises(CheckpointError, match=REFUSED) as e:
        load_pretrained(str(pickled_model))
    assert "\n" not in str(e.value) and str(pickled_model) in str(e.value)
    model = load_pretrained(str(pickled_model), allow_pickle=True)
    reference = load_pretrained(str(tiny_model))
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_load_adapter_refuses_a_pickled_adapter_unless_allowed(tiny_model: Path, tiny_run: Path,  # noqa: F811
                                                              pickled_adapter_run: Path) -> None:
    with pytest.raises(CheckpointError, match=REFUSED):
        load_adapter(load_pretrained(str(tiny_model)), pickled_adapter_run / "model")
    ids = torch.tensor([[1, 5, 9, 12]])
    pickled = load_adapter(load_pretrained(str(tiny_model)), pickled_adapter_run / "model", allow_pickle=True)
    safe = load_adapter(load_pretrained(str(tiny_model)), tiny_run / "model")
    assert torch.allclose(pickled.eval()(input_ids=ids).logits, safe.eval()(input_ids=ids).logits)
    with pytest.raises(CheckpointError, match="adapter_config.json missing"):
        load_adapter(load_pretrained(str(tiny_model)), tiny_model)


@pytest.fixture
def remote_code_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "lmtailor_custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (folder / "configuration_custom.py").write_text("raise SystemExit('remote code ran')\n")
    return folder


def test_trust_remote_code_is_off_by_default(tiny_model: Path, remote_code_folder: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for load in (lambda: load_pretrained(str(remote_code_folder)),
                 lambda: load_model_config(str(remote_code_folder)),
                 lambda: Run.open(remote_code_folder).load()):
        with pytest.raises(ModelError, match="trust_remote_code is off") as e:
            load()
        assert "\n" not in str(e.value)

    import transformers

    seen: dict = {}
    original = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    Run.open(tiny_model).load()
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True


def test_tokenizer_loader_keeps_remote_code_off(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    seen: dict = {}
    original = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)
    load_tokenizer(str(tiny_model))
    assert seen["trust_remote_code"] is False


# ---- Run.open ---------------------------------------------------------------------------------------------------

def test_run_open_a_full_run_folder(full_run: Path, tiny_model: Path) -> None:
    run = Run.open(full_run)
    assert run.path == full_run and run.model_dir == full_run / "model"
    assert run.config["method"] == "full" and run.objective == run.config["objective"]
    assert run.base_model == str(tiny_model) and not run.adapter and run.kind == "causal-lm"
    assert run.system_prompt == "Answer with a shell command." and run.name == "run"
    model, tok = run.load()
    assert not model.training and type(model).__name__ == "LlamaForCausalLM" and tok.pad_token is not None


def test_run_open_an_adapter_run_folder(tiny_run: Path, tiny_model: Path) -> None:  # noqa: F811
    run = Run.open(tiny_run)
    assert run.adapter and run.base_model == str(tiny_model) and run.kind == "causal-lm"
    model, _ = run.load()
    assert hasattr(model, "peft_config") and not model.training
    merged, _ = run.load(merge=True)
    assert not hasattr(merged, "peft_config")
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(model(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5)


def test_run_open_a_model_folder_and_a_name(tiny_model: Path) -> None:
    run = Run.open(str(tiny_model))
    assert run.path == tiny_model and run.model_dir == tiny_model and run.config == {}
    assert run.objective is None and run.base_model == str(tiny_model) and run.system_prompt is None
    hub = Run.open("some-org/some-model")  # a hub id is only resolved when loaded: no network here
    assert hub.path is None and hub.model_dir is None and hub.base_model == "some-org/some-model"
    assert hub.name == "some-org/some-model" and hub.kind == "causal-lm"


def test_run_open_refuses_what_is_not_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CheckpointError, match="no such run or model folder") as e:
        Run.open(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value) and "lmtailor train" in str(e.value)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="neither a run folder nor a model folder"):
        Run.open(tmp_path / "notes")
    with pytest.raises(CheckpointError, match="is a file"):
        Run.open(tmp_path / "notes" / "a.txt")
    (tmp_path / "crashed" / "model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no model in"):
        Run.open(tmp_path / "crashed")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    with pytest.raises(CheckpointError, match="runs/typo"):  # a mistyped run folder, not a hub id
        Run.open("runs/typo")


@pytest.mark.parametrize(("config", "kind"), [
    ({"architectures": ["LlamaForCausalLM"]}, "causal-lm"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "seq-cls"),
    ({"architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}, "seq2seq"),
    ({"architectures": ["BartForConditionalGeneration"]}, "seq2seq"),
    ({"architectures": ["LlavaForConditionalGeneration"], "text_config": {}}, "causal-lm"),
    ({"architectures": ["BertForMaskedLM"]}, "masked-lm"),
    ({"architectures": ["BertForPreTraining"]}, "masked-lm"),
    ({}, "causal-lm"),
])
def test_kind_comes_from_config_json(config: dict, kind: str) -> None:
    assert config_kind(config) == kind


@pytest.mark.parametrize(("task_type", "base_arch", "kind"), [
    ("CAUSAL_LM", "LlamaForCausalLM", "causal-lm"),
    ("SEQ_CLS", "LlamaForCausalLM", "seq-cls"),
    ("SEQ_2_SEQ_LM", "T5ForConditionalGeneration", "seq2seq"),
    ("CAUSAL_LM", "BertForMaskedLM", "masked-lm"),  # add_lora tags a masked LM's adapter CAUSAL_LM
])
def test_adapter_kind_comes_from_task_type_and_base(task_type: str, base_arch: str, kind: str,
                                                    tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": [base_arch]}))
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text(
        json.dumps({"task_type": task_type, "base_model_name_or_path": str(base)}))
    run = Run.open(tmp_path / "adapter")
    assert run.adapter and run.kind == kind and run.base_model == str(base)


def test_classification_adapter_keeps_its_labels(tiny_model: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    labels = {0: "neg", 1: "neutral", 2: "pos"}
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    model = add_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    tok = load_tokenizer(str(tiny_model))
    save_model(model, tok, tmp_path / "clf")
    run = Run.open(tmp_path / "clf")
    assert run.adapter and run.kind == "seq-cls" and run.auto_class == "AutoModelForSequenceClassification"
    loaded, _ = run.load()
    assert loaded.config.id2label == labels
    ids = torch.tensor([[1, 5, 9, 12]])
    assert torch.allclose(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)
