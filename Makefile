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

.PHONY: install browser netns up lint test bench gpu-wheels
install: $(STAMP)

# The web page's tests drive a real browser: Debian's chromium, since Playwright's own browser
# download needs more of the internet than CI has. Only `make test` needs it, and only once.
browser:
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)

# tests/test_hosts.py makes separate hosts of network namespaces (`ip`, iproute2) and loses packets between
# them with `tc netem`, or with nftables where the kernel has no netem. As root only: elsewhere those tests
# skip, saying why, and there is nothing to install.
netns:
	[ "$$(id -u)" != 0 ] || (command -v ip && command -v tc && command -v nft) >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 nftables)

up: $(STAMP)
	$(VENV)/bin/atelier up

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# Two workers, whole files each (module-scoped clusters stay shared): about a fifth faster on two cores.
test: $(STAMP) browser netns
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile

bench: $(STAMP)
	$(VENV)/bin/python bench/overhead.py

# The wheels a lent GPU machine lacks (it has Python 3.12, torch 2.11 + CUDA 13, transformers, accelerate,
# peft, triton, msgpack, aiohttp, uvloop, pillow, rich, prometheus-client, and no internet), for
# bench/gpu_check.py to install without an index. cp312 x86-64, no dependencies followed (that would
# fetch a torch), never a torch; about 53 MB (av alone is 36), within the device tool's 64 MiB carry.
# xfuser (the gangs' CUDA backend) with the needs the machine lacks: sentencepiece, beautifulsoup4,
# soupsieve, distvae, yunchang, einops, PyYAML. Left out: scipy (35 MB; only torchsde, Stable Audio's
# scheduler, needs it) and flash-attn (xfuser's optional kernels). pytest and pytest-timeout: the check
# runs the gpu-marked tests.
GPU_WHEELS ?= .gpu-wheels
GPU_PACKAGES = "diffusers>=0.35,<0.43" "pydantic>=2.7,<3" pydantic-core annotated-types typing-inspection \
	typing-extensions "pyzmq>=26,<28" "torchao>=0.18,<0.19" "gguf>=0.10,<1" "compel>=2.5,<3" pyparsing \
	"torchsde>=0.2.6,<0.3" trampoline "av>=12,<19" "DeepCache>=0.1.1,<0.2" importlib-metadata zipp \
	"pytest>=8,<10" "pytest-timeout>=2.3,<3" pluggy iniconfig \
	"xfuser>=0.7,<0.8" sentencepiece beautifulsoup4 soupsieve distvae yunchang einops PyYAML

gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
		--no-deps -d $(GPU_WHEELS) $(GPU_PACKAGES)
	@! ls $(GPU_WHEELS) | grep -i '^torch-' || (echo "a torch wheel in $(GPU_WHEELS): remove it" && false)
	@du -sh $(GPU_WHEELS)
