# Two commands on a fresh clone:  `make serve`  (OpenAI-compatible server, demo model)
#                                 `make test`   (the CPU test suite)
# Each creates .venv/ and installs what it needs the first time.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: serve test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU build of PyTorch first (tests use HF transformers as the reference), then the package.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/jaxpage serve $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup tests $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
