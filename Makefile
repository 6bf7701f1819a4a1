# One-command entry points; every target creates the virtual environment first if needed.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup quickstart test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

quickstart: setup
	$(PY) examples/quickstart.py

lint: setup
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) -m pytest bench --benchmark-only --benchmark-columns=min,median,max,rounds -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .benchmarks .ruff_cache *.egg-info
