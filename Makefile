# Set-up commands. Every target creates .venv when it is missing or older than setup.cfg.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUNS ?= runs/demo

.PHONY: venv demo demo-rl demo-seeds readme test test-fast bench lint format clean

$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The pipeline on the tiny model (lit_bluelm/demo.py): demo data (written once), then each stage
# from the last, in one process. Stage 1 trains a larger teacher, prunes the tiny student out of
# it and distils it; the same student trained from scratch for the same steps is the baseline it
# must beat. FROM=<run> (e.g. FROM=sft) reruns from that stage on, reusing the earlier runs.
demo: $(STAMP)
	$(BIN)/python -m lit_bluelm.demo --runs $(DEMO_RUNS) $(if $(FROM),--from $(FROM))

# What make demo-rl ran before GRPO joined make demo: the same as make demo (kept for scripts).
demo-rl: $(STAMP)
	$(BIN)/python -m lit_bluelm.demo --runs $(DEMO_RUNS) --rl $(if $(FROM),--from $(FROM))

# The stages after the text stage again with 3 seeds (seed and data.seed 1234+k) into
# $(DEMO_RUNS)_seed<k>/; prints each claim's mean and min over the seeds and adds them to
# $(DEMO_RUNS)/report.md. Runs the text stages first when they have not run. FROM=<run> reruns
# each seed's folder from that stage on (e.g. FROM=reward).
demo-seeds: $(STAMP)
	$(BIN)/python -m lit_bluelm.demo --runs $(DEMO_RUNS) --seeds 3 $(if $(FROM),--from $(FROM))

# The README's demo section is $(DEMO_RUNS)/report.md, spliced between its markers.
readme: $(STAMP)
	$(BIN)/python -m lit_bluelm.report --runs $(DEMO_RUNS) --readme README.md

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/kd_memory.py
	$(BIN)/python bench/step_speed.py
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/loader.py
	$(BIN)/python bench/generation.py
	$(BIN)/python bench/faults.py
	$(BIN)/python bench/long_context.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data/demo
