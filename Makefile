# Two commands from a fresh clone (see README):  make test   and   make main
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch: never let pip resolve an unpinned torch (that pulls a multi-GB CUDA build)
TORCH_SPEC ?= torch==2.13.0
# lowest supported transformers, tested by `make test-min`
TRANSFORMERS_MIN ?= 5.4.0

.PHONY: setup test test-slow test-fuzz test-common test-min main publish-main main-scratch lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# the property / fuzz suite at full size (tests/test_fuzz.py: over 10^4 cases, ~5 min on 2 cores; `make test`
# runs a small fixed sample of it); prints the number of cases and failing properties
test-fuzz: setup
	VKT_FUZZ=1 $(PY) -m pytest -q -m fuzz -p no:cacheprovider tests/test_fuzz.py

# transformers' own common model tests (ModelTesterMixin, ConfigTester, TrainingTesterMixin), taken from the
# sdist of the installed transformers into .cache/ (pip download), on the native and a converted hybrid model
test-common: setup
	$(PY) -m pytest -q -m transformers_common

test-min:
	$(MAKE) setup VENV=$(VENV)-min
	$(VENV)-min/bin/python -m pip install -q "transformers==$(TRANSFORMERS_MIN)"
	$(VENV)-min/bin/python -m pytest -q

lint: setup
	$(PY) -m ruff check vkt_hf recipes benchmarks scripts tests
	$(PY) -m ruff format --check vkt_hf recipes benchmarks scripts tests

# SmolLM2-135M-Instruct: fetched, converted, distilled and compared with the original (<= 15 min on 2 cores);
# writes only under runs/main/ (ignored). publish-main copies its report and card into docs/main/ and
# model_cards/ and regenerates the README's main-job table. main-scratch: the tiny from-scratch comparison.
main: setup
	$(PY) recipes/main.py

publish-main: setup
	$(PY) recipes/main.py --publish

main-scratch: setup
	$(PY) recipes/main_scratch.py

clean:
	rm -rf $(VENV) $(VENV)-min
