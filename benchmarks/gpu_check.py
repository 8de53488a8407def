"""GPU check of issue 15: bf16 full fine-tuning, LoRA and QLoRA of a ~1B llama built from its config (random weights:
the GPU machine has no network), packing on, through `lmtailor train`; HF `Trainer` on the same model, batch and
precision as the obvious alternative.

For each run: steady tokens/s (the first steps, with their kernel selection and allocator warm-up, left out), model
FLOPs utilisation against the datasheet's dense bf16 peak and against the peak of a large bf16 matmul measured here,
and the measured peak memory beside `lmtailor plan`'s estimate (`plan.run_estimate`) for the same run.

    bash benchmarks/gpu_check.sh                      # on a GPU machine; writes $OUT/gpu_check.json if OUT is set
    python benchmarks/gpu_check.py --tiny             # CPU self-test of this script: a tiny llama, 3 steps each

Model FLOPs per token: full fine-tuning 6 x (matmul weights) + attention (12 x layers x hidden x the mean attended
length, half the row under a causal mask); LoRA and QLoRA 4 x (matmul weights) + attention, since frozen weights get
no weight gradients; the recomputation of gradient checkpointing is not counted (hardware, not model, FLOPs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
SPEC_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, max_position_embeddings=4096)
SPEC_TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=512)


def corpus() -> list[str]:
    """Real English and code to train the tokenizer and fill rows: this repository's docs and sources."""
    files = sorted(ROOT.glob("*.md")) + sorted((ROOT / "docs").glob("**/*.md")) + sorted(
        (ROOT / "src").glob("**/*.py"))
    return [f.read_text(errors="replace") for f in files]


