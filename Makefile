# ccm-wsgi: `make serve` runs the embedded default on 127.0.0.1:8080, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): setup.py | $(PY)
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/ccm-wsgi serve $(if $(CONFIG),-c $(CONFIG))

test: $(STAMP)
	sh tests/install-system-deps.sh
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check ccm_wsgi tests conf
	$(VENV)/bin/mypy --strict ccm_wsgi/config ccm_wsgi/names.py

bench: $(STAMP)
	sh tests/bench/run.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .hypothesis
