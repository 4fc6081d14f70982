# Two commands do all the set-up on a fresh machine (README):
#   make demo   - SimCLR on BloodMNIST (downloaded, or found in $MEDLATENT_DATA), then its probes
#   make test   - the import-layer contracts (lint-imports), then the test suite
#   make wheel-test - build sdist + wheel, install the wheel in a fresh venv, smoke-test it (CI runs it)
# torch is pinned to the CPU wheel here; on a GPU machine install the CUDA build first and
# `make VENV=... test` reuses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_RUN ?= runs/demo-bloodmnist-simclr

.PHONY: setup browser demo test wheel-test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[all]"
	touch $@

setup: $(VENV)/.installed

# Headless Chromium (Debian's package) for the report's browser check; where it cannot be
# installed (no root, no apt) that one test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		( command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		  ( apt-get install -y -qq chromium >/dev/null 2>&1 || \
		    ( apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1 ) ) ) || \
		echo "chromium could not be installed: the report's browser check will be skipped"

demo: setup
	@if [ -f $(DEMO_RUN)/config.yaml ]; then \
		$(BIN)/medlatent pretrain --resume $(DEMO_RUN); \
	else \
		$(BIN)/medlatent pretrain --data bloodmnist --method simclr --epochs 30 --output $(DEMO_RUN); \
	fi
	$(BIN)/medlatent probe $(DEMO_RUN)
	$(BIN)/medlatent report $(DEMO_RUN)

test: setup browser
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The package as users get it, away from the checkout (scripts/check_wheel.sh says what it checks).
wheel-test: setup
	VENV=$(VENV) PYTHON=$(PYTHON) bash scripts/check_wheel.sh

clean:
	rm -rf $(VENV) build dist *.egg-info
