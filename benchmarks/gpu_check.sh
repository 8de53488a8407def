#!/usr/bin/env bash
# GPU check of issue 15 (on a GPU machine; about 5 minutes): bf16 full fine-tuning, LoRA and QLoRA of a ~1B llama
# built from its config (random weights), packing on, and HF Trainer on the same model and batch: tokens/s, model
# FLOPs utilisation, peak memory against `lmtailor plan`. See benchmarks/gpu_check.py; writes $OUT/gpu_check.json
# when OUT is set. `python benchmarks/gpu_check.py --tiny` checks the script itself on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
