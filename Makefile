# Two entry points for a fresh Linux machine with Python 3.10+:
#   make demo   install everything and run the digits demo
#   make test   install what the tests need and run them
#   make bench  run the CPU benchmarks (not part of CI)
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

# CPU benchmarks (about 20 minutes on 2 cores); CI does not run them.
bench: install
	$(BIN)/python bench/quality.py | tee bench-quality.md
	$(BIN)/python bench/speed.py | tee bench-speed.md

clean:
	rm -rf demo-output label-errors .pytest_cache
