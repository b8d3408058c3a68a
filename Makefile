# One-command setup and run on a fresh machine: `make demo`, `make test`.
# The venv is rebuilt only when pyproject.toml changes (stamp file).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch that lies on this machine's disk; an unpinned resolve
# would download a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup browser test test-fast lint demo bench quality quality-quick quality-probes clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,plot,cli,bench]"
	touch $(STAMP)

# Headless Chromium and its WebDriver (Debian's packages) for tests/test_web_page.py. A no-op
# when both are there; elsewhere apt-get installs them when it can (root), and when it cannot
# the browser tests skip and say why.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium and chromium-driver (apt-get) for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			chromium chromium-driver >/dev/null) \
		|| echo "apt-get could not install chromium: the browser tests will be skipped"; \
	else echo "no apt-get as root here: install chromium and chromedriver to run the browser tests"; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint browser
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/surgeon demo --out runs/demo

bench: $(STAMP)
	$(PY) benchmarks/overhead.py

# the outcome benchmark (README: Outcome benchmark); one torch thread per fit
quality: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/quality.py --workers 2 --out runs/quality

quality-probes: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/quality.py --probes --seeds 5 --workers 2 --out runs/quality-probes

quality-quick: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) benchmarks/quality.py --quick --workers 2 --out runs/quality-quick

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache .ruff_cache .hypothesis
