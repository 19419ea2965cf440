# Two entry points for a fresh Linux machine with Python 3.10+:
#   make demo   install everything and run the digits demo
#   make test   install what the tests need and run them
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-test demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -e '.[train]'
	$(BIN)/pip check

install-test: $(BIN)/python
	$(BIN)/pip install -e '.[train,test]'
	$(BIN)/pip check

demo: install
	$(BIN)/kili-label-errors demo --output demo-output

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-output label-errors .pytest_cache
