# mige_lightning — `make help` lists the targets.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
CONFIG  ?= configs/demo.yaml
PYTEST_ARGS ?=
NODES   ?= 2
GPUS_PER_NODE ?= 8
SLURM_CONFIG ?= configs/mige_xl.yaml configs/trainer/fsdp.yaml

.DEFAULT_GOAL := help
.PHONY: help install demo pretrain-world predict-demo replicate-mutual bench-pretraining bench-curve bench-targets test test-fast lint format bench bench-data bench-streaming bench-sample bench-fsdp slurm-dry-run slurm-submit clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-10s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the package with its dev extras

demo: $(STAMP) ## generate the world, fine-tune MIGE from the world's shipped pretrained components on CPU (configs/demo.yaml)
	$(BIN)/python -m mige_lightning fit --config $(CONFIG)

pretrain-world: $(STAMP) ## make the world's pretrained components again: T5, vision bridge, text-to-image DiT (mige_world/pretrained)
	$(BIN)/python -m mige_lightning pretrain-world --config $(CONFIG)

predict-demo: $(STAMP) ## sample the held-out requests with the newest demo checkpoint, judge them → predictions/demo/
	@ckpt=$$(ls -td runs/demo/version_*/checkpoints/last.ckpt 2>/dev/null | head -1); \
	test -n "$$ckpt" || { echo "no demo checkpoint under runs/demo: run 'make demo' first"; exit 1; }; \
	$(BIN)/python -m mige_lightning predict --config $(CONFIG) --config configs/predict/demo.yaml --ckpt_path $$ckpt
	$(BIN)/python -m mige_lightning judge-synthetic --world data/demo --predictions predictions/demo

replicate-mutual: $(STAMP) ## joint vs single-task training on the synthetic world, 4 settings × 3 seeds (~1 h) → docs/RESULTS.md
	$(BIN)/python -m bench.replicate_mutual

bench-pretraining: $(STAMP) ## the demo's fine-tuning from none, some or all of the pretrained components (~40 min) → docs/RESULTS.md
	$(BIN)/python -m bench.pretraining_gain

bench-curve: $(STAMP) ## the demo's held-out scene accuracy against wall time, 30 minutes
	$(BIN)/python -m bench.learning_curve --minutes 30 --every 700

bench-targets: $(STAMP) ## epsilon vs v vs x0 prediction (and min-SNR) on the demo at equal steps (~12 min)
	$(BIN)/python -m bench.compare_targets --steps 400

test: $(STAMP) ## run the whole test suite (slow tests included, as CI does)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: $(STAMP) ## run the tests not marked slow
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP) ## train-step time and peak memory (tiny + mid presets, CPU)
	$(BIN)/python -m bench.train_step

bench-data: $(STAMP) ## data-loading samples/s at 512 px with and without the latent cache (~4 min)
	$(BIN)/python -m bench.dataloader

bench-streaming: $(STAMP) ## loader samples/s per worker at 512 px: file loader vs litdata shards (images, latents); task mix (~5 min)
	$(BIN)/python -m bench.streaming_loader

bench-sample: $(STAMP) ## seconds per image per task (tiny, mid) and guidance overhead, CPU
	$(BIN)/python -m bench.sample

bench-fsdp: $(STAMP) ## per-rank params/grads/AdamW bytes under FSDP2: 1 vs 2 CPU ranks, xl at 8–64 GPUs
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.fsdp_memory

slurm-dry-run: ## print the SLURM job script slurm-submit would submit (NODES, GPUS_PER_NODE, SLURM_CONFIG)
	@NODES=$(NODES) GPUS_PER_NODE=$(GPUS_PER_NODE) CONFIG="$(SLURM_CONFIG)" scripts/slurm/submit.sh --dry-run

slurm-submit: ## submit FSDP2 training to SLURM (checkpoints + requeues itself on pre-emption)
	NODES=$(NODES) GPUS_PER_NODE=$(GPUS_PER_NODE) CONFIG="$(SLURM_CONFIG)" scripts/slurm/submit.sh

clean: ## remove runs, generated demo data and caches (keeps .venv)
	rm -rf runs data/demo data/mutual predictions eval .pytest_cache .ruff_cache
