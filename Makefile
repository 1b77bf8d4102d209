# Two commands do everything on a fresh machine: `make serve` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup serve test bench clean

setup: $(STAMP)

# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

serve: setup
	$(VENV)/bin/netcompress serve

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python -m bench.run_all

clean:
	rm -rf var .pytest_cache
