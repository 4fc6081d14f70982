# Two commands do all the set-up on a fresh machine (README):
#   make demo   - SimCLR on BloodMNIST (downloaded, or found in $MEDLATENT_DATA), then its probes
#   make test   - the test suite
# torch is pinned to the CPU wheel here; on a GPU machine install the CUDA build first and
# `make VENV=... test` reuses it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_RUN ?= runs/demo-bloodmnist-simclr

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0" -e ".[all]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	@if [ -f $(DEMO_RUN)/config.yaml ]; then \
		$(BIN)/medlatent pretrain --resume $(DEMO_RUN); \
	else \
		$(BIN)/medlatent pretrain --data bloodmnist --method simclr --epochs 30 --output $(DEMO_RUN); \
	fi
	$(BIN)/medlatent probe $(DEMO_RUN)

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
