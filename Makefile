# ccm-wsgi: `make serve` runs the embedded default on 127.0.0.1:8080, `make test` runs the whole suite,
# `make test-unit` only the pure unit tests (tests/unit: no process, no socket; seconds), `make lint` ruff and mypy.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test test-unit lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ccm-wsgi serve $(if $(CONFIG),-c $(CONFIG))

NODE_DEPS := tests/node/node_modules/.package-lock.json

# the real npm proper-lockfile, to drive Claude Code's refresh lock in tests/test_refresh.py
$(NODE_DEPS): tests/node/package-lock.json
	npm ci --prefix tests/node --no-audit --no-fund --silent

# The suite on two processes (pytest-xdist, each idle test's waits filled by the other's work), then the scan
# for leaked secrets on its own, over what every process of the run gathered (tests/support/secrets_guard.py).
FINAL_SCAN := tests/test_secrets.py::test_no_secret_in_any_log_or_error_body

test: $(STAMP)
	sh tests/install-system-deps.sh
	$(MAKE) --no-print-directory $(NODE_DEPS)
	scan=$$(mktemp -d) && export CCM_TEST_SCAN_DIR=$$scan; \
	$(PY) -m pytest -q -n 2 --dist worksteal --deselect $(FINAL_SCAN); suite=$$?; \
	$(PY) -m pytest -q $(FINAL_SCAN); final=$$?; \
	rm -rf "$$scan"; [ $$suite = 0 ] && [ $$final = 0 ]

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

# both checks always run; the target fails if either does
lint: $(STAMP)
	$(VENV)/bin/ruff check ccm_wsgi tests conf; ruff=$$?; \
	$(VENV)/bin/mypy ccm_wsgi; mypy=$$?; \
	[ $$ruff = 0 ] && [ $$mypy = 0 ]

bench: $(STAMP)
	sh tests/bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache .hypothesis
