# Two commands do everything on a fresh machine: `make serve` and `make test`.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp

.PHONY: setup browser serve test bench clean

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

# Debian's chromium + chromedriver for the dashboard's browser test (idempotent; needs root for apt-get).
# Only `make test` needs them: `make serve` does not install a browser.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "warning: chromium/chromium-driver missing: the dashboard test skips (and fails under CI=true)"

# Lint first (ruff, configured in pyproject.toml): an unused import or undefined name fails in a second.
test: setup browser
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python -m bench.run_all

clean:
	rm -rf var .pytest_cache
