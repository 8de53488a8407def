"""The same recipe under `accelerate launch` with 2 processes (DDP over gloo on CPU) matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ACCELERATE = Path(sys.executable).with_name("accelerate")


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _one_and_two(tiny_model: Path, pairs_file: Path, tmp_path: Path, steps: int, method: str, mixed: str
                 ) -> tuple[dict, dict, list[list[float]]]:
    """The same recipe in one process and under `accelerate launch` with two: their metrics and step losses.
    Global batch 8: one process accumulates 4 micro-batches of 2; two processes do 2 each and average."""
    rows = [json.loads(line) for line in pairs_file.read_text().splitlines()]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({**r, "instruction": f"{r['instruction']} {i}"}) + "\n"
                            for i in range(4) for r in rows))
    common = ["train", f"base_model={tiny_model}", f"data.path={data}", f"max_steps={steps}", "batch_size=8",
              "micro_batch_size=2", "lr=1e-2", f"method={method}", "eval.before_after=false", "data.val_size=4",
              f"mixed_precision={mixed}", "--no-progress"]
    _run([sys.executable, "-m", "lmtailor", *common, f"output_dir={tmp_path / 'one'}"])
    _run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", mixed, "--dynamo_backend", "no", "-m", "lmtailor", *common,
          f"output_dir={tmp_path / 'two'}"])
    one, two = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("one", "two"))
    losses = [[json.loads(x)["loss"] for x in (tmp_path / r / "history.jsonl").read_text().splitlines()]
              for r in ("one", "two")]
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert len(losses[0]) == len(losses[1]) == steps
    return one, two, losses


def test_two_processes_match_one(tiny_model, pairs_file, tmp_path):
    # mixed_precision=no: on a CPU with AMX dtype auto trains in bf16, whose rounding depends on how a step is split
    _, _, losses = _one_and_two(tiny_model, pairs_file, tmp_path, 6, "full", "no")
    # Same examples, same token-mean loss; only float summation order differs (tolerance 1e-4 relative).
    assert all(abs(a - b) <= 1e-4 * abs(a) for a, b in zip(*losses, strict=True))
    assert losses[0][-1] < losses[0][0]
    w1 = load_file(tmp_path / "one" / "model" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


def test_two_processes_train_lora_over_a_bf16_base(tiny_model, pairs_file, tmp_path):
    """DDP over a model whose frozen weights are bf16 and whose adapters are float32 (LoRA under bf16): the
    processes start from the same weights (DDP broadcasts both dtypes) and track one process; bf16 rounds
    differently with the step split, so within 2%."""
    _, two, losses = _one_and_two(tiny_model, pairs_file, tmp_path, 4, "lora", "bf16")
    assert two["precision"] == {"mixed": "bf16", "frozen_weights": ["bfloat16"]}
    assert all(abs(a - b) <= 0.02 * abs(a) for a, b in zip(*losses, strict=True)), losses


# `lmtailor train` whose budget's timed steps say 1 ms a step: the run must re-fit on the way, on every process alike
HOPEFUL_BUDGET = """
import sys
import lmtailor.loop
from lmtailor.cli import main
lmtailor.loop.measure_step = lambda *args, **kwargs: (0.001, 0.001)
sys.exit(main(sys.argv[1:]))
"""


def test_two_processes_refit_a_budget_together(tiny_model, pairs_file, tmp_path):
    """A budget re-fitted on the way under DDP: the main process decides, every process stops at the same step
    (no hang, no process left waiting in a collective), and the run ends within its budget's steps."""
    import re

    script = tmp_path / "hopeful.py"
    script.write_text(HOPEFUL_BUDGET)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "train",
                           f"base_model={tiny_model}", f"data.path={pairs_file}", "epochs=2000", "batch_size=4",
                           "method=full", "eval.before_after=false", "data.val_size=2", "eval_every=0",
                           "mixed_precision=no", "budget=8s", f"output_dir={tmp_path / 'two'}", "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fitted = int(re.search(r"-> (\d+) steps \(", proc.stdout).group(1))
    refits = re.findall(r"budget: at step \d+ a step takes [\d.]+ s: (\d+) -> (\d+) steps", proc.stdout)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and refits, proc.stdout[-3000:]
    assert metrics["steps"] == int(refits[-1][1]) < fitted
    assert len(metrics["budget_refits"]) == len(refits)  # printed once, by the main process


def test_dpo_two_processes_match_one(tiny_model, tmp_path):
    """DPO with LoRA (the reference: the adapter disabled) under DDP: the same losses, margins and adapter."""
    words = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo"]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"what to do with {w} {i}", "chosen": f"ls -la {w}",
                                        "rejected": f"rm -rf {w}"}) + "\n" for i in range(3) for w in words))
    common = ["train", f"base_model={tiny_model}", f"data.path={data}", "objective=dpo", "max_steps=4",
              "batch_size=8", "micro_batch_size=2", "lr=1e-2", "lora.target_modules=all-linear",
              "eval.before_after=false", "data.val_size=4", "eval_every=0", "mixed_precision=no", "--no-progress"]
    _run([sys.executable, "-m", "lmtailor", *common, f"output_dir={tmp_path / 'one'}"])
    _run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmtailor", *common,
          f"output_dir={tmp_path / 'two'}"])
    hist = [[json.loads(x) for x in (tmp_path / r / "history.jsonl").read_text().splitlines()] for r in ("one", "two")]
    assert len(hist[0]) == len(hist[1]) == 4
    for a, b in zip(*hist, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-4 * abs(a["loss"])
        assert abs(a["reward_margin"] - b["reward_margin"]) <= 1e-4 + 1e-4 * abs(a["reward_margin"])
    assert hist[0][-1]["loss"] < hist[0][0]["loss"]
    w1 = load_file(tmp_path / "one" / "model" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "adapter_model.safetensors")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-4) for k in w1)