def build(work: Path, spec: dict[str, Any], rows: int, row_chars: int, device: str) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmtailor.tokenizers import train_bpe

    texts = corpus()
    tok = train_bpe(texts, vocab_size=32000, min_frequency=2)
    tok.save_pretrained(work / "m")
    cfg = LlamaConfig(**spec, vocab_size=len(tok), tie_word_embeddings=True, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):  # random init of ~1B parameters takes a minute on a CPU, a second on a GPU
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(work / "m")  # bf16 on disk: half the bytes; runs load float32
    del model
    text = "\n".join(texts)
    step = max(1, (len(text) - row_chars) // max(rows, 1))
    lines = [{"text": text[i * step:i * step + row_chars]} for i in range(rows)]
    (work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return {**spec, "vocab_size": len(tok), "tie_word_embeddings": True}


def measured_bf16_tflops(device: str) -> float | None:
    import torch

    if device != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * 10 / (start.elapsed_time(end) / 1e3) / 1e12


def steady_rate(history: list[dict[str, Any]], skip: int) -> tuple[float, float]:
    """(tokens/s, seconds/step) between step `skip` and the last step, from history.jsonl's cumulative figures."""
    a, b = history[min(skip, len(history) - 2) - 1], history[-1]
    tokens = lambda r: r["tokens_per_s"] * r["elapsed_s"]  # noqa: E731 - cumulative tokens at that step
    seconds = b["elapsed_s"] - a["elapsed_s"]
    return (tokens(b) - tokens(a)) / seconds, seconds / (b["step"] - a["step"])


def flops_per_token(shape: Any, method: str, attended: float) -> float:
    """Model FLOPs per token (see the module docstring) from `plan.Shape`'s linear weights, the head included."""
    matmul = shape.layers * shape.layer_linear() + shape.vocab * shape.hidden
    attention = 12 * shape.layers * shape.hidden * attended  # QK^T and AV (2 x 2h per key) forward, twice backward
    return (6 if method == "full" else 4) * matmul + attention


def train_args(work: Path, method: str, steps: int, a: argparse.Namespace, out: Path) -> list[str]:
    """`lmtailor train` on the built model and rows; validation only after the last step (eval_every=0), as the
    HF Trainer side has none, so that both rates are of training steps."""
    return ["train", "objective=clm", f"base_model={work / 'm'}", f"data.path={work / 'd.jsonl'}", f"method={method}",
            f"max_length={a.seq}", f"pack_length={a.seq}", f"batch_size={a.batch}", f"micro_batch_size={a.micro}",
            f"max_steps={steps}", "eval.before_after=false", "data.val_size=8", "eval_every=0",
            f"gradient_checkpointing={str(method != 'full').lower()}", f"output_dir={out}", "lr=1e-4", "--no-progress"]


def run_profiled(work: Path, method: str, a: argparse.Namespace, out_txt: Path) -> None:
    """torch.profiler over one optimizer step of `lmtailor train` (the one after the skipped warm-up steps): the top
    operators by device time and by host time, and the step's wall time against its kernels' busy time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import lmtailor.loop as loop_module
    from lmtailor.cli import main as cli

    original = loop_module._optimizer_step
    calls = {"n": 0}
    cuda = torch.cuda.is_available()

    def profiled(loop: Any, items: list[Any]) -> Any:
        calls["n"] += 1
        if calls["n"] != a.skip + 1:
            return original(loop, items)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        t0 = time.perf_counter()
        with profile(activities=activities) as prof:
            result = original(loop, items)
            if cuda:
                torch.cuda.synchronize()
        write_profile(method, prof, time.perf_counter() - t0, cuda, out_txt)
        return result

    loop_module._optimizer_step = profiled  # type: ignore[assignment]
    cli(train_args(work, method, a.skip + 2, a, work / f"profile-{method}"))


def write_profile(name: str, prof: Any, wall: float, cuda: bool, out_txt: Path) -> None:
    events = prof.key_averages()
    tables = [events.table(sort_by=key, row_limit=30) for key in
              (("device_time_total",) if cuda else ()) + ("self_cpu_time_total",)]
    out_txt.write_text(f"{name}: one step, wall {wall:.3f} s\n" + "\n\n".join(tables))
    print(f"{name}: one step profiled, wall {wall:.3f} s", flush=True)


def run_ours(work: Path, method: str, steps: int, a: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    out = work / f"run-{method}"
    cmd = [sys.executable, "-m", "lmtailor", *train_args(work, method, steps, a, out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=a.run_timeout)
    wall = time.perf_counter() - t0
    (work / f"{method}.log").write_text(p.stdout + p.stderr)
    if p.returncode:
        tail = (p.stdout + p.stderr).strip().splitlines()[-15:]
        print(f"{method}: failed (exit {p.returncode}):\n  " + "\n  ".join(tail), flush=True)
        return {"error": tail[-1] if tail else f"exit {p.returncode}", "log_tail": tail}
    metrics = json.loads((out / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    tps, sps = steady_rate(history, a.skip)
    data = metrics["data"]
    return {"tokens_per_s": tps, "seconds_per_step": sps, "steps": metrics["steps"], "wall_s": round(wall, 1),
            "losses": [r["loss"] for r in history], "peak_memory_mib": metrics.get("peak_memory_mib"),
            "seconds": metrics.get("seconds"),
            "sequences": data.get("train_sequences"), "tokens": data.get("train_tokens")}


def run_hf(work: Path, steps: int, a: argparse.Namespace, result: Path) -> None:
    """HF Trainer, full fine-tuning: the same model, rows, batch, micro-batch and bf16 autocast over float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(work / "m")
    rows = [json.loads(line)["text"] for line in (work / "d.jsonl").read_text().splitlines()]
    enc = [tok(t, truncation=True, max_length=a.seq)["input_ids"] for t in rows]
    data = [{"input_ids": ids, "labels": ids} for ids in enc]
    model = AutoModelForCausalLM.from_pretrained(work / "m", dtype=torch.float32, attn_implementation="sdpa")
    times: list[tuple[float, int]] = []

    from torch.profiler import ProfilerActivity, profile

    profiled = a.profile_side == "hf"
    prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if profiled and state.global_step == a.skip:
                self.t0 = time.perf_counter()
                prof.__enter__()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter(), state.num_input_tokens_seen))
            if profiled and state.global_step == a.skip + 1:
                prof.__exit__(None, None, None)
                write_profile("hf", prof, time.perf_counter() - self.t0, device == "cuda",
                              work / "profile-hf.txt")

    def collate(items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.full((len(items), width), tok.pad_token_id)
        labels = torch.full((len(items), width), -100)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(x["input_ids"]), torch.tensor(x["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    args = TrainingArguments(output_dir=str(work / "hf"), per_device_train_batch_size=a.micro,
                             gradient_accumulation_steps=a.batch // a.micro, max_steps=steps, learning_rate=1e-4,
                             bf16=device == "cuda", logging_steps=1, save_strategy="no", report_to=[],
                             include_num_input_tokens_seen="non_padding", dataloader_num_workers=0,
                             use_cpu=device == "cpu", disable_tqdm=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()]).train()
    first = min(a.skip, len(times) - 2) - 1  # the steady rate from the end of this step, as steady_rate does
    (t_a, n_a), (t_b, n_b) = times[first], times[-1]
    result.write_text(json.dumps({
        "tokens_per_s": (n_b - n_a) / (t_b - t_a), "seconds_per_step": (t_b - t_a) / (len(times) - 1 - first),
        "peak_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU self-test: a tiny llama, 3 steps per run")
    p.add_argument("--methods", default="full,lora,qlora,hf")
    p.add_argument("--steps", type=int, default=14)
    p.add_argument("--skip", type=int, default=4, help="steps left out of the steady rate")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--run-timeout", type=int, default=180)
    p.add_argument("--work")
    p.add_argument("--profile", default="", help="comma-separated methods to profile one step of (torch.profiler)")
    p.add_argument("--hf-side", help=argparse.SUPPRESS)
    p.add_argument("--profile-side", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.tiny:
        a.steps, a.skip, a.seq, a.batch, a.micro = 4, 2, 256, 4, 2
    if a.hf_side:
        run_hf(Path(a.work), a.steps, a, Path(a.hf_side))
        return
    if a.profile_side == "hf":
        run_hf(Path(a.work), a.skip + 2, a, Path(a.work) / "hf-profiled.json")
        return
    if a.profile_side:
        run_profiled(Path(a.work), a.profile_side, a, Path(a.work) / f"profile-{a.profile_side}.txt")
        return

    import torch

    from lmtailor.plan import run_estimate, shape_of

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(a.work or tempfile.mkdtemp(prefix="gpu_check-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    gpu = torch.cuda.get_device_name() if device == "cuda" else "none (CPU self-test)"
    datasheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in gpu), None)
    measured = measured_bf16_tflops(device)
    import transformers
    print(f"device: {gpu}; torch {torch.__version__}, transformers {transformers.__version__}; bf16 peak: "
          f"datasheet {datasheet} TFLOP/s, measured (8192^3 matmul) "
          f"{'-' if measured is None else f'{measured:.0f}'} TFLOP/s", flush=True)
    t0 = time.perf_counter()
    spec = build(work, SPEC_TINY if a.tiny else SPEC_1B, rows=a.batch * (a.steps + 2) + 8,
                 row_chars=a.seq * 3, device=device)
    shape = shape_of(spec)
    print(f"model: llama {shape.params() / 1e9:.3f}B parameters ({spec}), built in {time.perf_counter() - t0:.0f} s",
          flush=True)
    out: dict[str, Any] = {"gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
                           "datasheet_bf16_tflops": datasheet, "measured_bf16_tflops": measured, "spec": spec,
                           "params": shape.params(), "seq": a.seq, "batch": a.batch, "micro_batch": a.micro,
                           "steps": a.steps, "steady_from_step": a.skip, "runs": {}}
    for method in a.methods.split(","):
        t1 = time.perf_counter()
        if method == "hf":
            res_file = work / "hf.json"
            p2 = subprocess.run([sys.executable, __file__, "--hf-side", str(res_file), "--work", str(work),
                                 *(["--tiny"] if a.tiny else []), "--steps", str(a.steps), "--skip", str(a.skip),
                                 "--seq", str(a.seq), "--batch", str(a.batch), "--micro", str(a.micro)],
                                env=env, capture_output=True, text=True, timeout=a.run_timeout)
            if p2.returncode:
                tail = (p2.stdout + p2.stderr).strip().splitlines()[-15:]
                print("hf: failed:\n  " + "\n  ".join(tail), flush=True)
                res: dict[str, Any] = {"error": tail[-1] if tail else "failed", "log_tail": tail}
            else:
                res = json.loads(res_file.read_text())
            fpt_method, plan_mib = "full", None
        else:
            res = run_ours(work, method, a.steps, a, env)
            fpt_method = method
            mixed = "bf16" if device == "cuda" else "no"
            plan_mib = run_estimate(shape, method, method != "full", a.seq, a.micro, mixed_precision=mixed,
                                    device=device, packed=True, accumulating=a.batch > a.micro) / 2**20
        if "tokens_per_s" in res:
            flops = flops_per_token(shape, fpt_method, attended=a.seq / 2) * res["tokens_per_s"]
            res["model_tflops"] = flops / 1e12
            res["mfu_datasheet"] = flops / (datasheet * 1e12) if datasheet else None
            res["mfu_measured"] = flops / (measured * 1e12) if measured else None
            res["plan_peak_mib"] = plan_mib
            mfu = res["mfu_datasheet"]
            print(f"{method:<6} {res['tokens_per_s']:10.0f} tokens/s  {res['seconds_per_step']:.3f} s/step  "
                  f"{res['model_tflops']:.0f} TFLOP/s  MFU {'-' if mfu is None else f'{mfu:.1%}'} of datasheet, "
                  f"{'-' if measured is None else format(res['mfu_measured'], '.1%')} of measured; peak "
                  f"{res.get('peak_memory_mib') or 0:.0f} MiB vs plan "
                  f"{'-' if plan_mib is None else f'{plan_mib:.0f}'} MiB  ({time.perf_counter() - t1:.0f} s)",
                  flush=True)
        out["runs"][method] = res
    for method in filter(None, a.profile.split(",")):
        p3 = subprocess.run([sys.executable, __file__, "--profile-side", method, "--work", str(work),
                             *(["--tiny"] if a.tiny else []), "--skip", str(a.skip), "--seq", str(a.seq),
                             "--batch", str(a.batch), "--micro", str(a.micro)],
                            env=env, capture_output=True, text=True, timeout=a.run_timeout)
        text = (work / f"profile-{method}.txt")
        if p3.returncode or not text.exists():
            print(f"profile {method}: failed:\n  " + "\n  ".join((p3.stdout + p3.stderr).strip().splitlines()[-12:]))
        else:
            print(text.read_text().splitlines()[0], flush=True)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], f"profile-{method}.txt").write_text(text.read_text())
    out["seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(out, indent=2)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    if a.tiny:
        failed = [m for m, r in out["runs"].items() if "error" in r]
        print(f"self-test: {len(out['runs']) - len(failed)} of {len(out['runs'])} runs measured"
              + (f"; failed: {failed}" if failed else ""))


if __name__ == "__main__":
    main()
