# The two commands of the README, with everything they need set up on a fresh machine.
#   make up     start atelier (broker, scheduler, a node, built-in tiny models)
#   make test   run the whole test suite

VENV ?= .venv
PYTHON ?= python3
# Pinned so a fresh install is predictable: the CPU wheel where no CUDA build is wanted, the CUDA one
# from PyPI on a GPU host. Install another build into the venv first and this step keeps it.
TORCH ?= torch==2.13.0

STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q "$(TORCH)"
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

.PHONY: install browser up lint test bench
install: $(STAMP)

# The web page's tests drive a real browser: Debian's chromium, since Playwright's own browser
# download needs more of the internet than CI has. Only `make test` needs it, and only once.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

up: $(STAMP)
	$(VENV)/bin/atelier up

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest

bench: $(STAMP)
	$(VENV)/bin/python bench/overhead.py
