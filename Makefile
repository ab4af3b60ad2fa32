# ftaas: `make run` brings the whole service up; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch; a GPU image installs its own (see Dockerfile.gpu).
TORCH_SPEC ?= torch==2.13.0

.PHONY: install run test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

run: install
	$(VENV)/bin/ftaas serve

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check app worker tests
	$(VENV)/bin/mypy app worker
	$(VENV)/bin/lint-imports
