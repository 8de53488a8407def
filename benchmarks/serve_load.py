"""Serving benchmark on the bundled model (smollm2-135m-instruct), CPU.

1. Batch-1 decoding speed of each lever against plain fp32 HF `generate` (same process, same prompt), with its
   quality cost: perplexity on a fixed text, teacher-forced top-1 agreement and greedy agreement with fp32.
2. The server under load: 1, 4 and 8 concurrent OpenAI clients, a fixed number of requests each level:
   requests/s, tokens/s, p50/p95 latency, errors; and the dynamic-batching gain over one-at-a-time (8 clients,
   max_batch_size=1 vs batching).

    python benchmarks/serve_load.py [--requests 8] [--tokens 24] [--speedup none|bf16|int8]

Writes benchmarks/results/serve_load.json and prints tables.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL = "smollm2-135m-instruct"
PROMPT = "Explain in a few sentences what a Linux kernel does."
TEXT = ("The Linux kernel is the core of the operating system. It manages the processor, memory and devices, and "
        "it lets programs share them safely. When a program wants to read a file, it asks the kernel through a "
        "system call; the kernel checks permissions, talks to the disk driver and copies the data back. The kernel "
        "also schedules processes, so that many programs appear to run at the same time on a few cores.")
CLIENT_PROMPTS = ["How do I list files?", "What is a tar archive?", "Explain grep in one sentence.",
                  "How can I check disk usage?", "What does pwd print?", "How do I copy a folder?",
                  "What is a process?", "How do I make a folder?"]


def _decode_speed(model: Any, ids: torch.Tensor, tokens: int, static: bool, threads: int
                  ) -> tuple[float, float, list[int]]:
    """(tokens per wall second, tokens per CPU second of this process, the greedy tokens)."""
    kw = {"cache_implementation": "static"} if static else {}
    torch.set_num_threads(threads)
    with torch.inference_mode():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, **kw)  # warm up
        t0, c0 = time.perf_counter(), time.process_time()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, **kw)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    return tokens / dt, tokens / cpu, out[0, ids.shape[1]:].tolist()


@torch.inference_mode()
def _quality(model: Any, text_ids: torch.Tensor, ref_top1: torch.Tensor | None) -> tuple[float, torch.Tensor, float]:
    logits = model(input_ids=text_ids).logits[0, :-1].float()  # (T-1, V)
    nll = torch.nn.functional.cross_entropy(logits, text_ids[0, 1:])
    top1 = logits.argmax(-1)
    agree = 1.0 if ref_top1 is None else (top1 == ref_top1).float().mean().item()
    return math.exp(nll.item()), top1, agree


def levers(tokens: int, rounds: int = 3) -> list[dict[str, Any]]:
    """Each lever's batch-1 speed: best of `rounds`, variants interleaved so that other load on the machine hits
    all alike; tokens per CPU-second is reported too, as it moves much less with such load."""
    from lmtailor.models import load_model, load_tokenizer
    from lmtailor.render import prompt_ids
    from lmtailor.serve.models import speed_up

    tok = load_tokenizer(MODEL)
    base = load_model(MODEL).eval()
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": PROMPT}])])
    text_ids = torch.tensor([tok(TEXT)["input_ids"]])
    default = torch.get_num_threads()
    variants = [("fp32 HF generate (baseline)", "none", False, default), ("fp32 + static cache", "none", True, default),
                ("bf16", "bf16", False, default), ("int8 dynamic", "int8", False, default),
                ("fp32, 1 thread", "none", False, 1), ("bf16, 1 thread", "bf16", False, 1),
                ("int8 dynamic, 1 thread", "int8", False, 1)]
    models = {how: base if how == "none" else speed_up(copy.deepcopy(base), how).eval() for _, how, _, _ in variants}
    speed: dict[str, float] = {}
    cpu_speed: dict[str, float] = {}
    generated: dict[str, list[int]] = {}
    for _ in range(rounds):
        for label, how, static, threads in variants:
            tps, cps, generated[label] = _decode_speed(models[how], ids, tokens, static, threads)
            speed[label] = max(speed.get(label, 0.0), tps)
            cpu_speed[label] = max(cpu_speed.get(label, 0.0), cps)
    rows: list[dict[str, Any]] = []
    ref_tokens = generated[variants[0][0]]
    _, ref_top1, _ = _quality(base, text_ids, None)
    torch.set_num_threads(default)
    for label, how, static, threads in variants:
        ppl, _, agree = _quality(models[how], text_ids, ref_top1)
        gen = generated[label]
        same = next((i for i, (a, b) in enumerate(zip(gen, ref_tokens, strict=False)) if a != b), len(gen))
        tps, cps = speed[label], cpu_speed[label]
        x_cpu = cps / cpu_speed[variants[0][0]]
        rows.append({"variant": label, "speedup": how, "static_cache": static, "threads": threads,
                     "tokens_per_s": round(tps, 2),
                     "x_vs_fp32": round(tps / speed[variants[0][0]], 2), "tokens_per_cpu_s": round(cps, 2),
                     "x_vs_fp32_cpu_time": round(x_cpu, 2), "perplexity": round(ppl, 3),
                     "teacher_forced_top1_agreement": round(agree, 4),
                     "greedy_tokens_identical_before_divergence": f"{same}/{len(gen)}"})
        print(f"  {label:28} {tps:5.1f} tok/s ({tps / speed[variants[0][0]]:.2f}x)  {cps:5.1f} tok/cpu-s "
              f"({x_cpu:.2f}x)  ppl {ppl:7.3f}  "
              f"top1 agree {agree:.3f}  greedy same {same}/{len(gen)}", flush=True)
    return rows


def load_level(url: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    latencies: list[float] = []
    errors: list[str] = []
    produced = [0]
    lock = threading.Lock()
    todo = list(range(requests))

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            t0 = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": CLIENT_PROMPTS[i % len(CLIENT_PROMPTS)]}],
                    max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True})
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    produced[0] += r.usage.completion_tokens
            except Exception as e:  # counted and reported: the benchmark must show 0
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    p95 = lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)] if lat else float("nan")
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 2), "req_per_s": round(requests / wall, 3),
            "tokens_per_s": round(produced[0] / wall, 2), "p50_s": round(statistics.median(lat), 2) if lat else None,
            "p95_s": round(p95, 2), "errors": len(errors), "error_samples": errors[:3]}


def server_load(requests: int, tokens: int, speedup: str, threads: int) -> dict[str, Any]:
    from lmtailor.serve import Limits, create_app, load_models, running

    slots = load_models([MODEL], speedup=speedup)
    name = next(iter(slots))
    out: dict[str, Any] = {"speedup": speedup, "torch_threads": threads or torch.get_num_threads(), "levels": []}
    for label, batch in (("dynamic batching", 8), ("one at a time", 1)):
        app = create_app(slots, limits=Limits(max_batch_size=batch, batch_window_ms=20, torch_threads=threads))
        with running(app) as url:
            load_level(url, name, 1, 1, 4)  # warm up
            levels = (1, 4, 8) if batch > 1 else (8,)
            for clients in levels:
                row = {"mode": label, **load_level(url, name, clients, requests, tokens)}
                health = json.loads(__import__("urllib.request").request.urlopen(url + "/health").read())
                row["mean_rows_per_batch_since_start"] = round(health["rows"] / max(1, health["batches"]), 2)
                out["levels"].append(row)
                print(f"  {label:17} clients {clients}: {row['req_per_s']:.2f} req/s  {row['tokens_per_s']:6.1f} tok/s"
                      f"  p50 {row['p50_s']} s  p95 {row['p95_s']} s  errors {row['errors']}", flush=True)
    batched = next(r for r in out["levels"] if r["mode"] == "dynamic batching" and r["clients"] == 8)
    serial = next(r for r in out["levels"] if r["mode"] == "one at a time")
    out["batching_gain_8_clients"] = round(batched["req_per_s"] / serial["req_per_s"], 2)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    p.add_argument("--tokens", type=int, default=24, help="tokens generated per request (EOS ignored)")
    p.add_argument("--speedup", default="none", choices=["none", "bf16", "int8"], help="server model speed-up")
    p.add_argument("--threads", type=int, default=1, help="server torch threads (0: torch default)")
    p.add_argument("--lever-tokens", type=int, default=16, help="tokens per batch-1 lever measurement")
    p.add_argument("--only", choices=["all", "levers", "server"], default="all")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    a = p.parse_args()
    t0 = time.time()
    result: dict[str, Any] = {
        "model": MODEL, "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0],
        "tokens_per_request": a.tokens}
    if a.only in ("all", "levers"):
        print(f"batch-1 decoding, {a.lever_tokens} tokens ({MODEL}, {torch.get_num_threads()} threads):", flush=True)
        result["batch1_levers"] = levers(a.lever_tokens)
    if a.only == "levers":
        print(json.dumps(result["batch1_levers"], indent=1))
        return
    print(f"server under load ({a.requests} requests per level, speedup={a.speedup}, threads={a.threads}):",
          flush=True)
    import warnings

    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
    result["server"] = server_load(a.requests, a.tokens, a.speedup, a.threads)
    result["wall_s"] = round(time.time() - t0, 1)
    from lmtailor.io import atomic_write_json

    atomic_write_json(a.out, result)
    print(f"batching gain (8 clients): {result['server']['batching_gain_8_clients']}x; total {result['wall_s']} s; "
          f"wrote {a.out}")


if __name__ == "__main__":
    main()
