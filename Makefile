# Two entry points on a fresh machine: `make speedrun` (the main job) and `make test` (the whole suite).
# torch==2.13.0 is installed first: it is the local CPU wheel; an unpinned torch would pull GBs of CUDA.
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/.ok: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.5"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.ok

speedrun: install
	$(VENV)/bin/sobre speedrun

# pytest exit code 5 ("no tests collected") counts as a failure
test: install
	$(VENV)/bin/ruff check sobre tests bench
	$(PY) -m pytest -q --durations=15; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

.PHONY: install speedrun test