GRPO = ["objective=grpo", "batch_size=8", "micro_batch_size=2", "grpo.group=4", "grpo.max_new_tokens=6",
        "lora.target_modules=all-linear", "eval.before_after=false", "data.val_size=0", "eval_every=0",
        "--no-progress"]


def _grpo_one_and_two(model: Path, data: Path, tmp_path: Path, *extra: str) -> list[list[dict]]:
    common = ["train", f"base_model={model}", f"data.path={data}", *GRPO, "mixed_precision=no", *extra]
    _run([sys.executable, "-m", "lmtailor", *common, f"output_dir={tmp_path / 'one'}"])
    _run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmtailor", *common,
          f"output_dir={tmp_path / 'two'}"])
    w1 = load_file(tmp_path / "one" / "model" / "adapter_model.safetensors")
    w2 = load_file(tmp_path / "two" / "model" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in w1.items() if "lora_B" in k)  # the adapter did train
    # Per tensor, relative to its size: Adam turns a gradient entry near zero into a step of about lr whichever
    # its sign, so summation order alone (which differs with the CPU's kernels) can move one entry by ~lr/100
    # (seen on an AVX-512 Xeon: 1 of 32,768 entries off by 2.1e-4, the tensor's difference 9e-5 of its norm).
    assert all(float((w1[k] - w2[k]).norm()) <= 1e-3 * float(w1[k].norm()) + 1e-6 for k in w1)
    return [[json.loads(x) for x in (tmp_path / r / "history.jsonl").read_text().splitlines()] for r in ("one", "two")]


def _close(a: float, b: float, tol: float = 1e-4) -> bool:
    return abs(a - b) <= tol + tol * abs(a)


def test_grpo_two_processes_match_one(tiny_model, tmp_path):
    """grpo with a verifiable reward (a target length) and the KL to the adapter-disabled reference, global batch 8
    (4 prompts per micro-batch-pair): one process accumulating 4 micro-batches and two processes with 2 each sample
    the same answers (per-answer seeds), so they log the same rewards and losses and end with the same adapter."""
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{w} {i}", "output": "ls -la"}) + "\n" for i in range(2)
                            for w in ("alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo")))
    hist = _grpo_one_and_two(tiny_model, data, tmp_path, "max_steps=3", "lr=1e-2", "grpo.reward.length=12",
                             "grpo.reward.stop=0.5")
    assert len(hist[0]) == len(hist[1]) == 3
    for a, b in zip(*hist, strict=True):
        # the same answers: rewards and lengths equal (micro-batches of equal size: the mean of their means is the
        # step's mean; not so the logged KL, a token mean per micro-batch); the loss differs only by summation order
        for key in ("loss", "reward_mean", "answer_length"):
            assert _close(a[key], b[key]), (key, a, b)
    assert any(r["reward_std"] > 0 for r in hist[0])  # the groups' rewards differ: advantages are not all zero


def test_grpo_discriminator_two_processes_match_one(tiny_model, tmp_path):
    """grpo with the discriminator reward (the GAN set-up) under DDP: the judge scores every pass of a step with
    the same head and takes its turn on the whole step's reals and fakes, its gradients summed over processes, so
    two processes train the same policy and the same judge as one process accumulating micro-batches."""
    data = tmp_path / "real.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"{w} {i}", "output": "ls"}) + "\n" for i in range(2)
                            for w in ("alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo")))
    hist = _grpo_one_and_two(tiny_model, data, tmp_path / "runs", "max_steps=3", "lr=2e-2", "grpo.reward.stop=0",
                             "grpo.max_new_tokens=3", "grpo.reward.discriminator.lr=0.05",
                             "grpo.reward.discriminator.steps_per_gen_step=2")
    for a, b in zip(*hist, strict=True):
        for key in ("loss", "reward_mean", "disc_accuracy", "disc_real_prob", "disc_loss"):
            assert _close(a[key], b[key]), (key, a, b)
    assert hist[0][-1]["disc_accuracy"] != 0.5  # the judge has learnt something after its first turn
    j1 = load_file(tmp_path / "runs" / "one" / "model" / "companion.safetensors")
    j2 = load_file(tmp_path / "runs" / "two" / "model" / "companion.safetensors")
    assert j1.keys() == j2.keys() and all(torch.allclose(j1[k], j2[k], atol=1e-5) for k in j1)
    assert float(j1["head.weight"].abs().max()) > 0
