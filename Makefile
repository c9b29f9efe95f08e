# gradleak: `make demo` and `make test` each set up .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-slow lint typecheck bench bench-peer bench-kernels screenshots dist flower-env clean

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

# breaching, the peer the attack benchmark runs on the same machine; its pinned hydra-core
# conflicts with the constraints, so it is installed beside the virtual environment
bench-peer: venv
	$(PY) -m pip install --quiet --target .bench-peer --no-deps breaching==0.1.2 hydra-core==1.3.2 \
		omegaconf==2.3.0 antlr4-python3-runtime==4.9.3

bench-kernels: venv
	$(PY) bench/kernels.py

# the README's grid and report pictures of a real run (needs a headless Chromium)
screenshots: venv
	$(PY) docs/screenshots.py

# wheels of both distributions, the service (gradleak) and the SDK (gradleak-client), into dist/
dist: venv
	rm -rf dist clients/python/build build
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist . clients/python

# Flower's runtime for the Flower tests and example: flwr's pins conflict with constraints.txt, so
# it is installed beside the virtual environment and put first on PYTHONPATH where it runs
FLOWER_ENV := .flower-env
flower-env: venv
	$(PY) -m pip install --quiet --upgrade --target $(FLOWER_ENV) -c constraints-flower.txt 'flwr[simulation]==1.42.0'
	sha256sum constraints-flower.txt | cut -d' ' -f1 > $(FLOWER_ENV)/.installed

clean:
	rm -rf $(VENV) $(FLOWER_ENV) .pytest_cache .ruff_cache .mypy_cache runs .gradleak dist build clients/python/build
