# Two entry points: `make demo` and `make test` (and `make demo-server`). Both build .venv once and refresh it only
# when pyproject.toml changes (the stamp file is named after its hash).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-16)

export DS_BUILD_OPS := 0
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export OMP_NUM_THREADS ?= 2
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
# Prefect's ephemeral server migrates its database on first start: slow on a 2-core machine.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: venv demo demo-server test clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	# torch first and pinned: the build that matches torchvision 0.29.1
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	# the whole pipeline: the bare package is the light consumer install (README, "Consumers")
	$(BIN)/pip install -q -e '.[all,dev]'
	# Real photos for the sample data; scikit-image's photos are the fallback without it.
	-dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist)
	# sshd and pdsh: the multi-node test of the hostfile path (tests/test_multinode.py; skipped without them).
	-dpkg -s openssh-server pdsh >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq openssh-server pdsh)
	# A real headless browser for the report test (tests/browser.py); the test says so when absent.
	-dpkg -s chromium chromium-driver >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver)
	touch $@

demo: venv
	$(BIN)/mfm demo

demo-server: venv
	bash infra/demo-server.sh

test: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) .cache demo-out
