# Two commands for a fresh Debian/Ubuntu machine with Python 3.10+:
#   make demo   - venv, package, Fashion-MNIST, demo bench with the speed-up table
#   make test   - venv, dev extras, the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# Where the CPU build of torch comes from when this machine's pip cannot find it locally.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# The oldest Lightning the package supports (pyproject.toml's lower bound); `make test-lightning-oldest` runs
# tests/test_compat.py and a fast subset against it.
LIGHTNING_OLDEST ?= 2.4.0
OLDEST_VENV ?= .venv-lightning-oldest
# The Lightning requirement as pyproject.toml states it (the supported range), e.g. lightning>=2.4.0,<2.7.
LIGHTNING_RANGE := $(shell sed -n 's/^ *"\(lightning[<>=][^"]*\)",*$$/\1/p' pyproject.toml)
# A fast subset that exercises every use of Lightning's private API and the adapters around it: the
# compatibility test, the schedule callbacks and LR range test, logging, the strategies on gloo, and a
# pipeline resume.
OLDEST_TESTS ?= tests/test_compat.py tests/schedules tests/test_metrics.py tests/distributed/test_core.py \
	tests/distributed/test_strategies.py tests/distributed/test_clean_exit.py \
	tests/pipeline/test_strategy.py::test_checkpoint_roundtrip_and_exact_resume
# The oldest torch the package supports (pyproject.toml's lower bound). `make test-torch-oldest` runs the whole
# suite against it in .venv-torch-oldest. PyPI has only CUDA builds of it for Linux x86_64 (about 6 GB installed
# with the CUDA libraries, which the tests do not use), so CI leaves it out; run it before changing the bound.
TORCH_OLDEST ?= 2.10.0
TORCH_OLDEST_VENV ?= .venv-torch-oldest
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
# Test processes (pytest-xdist): most tests wait on imports and child processes, so two share even two cores
# well; PYTEST_WORKERS=0 runs the suite in this process. A worker that runs out of tests takes some of the
# other's (--dist worksteal), so that neither idles behind the other's last long tests (timings: CHANGELOG).
PYTEST_WORKERS ?= 2
PYTEST_DIST ?= worksteal
PYTEST_ARGS ?=

.PHONY: demo test test-lightning-oldest test-torch-oldest lint venv torch install install-dev data clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

# On a machine without a GPU: the CPU build of torch (a plain `torch` requirement pulls a multi-GB
# CUDA build). First a CPU wheel from pip's configured local wheels (then its dependencies from the
# usual index), else PyTorch's CPU index; then check that a CPU build is what got installed.
torch: $(PY)
ifeq ($(HAS_GPU),1)
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch
else
	@if ! $(PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$(TORCH_VERSION)') else 1)" 2>/dev/null; then \
	  if $(PIP) install -q --no-deps --no-index "torch==$(TORCH_VERSION)" 2>/dev/null; then \
	    $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	  else \
	    $(PIP) install -q "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	  fi; \
	fi
	@$(PY) -W ignore -c "import torch, sys; cpu = torch.version.cuda is None; print('torch', torch.__version__, '(CPU build)' if cpu else '(CUDA build!)'); sys.exit(0 if cpu else 1)"
endif

install: torch
	$(PIP) install -q -e .

# The newest Lightning in the supported range, also in a venv that already has an older one.
install-dev: torch
	@test -n '$(LIGHTNING_RANGE)' || { echo "pyproject.toml lists no lightning requirement with a range"; exit 1; }
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --upgrade "$(LIGHTNING_RANGE)"

# Fashion-MNIST: Debian's package when apt can install it; otherwise the loader finds
# ../shared/data, $$LIGHTNING_SPEEDUP_DATA, the user cache, or downloads the official files.
data:
	@if [ -z "$(NO_APT)" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] && echo "" || (command -v sudo >/dev/null && echo "sudo -n") ); \
	  echo "installing Debian's dataset-fashion-mnist with apt-get as root ($${SUDO:-already root}); skip it with: make demo NO_APT=1"; \
	  ($$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
	   || ($$SUDO apt-get update -qq >/dev/null 2>&1 && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
	  && echo "installed Debian's dataset-fashion-mnist" \
	  || echo "apt could not install dataset-fashion-mnist; the loader will look elsewhere or download"; \
	fi
	@if [ -z "$$LIGHTNING_SPEEDUP_DATA" ] && [ -d ../shared/data ]; then echo "also found ../shared/data"; fi

demo: install data
	@export LIGHTNING_SPEEDUP_DATA=$${LIGHTNING_SPEEDUP_DATA:-$$( [ -d ../shared/data ] && realpath ../shared/data )}; \
	$(VENV)/bin/lightning-speedup demo

test: install-dev
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist $(PYTEST_DIST) $(PYTEST_ARGS)

# The whole suite against the oldest supported torch (a CUDA build from PyPI), in a venv of its own.
test-torch-oldest:
	@test -x $(TORCH_OLDEST_VENV)/bin/python || $(PYTHON) -m venv $(TORCH_OLDEST_VENV)
	$(TORCH_OLDEST_VENV)/bin/python -m pip install -q "torch==$(TORCH_OLDEST)"
	$(TORCH_OLDEST_VENV)/bin/python -m pip install -q -e ".[dev]" "$(LIGHTNING_RANGE)"
	@$(TORCH_OLDEST_VENV)/bin/python -W ignore -c "import torch, sys; print('torch', torch.__version__); \
	  sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_OLDEST)' else 1)"
	$(TORCH_OLDEST_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The same tests against the oldest supported Lightning, in a venv of its own (no optional extras).
test-lightning-oldest:
	@$(MAKE) --no-print-directory torch VENV=$(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q -e . "lightning==$(LIGHTNING_OLDEST)" "pytest>=8" "pytest-timeout>=2.3" \
	  "pytest-xdist>=3.5"
	@$(OLDEST_VENV)/bin/python -c "import lightning, sys; print('lightning', lightning.__version__); \
	  sys.exit(0 if lightning.__version__ == '$(LIGHTNING_OLDEST)' else 1)"
	$(OLDEST_VENV)/bin/python -m pytest -n $(PYTEST_WORKERS) --dist $(PYTEST_DIST) $(PYTEST_ARGS) $(OLDEST_TESTS)

lint: install-dev
	$(VENV)/bin/ruff check lightning_speedup tests benchmarks
	$(VENV)/bin/ruff format --check lightning_speedup tests benchmarks

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build dist *.egg-info .pytest_cache .ruff_cache
