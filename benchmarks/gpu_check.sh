#!/usr/bin/env bash
# GPU check of issue 15 (run only on a GPU machine; ~10 minutes): bf16 full fine-tuning, LoRA and QLoRA of a ~1B
# llama built from its config (random weights: the GPU machine has no network), packing on; prints tokens/s, model
# FLOPs utilisation and peak memory next to `lmtailor plan`. Writes $OUT/gpu_check.json when OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD/tests" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
WORK=$(mktemp -d)
$PY - "$WORK" <<'PY'
import json, sys, time
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from conftest import CORPUS
from lmtailor.tokenizers import train_bpe
from lmtailor.plan import estimate, shape_of

work = Path(sys.argv[1])
tok = train_bpe(CORPUS * 50, vocab_size=2000, min_frequency=1)
tok.save_pretrained(work / "m")
spec = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
            num_key_value_heads=8, vocab_size=len(tok), tie_word_embeddings=True, max_position_embeddings=4096)
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(**spec, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(
    work / "m")
words = " ".join(CORPUS).split()
rows = [{"text": " ".join(words[(i * 7) % len(words):] + words)[:6000]} for i in range(512)]
(work / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
json.dump(spec, open(work / "spec.json", "w"))
PY
results=()
for method in full lora qlora; do
  start=$(date +%s)
  $PY -m lmtailor train objective=clm base_model="$WORK/m" data.path="$WORK/d.jsonl" method=$method \
      max_length=2048 pack_length=2048 batch_size=16 micro_batch_size=4 max_steps=12 eval.before_after=false \
      data.val_size=8 gradient_checkpointing=$([ $method = full ] && echo false || echo true) \
      output_dir="$WORK/run-$method" --no-progress > "$WORK/$method.log" 2>&1 || { tail -20 "$WORK/$method.log"; continue; }
  echo "$method: $(($(date +%s) - start)) s"
  results+=("$method")
done
$PY - "$WORK" "${results[@]}" <<'PY'
import json, os, sys
from pathlib import Path
import torch
from lmtailor.plan import estimate, shape_of
work, methods = Path(sys.argv[1]), sys.argv[2:]
spec = json.load(open(work / "spec.json"))
shape = shape_of(spec)
peak_tflops = {"H200": 989, "H100": 989, "A100": 312}.get(next((k for k in ("H200", "H100", "A100")
                                                                  if k in torch.cuda.get_device_name()), ""), 0)
out = {"gpu": torch.cuda.get_device_name(), "params": shape.params(), "runs": {}}
for m in methods:
    metrics = json.loads((work / f"run-{m}" / "metrics.json").read_text())
    tps = metrics["train_tokens_per_s"]
    flops = (6 if m == "full" else 4 + 2) * shape.params()  # lora/qlora run with checkpointing
    mfu = tps * flops / (peak_tflops * 1e12) if peak_tflops else None
    plan = estimate(shape, m, m != "full", 2048).peak(4) / 2**30
    out["runs"][m] = {"tokens_per_s": tps, "mfu": mfu, "plan_peak_gib": plan}
    print(f"{m:<6} {tps:9.0f} tokens/s  MFU {mfu if mfu is None else f'{mfu:.1%}'}  plan peak {plan:.1f} GiB "
          "(measured peak: see nvidia-smi log / torch.cuda.max_memory_allocated in a later version)")
if os.environ.get("OUT"):
    Path(os.environ["OUT"], "gpu_check.json").write_text(json.dumps(out, indent=2))
PY
