# Set-up commands. Every target creates .venv when it is missing or older than setup.cfg.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_RUNS ?= runs/demo

.PHONY: venv demo test test-fast bench lint format clean

$(STAMP): setup.cfg setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# The pipeline on the tiny model: demo data (written once), then each stage from the last.
# Stage 1 trains a larger teacher, prunes the tiny student out of it and distils it; the same
# student trained from scratch for the same steps is the baseline it must beat.
TEACHER_CKPT := $(DEMO_RUNS)/text_teacher/checkpoints/last.ckpt
demo: $(STAMP)
	$(BIN)/python -m datamodules.demo
	$(BIN)/python train.py stage=text module=next_token model=tiny_teacher run_dir=$(DEMO_RUNS)/text_teacher
	$(BIN)/python train.py stage=text module=next_token run_dir=$(DEMO_RUNS)/text_scratch
	$(BIN)/python train.py stage=text distill.teacher=$(TEACHER_CKPT) distill.init_from_teacher=true \
		run_dir=$(DEMO_RUNS)/text
	$(BIN)/python train.py stage=joint init_from=$(DEMO_RUNS)/text/checkpoints/last.ckpt run_dir=$(DEMO_RUNS)/joint
	$(BIN)/python train.py stage=reasoning init_from=$(DEMO_RUNS)/joint/checkpoints/last.ckpt \
		run_dir=$(DEMO_RUNS)/reasoning
	$(BIN)/python -m lit_bluelm.summary $(DEMO_RUNS)/text_teacher $(DEMO_RUNS)/text_scratch $(DEMO_RUNS)/text \
		$(DEMO_RUNS)/joint $(DEMO_RUNS)/reasoning --better $(DEMO_RUNS)/text $(DEMO_RUNS)/text_scratch

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/python bench/train_overhead.py
	$(BIN)/python bench/kd_memory.py
	$(BIN)/python bench/packing.py
	$(BIN)/python bench/loader.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs data/demo
