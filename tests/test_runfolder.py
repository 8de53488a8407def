"""Run folders and outputs are never lost or mixed up (issue 17), through the real CLI on a tiny model.

One finished run (4 LoRA steps, checkpoints at steps 2 and 4) is trained once; each test works on a copy of it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lmtailor.cli import main

STEPS = ["max_steps=6", "save_every=2", "keep_checkpoints=3", "batch_size=4", "lr=5e-3", "seed=7",
         "eval.before_after=false", "eval.generate_examples=0", "--no-progress"]


def _train(tiny: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["train", f"base_model={tiny}", f"data.path={data}", f"output_dir={out}", *STEPS, *extra])


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder of a finished 6-step run with checkpoints at steps 2 and 4, its data file)."""
    from conftest import PAIRS

    root = tmp_path_factory.mktemp("finished")
    data = root / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{q} {i}", "output": a}) + "\n"
                            for i in range(3) for q, a in PAIRS))
    assert _train(tiny_model, data, root / "run") == 0
    return root / "run", data


@pytest.fixture
def run(finished: tuple[Path, Path], tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished[0], copy)
    return copy


@pytest.fixture
def crashed(run: Path) -> Path:
    """The run as a kill after its step-4 checkpoint leaves it: no final model."""
    shutil.rmtree(run / "model")
    return run


