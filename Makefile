# gradleak: `make demo` and `make test` each set up .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow lint typecheck bench bench-kernels clean

$(STAMP): pyproject.toml constraints.txt clients/python/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]' -e 'clients/python[all]'
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(PY) -m service.demo

test: venv
	$(PY) -m ruff check .
	$(PY) -m pytest

test-slow: venv
	$(PY) -m pytest -m slow

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: venv
	$(PY) -m mypy service api kernels clients/python/src

bench: venv
	$(PY) -m bench.attacks all

bench-kernels: venv
	$(PY) bench/kernels.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache runs .gradleak