def test_existing_outputs_are_an_error_and_force_keeps_a_backup(run, finished, tiny_model, tmp_path, capsys,
                                                                  monkeypatch):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(run), "--format", "merged", "--out", str(out)]) == 2
    assert "already exists" in _one_line_error(capsys) and (out / "keep.txt").read_text() == "mine"
    assert main(["export", str(run), "--format", "merged", "--out", str(out), "--force"]) == 0
    backups = list(tmp_path.glob("merged.bak-*"))
    assert len(backups) == 1 and (backups[0] / "keep.txt").read_text() == "mine"
    assert (out / "config.json").is_file() and not (out / "keep.txt").exists()
    # a file where a GGUF goes, the current folder, a folder holding the input, a path under a file
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not yours to delete")
    assert main(["export", str(run), "--format", "gguf", "--out", str(gguf)]) == 2
    assert "already exists" in _one_line_error(capsys) and gguf.read_bytes() == b"not yours to delete"
    monkeypatch.chdir(tmp_path)
    for target, message in ((".", "current folder"), (str(tmp_path.parent), "current folder"),
                            (str(gguf / "x"), "is a file")):
        assert main(["export", str(run), "--format", "merged", "--out", target, "--force"]) == 2
        assert message in _one_line_error(capsys)
    # tokenizer extend / train, eval, privacy scrub
    terms = tmp_path / "terms.txt"
    terms.write_text("kubectl\n")
    assert main(["tokenizer", "extend", str(tiny_model), "--terms", str(terms), "--out", str(out)]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert main(["tokenizer", "train", "--corpus", str(terms), "--out", str(out)]) == 2
    assert "already exists" in _one_line_error(capsys)
    assert main(["eval", str(run), "--data", str(finished[1]), "--generate", "0", "--out", str(out)]) == 2
    assert "is a folder" in _one_line_error(capsys)
    assert main(["privacy", "scrub", str(finished[1]), "--out", str(out)]) == 2
    assert "is a folder" in _one_line_error(capsys)
    assert main(["privacy", "scrub", str(finished[1]), "--out", str(gguf)]) == 2
    assert "already exists" in _one_line_error(capsys) and gguf.read_bytes() == b"not yours to delete"
    assert (out / "config.json").is_file()


def test_overwrite_with_a_bad_data_path_keeps_the_finished_run(run, finished, tiny_model, capsys):
    before = _snapshot(run)
    assert _train(tiny_model, run.parent / "typo.jsonl", run, "overwrite=true") == 2
    assert "typo.jsonl" in _one_line_error(capsys)
    assert _snapshot(run) == before
    old_id = json.loads((run / "run.json").read_text())["id"]
    # a good overwrite replaces it, and its checkpoints are the new run's only
    assert _train(tiny_model, finished[1], run, "overwrite=true", "seed=8", "max_steps=4") == 0
    ident = json.loads((run / "run.json").read_text())
    assert ident["id"] != old_id and ident["seed"] == 8
    assert not list(run.glob(".lmtailor-previous-*"))
    assert [json.loads(line)["step"] for line in (run / "history.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    for ckpt in (run / "checkpoints").iterdir():
        assert json.loads((ckpt / "manifest.json").read_text())["run"]["id"] == ident["id"]


def test_a_fresh_run_never_takes_over_another_and_resume_names_what_changed(crashed, finished, tiny_model,
                                                                            tmp_path, capsys):
    history = (crashed / "history.jsonl").read_text()
    assert _train(tiny_model, finished[1], crashed, "seed=3", "lr=1e-2") == 2
    assert "checkpoints of an unfinished run" in _one_line_error(capsys)
    assert (crashed / "history.jsonl").read_text() == history
    # settings a checkpoint cannot take are refused, each named
    assert _train(tiny_model, finished[1], crashed, "resume=true", "lora.r=4", "batch_size=2") == 2
    line = _one_line_error(capsys)
    assert "lora.r 16 -> 4" in line and "batch_size 4 -> 2" in line
    other = tmp_path / "other.jsonl"
    other.write_text(finished[1].read_text().replace("ls -la", "ls -l"))
    assert _train(tiny_model, other, crashed, "resume=true") == 2
    assert "data files' content" in _one_line_error(capsys)
    # a held lock: a second training into the folder stops at once
    fd = os.open(crashed / ".lmtailor.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert _train(tiny_model, finished[1], crashed, "resume=true") == 2
        assert "in use by another training" in _one_line_error(capsys)
    finally:
        os.close(fd)
    # settings that can change are applied and named; staging a kill left is cleaned, other files are kept
    (crashed / ".model.abcd1234.tmp").mkdir()
    (crashed / "checkpoints" / ".step-000006.abcd1234.tmp").mkdir()
    (crashed / ".history.jsonl.abcd1234.tmp").write_text("x")
    (crashed / ".notes.old").write_text("the user's")
    assert _train(tiny_model, finished[1], crashed, "resume=true", "lr=1e-2", "eval_every=3") == 0
    out = capsys.readouterr().out
    assert "applied from step 4 on: eval_every 0 -> 3; lr 0.005 -> 0.01" in out
    names = {p.name for p in crashed.iterdir()} | {p.name for p in (crashed / "checkpoints").iterdir()}
    assert not [n for n in names if n.endswith(".tmp")] and ".notes.old" in names


@pytest.mark.parametrize("damage", ["truncate weights", "garble rng.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_one(crashed, finished, tiny_model, capsys, damage):
    newest = crashed / "checkpoints" / "step-000004"
    if damage == "truncate weights":
        data = (newest / "trainable.safetensors").read_bytes()
        (newest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    else:
        (newest / "rng.json").write_text((newest / "rng.json").read_text().replace("[", "{", 1))
    assert _train(tiny_model, finished[1], crashed, "resume=true") == 0
    out = capsys.readouterr().out
    assert "step-000004" in out and "damaged" in out and "resumed from" in out and "step-000002" in out
    # resumed from step 2, the run still ends with the uninterrupted run's weights
    expected = load_file(str(finished[0] / "model" / "adapter_model.safetensors"))
    got = load_file(str(crashed / "model" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all((expected[k] == got[k]).all() for k in expected)


def test_a_non_finite_lr_stops_naming_the_step_and_keeps_the_last_good_checkpoint(crashed, finished, tiny_model,
                                                                                 capsys):
    good = _snapshot(crashed / "checkpoints")
    assert _train(tiny_model, finished[1], crashed, "resume=true", "lr=.inf") == 2
    assert "training diverged at step 6" in _one_line_error(capsys)
    assert _snapshot(crashed / "checkpoints") == good and not (crashed / "model").exists()
    fresh = crashed.parent / "fresh"
    assert _train(tiny_model, finished[1], fresh, "lr=.inf", "save_every=1") == 2
    assert "training diverged at step 1" in _one_line_error(capsys)
    assert not (fresh / "model").exists() and not list((fresh / "checkpoints").glob("step-*"))


def test_run_folder_paths_give_one_line_errors(finished, tiny_model, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoints").write_text("x")
    for out, message in ((a_file, "is a file"), (a_file / "sub", "which is a file"),
                         (Path("/proc/lmtailor-nope"), "cannot create"), (tmp_path / "ck", "checkpoints is a file")):
        assert _train(tiny_model, finished[1], out) == 2
        assert message in _one_line_error(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "read-only"
        locked.mkdir(mode=0o500)
        assert _train(tiny_model, finished[1], locked) == 2
        assert "not writable" in _one_line_error(capsys)


def test_a_damaged_run_folder_gives_one_line_errors(run, finished, tmp_path, capsys):
    config = (run / "config.yaml").read_text()
    adapter = (run / "model" / "adapter_model.safetensors").read_bytes()
    damaged = {"config: data: 5": "data: 5\n", "config: a list": "- 1\n"}
    for damage in ("config: data: 5", "config: a list", "truncated adapter"):
        (run / "config.yaml").write_text(damaged.get(damage, config))
        (run / "model" / "adapter_model.safetensors").write_bytes(adapter[:100] if "adapter" in damage else adapter)
        for verb in (["eval", str(run), "--data", str(finished[1]), "--generate", "0"],
                     ["generate", str(run), "hi", "--max-new-tokens", "2"],
                     ["export", str(run), "--format", "merged", "--out", str(tmp_path / "x")]):
            assert main(verb) == 2, (damage, verb[0])
            _one_line_error(capsys)


def test_compare_configs_sorts_changes_into_applied_and_refused():
    from lmtailor.runfolder import compare_configs

    old = {"lr": 0.001, "seed": 1, "resume": False, "lora": {"r": 8}, "pretrain": {"scratch": None},
           "eval": {"samples": 3}, "only_old": 1}
    new = {"lr": 0.002, "seed": 1, "resume": True, "lora": {"r": 4}, "pretrain": {"scratch": {"arch": "llama"}},
           "eval": {"samples": 5}, "only_new": 2}
    applied, refused = compare_configs(old, new)
    assert applied == ["eval {'samples': 3} -> {'samples': 5}", "lr 0.001 -> 0.002"]
    assert refused == ["lora.r 8 -> 4", "pretrain.scratch None -> {'arch': 'llama'}"]
